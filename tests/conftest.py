"""Shared fixtures: a real redis-server started by the suite, gateway apps on the in-process simulator."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway import config as cfg
from gateway.auth import hash_key
from gateway.quota import MemoryQuotaBackend, QuotaBackend, RedisQuotaBackend
from gateway.sim import SimConfig, Simulator, start_sim
from gateway.store.redis import connect

from .gateways import SimProcess
from .redis_server import RedisClusterServers, RedisServer

TEAM_A_KEY = "eg-test-team-a"
TEAM_B_KEY = "eg-test-team-b"
ADMIN_KEY = "eg-test-admin"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"


def base_config(**overrides: Any) -> dict[str, Any]:
    """A plain config dict: sim upstream without latency, memory stores, two teams and an admin."""
    data: dict[str, Any] = {
        "upstream": {"url": "sim://", "api_key": UPSTREAM_KEY, "backoff_base_s": 0.01, "max_retries": 3},
        "cache": {"url": "memory://"},
        "state": {"url": "memory://"},
        "teams": [
            {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)]},
            {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)]},
        ],
        "admin_keys": [hash_key(ADMIN_KEY)],
        "metrics": {"token": "metrics-token"},
        "limits": {"request_timeout_s": 10},
    }
    return merge(data, overrides)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def auth(key: str = TEAM_A_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    """The suite's own Redis, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A 3-node Redis Cluster for the whole session (started on first use)."""
    cluster = RedisClusterServers().start()
    yield cluster
    cluster.cleanup()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The suite's Redis Cluster as a `redis+cluster://` URL, every node flushed before each test."""
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis for one test alone: it may kill and restart it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


Gateway = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def gateway(aiohttp_client: Any) -> Gateway:
    """`await gateway(config_overrides..., sim=SimConfig(...))` → a test client of a started gateway app.

    The app's simulator is `client.app[K.SIMULATOR]`; several apps may share one (`simulator=`). `clock=`
    replaces the wall clock of quota and pacing (see tests/clock.py).
    """
    from gateway.app import create_app

    async def make(
        sim: SimConfig | None = None, *, simulator: Simulator | None = None, clock: Any = None, **overrides: Any
    ) -> TestClient:
        config = cfg.build(cfg.Config, base_config(**overrides), "")
        app = create_app(config, simulator=simulator or Simulator(sim or SimConfig()))
        if clock is not None:
            app[K.CLOCK] = clock
        client: TestClient = await aiohttp_client(app)
        return client

    return make


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    """`sim_process("--kind", "tei")` → a started `embedding-gateway sim` process (killed at the test's end)."""
    started: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        sim = SimProcess(tmp_path / f"sim-{len(started)}.log", *args)
        started.append(sim)
        sim.start()
        return sim

    yield start
    for sim in started:
        sim.stop()


def sim_of(client: TestClient) -> Simulator:
    return client.app[K.SIMULATOR]


async def until(condition: Callable[[], object], within_s: float = 30.0) -> None:
    """Polls `condition()` until it is true; fails the test if it is not within `within_s` (a bound, not a timing)."""
    for _ in range(int(within_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The reliability suite's per-fault tally: requests sent / succeeded / failed, with which status."""
    from .reliability import REPORT

    if REPORT:
        terminalreporter.section("faults: requests sent / succeeded / failed (status code)")
        for tally in REPORT:
            terminalreporter.write_line(tally.line())


async def upstream_answer(sim: Simulator, body: dict[str, Any]) -> bytes:
    """The body a twin of `sim` (same config, its own counters) answers to `body`: what the upstream would send."""
    runner, url = await start_sim(Simulator(sim.config))
    try:
        async with ClientSession() as session, session.post(url + "/embeddings", data=orjson.dumps(body)) as resp:
            assert resp.status == 200
            return await resp.read()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def state_client(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Any]:
    """A flushed client of the suite's real Redis, or of its real 3-node cluster when the param is "cluster"."""
    if request.param == "cluster":  # the cluster fixture flushes it
        client = connect(request.getfixturevalue("cluster_url"), socket_timeout_s=2)
    else:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


class AccessRecords(logging.Handler):
    """A handler attached to `gateway.access` itself, as a log shipper would attach one: every record it gets."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Each record's access line, as JSON."""
        return [orjson.loads(r.getMessage()) for r in self.records]


@pytest.fixture
def access() -> Iterator[AccessRecords]:
    logger = logging.getLogger("gateway.access")
    handler, level = AccessRecords(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def quota_backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[QuotaBackend]:
    """The same contract for both backends; tests pass the clock (`now_ms`) explicitly."""
    if request.param == "memory":
        yield MemoryQuotaBackend()
        return
    async with state_client(request, redis_server) as client:
        yield RedisQuotaBackend(client)
