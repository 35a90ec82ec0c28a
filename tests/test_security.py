"""Security: no key leaks anywhere, every route but health needs a key, admin routes need an admin key,
teams cannot see each other's usage or cache entries, and oversized requests are refused early."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.sim import Fault, SimConfig

from .conftest import ADMIN_KEY, TEAM_A_KEY, TEAM_B_KEY, UPSTREAM_KEY, Gateway, auth, sim_of
from .workload import run_workload

MODEL = "jina-embeddings-v3"
METRICS_TOKEN = "metrics-token"
SECRETS = {
    "upstream key": UPSTREAM_KEY, "team-a key": TEAM_A_KEY, "team-b key": TEAM_B_KEY,
    "admin key": ADMIN_KEY, "metrics token": METRICS_TOKEN,
}
PUBLIC = {"/healthz", "/readyz"}
# Routes only an admin key (or, for /metrics, the metrics token) may use.
ADMIN_ONLY = re.compile(r"^/(metrics|admin\b|v1/admin\b)")


def routes(app: web.Application) -> Iterator[tuple[str, str]]:
    """(method, path) of every route, path parameters filled in, so new routes are covered automatically."""
    seen = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or re.sub(r"\{[^}]+\}", "x-does-not-exist", info.get("formatter", ""))
        method = "GET" if route.method == "*" else route.method
        if path and (method, path) not in seen:
            seen.add((method, path))
            yield method, path


@dataclass
class Recorder:
    """Every response the workload got: status, headers and body."""

    client: TestClient
    seen: list[tuple[str, str, int, str]] = field(default_factory=list)

    async def call(self, method: str, path: str, key: str | None = None, **kw: Any) -> tuple[int, bytes]:
        headers = {**kw.pop("headers", {}), **(auth(key) if key else {})}
        resp = await self.client.request(method, path, headers=headers, **kw)
        raw = await resp.read()
        self.seen.append((method, path, resp.status, str(dict(resp.headers)) + raw.decode("utf-8", "replace")))
        return resp.status, raw

    async def embed(self, body: Any, key: str = TEAM_A_KEY) -> int:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        status, _ = await self.call("POST", "/v1/embeddings", key, data=data)
        return status


def assert_no_secret(where: str, text: str) -> None:
    for name, secret in SECRETS.items():
        assert secret not in text, f"the {name} appears in {where}"


async def test_no_key_appears_in_any_log_line_metric_or_response(
    gateway: Gateway, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await gateway(
        sim=SimConfig(api_key=UPSTREAM_KEY, latency_base_ms=5),
        cache={"url": redis_url}, state={"url": redis_url},
        upstream={"timeout_s": 0.2, "max_retries": 1},
        limits={"request_timeout_s": 2, "max_body_bytes": 65536, "max_inputs_per_request": 8},
        teams=[
            {"name": "team-a", "keys": [_hash(TEAM_A_KEY)]},
            {"name": "team-b", "keys": [_hash(TEAM_B_KEY)], "models": [MODEL, "jina-embeddings-v5-text-nano"]},
        ],
    )
    sim = sim_of(client)
    rec = Recorder(client)
    statuses: set[int] = set()

    await run_workload(client, sim)  # misses, hits, joined inputs, a retried upstream failure, two teams
    # Every route, with every kind of key and none.
    for method, path in routes(client.app):
        for key in (None, "wrong-key", UPSTREAM_KEY, TEAM_A_KEY, TEAM_B_KEY, ADMIN_KEY, METRICS_TOKEN):
            statuses.add((await rec.call(method, path, key))[0])
    statuses.add((await rec.call("GET", "/v1/no-such-route", TEAM_A_KEY))[0])
    statuses.add((await rec.call("DELETE", "/v1/embeddings", TEAM_A_KEY))[0])
    # Every error path of the embeddings route.
    statuses |= {
        await rec.embed(b"{not json"),
        await rec.embed({"model": MODEL}),
        await rec.embed({"model": MODEL, "input": ["x"] * 9}),
        await rec.embed({"model": MODEL, "input": ["x" * 70000]}),
        await rec.embed({"model": "jina-clip-v2", "input": ["not this model"]}, key=TEAM_B_KEY),
        await rec.embed({"model": MODEL, "input": ["admins do not embed"]}, key=ADMIN_KEY),
        await rec.embed({"model": "no-such-model", "input": ["the upstream refuses it"]}),
    }
    sim.inject(*[Fault("status", status=503)] * 2)
    statuses.add(await rec.embed({"model": MODEL, "input": ["upstream down"]}))
    sim.inject(*[Fault("status", status=429, headers={"Retry-After": "5"})] * 2)
    statuses.add(await rec.embed({"model": MODEL, "input": ["upstream rate limited"]}))
    sim.inject(*[Fault("delay", delay_s=0.5)] * 2)
    statuses.add(await rec.embed({"model": MODEL, "input": ["upstream timing out"]}))
    sim.inject(Fault("malformed"), Fault("close"))
    statuses.add(await rec.embed({"model": MODEL, "input": ["upstream garbage"]}))
    good = sim.config
    sim.config = SimConfig(api_key="the upstream rotated its key")
    statuses.add(await rec.embed({"model": MODEL, "input": ["upstream refuses the gateway's key"]}))
    sim.config = good
    # The usage API: own team, every team, another team, CSV, bad parameters.
    for key, query in [
        (TEAM_A_KEY, {}), (ADMIN_KEY, {}), (TEAM_A_KEY, {"team": "team-b"}), (ADMIN_KEY, {"format": "csv"}),
        (TEAM_B_KEY, {"start": "yesterday"}), (TEAM_B_KEY, {"nope": "1"}),
    ]:
        statuses.add((await rec.call("GET", "/v1/usage", key, params=query))[0])
    _, metrics_text = await rec.call("GET", "/metrics", ADMIN_KEY)

    assert {200, 400, 401, 403, 404, 405, 413, 422, 429, 502, 504} <= statuses, sorted(statuses)
    for method, path, status, text in rec.seen:
        assert_no_secret(f"the {status} answer to {method} {path}", text)
    assert_no_secret("/metrics", metrics_text.decode())
    log_text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert_no_secret("the logs", log_text)
    assert len(caplog.records) > 20  # the access log saw the workload: the check above read something


def _hash(key: str) -> str:
    from gateway.auth import hash_key

    return hash_key(key)


async def test_every_route_but_health_refuses_a_missing_or_wrong_key(gateway: Gateway) -> None:
    client = await gateway()
    checked = 0
    for method, path in routes(client.app):
        if path in PUBLIC:
            assert (await client.request(method, path)).status == 200
            continue
        for headers in ({}, auth("wrong-key"), auth(UPSTREAM_KEY), {"Authorization": TEAM_A_KEY}):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 401, (method, path, headers)
            body = await resp.json()
            assert body["code"] in ("AUTH_MISSING_API_KEY", "AUTH_INVALID_API_KEY") and body["detail"]
        checked += 1
    assert sim_of(client).calls == 0
    assert checked >= 4


async def test_admin_routes_need_an_admin_key(gateway: Gateway) -> None:
    client = await gateway()
    # A team key made over the admin API is a team key like the config file's.
    made = await client.post("/admin/teams", headers=auth(ADMIN_KEY), json={"name": "api-team"})
    assert made.status == 201
    api_key = (await (await client.post("/admin/teams/api-team/keys", headers=auth(ADMIN_KEY))).json())["key"]
    admin_routes = [(m, p) for m, p in routes(client.app) if ADMIN_ONLY.match(p)]
    assert {"/admin/teams", "/admin/audit", "/admin/keys/x-does-not-exist"} <= {p for _, p in admin_routes}
    for method, path in admin_routes:
        for key in (TEAM_A_KEY, TEAM_B_KEY, api_key):
            resp = await client.request(method, path, headers=auth(key))
            assert resp.status == 403, (method, path)
            assert (await resp.json())["code"]
        # An admin key is let through: what may still refuse it is the body it did not send or an unknown id.
        resp = await client.request(method, path, headers=auth(ADMIN_KEY))
        assert resp.status < 400 or (resp.status in (400, 404, 422) and (await resp.json())["code"]), (method, path)


async def test_a_team_cannot_read_another_teams_usage(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=5))
    await run_workload(client, sim_of(client))
    for key, other in ((TEAM_A_KEY, "team-b"), (TEAM_B_KEY, "team-a")):
        resp = await client.get("/v1/usage", params={"team": other}, headers=auth(key))
        assert resp.status == 403 and (await resp.json())["code"] == "USAGE_FORBIDDEN"
        resp = await client.get("/v1/usage", params={"team": f"{other},{'team-a' if other == 'team-b' else 'team-b'}"},
                                headers=auth(key))
        assert resp.status == 403
        own = await client.get("/v1/usage", headers=auth(key))
        assert {row["team"] for row in (await own.json())["data"]} == {"team-b" if other == "team-a" else "team-a"}
        csv = await client.get("/v1/usage", params={"format": "csv", "group_by": "team"}, headers=auth(key))
        assert other not in await csv.text()


async def test_team_scoped_cache_never_answers_one_team_from_anothers_entry(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=30), cache={"scope": "team"})
    sim = sim_of(client)
    texts = [f"shared secret document {i}" for i in range(4)]
    body = orjson.dumps({"model": MODEL, "input": texts})

    async def post(key: str) -> Any:
        resp = await client.post("/v1/embeddings", data=body, headers=auth(key))
        assert resp.status == 200
        await resp.read()
        return resp.headers

    first = await post(TEAM_A_KEY)
    assert first["X-Cache-Misses"] == "4"
    again = await post(TEAM_A_KEY)
    assert again["X-Cache-Hits"] == "4"  # the team's own entries are used
    other = await post(TEAM_B_KEY)
    assert other["X-Cache-Hits"] == "0" and other["X-Cache-Misses"] == "4"
    # Concurrent identical requests of two teams do not share an in-flight upstream call either.
    fresh = orjson.dumps({"model": MODEL, "input": ["in flight for one team only"]})
    sim.reset_counters()
    answers = await asyncio.gather(*(
        client.post("/v1/embeddings", data=fresh, headers=auth(k)) for k in (TEAM_A_KEY, TEAM_B_KEY)
    ))
    for resp in answers:
        await resp.read()
        assert resp.headers["X-Cache-Joined"] == "0" and resp.headers["X-Cache-Misses"] == "1"
    assert sim.inputs == 2


# ---- oversized requests --------------------------------------------------------------------------------


async def _raw(client: TestClient, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[bytes, int]:
    """Sends `head`, then `chunks` until the server answers; returns the answer and the body bytes sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head)
    answered = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        for chunk in chunks:
            if answered.done():
                break
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait([answered, asyncio.ensure_future(writer.drain())], return_when="FIRST_COMPLETED")
        answer = await asyncio.wait_for(answered, 10)
    except ConnectionError:
        answer = await asyncio.wait_for(answered, 10)
    finally:
        writer.close()
    return answer, sent


def _head(client: TestClient, extra: str) -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nAuthorization: Bearer {TEAM_A_KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_oversized_bodies_are_refused_before_being_buffered(gateway: Gateway) -> None:
    client = await gateway(limits={"max_body_bytes": 65536})
    # A declared length over the limit: refused at once, before one body byte is read.
    answer, _ = await _raw(client, _head(client, "Content-Length: 1000000000\r\n"))
    assert _status(answer) == 413 and b'"PAYLOAD_TOO_LARGE"' in answer
    # A chunked body with no declared length: refused once the limit is crossed, not at its end.
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    answer, sent = await _raw(client, _head(client, "Transfer-Encoding: chunked\r\n"), iter([chunk] * 4096))
    assert _status(answer) == 413 and b'"PAYLOAD_TOO_LARGE"' in answer
    assert sent < 4096 * len(chunk), "the gateway read the whole 64 MiB stream"
    assert sim_of(client).calls == 0


@pytest.mark.parametrize(
    ("what", "request_bytes"),
    [
        ("an 100 KB header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"),
        ("an 100 KB Authorization header", b"GET /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
         + b"b" * 100_000 + b"\r\n\r\n"),
        ("an 100 KB URL", b"GET /v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("50,000 headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-H%d: v\r\n" % i for i in range(50_000)) + b"\r\n"),
    ],
)
async def test_oversized_headers_and_urls_get_a_4xx(gateway: Gateway, what: str, request_bytes: bytes) -> None:
    client = await gateway()
    answer, _ = await _raw(client, request_bytes)
    assert 400 <= _status(answer) < 500, (what, answer[:100])


async def test_too_many_inputs_are_refused_before_any_upstream_work(gateway: Gateway) -> None:
    client = await gateway(
        limits={"max_inputs_per_request": 100},
        teams=[{"name": "team-a", "keys": [_hash(TEAM_A_KEY)], "max_inputs_per_request": 10}],
    )
    for n, status in ((10, 200), (11, 422), (101, 422), (100_000, 422)):
        resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"] * n}, headers=auth())
        assert resp.status == status, n
        if status == 422:
            body = await resp.json()
            assert body["code"] == "VALIDATION_ERROR" and body["errors"][0]["field"] == "input"
    assert sim_of(client).inputs == 1


async def test_a_team_cannot_reach_another_teams_files_or_batches(gateway: Gateway, redis_url: str) -> None:
    """Every route that takes a file or batch id, enumerated from the router: another team's key gets 404 for
    each (reads, streams and deletes alike), its lists show nothing, and the owner still has everything."""
    import dataclasses
    import io

    import aiohttp

    from gateway import config as cfg

    if "batch" not in {f.name for f in dataclasses.fields(cfg.Config)}:
        pytest.skip("the batch API is not part of this build")
    client = await gateway(state={"url": redis_url}, cache={"url": redis_url}, batch={"workers": 0})
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    line = {"custom_id": "a-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "team a's text"}}
    form.add_field("file", io.BytesIO(orjson.dumps(line) + b"\n"), filename="a.jsonl")
    resp = await client.post("/v1/files", data=form, headers=auth(TEAM_A_KEY))
    assert resp.status == 200, await resp.text()
    file_id = (await resp.json())["id"]
    resp = await client.post("/v1/batch/embeddings", headers=auth(TEAM_A_KEY),
                             data=orjson.dumps({"model": MODEL, "input_file_id": file_id}))
    assert resp.status == 202, await resp.text()
    batch_id = (await resp.json())["id"]
    ids = {"file_id": file_id, "batch_id": batch_id}

    owned = []
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        formatter = info.get("formatter", "")
        if route.method == "HEAD" or not any(f"{{{name}}}" in formatter for name in ids):
            continue
        owned.append((route.method, formatter.format(**ids)))
    assert owned, "no route takes a file or batch id"
    for method, path in sorted(owned, key=lambda mp: mp[0] == "DELETE"):  # deletes last
        resp = await client.request(method, path, headers=auth(TEAM_B_KEY))
        assert resp.status == 404, (method, path, resp.status)
        assert (await resp.json())["code"] == "NOT_FOUND"
    for method, path in owned:
        if method == "GET" and path.count("/") == 3:  # the object itself is still the owner's
            assert (await client.get(path, headers=auth(TEAM_A_KEY))).status == 200, path
    for method, path in routes(client.app):
        if method == "GET" and "{" not in path and path.startswith("/v1/") and path != "/v1/usage":
            text = await (await client.get(path, headers=auth(TEAM_B_KEY))).text()  # lists: /v1/batches, ...
            assert file_id not in text and batch_id not in text, path
