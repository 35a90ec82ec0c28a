"""Faults under load: a misbehaving upstream, a Redis killed and restarted, clients that go away or dawdle.

For each: every request ends by its deadline (a generous outer bound catches hangs), errors carry the
documented status and JSON shape, nothing wrong is cached, no task or descriptor is left behind, and the
gateway serves normally again once the fault ends. Each fault's tally is printed at the end of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.sim import Fault, SimConfig, Simulator, start_sim

from .conftest import ADMIN_KEY, TEAM_A_KEY, base_config, merge, until
from .redis_server import RedisServer
from .reliability import Answer, Resources, assert_error_shape, fire, record, resources, tally, vectors_of

MODEL = "jina-embeddings-v3"
DEADLINE_S = 3.0
# Generous: a request still unanswered this long after its deadline has hung.
OUTER_S = DEADLINE_S + 10
MAX_CONCURRENCY = 2  # upstream calls in flight: bounds the pooled upstream connections a snapshot may see
MAX_RETRIES = 3
REFERENCE = Simulator(SimConfig())  # the vectors a healthy upstream gives, for checking every 200

UPSTREAM_DOWN = {502: {"UPSTREAM_ERROR"}, 504: {"UPSTREAM_TIMEOUT"}}


@dataclass
class Rig:
    """A gateway app on a real port, its upstream simulator on another, and what a test needs of both."""

    client: TestClient
    sim: Simulator
    sim_runner: web.AppRunner
    release: asyncio.Event  # a hung upstream answer ("delay" fault) waits for this
    hanging: asyncio.Event  # set when the upstream starts hanging on a "delay" fault
    ports: dict[int, str]

    @property
    def url(self) -> str:
        return str(self.client.make_url("/v1/embeddings"))

    async def load(
        self, bodies: list[dict[str, Any]], concurrency: int = 32, halfway: asyncio.Event | None = None
    ) -> list[Answer]:
        return await fire(
            self.url, bodies, TEAM_A_KEY, outer_timeout_s=OUTER_S, concurrency=concurrency, halfway=halfway
        )

    async def load_usage(self) -> Answer:
        """`GET /v1/usage` of every team (admin key), answered whatever its status."""
        async with aiohttp.ClientSession() as session, session.get(
            str(self.client.make_url("/v1/usage")), headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())

    async def settle(self) -> Resources:
        """Waits until the gateway is idle (no flight, no open client connection), then takes a snapshot."""
        coalescer = self.client.app[K.COALESCER]
        await coalescer.close()  # returns once every upstream call the coalescer owns has finished
        server = self.client.server.runner.server  # type: ignore[union-attr]
        for _ in range(500):
            # Closed connections are noticed, and released upstream answers written, within a few loop turns.
            snap = resources(self.ports)
            if not server.connections and snap.handlers <= snap.sockets["upstream"] // 2:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        assert not server.connections, "client connections left open on the gateway"  # type: ignore[union-attr]
        assert coalescer.pending_inputs == 0
        assert not coalescer._groups, "a batch group outlived its flights"
        return snap


def assert_no_leak(before: Resources, after: Resources) -> None:
    assert after.files == before.files, f"non-socket descriptors leaked: {before} → {after}"
    assert after.sockets["gateway"] == 0, after
    # pooled keep-alive connections to the upstream: both ends live in this process, and the simulator
    # holds one handler task for each
    assert after.sockets["upstream"] <= 2 * MAX_CONCURRENCY, after
    assert after.handlers <= after.sockets["upstream"] // 2, after
    # A leak is growth. "before" may catch a short-lived task finishing (a usage flush, a write-behind), so
    # fewer tasks after is not a failure.
    assert after.tasks <= before.tasks, f"tasks leaked: {before} → {after}"


@pytest.fixture
async def rig_factory(aiohttp_client: Any) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    runners: list[web.AppRunner] = []
    releases: list[asyncio.Event] = []

    async def make(**overrides: Any) -> Rig:
        release, hanging = asyncio.Event(), asyncio.Event()
        releases.append(release)

        async def gated_sleep(seconds: float) -> None:
            # A "delay" fault hangs the upstream until the test releases it (or the delay passes).
            hanging.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), seconds)

        sim = Simulator(SimConfig(), sleep=gated_sleep)
        sim_runner, sim_url = await start_sim(sim)
        runners.append(sim_runner)
        data = base_config(**merge({
            "upstream": {
                "url": sim_url, "timeout_s": 0.5, "max_retries": MAX_RETRIES, "backoff_base_s": 0.01,
                "backoff_max_s": 0.05, "limits": {"max_concurrency": MAX_CONCURRENCY},
            },
            "limits": {"request_timeout_s": DEADLINE_S},
        }, overrides))
        client: TestClient = await aiohttp_client(create_app(cfg.build(cfg.Config, data, "")))
        ports = {client.port: "gateway", sim_runner.addresses[0][1]: "upstream"}  # type: ignore[dict-item]
        return Rig(client, sim, sim_runner, release, hanging, ports)

    yield make
    for release in releases:
        release.set()
    for runner in runners:
        await runner.cleanup()


def bodies(tag: str, requests: int, per_request: int = 3, distinct: int = 30) -> list[dict[str, Any]]:
    """`requests` bodies over `distinct` texts, overlapping, so batches mix callers and share inputs."""
    texts = [f"{tag} text {i}: the quick brown fox" for i in range(distinct)]
    return [
        {"model": MODEL, "input": [texts[(r * per_request + j) % distinct] for j in range(per_request)]}
        for r in range(requests)
    ]


def assert_right(answers: list[Answer], sent: list[dict[str, Any]]) -> None:
    """Every answer is a 200 whose vectors are exactly the healthy upstream's."""
    for answer, body in zip(answers, sent, strict=True):
        assert answer.status == 200, answer.what
        expected, _ = REFERENCE.embed(body)
        got = vectors_of(answer)
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


# The upstream's faults: (name, the fault, the status clients get when it lasts, how many a burst
# may have that the retries absorb)
UPSTREAM_FAULTS = [
    ("upstream 5xx", Fault("status", status=503), UPSTREAM_DOWN, MAX_RETRIES),
    ("upstream 500 with a non-JSON body", Fault("status", status=500, body={"oops": 1}), UPSTREAM_DOWN, MAX_RETRIES),
    ("upstream closes mid-body", Fault("close"), UPSTREAM_DOWN, MAX_RETRIES),
    ("upstream malformed JSON", Fault("malformed"), UPSTREAM_DOWN, MAX_RETRIES),
    ("upstream fewer embeddings than inputs", Fault("short"), UPSTREAM_DOWN, MAX_RETRIES),
    ("upstream timing out", Fault("delay", delay_s=60), UPSTREAM_DOWN, MAX_RETRIES),
    (
        "upstream 429 storm (Retry-After: 1)",
        Fault("status", status=429, headers={"Retry-After": "1"},
              body={"detail": "slow down", "code": "RATE_REQUEST_LIMIT_EXCEEDED"}),
        {429: {"UPSTREAM_RATE_LIMITED"}, 504: {"UPSTREAM_TIMEOUT"}},
        1,  # one Retry-After wait fits in the deadline; three would not
    ),
]


@pytest.mark.parametrize(
    ("name", "fault", "outage_errors", "burst"), UPSTREAM_FAULTS, ids=[f[0] for f in UPSTREAM_FAULTS]
)
async def test_upstream_fault(
    rig_factory: Callable[..., Awaitable[Rig]],
    name: str,
    fault: Fault,
    outage_errors: dict[int, set[str]],
    burst: int,
) -> None:
    rig = await rig_factory()
    sim = rig.sim
    record(name, answers := await rig.load(warm := bodies(f"{name} warm", 20)))
    assert_right(answers, warm)
    before = await rig.settle()

    # A burst the retries absorb: every request succeeds, with the right vectors.
    sim.inject(*[fault] * burst)
    record(name, answers := await rig.load(sent := bodies(f"{name} burst", 40)))
    assert_right(answers, sent)
    assert sim.pending_faults == 0

    # An outage: every attempt fails, so every request fails, by its deadline, in the documented shape.
    sim.inject(*[fault] * 10_000)
    record(name, answers := await rig.load(sent := bodies(f"{name} outage", 20)))
    for answer in answers:
        assert_error_shape(answer, outage_errors)
    calls_during_outage = sim.calls

    # The fault ends: the same inputs go upstream again (nothing from the outage was cached) and are right.
    sim.clear_faults()
    rig.release.set()
    record(name, answers := await rig.load(sent))
    assert_right(answers, sent)
    fetched = sum(int(a.headers["X-Cache-Misses"]) for a in answers)
    assert fetched == 30, "every input of the outage had to be fetched again"
    assert calls_during_outage > 0
    assert_no_leak(before, await rig.settle())


async def test_malformed_answer_is_never_cached(rig_factory: Callable[..., Awaitable[Rig]]) -> None:
    """One bad answer per kind, no retries left: the client gets 502, and the next request goes upstream."""
    rig = await rig_factory(upstream={"max_retries": 0})
    for kind in ("malformed", "short", "close"):
        body = {"model": MODEL, "input": [f"never cache a {kind} answer", f"{kind} second input"]}
        rig.sim.inject(Fault(kind))
        (bad,) = await rig.load([body])
        assert_error_shape(bad, {502: {"UPSTREAM_ERROR"}})
        rig.sim.reset_counters()
        (good,) = await rig.load([body])
        assert_right([good], [body])
        assert good.headers["X-Cache-Misses"] == "2" and rig.sim.inputs == 2
        record("upstream bad answer, no retries", [bad, good])


async def test_deadline_bounds_a_hung_upstream(rig_factory: Callable[..., Awaitable[Rig]]) -> None:
    """An upstream that never answers, retried forever: every request ends with 504 at its deadline."""
    rig = await rig_factory(upstream={"timeout_s": 60, "max_retries": 100})
    before = await rig.settle()
    rig.sim.inject(*[Fault("delay", delay_s=600)] * 100)
    answers = await rig.load(bodies("hung", 30))
    record("upstream hangs (no timeout before the deadline)", answers)
    for answer in answers:
        assert_error_shape(answer, {504: {"UPSTREAM_TIMEOUT"}})
    rig.sim.clear_faults()
    rig.release.set()
    assert_no_leak(before, await rig.settle())


# ---- the cache Redis ---------------------------------------------------------------------------------------


async def test_cache_redis_killed_and_restarted_under_load(
    rig_factory: Callable[..., Awaitable[Rig]], own_redis: RedisServer
) -> None:
    # No in-process tier: every lookup asks Redis, so the outage is met by every request.
    rig = await rig_factory(cache={"url": own_redis.url, "error_backoff_s": 0.2, "socket_timeout_s": 0.5,
                                   "hot_max_bytes": 0})
    rig.ports[own_redis.port] = "cache-redis"
    name = "cache Redis killed and restarted"
    record(name, answers := await rig.load(warm := bodies("redis warm", 20)))
    assert_right(answers, warm)
    coalescer = rig.client.app[K.COALESCER]
    # Callers are answered before their entries' write lands; a flight ends when it has.
    await until(lambda: coalescer.pending_inputs == 0)
    record(name, answers := await rig.load(warm))
    assert all(a.headers["X-Cache-Hits"] == "3" for a in answers)  # cached in Redis
    before = await rig.settle()

    # Kill it while requests are in flight: they are served from the upstream instead.
    halfway = asyncio.Event()
    sent = bodies("redis outage", 200, distinct=300)
    load = asyncio.ensure_future(rig.load(sent, concurrency=16, halfway=halfway))
    await halfway.wait()
    own_redis.stop()
    record(name, answers := await load)
    assert_right(answers, sent)
    record(name, answers := await rig.load(warm))  # what was cached is gone with Redis: fetched again
    assert_right(answers, warm)
    assert rig.client.app[K.CACHE].errors > 0

    # Back (empty): caching resumes by itself once the error backoff has passed.
    own_redis.start()
    probe = [{"model": MODEL, "input": ["after the restart", "cached again"]}]
    for _ in range(200):
        answers = await rig.load(probe)
        record(name, answers)
        assert_right(answers, probe)
        if answers[0].headers["X-Cache-Hits"] == "2":
            break
        await asyncio.sleep(0.05)
    assert answers[0].headers["X-Cache-Hits"] == "2", "the cache never came back"
    after = await rig.settle()
    # The pool: at most one per concurrent request's read plus one per upstream call's write-behind in flight.
    assert after.sockets["cache-redis"] <= 16 + MAX_CONCURRENCY, after
    assert_no_leak(before, after)


# ---- the state Redis ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("on_store_error", ["open", "closed"])
async def test_state_redis_killed_and_restarted_under_load(
    rig_factory: Callable[..., Awaitable[Rig]], on_store_error: str
) -> None:
    """Quotas and usage live in the state Redis. While it is down, quota admission falls back to the local
    limiter (`open`) or answers 503 (`closed`), the usage API answers 503, and usage is tallied in process; once
    it is back every answered request is counted exactly once (an AOF-backed Redis, as in production)."""
    state = RedisServer(None, "--appendonly", "yes", "--appendfsync", "always").start()
    try:
        rig = await rig_factory(
            state={"url": state.url, "socket_timeout_s": 0.5},
            usage={"flush_interval_s": 0.05},
            quota={"on_store_error": on_store_error, "error_backoff_s": 0.2},
            teams=[{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "quota": {"tokens_per_month": 10**9}}],
        )
        rig.ports[state.port] = "state-redis"
        name = f"state Redis killed and restarted (quota {on_store_error})"
        down = {503: {"QUOTA_STORE_UNAVAILABLE"}} if on_store_error == "closed" else {}
        sent: list[Answer] = []
        record(name, answers := await rig.load(bodies("state warm", 20)))
        assert all(a.status == 200 and "RateLimit" in a.headers for a in answers)
        sent += answers
        before = await rig.settle()

        halfway = asyncio.Event()
        outage = bodies("state outage", 200, distinct=300)
        load = asyncio.ensure_future(rig.load(outage, concurrency=16, halfway=halfway))
        await halfway.wait()
        state.stop()
        record(name, answers := await load)
        sent += answers
        record(name, answers := await rig.load(bodies("state down", 20)))
        sent += answers
        for answer in sent:
            if answer.status != 200:
                assert_error_shape(answer, down)
        if on_store_error == "closed":
            assert {a.status for a in answers} == {503}
        during = await rig.load_usage()
        record(name, [during])
        assert_error_shape(during, {503: {"STATE_UNAVAILABLE"}})

        state.start()
        probe = bodies("state back", 1)
        for _ in range(200):  # the clients reconnect by themselves once the error backoff has passed
            answers = await rig.load(probe)
            if answers[0].status == 200:
                break
            await asyncio.sleep(0.05)
        record(name, answers)
        sent += answers
        for _ in range(200):  # ...and the next flush writes the backlog
            report = await rig.load_usage()
            if report.status == 200:
                break
            await asyncio.sleep(0.05)
        record(name, [report])
        ok = [a for a in sent if a.status == 200]
        expected = {
            "requests": len(ok),
            "inputs": sum(len(a.json()["data"]) for a in ok),
            "hits": sum(int(a.headers["X-Cache-Hits"]) for a in ok),
            "misses": sum(int(a.headers["X-Cache-Misses"]) for a in ok),
            "joined": sum(int(a.headers["X-Cache-Joined"]) for a in ok),
            "upstream_tokens": sum(int(a.headers["X-Upstream-Tokens"]) for a in ok),
        }
        total = report.json()["total"]
        assert {k: total[k] for k in expected} == expected
        assert_no_leak(before, await rig.settle())
    finally:
        state.cleanup()


class _Heard(logging.Handler):
    """Sets an event when a logger says something containing `words` (waiting on a log line, not on time)."""

    def __init__(self, words: str) -> None:
        super().__init__(logging.WARNING)
        self.words = words
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


async def test_state_redis_killed_and_restarted_mid_batch_job(rig_factory: Callable[..., Awaitable[Rig]]) -> None:
    """A batch job's state lives in the state Redis: killed (SIGKILL) half way through a job and restarted,
    the job resumes from its last checkpoint and ends with every line answered exactly once, and right."""
    state = RedisServer(None, "--appendonly", "yes", "--appendfsync", "always").start()
    heard = _Heard("batch job")
    logging.getLogger("gateway.batch").addHandler(heard)
    try:
        rig = await rig_factory(
            state={"url": state.url, "socket_timeout_s": 0.5},
            batch={"chunk_lines": 20, "chunks_in_flight": 2, "lease_s": 1.0, "heartbeat_s": 0.1, "poll_s": 0.1},
        )
        rig.ports[state.port] = "state-redis"
        rig.sim.config = SimConfig(latency_base_ms=20)  # the job takes a while: time to kill Redis under it
        lines = [{"custom_id": f"line-{i}", "body": {"input": f"batch line {i}: pack my box"}} for i in range(400)]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TEAM_A_KEY}"}) as session:
            base = str(rig.client.make_url("/v1/batch"))
            async with session.post(base + "/embeddings", json={"model": MODEL, "input": lines}) as resp:
                assert resp.status == 202, await resp.text()
                job_id = (await resp.json())["id"]

            async def job() -> dict[str, Any]:
                async with session.get(f"{base}/{job_id}") as resp:
                    return dict(await resp.json()) if resp.status == 200 else {"status": str(resp.status)}

            for _ in range(400):  # until some chunks are committed
                at_kill = (await job()).get("request_counts", {}).get("completed", 0)
                if at_kill >= 60:
                    break
                await asyncio.sleep(0.02)
            assert at_kill < 400, "the job ended before Redis could be killed under it"
            state.stop()
            await asyncio.wait_for(heard.event.wait(), OUTER_S)  # the worker noticed
            state.start()
            for _ in range(1500):
                current = await job()
                if current["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                await asyncio.sleep(0.02)
            assert current["status"] == "completed", current
            assert current["request_counts"] == {"total": 400, "completed": 400, "failed": 0}
            async with session.get(f"{base}/{job_id}/output") as resp:
                output = [orjson.loads(x) for x in (await resp.read()).splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(line["custom_id"] for line in lines)
        for o in output:
            i = int(o["custom_id"].split("-")[1])
            (expected,), _ = REFERENCE.embed({"model": MODEL, "input": [lines[i]["body"]["input"]]})
            assert np.array_equal(np.asarray(o["response"]["body"]["data"][0]["embedding"], np.float32), expected)
        assert rig.sim.inputs == 400  # resumed chunks were answered from the cache: each input billed once
        record("state Redis killed mid batch job", [Answer(200, {}, b"")] * len(output))
    finally:
        logging.getLogger("gateway.batch").removeHandler(heard)
        state.cleanup()


# ---- clients -----------------------------------------------------------------------------------------------


def _request_head(rig: Rig, length: int) -> bytes:
    return (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{rig.client.port}\r\n"
        f"Authorization: Bearer {TEAM_A_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def test_client_disconnecting_mid_request(
    rig_factory: Callable[..., Awaitable[Rig]], caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that hang up while their inputs are upstream: the flight completes, is cached, nothing leaks."""
    rig = await rig_factory()
    before = await rig.settle()
    rig.sim.inject(Fault("delay", delay_s=60))  # the upstream holds the first call until released
    body = orjson.dumps({"model": MODEL, "input": ["a client that leaves", "before the answer"]})
    for _ in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", rig.client.port)
        writer.write(_request_head(rig, len(body)) + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    await rig.hanging.wait()
    rig.release.set()
    await rig.client.app[K.COALESCER].close()
    rig.sim.reset_counters()
    (answer,) = await rig.load([orjson.loads(body)])
    assert answer.headers["X-Cache-Hits"] == "2" and rig.sim.calls == 0  # the abandoned flight was cached
    record("clients disconnecting mid-request", [answer])
    tally("clients disconnecting mid-request", sent=20, ok=0, failed={"client gone before the answer": 20})
    assert_no_leak(before, await rig.settle())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_client_disconnecting_mid_body(
    rig_factory: Callable[..., Awaitable[Rig]], caplog: pytest.LogCaptureFixture
) -> None:
    rig = await rig_factory()
    before = await rig.settle()
    for _ in range(20):
        _, writer = await asyncio.open_connection("127.0.0.1", rig.client.port)
        writer.write(_request_head(rig, 10_000) + b'{"model": "jina-embeddings-v3", "input": ["')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    after = await rig.settle()
    assert rig.sim.calls == 0
    assert_no_leak(before, after)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client hanging up is not a gateway error"
    tally("clients disconnecting mid-body", sent=20, ok=0, failed={"client gone mid-body": 20})


async def test_client_sending_its_body_slowly(rig_factory: Callable[..., Awaitable[Rig]]) -> None:
    """A body trickling in for longer than the deadline gets 408 at the deadline, not a handler held forever."""
    rig = await rig_factory(limits={"request_timeout_s": 0.5})
    before = await rig.settle()
    body = orjson.dumps({"model": MODEL, "input": ["sent one byte at a time"]})
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.client.port)
    writer.write(_request_head(rig, len(body)))
    sent = 0
    answered = asyncio.ensure_future(reader.read(65536))
    while sent < len(body) and not answered.done():
        writer.write(body[sent : sent + 1])
        sent += 1
        await asyncio.wait([answered], timeout=0.05)
    head = await asyncio.wait_for(answered, OUTER_S)
    writer.close()
    await writer.wait_closed()
    assert sent < len(body), "the gateway waited for the whole trickle"
    assert head.startswith(b"HTTP/1.1 408 "), head[:80]
    payload = orjson.loads(head.split(b"\r\n\r\n", 1)[1])
    assert payload["code"] == "REQUEST_TIMEOUT" and payload["detail"]
    record("client sending its body slowly", [Answer(408, {}, orjson.dumps(payload))])
    # The gateway itself is unharmed.
    (ok,) = await rig.load([{"model": MODEL, "input": ["quick enough"]}])
    assert ok.status == 200
    assert_no_leak(before, await rig.settle())


# ---- what a soak or a leak alert watches -------------------------------------------------------------------


async def test_process_gauges_are_exported(rig_factory: Callable[..., Awaitable[Rig]]) -> None:
    rig = await rig_factory()
    async with aiohttp.ClientSession() as session, session.get(
        str(rig.client.make_url("/metrics")), headers={"Authorization": "Bearer metrics-token"}
    ) as resp:
        text = await resp.text()
    lines = [line.split(" ") for line in text.splitlines() if line.startswith("eg_process")]
    values = {name: float(value) for name, value in lines}
    assert values["eg_process_asyncio_tasks"] >= 1
    assert values["eg_process_resident_memory_bytes"] > 10 * 2**20
    assert values['eg_process_open_fds{kind="socket"}'] >= 2  # the gateway's and the simulator's listeners


@pytest.mark.slow
def test_soak_script_runs_and_reports() -> None:
    """A 15-second soak, so the script keeps working; the 10-minute run is done by hand (README)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "soak.py"), "--minutes", "0.25", "--warmup-minutes", "0.1",
         "--interval-s", "3", "--concurrency", "8", "--max-rss-growth", "1.0"],
        capture_output=True, text=True, timeout=120, cwd=root,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "soak: PASS" in out.stdout and '"rss_mib_end"' in out.stdout


# ---- the event loop `serve` runs on ------------------------------------------------------------------------


@pytest.mark.parametrize("max_wait_ms", [0.0, 0.3, 1.0])
def test_a_burst_under_uvloop_gets_no_500(max_wait_ms: float) -> None:
    """`serve` runs on uvloop, whose `call_at` for a moment already past returns a plain Handle (no `when()`):
    the coalescer's batching timer must work with both loops. A burst of overlapping requests, no 5xx."""
    uvloop = pytest.importorskip("uvloop")

    async def burst() -> list[Answer]:
        sim = Simulator(SimConfig(latency_base_ms=2))
        sim_runner, sim_url = await start_sim(sim)
        data = base_config(upstream={"url": sim_url, "limits": {"max_concurrency": 2}},
                           coalesce={"max_wait_ms": max_wait_ms})
        runner = web.AppRunner(create_app(cfg.build(cfg.Config, data, "")))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/embeddings"
            return await fire(url, bodies("uvloop", 300, per_request=4, distinct=97), TEAM_A_KEY,
                              outer_timeout_s=OUTER_S, concurrency=64)
        finally:
            await runner.cleanup()
            await sim_runner.cleanup()

    answers = uvloop.run(burst())
    record("a burst under uvloop", answers)
    assert [a.what for a in answers if a.status != 200] == []
