"""Pacing of the shared upstream key: the slot contract (memory and Redis), then a fleet of gateways."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import config as cfg
from gateway.keys import pacing_keys
from gateway.pacing import MemoryPacingBackend, PacingBackend, RedisPacingBackend, budget_id
from gateway.sim import Fault, SimConfig, Simulator

from .clock import FakeClock
from .conftest import TEAM_A_KEY, UPSTREAM_KEY, Gateway, auth, sim_of, state_client
from .redis_server import RedisServer

MODEL = "jina-embeddings-v3"
W = 61_000  # the 60-s window plus the default 1-s margin


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[PacingBackend]:
    if request.param == "memory":
        yield MemoryPacingBackend()
        return
    async with state_client(request, redis_server) as client:
        yield RedisPacingBackend(client, "test")


async def slot(b: PacingBackend, now: int, *, rpm: int = 0, tpm: int = 0, tokens: int = 1,
               max_wait: int = 10**9) -> tuple[bool, int, int]:
    return await b.acquire(window_ms=W, rpm=rpm, tpm=tpm, tokens=tokens, max_wait_ms=max_wait, now_ms=now)


async def test_requests_fill_a_window_then_wait_for_the_oldest_to_leave(backend: PacingBackend) -> None:
    slots = [(await slot(backend, 1000, rpm=3))[1] for _ in range(7)]
    assert slots == [1000, 1000, 1000, 1000 + W, 1000 + W, 1000 + W, 1000 + 2 * W]
    # Later, the log has moved on: a call at 1000 + 2W + 5 fits the window after the last slot.
    assert (await slot(backend, 1000 + 3 * W, rpm=3))[1] == 1000 + 3 * W


async def test_tokens_wait_until_enough_have_left_the_window(backend: PacingBackend) -> None:
    assert (await slot(backend, 0, tpm=1000, tokens=400))[1] == 0
    assert (await slot(backend, 10, tpm=1000, tokens=400))[1] == 10
    assert (await slot(backend, 20, tpm=1000, tokens=300))[1] == W  # the first 400 must leave
    assert (await slot(backend, 30, tpm=1000, tokens=5000))[1] == 2 * W  # alone, once the rest has left
    assert (await slot(backend, 40, tpm=1000, tokens=1))[1] == 3 * W  # behind the giant


async def test_a_turn_past_the_deadline_is_refused_and_not_booked(backend: PacingBackend) -> None:
    await slot(backend, 0, rpm=1)
    granted, at, now = await slot(backend, 500, rpm=1, max_wait=W - 501)
    assert not granted and at - now == W - 500
    granted, at, _ = await slot(backend, 500, rpm=1, max_wait=W - 500)
    assert granted and at == W


async def test_hold_keeps_every_caller_off_the_key(backend: PacingBackend) -> None:
    await backend.hold(5000, 100)
    await backend.hold(1000, 200)  # a shorter hold never shortens a longer one
    assert (await slot(backend, 300, rpm=10))[1] == 5100


async def test_redis_and_memory_agree_on_a_random_history(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    memory, shared = MemoryPacingBackend(), RedisPacingBackend(client, "parity")
    rng = random.Random(7)
    now = 0
    for _ in range(600):
        now += rng.choice([0, 0, 5, 300, 2000, 30_000])
        if rng.random() < 0.03:
            ms = rng.randint(0, 5000)
            await memory.hold(ms, now)
            await shared.hold(ms, now)
            continue
        kwargs: dict[str, Any] = {"window_ms": W, "rpm": 20, "tpm": 9000, "tokens": rng.randint(1, 2500),
                                  "max_wait_ms": rng.choice([0, 20_000, 10**9]), "now_ms": now}
        assert await memory.acquire(**kwargs) == await shared.acquire(**kwargs)
    await client.aclose()


def test_budget_names_the_key_without_writing_it() -> None:
    upstream = cfg.Upstream(url="https://api.jina.ai/v1", api_key="jina_secret_123")
    log, meta = pacing_keys(budget_id(upstream))
    assert "jina_secret_123" not in log + meta and log.startswith("eg:up:{") and meta.endswith("}:meta")
    other = cfg.Upstream(url="https://api.jina.ai/v1", api_key="jina_other")
    assert budget_id(other) != budget_id(upstream)


# ---- a fleet of gateways ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_three_gateways_keep_a_burst_of_500_under_the_upstreams_60_rpm(
    gateway: Gateway, redis_url: str
) -> None:
    """500 requests over 3 gateways sharing one Redis; the simulator allows 60 calls in any 60 s and would
    answer 429 to the 61st. Every call waits its turn (fake time), none is refused."""
    clock = FakeClock()
    sim = Simulator(SimConfig(rate_limit_requests=60, rate_window_s=60), clock=clock.time)
    config: dict[str, Any] = {
        "state": {"url": redis_url},
        "upstream": {"limits": {"requests_per_minute": 60, "max_concurrency": 500}},
        "coalesce": {"max_batch_inputs": 1},  # one upstream call per request: 500 calls to pace
        "limits": {"request_timeout_s": 3600},
    }
    fleet = [await gateway(simulator=sim, clock=clock, **config) for _ in range(3)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send(i: int) -> int:
            url = fleet[i % 3].make_url("/v1/embeddings")
            body = orjson.dumps({"model": MODEL, "input": [f"burst input {i}"]})
            async with session.post(url, data=body, headers=auth(TEAM_A_KEY)) as resp:
                await resp.read()
                return resp.status

        start = clock.time()
        tasks = [asyncio.ensure_future(send(i)) for i in range(500)]
        await clock.run(tasks)
    assert [t.result() for t in tasks] == [200] * 500
    assert sim.calls == sim.ok_calls == 500  # not one 429
    # 60 calls per 61-s window: the 500th call left in the 9th window, at 8 x 61 s.
    assert round(clock.time() - start, 3) == 8 * 61


async def test_a_turn_after_the_deadline_is_429_with_retry_after(gateway: Gateway) -> None:
    clock = FakeClock()
    client = await gateway(clock=clock, upstream={"limits": {"requests_per_minute": 1}},
                           limits={"request_timeout_s": 5})
    first = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["a"]}),
                              headers=auth(TEAM_A_KEY))
    assert first.status == 200
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["b"]}),
                             headers=auth(TEAM_A_KEY))
    body = await resp.json()
    assert resp.status == 429 and body["code"] == "UPSTREAM_RATE_LIMITED"
    assert resp.headers["Retry-After"] == "61" and sim_of(client).calls == 1
    metrics = await (await client.get("/metrics", headers=auth("metrics-token"))).text()
    assert "eg_upstream_pacing_refusals_total 1.0" in metrics


async def test_an_upstream_429_holds_the_fleet_and_is_counted(gateway: Gateway, redis_url: str) -> None:
    client = await gateway(state={"url": redis_url}, upstream={"limits": {"requests_per_minute": 1000}})
    sim_of(client).inject(Fault(kind="status", status=429, headers={"Retry-After": "1"}))
    redis = aioredis.Redis.from_url(redis_url)
    seconds, micros = await redis.time()
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["x"]}),
                             headers=auth(TEAM_A_KEY))
    assert resp.status == 200 and sim_of(client).calls == 2
    _, meta = pacing_keys(budget_id(cfg.Upstream(url="sim://", api_key=UPSTREAM_KEY)))
    held_until = int(await redis.hget(meta, "until"))
    assert held_until >= seconds * 1000 + micros // 1000 + 1000
    await redis.aclose()
    metrics = await (await client.get("/metrics", headers=auth("metrics-token"))).text()
    assert 'eg_upstream_calls_total{model="jina-embeddings-v3",status="429"} 1.0' in metrics
    assert 'eg_upstream_retries_total{reason="429"} 1.0' in metrics


async def test_pacing_survives_a_dead_state_store(gateway: Gateway, own_redis: RedisServer) -> None:
    client = await gateway(state={"url": own_redis.url}, upstream={"limits": {"requests_per_minute": 1000}},
                           quota={"error_backoff_s": 0.0})
    own_redis.stop()
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["x"]}),
                             headers=auth(TEAM_A_KEY))
    assert resp.status == 200
    metrics = await (await client.get("/metrics", headers=auth("metrics-token"))).text()
    assert 'eg_store_errors_total{op="pacing",store="state"} 1.0' in metrics
