"""The Batch API end to end: files, jobs, output and errors streams, cancel, limits, teams, the cache."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway.auth import hash_key
from gateway.errors import QuotaExceeded
from gateway.jobs import Job
from gateway.sim import Fault, SimConfig, Simulator

from .clock import FakeClock
from .conftest import ADMIN_KEY, TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, sim_of

MODEL = "jina-embeddings-v3"
STORES = ["memory", "redis"]


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)


def line(custom_id: str, inputs: Any, **fields: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"input": inputs, **fields}}


def text(i: int, tag: str = "doc") -> str:
    return f"{tag} {i}: the quick brown fox jumps over the lazy dog"


async def start(gateway: Gateway, store: str, redis_url: str | None = None, **overrides: Any) -> TestClient:
    if store == "redis":
        assert redis_url is not None
        overrides = {"state": {"url": redis_url}, "cache": {"url": redis_url}, **overrides}
    return await gateway(**overrides)


async def upload(client: TestClient, content: bytes, key: str = TEAM_A_KEY, purpose: str = "batch") -> Any:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", io.BytesIO(content), filename="lines.jsonl", content_type="application/jsonl")
    resp = await client.post("/v1/files", data=form, headers=auth(key))
    return resp.status, await resp.json()


async def submit(client: TestClient, body: dict[str, Any], key: str = TEAM_A_KEY) -> tuple[int, Any]:
    resp = await client.post("/v1/batch/embeddings", data=orjson.dumps(body), headers=auth(key))
    return resp.status, await resp.json()


async def run_file(client: TestClient, rows: list[Any], **job: Any) -> Job:
    status, file = await upload(client, jsonl(rows))
    assert status == 200, file
    status, created = await submit(client, {"model": MODEL, "input_file_id": file["id"], **job})
    assert status == 202, created
    return await settled(client, created["id"])


async def settled(client: TestClient, job_id: str, team: str = "team-a") -> Job:
    job = await asyncio.wait_for(client.app[K.BATCH_WORKER].settled(team, job_id), 60)
    assert job is not None
    return job


async def stream(client: TestClient, job_id: str, which: str = "output", key: str = TEAM_A_KEY) -> list[Any]:
    resp = await client.get(f"/v1/batch/{job_id}/{which}", headers=auth(key))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/jsonl"
    return [orjson.loads(x) for x in (await resp.read()).splitlines()]


async def sync(client: TestClient, body: dict[str, Any]) -> bytes:
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, **body}), headers=auth())
    assert resp.status == 200
    return await resp.read()


# ---- files -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_file_upload_read_delete_and_other_teams_see_nothing(
    gateway: Gateway, redis_url: str, store: str
) -> None:
    client = await start(gateway, store, redis_url)
    content = jsonl([line("a", "x"), line("b", "y")]) + b"\n"
    status, file = await upload(client, content)
    assert status == 200
    assert file["object"] == "file" and file["purpose"] == "batch" and file["filename"] == "lines.jsonl"
    assert file["bytes"] == len(content) and file["lines"] == 2
    assert file["expires_at"] == file["created_at"] + 24 * 3600
    url = f"/v1/files/{file['id']}"
    assert await (await client.get(url, headers=auth())).json() == file
    assert await (await client.get(url + "/content", headers=auth())).read() == content
    for method, path in (("GET", url), ("GET", url + "/content"), ("DELETE", url)):
        resp = await client.request(method, path, headers=auth(TEAM_B_KEY))
        assert resp.status == 404 and (await resp.json())["code"] == "NOT_FOUND"
    resp = await client.delete(url, headers=auth())
    assert resp.status == 200 and (await resp.json())["deleted"] is True
    assert (await client.get(url, headers=auth())).status == 404


async def test_file_upload_limits(gateway: Gateway) -> None:
    client = await gateway(batch={"max_lines_per_file": 3, "max_file_bytes": 400})
    assert (await upload(client, jsonl([line("a", "x")]), purpose="fine-tune"))[0] == 422
    status, body = await upload(client, jsonl([line(str(i), "x") for i in range(4)]))
    assert status == 422 and "4 lines" in body["detail"]
    status, body = await upload(client, b"\n \n")
    assert status == 422 and "0 lines" in body["detail"]
    status, body = await upload(client, jsonl([line("a", "x" * 500)]))
    assert status == 413 and body["code"] == "PAYLOAD_TOO_LARGE"
    resp = await client.post("/v1/files", data=b"{}", headers={**auth(), "Content-Type": "application/json"})
    assert resp.status == 400
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("purpose", "batch")
    assert (await client.post("/v1/files", data=form, headers=auth())).status == 422  # no file


# ---- jobs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
async def test_job_output_is_the_synchronous_answer_of_each_line(
    gateway: Gateway, redis_url: str, store: str
) -> None:
    client = await start(gateway, store, redis_url, batch={"chunk_lines": 3})
    rows = [
        line("one", text(1)),
        line("list", [text(2), text(3), text(2)]),
        line("b64", text(4), embedding_type="base64"),
        line("dims", [text(1), text(5)], dimensions=64, task="retrieval.query"),
        line("openai", text(6), encoding_format="base64"),
        line("bits", text(7), embedding_type="ubinary"),
        line("late", [text(8), text(9)], late_chunking=True),
        {"custom_id": "other-model", "body": {"input": text(1), "model": "jina-embeddings-v4"}},
    ]
    job = await run_file(client, rows)
    assert job.status == "completed"
    assert (job.total, job.completed, job.failed) == (8, 8, 0)
    out = await stream(client, job.id)
    assert [o["custom_id"] for o in out] == [r["custom_id"] for r in rows]
    assert await stream(client, job.id, "errors") == []
    sim = sim_of(client)
    sim.reset_counters()
    for row, got in zip(rows, out, strict=True):
        assert got["response"]["status_code"] == 200
        want = await sync(client, row["body"])
        assert orjson.dumps(got["response"]["body"]) == orjson.dumps(orjson.loads(want))
    assert sim.calls == 0  # every line's inputs were cached by the job


async def test_jina_inline_form_and_job_fields(gateway: Gateway) -> None:
    client = await gateway()
    status, created = await submit(client, {"model": MODEL, "input": [line("a", "x y"), line("b", "z")]})
    assert status == 202
    assert created["status"] == "validating" and created["object"] == "batch"
    assert created["endpoint"] == "/v1/embeddings" and created["completion_window"] == "24h"
    assert created["input_file_id"] is None
    assert created["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    job = await settled(client, created["id"])
    body = await (await client.get(f"/v1/batch/{job.id}", headers=auth())).json()
    assert body["status"] == "completed"
    assert body["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert body["created_at"] <= body["in_progress_at"] <= body["completed_at"]
    assert body["expires_at"] == body["completed_at"] + 24 * 3600
    assert [o["custom_id"] for o in await stream(client, job.id)] == ["a", "b"]


async def test_malformed_lines_go_to_the_errors_stream_with_line_and_reason(gateway: Gateway) -> None:
    client = await gateway(teams=[{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "models": [MODEL]}])
    rows: list[Any] = [
        line("ok-1", text(1)),
        b'{"custom_id": "broken", "body": ',  # line 2: not JSON
        line("ok-2", text(2)),
        {"body": {"input": "x"}},  # line 4: no custom_id
        {"custom_id": "get", "method": "GET", "body": {"input": "x"}},
        {"custom_id": "url", "url": "/v1/chat/completions", "body": {"input": "x"}},
        {"custom_id": "no-body"},
        line("empty", []),
        line("model", text(3), model="jina-clip-v2"),
        b"",  # blank lines are skipped but counted, like an editor counts them
        line("ok-3", text(3)),
    ]
    job = await run_file(client, rows)
    assert job.status == "completed"
    assert (job.total, job.completed, job.failed) == (10, 3, 7)
    assert [o["custom_id"] for o in await stream(client, job.id)] == ["ok-1", "ok-2", "ok-3"]
    errors = {e["error"]["line"]: e for e in await stream(client, job.id, "errors")}
    assert sorted(errors) == [2, 4, 5, 6, 7, 8, 9]
    assert errors[2]["custom_id"] is None and errors[2]["error"]["code"] == "INVALID_JSON"
    assert errors[4]["custom_id"] is None and "custom_id" in errors[4]["error"]["message"]
    assert errors[5]["custom_id"] == "get" and "method" in errors[5]["error"]["message"]
    assert errors[6]["custom_id"] == "url" and "url" in errors[6]["error"]["message"]
    assert errors[7]["custom_id"] == "no-body" and "body" in errors[7]["error"]["message"]
    assert errors[8]["custom_id"] == "empty" and errors[8]["error"] == {
        "code": "VALIDATION_ERROR", "message": "input: must not be empty", "line": 8
    }
    assert errors[9]["error"]["code"] == "MODEL_NOT_ALLOWED"


async def test_a_job_of_only_malformed_lines_fails_at_once(gateway: Gateway) -> None:
    client = await gateway()
    status, created = await submit(client, {"model": MODEL, "input": [{"custom_id": "a"}, line("b", "")]})
    assert status == 202
    assert created["status"] == "failed" and created["failed_at"] == created["created_at"]
    assert created["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    assert "errors stream" in created["errors"]["data"][0]["message"]
    assert [e["error"]["line"] for e in await stream(client, created["id"], "errors")] == [1, 2]
    assert sim_of(client).calls == 0


@pytest.mark.parametrize("form", ["file", "inline"])
async def test_duplicate_custom_ids_are_refused(gateway: Gateway, form: str) -> None:
    client = await gateway()
    rows = [line("a", "x"), line("b", "y"), {"custom_id": "a", "body": {}}]
    if form == "file":
        _, file = await upload(client, jsonl(rows))
        status, body = await submit(client, {"model": MODEL, "input_file_id": file["id"]})
    else:
        status, body = await submit(client, {"model": MODEL, "input": rows})
    assert status == 422
    assert body["detail"].endswith("duplicate custom_id 'a' on lines 1 and 3")


async def test_job_request_validation(gateway: Gateway) -> None:
    client = await gateway()
    _, file = await upload(client, jsonl([line("a", "x")]))
    fid = file["id"]
    cases = [
        ({"input_file_id": fid}, "model"),
        ({"model": MODEL}, "input_file_id"),
        ({"model": MODEL, "input_file_id": fid, "input": []}, "input_file_id"),
        ({"model": MODEL, "input_file_id": fid, "endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"model": MODEL, "input_file_id": fid, "completion_window": "soon"}, "completion_window"),
        ({"model": MODEL, "input_file_id": fid, "completion_window": "0h"}, "completion_window"),
        ({"model": MODEL, "input_file_id": fid, "completion_window": "721h"}, "completion_window"),
        ({"model": MODEL, "input_file_id": fid, "completion_window": 24}, "completion_window"),
        ({"model": MODEL, "input": []}, "input"),
    ]
    for body, field in cases:
        status, answer = await submit(client, body)
        assert status == 422, body
        assert answer["errors"][0]["field"] == field
    for window in ("1h", "720h"):
        status, answer = await submit(client, {"model": MODEL, "input_file_id": fid, "completion_window": window})
        assert status == 202 and answer["completion_window"] == window
    status, answer = await submit(client, {"model": MODEL, "input_file_id": "file-nope"})
    assert status == 404
    status, answer = await submit(client, {"model": MODEL, "input_file_id": fid}, key=TEAM_B_KEY)
    assert status == 404  # another team's file


async def test_jobs_are_private_to_their_team(gateway: Gateway) -> None:
    client = await gateway(batch={"workers": 0})
    _, created = await submit(client, {"model": MODEL, "input": [line("a", "x")]})
    base = f"/v1/batch/{created['id']}"
    for method, path in (("GET", base), ("DELETE", base), ("GET", base + "/output"), ("GET", base + "/errors")):
        resp = await client.request(method, path, headers=auth(TEAM_B_KEY))
        assert resp.status == 404, path
    listed = await (await client.get("/v1/batches", headers=auth(TEAM_B_KEY))).json()
    assert listed["data"] == []
    resp = await client.get(base, headers=auth(ADMIN_KEY))
    assert resp.status == 403


@pytest.mark.parametrize("store", STORES)
async def test_active_job_limit_and_cancel_of_a_queued_job(gateway: Gateway, redis_url: str, store: str) -> None:
    client = await start(gateway, store, redis_url, batch={"workers": 0, "max_active_jobs_per_team": 2})
    ids = []
    for i in range(2):
        status, created = await submit(client, {"model": MODEL, "input": [line("a", f"x{i}")]})
        assert status == 202
        ids.append(created["id"])
    status, body = await submit(client, {"model": MODEL, "input": [line("a", "x")]})
    assert status == 429 and body["code"] == "TOO_MANY_BATCH_JOBS"
    assert (await submit(client, {"model": MODEL, "input": [line("a", "x")]}, key=TEAM_B_KEY))[0] == 202
    resp = await client.delete(f"/v1/batch/{ids[0]}", headers=auth())
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "cancelled"  # nobody ran it: cancelled at once
    assert body["cancelled_at"] is not None and body["request_counts"]["completed"] == 0
    assert (await submit(client, {"model": MODEL, "input": [line("a", "x")]}))[0] == 202  # the slot is free
    assert await stream(client, ids[0]) == []


@pytest.mark.parametrize("store", STORES)
async def test_list_batches_newest_first_with_pages(gateway: Gateway, redis_url: str, store: str) -> None:
    client = await start(gateway, store, redis_url, batch={"workers": 0, "max_active_jobs_per_team": 10})
    ids = []
    for i in range(5):
        ids.append((await submit(client, {"model": MODEL, "input": [line("a", f"x{i}")]}))[1]["id"])
    page = await (await client.get("/v1/batches?limit=3", headers=auth())).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:3]
    assert page["has_more"] is True and page["last_id"] == ids[2]
    rest = await (await client.get(f"/v1/batches?limit=3&after={ids[2]}", headers=auth())).json()
    assert [j["id"] for j in rest["data"]] == [ids[1], ids[0]] and rest["has_more"] is False
    assert (await client.get("/v1/batches?limit=0", headers=auth())).status == 422


# ---- the cache, priority and quota -----------------------------------------------------------------------


@pytest.mark.slow
async def test_ten_thousand_lines_with_30_percent_cached_send_only_the_new_inputs(
    gateway: Gateway, redis_url: str
) -> None:
    client = await start(gateway, "redis", redis_url)
    sim = sim_of(client)
    texts = [text(i) for i in range(10_000)]
    old = set(range(0, 10_000, 10)) | set(range(1, 10_000, 10)) | set(range(2, 10_000, 10))  # 30%
    old_texts = [texts[i] for i in sorted(old)]
    for i in range(0, len(old_texts), 1000):
        await sync(client, {"input": old_texts[i : i + 1000]})
    sim.reset_counters()

    job = await run_file(client, [line(f"id-{i}", t, embedding_type="base64") for i, t in enumerate(texts)])
    assert job.status == "completed" and (job.completed, job.failed) == (10_000, 0)
    new_texts = [t for i, t in enumerate(texts) if i not in old]
    assert sim.inputs == 7000
    assert sorted(x for r in sim.requests for x in r["input"]) == sorted(new_texts)
    assert sim.tokens == sum(sim.token_count(t) for t in new_texts)

    out = await stream(client, job.id)
    assert [o["custom_id"] for o in out] == [f"id-{i}" for i in range(10_000)]
    sim.reset_counters()
    for i in range(0, 10_000, 2000):
        want = orjson.loads(await sync(client, {"input": texts[i : i + 2000], "embedding_type": "base64"}))
        got = [o["response"]["body"]["data"][0]["embedding"] for o in out[i : i + 2000]]
        assert got == [d["embedding"] for d in want["data"]]
    assert sim.calls == 0
    usage = sum(o["response"]["body"]["usage"]["total_tokens"] for o in out)
    assert usage == sum(sim.token_count(t) for t in texts)


async def test_a_job_leaves_the_hot_tier_to_interactive_traffic(gateway: Gateway, redis_url: str) -> None:
    warm = await start(gateway, "redis", redis_url)
    texts = [text(i) for i in range(20)]
    await sync(warm, {"input": texts})  # now in Redis
    client = await start(gateway, "redis", redis_url)  # another replica: its hot tier is empty
    hot = client.app[K.CACHE].local
    assert hot.bytes == 0
    job = await run_file(client, [line(str(i), t) for i, t in enumerate(texts)])
    assert job.completed == 20 and sim_of(client).calls == 0  # all from Redis
    assert hot.bytes == 0  # a re-index does not push interactive entries out
    await sync(client, {"input": texts})
    assert hot.bytes > 0


async def test_over_quota_the_job_waits_for_the_window(gateway: Gateway) -> None:
    client = await gateway(batch={"chunk_lines": 10})
    refusals = [QuotaExceeded("tokens_per_minute", 7, "over quota", code="QUOTA_EXCEEDED")] * 2
    client.app[K.SERVICE].admission = Admission(refusals)
    slept = fake_sleep(client)
    job = await run_file(client, [line(str(i), text(i)) for i in range(25)])
    assert job.status == "completed" and (job.completed, job.failed) == (25, 0)
    assert slept == [7, 7]
    assert sim_of(client).inputs == 25


async def test_the_real_quota_makes_a_job_wait_for_the_window_not_fail(gateway: Gateway) -> None:
    clock = FakeClock()
    team = {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "quota": {"tokens_per_minute": 600}}
    client = await gateway(clock=clock, teams=[team], batch={"chunk_lines": 10, "chunks_in_flight": 1})
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the worker waits Retry-After: the quota's clock moves on
        slept.append(seconds)
        clock.advance(seconds)

    client.app[K.BATCH_WORKER].sleep = sleep
    job = await run_file(client, [line(str(i), text(i)) for i in range(100)])  # ~1,500 estimated tokens
    assert job.status == "completed" and (job.completed, job.failed) == (100, 0)
    assert slept and all(s >= 1 for s in slept)  # it waited (more than one minute's quota) and never failed
    assert sim_of(client).inputs == 100


async def test_upstream_failures_are_retried_then_reported_per_line(gateway: Gateway) -> None:
    client = await gateway(batch={"max_attempts": 2, "chunk_lines": 5})
    sim = sim_of(client)
    slept = fake_sleep(client)
    sim.inject(*[Fault("status", 503)] * 4)  # one service call's worth: the worker tries it again
    job = await run_file(client, [line(str(i), text(i)) for i in range(5)])
    assert (job.completed, job.failed) == (5, 0) and len(slept) == 1
    sim.inject(*[Fault("status", 503)] * 8)  # two calls' worth: the lines fail, with the reason
    job = await run_file(client, [line(str(i), text(i, "new")) for i in range(5)])
    assert job.status == "completed" and (job.completed, job.failed) == (0, 5)
    errors = await stream(client, job.id, "errors")
    assert [e["error"]["code"] for e in errors] == ["UPSTREAM_ERROR"] * 5
    assert [e["error"]["line"] for e in errors] == [1, 2, 3, 4, 5]


async def test_an_input_the_upstream_refuses_fails_only_its_line(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(max_tokens_per_input=50))
    long = " ".join(["word"] * 100)
    job = await run_file(client, [line("a", text(1)), line("b", [text(2), long]), line("c", text(3))])
    assert (job.completed, job.failed) == (2, 1)
    assert [o["custom_id"] for o in await stream(client, job.id)] == ["a", "c"]
    (error,) = await stream(client, job.id, "errors")
    assert error["custom_id"] == "b" and error["error"]["code"] == "VALIDATION_ERROR"
    assert error["error"]["line"] == 2 and "exceed" in error["error"]["message"]


async def test_while_interactive_requests_come_in_a_job_works_in_small_steps(gateway: Gateway) -> None:
    client = await gateway(batch={"chunk_lines": 50, "yield_quiet_s": 3600, "yield_step_lines": 10,
                                  "yield_cpu_share": 1.0})  # share 1: no pauses, so nothing here is timed
    sim = sim_of(client)
    job = await run_file(client, [line(str(i), text(i, "idle")) for i in range(100)])
    assert job.completed == 100
    # Idle (the job's own calls do not count as interactive work): one call per chunk.
    assert sorted(len(r["input"]) for r in sim.requests) == [50, 50]
    await sync(client, {"input": "an interactive request"})
    sim.reset_counters()
    job = await run_file(client, [line(str(i), text(i, "busy")) for i in range(100)])
    assert job.completed == 100
    assert [len(r["input"]) for r in sim.requests] == [10] * 10
    assert [o["custom_id"] for o in await stream(client, job.id)] == [str(i) for i in range(100)]


class Admission:
    """Refuses with the given errors first, then admits everything."""

    def __init__(self, refusals: list[QuotaExceeded]) -> None:
        self.refusals = list(refusals)

    def applies(self, team: Any) -> bool:
        return True

    async def reserve(self, team: Any, *, estimate_tokens: int, cached_tokens: int, model: str = "") -> object:
        if self.refusals:
            raise self.refusals.pop(0)
        return object()

    async def reconcile(self, reservation: object, *, actual_tokens: int, actual_cost_usd: float = 0.0) -> None:
        return None


def fake_sleep(client: TestClient) -> list[float]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    client.app[K.BATCH_WORKER].sleep = sleep
    return slept


# ---- cancel, crash, shutdown -----------------------------------------------------------------------------


class Gate:
    """The sim's latency sleep: lets `calls` upstream calls through, then holds the rest until `open()`, so a
    test stops a job at a line count of its choosing."""

    def __init__(self, calls: int) -> None:
        self.left = calls
        self.opened = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        if self.left > 0:
            self.left -= 1
            return
        await self.opened.wait()

    def open(self) -> None:
        self.opened.set()


def gated(calls: int) -> tuple[Simulator, Gate]:
    gate = Gate(calls)
    return Simulator(SimConfig(latency_base_ms=1), sleep=gate), gate


async def progress(client: TestClient, job_id: str, done: int, *, status: str = "in_progress") -> Any:
    """Polls the job until `done` lines are committed and it has `status` (bounded: 30 s)."""
    for _ in range(3000):
        body = await (await client.get(f"/v1/batch/{job_id}", headers=auth())).json()
        if body["request_counts"]["completed"] == done and body["status"] == status:
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} did not reach {done} lines: {body}")


@pytest.mark.parametrize("store", STORES)
async def test_cancel_half_way_keeps_the_done_lines(gateway: Gateway, redis_url: str, store: str) -> None:
    # One chunk at a time, so one upstream call per 50-line chunk: the sim answers 20 of them (1000 lines).
    simulator, gate = gated(20)
    client = await start(gateway, store, redis_url, simulator=simulator,
                         batch={"chunk_lines": 50, "chunks_in_flight": 1, "heartbeat_s": 0.2})
    rows = [line(f"id-{i}", text(i)) for i in range(2000)]
    _, file = await upload(client, jsonl(rows))
    _, created = await submit(client, {"model": MODEL, "input_file_id": file["id"]})
    await progress(client, created["id"], 1000)
    resp = await client.delete(f"/v1/batch/{created['id']}", headers=auth())
    assert resp.status == 200 and (await resp.json())["status"] == "cancelling"
    for _ in range(50):  # the bound: cancelled within 5 s
        body = await (await client.get(f"/v1/batch/{created['id']}", headers=auth())).json()
        if body["status"] == "cancelled":
            break
        await asyncio.sleep(0.1)
    assert body["status"] == "cancelled" and body["cancelled_at"] is not None
    assert body["request_counts"] == {"total": 2000, "completed": 1000, "failed": 0}
    out = await stream(client, created["id"])
    assert [o["custom_id"] for o in out] == [f"id-{i}" for i in range(1000)]
    assert await stream(client, created["id"], "errors") == []
    gate.open()  # the held call lands (in the cache) before the app closes


@pytest.mark.parametrize("store", STORES)
async def test_past_its_completion_window_a_job_fails_keeping_the_lines_done(
    gateway: Gateway, redis_url: str, store: str
) -> None:
    simulator, gate = gated(2)  # chunks 0 and 1 are answered, chunk 2's call is held
    client = await start(gateway, store, redis_url, simulator=simulator,
                         batch={"chunk_lines": 50, "chunks_in_flight": 1, "heartbeat_s": 0.2})
    rows = [line(f"id-{i}", text(i)) for i in range(200)]
    _, created = await submit(client, {"model": MODEL, "input": rows, "completion_window": "2h"})
    await progress(client, created["id"], 100)
    worker = client.app[K.BATCH_WORKER]
    worker.clock = lambda: created["created_at"] + 2 * 3600  # the window ends while chunk 2 waits upstream
    job = await settled(client, created["id"])
    assert job.status == "failed" and job.failed_at == created["created_at"] + 2 * 3600
    assert (job.total, job.completed, job.failed) == (200, 100, 100)
    body = await (await client.get(f"/v1/batch/{job.id}", headers=auth())).json()
    assert body["errors"]["data"][0]["code"] == "BATCH_EXPIRED"
    assert [o["custom_id"] for o in await stream(client, job.id)] == [f"id-{i}" for i in range(100)]
    errors = await stream(client, job.id, "errors")  # every custom_id once, in output or errors
    assert [(e["custom_id"], e["error"]["line"]) for e in errors] == [(f"id-{i}", i + 1) for i in range(100, 200)]
    assert {e["error"]["code"] for e in errors} == {"BATCH_EXPIRED"}
    assert "2h completion_window" in errors[0]["error"]["message"]
    gate.open()


async def test_a_job_claimed_after_its_completion_window_runs_nothing(gateway: Gateway) -> None:
    client = await gateway(batch={"chunk_lines": 2})
    client.app[K.BATCH_WORKER].clock = lambda: time.time() + 3600  # claimed an hour late
    _, created = await submit(client, {"model": MODEL, "input": [line(str(i), text(i)) for i in range(5)],
                                       "completion_window": "1h"})
    job = await settled(client, created["id"])
    assert job.status == "failed" and (job.completed, job.failed) == (0, 5)
    assert [e["error"]["code"] for e in await stream(client, job.id, "errors")] == ["BATCH_EXPIRED"] * 5
    assert sim_of(client).calls == 0


async def test_a_dead_workers_job_is_resumed_from_its_checkpoint_by_another_replica(
    gateway: Gateway, redis_url: str
) -> None:
    fast = {"chunk_lines": 50, "chunks_in_flight": 2, "lease_s": 0.6, "heartbeat_s": 0.2, "poll_s": 0.05}
    simulator, gate = gated(2)  # chunks 0 and 1 are answered, chunk 2's call is held
    first = await start(gateway, "redis", redis_url, simulator=simulator, batch=fast)
    rows = [line(f"id-{i}", text(i)) for i in range(1500)]
    _, file = await upload(first, jsonl(rows))
    _, created = await submit(first, {"model": MODEL, "input_file_id": file["id"]})
    await progress(first, created["id"], 100)

    worker = first.app[K.BATCH_WORKER]

    async def dead(*_: Any) -> None:  # a crash gives nothing back: the lease must run out
        return None

    worker.store.release = dead  # type: ignore[method-assign]
    await worker.stop()
    gate.open()
    await first.app[K.COALESCER].close()  # calls already sent land in the cache, as they would upstream
    left_at = await worker.store.get_job("team-a", created["id"])
    assert left_at is not None and left_at.status == "in_progress" and left_at.completed == 100

    second = await start(gateway, "redis", redis_url, batch=fast)
    job = await settled(second, created["id"])
    assert job.status == "completed" and (job.completed, job.failed) == (1500, 0)
    out = await stream(second, created["id"])
    assert [o["custom_id"] for o in out] == [f"id-{i}" for i in range(1500)]
    sims = [simulator, sim_of(second)]
    assert sum(s.inputs for s in sims) == 1500  # nothing was sent twice
    assert sum(s.tokens for s in sims) == sum(simulator.token_count(text(i)) for i in range(1500))


async def test_stop_gives_the_leases_back_at_once(gateway: Gateway, redis_url: str) -> None:
    simulator, gate = gated(0)
    client = await start(gateway, "redis", redis_url, simulator=simulator)
    _, created = await submit(client, {"model": MODEL, "input": [line(str(i), text(i)) for i in range(400)]})
    await progress(client, created["id"], 0)  # claimed, its first call held upstream
    worker = client.app[K.BATCH_WORKER]
    # Bounded, not timed: a cancellation redis-py swallows (one landing while it connects) once made this
    # wait for the held upstream call's timeout.
    await asyncio.wait_for(worker.stop(), 30)
    await worker.stop()  # idempotent
    job = await worker.store.claim("team-a", created["id"], "another-replica", 0)
    assert job is not None and job.status == "in_progress" and job.completed == 0
    gate.open()
