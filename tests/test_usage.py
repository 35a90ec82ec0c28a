"""gateway/usage.py and GET /v1/usage: durable per team/model/day counters, who sees what, JSON and CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import ClientSession

from gateway import appkeys as K
from gateway.config import load_config
from gateway.errors import ValidationFailed
from gateway.sim import SimConfig
from gateway.store.redis import read_lua
from gateway.usage import (
    FIELDS,
    MemoryUsageStore,
    RedisUsageStore,
    Tally,
    UsageRecorder,
    UsageStore,
    parse_query,
)

from .conftest import ADMIN_KEY, TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, base_config, sim_of
from .promtext import scrape
from .redis_server import RedisServer, free_port
from .workload import MODEL, NANO, Sent, run_workload

PRICES = {MODEL: 0.05, NANO: 0.02}
def today() -> str:
    """The UTC day now, when a test reads it (not at import: a suite that runs across midnight would
    otherwise look for the previous day's counters)."""
    return datetime.now(UTC).date().isoformat()


async def usage(client: Any, key: str = ADMIN_KEY, **params: str) -> tuple[int, Any]:
    resp = await client.get("/v1/usage", params=params, headers=auth(key))
    raw = await resp.read()
    if resp.content_type == "text/csv":
        return resp.status, raw.decode()
    return resp.status, orjson.loads(raw)


def per_team(report: dict[str, Any], field: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in report["data"]:
        out[row["team"]] = out.get(row["team"], 0) + row[field]
    return out


def assert_matches(report: dict[str, Any], sent: Sent, sim_tokens: int) -> None:
    assert report["total"]["upstream_tokens"] == sim_tokens == sent.total("upstream_tokens")
    for field in ("requests", "inputs", "hits", "misses", "joined", "upstream_tokens"):
        assert per_team(report, field) == getattr(sent, field), field


@pytest.fixture
def redis_state(redis_url: str) -> dict[str, Any]:
    # A long interval: only the usage API's read and the shutdown flush write, so the test shows both do.
    return {"state": {"url": redis_url}, "usage": {"flush_interval_s": 3600}, "prices": PRICES}


async def test_usage_survives_a_restart_on_the_same_redis(gateway: Gateway, redis_state: dict[str, Any]) -> None:
    first = await gateway(sim=SimConfig(latency_base_ms=20), **redis_state)
    sim = sim_of(first)
    sent = await run_workload(first, sim, tag="one")
    status, before = await usage(first)
    assert status == 200
    assert_matches(before, sent, sim.tokens)
    await run_workload(first, sim, sent, tag="two")  # tallied, not yet written: the shutdown writes it
    assert first.app[K.USAGE].pending
    await first.close()

    second = await gateway(**redis_state)
    status, after = await usage(second)
    assert status == 200
    assert_matches(after, sent, sim.tokens)
    assert {r["day"] for r in after["data"]} == {today()}
    assert {(r["team"], r["model"]) for r in after["data"]} == {("team-a", MODEL), ("team-b", MODEL), ("team-b", NANO)}
    billed = sum(r["upstream_tokens"] * PRICES[r["model"]] / 1e6 for r in after["data"])
    assert after["total"]["cost_usd"] == pytest.approx(billed, rel=1e-9)
    saved = sum(r["cached_tokens"] * PRICES[r["model"]] / 1e6 for r in after["data"])
    assert after["total"]["cost_saved_usd"] == pytest.approx(saved, rel=1e-9) and saved > 0


async def test_a_team_sees_only_its_own_usage_and_the_admin_sees_all(
    gateway: Gateway, redis_state: dict[str, Any]
) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=20), **redis_state)
    sent = await run_workload(client, sim_of(client))

    status, body = await usage(client, TEAM_A_KEY, team="team-b")
    assert status == 403 and body["code"] == "USAGE_FORBIDDEN"
    status, body = await usage(client, TEAM_A_KEY, team="team-a,team-b")
    assert status == 403
    status, own = await usage(client, TEAM_A_KEY)
    assert status == 200 and {r["team"] for r in own["data"]} == {"team-a"}
    assert own["total"]["upstream_tokens"] == sent.upstream_tokens["team-a"]
    status, named = await usage(client, TEAM_B_KEY, team="team-b")
    assert status == 200 and {r["team"] for r in named["data"]} == {"team-b"}

    status, everyone = await usage(client, ADMIN_KEY)
    assert status == 200 and {r["team"] for r in everyone["data"]} == {"team-a", "team-b"}
    status, only_b = await usage(client, ADMIN_KEY, team="team-b")
    assert status == 200 and {r["team"] for r in only_b["data"]} == {"team-b"}
    assert (await client.get("/v1/usage")).status == 401


async def test_group_by_and_csv(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=20), prices=PRICES)  # memory:// state
    sent = await run_workload(client, sim_of(client))

    status, by_team = await usage(client, group_by="team")
    assert status == 200 and by_team["group_by"] == ["team"]
    assert [r["team"] for r in by_team["data"]] == ["team-a", "team-b"]
    assert all(set(r) == {"team", *FIELDS} for r in by_team["data"])
    assert {r["team"]: r["inputs"] for r in by_team["data"]} == sent.inputs
    status, total = await usage(client, group_by="")
    assert status == 200 and total["data"] == [total["total"]]

    status, text = await usage(client, format="csv", start=today(), end=today())
    assert status == 200
    rows = list(csv.reader(io.StringIO(text)))
    assert text.endswith("\r\n") and rows[0] == ["team", "model", "day", *FIELDS]
    status, as_json = await usage(client, start=today(), end=today())
    assert rows[1:] == [[str(r[c]) for c in rows[0]] for r in as_json["data"]]
    resp = await client.get("/v1/usage", params={"format": "csv"}, headers=auth(ADMIN_KEY))
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="usage_')


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "2025-13-01"}, "start"),
        ({"start": "2025-1-1"}, "start"),
        ({"start": "2025-W01-1"}, "start"),
        ({"end": "yesterday"}, "end"),
        ({"start": "2025-02-02", "end": "2025-02-01"}, "start"),
        ({"start": "2020-01-01", "end": "2025-01-01"}, "end"),
        ({"group_by": "team,week"}, "group_by"),
        ({"format": "xlsx"}, "format"),
        ({"team": ","}, "team"),
        ({"groupby": "team"}, "groupby"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(gateway: Gateway, params: dict[str, str], field: str) -> None:
    client = await gateway()
    status, body = await usage(client, **params)
    assert status == 422
    assert body["code"] == "VALIDATION_ERROR" and body["errors"][0]["field"] == field


def test_query_defaults_to_this_month() -> None:
    q = parse_query({}, today=date(2025, 3, 17), max_days=366)
    assert (q.start, q.end, q.group_by, q.format, q.teams) == (
        date(2025, 3, 1), date(2025, 3, 17), ("team", "model", "day"), "json", None
    )
    assert len(q.days()) == 17
    with pytest.raises(ValidationFailed):
        parse_query({"start": "2025-01-01"}, today=date(2025, 3, 17), max_days=30)


async def test_counts_land_on_the_utc_day_of_the_request() -> None:
    now = [datetime(2025, 3, 31, 23, 59, 59, tzinfo=UTC).timestamp()]
    recorder = UsageRecorder(MemoryUsageStore(), clock=lambda: now[0])
    recorder.record("a", MODEL, Tally(requests=1, upstream_tokens=5))
    now[0] += 2  # 2025-04-01 00:00:01
    recorder.record("a", MODEL, Tally(requests=1, upstream_tokens=7))
    recorder.record("a", MODEL, Tally(requests=1, upstream_tokens=1))
    assert await recorder.flush()
    got = await recorder.store.read(None, ["2025-03-31", "2025-04-01"])
    assert {k: (t.requests, t.upstream_tokens) for k, t in got.items()} == {
        ("a", MODEL, "2025-03-31"): (1, 5), ("a", MODEL, "2025-04-01"): (2, 8)
    }


class Flaky:
    """A store whose writes fail `failures` times, the first of them after the write was applied (lost reply)."""

    def __init__(self, inner: UsageStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.calls = 0

    async def add(self, tallies: Any, *, writer: str, seq: int) -> None:
        self.calls += 1
        if self.calls == 1:
            await self.inner.add(tallies, writer=writer, seq=seq)
        if self.calls <= self.failures:
            raise ConnectionError("reply lost")
        await self.inner.add(tallies, writer=writer, seq=seq)

    async def read(self, teams: Any, days: Any) -> Any:
        return await self.inner.read(teams, days)


@pytest.fixture
async def state_client(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_retried_flush_is_applied_exactly_once(backend: str, state_client: Any) -> None:
    inner: UsageStore = MemoryUsageStore() if backend == "memory" else RedisUsageStore(state_client, retention_s=60)
    errors: list[str] = []
    recorder = UsageRecorder(Flaky(inner, failures=2), on_error=errors.append)
    recorder.record("a", MODEL, Tally(requests=1, inputs=3, cost_usd=0.25))
    assert not await recorder.flush()
    recorder.record("a", MODEL, Tally(requests=1, inputs=4, cost_usd=0.5))  # arrives while the first is retried
    recorder.record("b", NANO, Tally(requests=1, inputs=1))
    assert not await recorder.flush()
    assert await recorder.flush() and not recorder.pending
    got = await inner.read(None, [today()])
    assert {k[:2]: (t.requests, t.inputs, t.cost_usd) for k, t in got.items()} == {
        ("a", MODEL): (2, 7, 0.75), ("b", NANO): (1, 1, 0.0)
    }
    assert errors == ["usage_flush", "usage_flush"]


async def test_usage_is_written_in_one_round_trip_per_flush(state_client: Any) -> None:
    store = RedisUsageStore(state_client, retention_s=3600)
    recorder = UsageRecorder(store)
    await state_client.script_load(read_lua("usage_add.lua"))  # as after the first flush of a process
    for i in range(50):
        recorder.record(f"team-{i % 3}", MODEL, Tally(requests=1, inputs=10, upstream_tokens=100, cost_usd=1e-5))
    executed = 0
    pipeline = state_client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **kw: Any) -> Any:
            nonlocal executed
            executed += 1
            return await execute(*a, **kw)

        pipe.execute = counted
        return pipe

    state_client.pipeline = counting_pipeline
    await state_client.config_resetstat()
    assert await recorder.flush()
    stats = await state_client.info("commandstats")
    assert executed == 1  # one round trip for 50 requests of 3 teams
    assert stats["cmdstat_evalsha"]["calls"] == 3 and stats["cmdstat_sadd"]["calls"] == 1  # a script call per team
    assert "cmdstat_script" not in stats  # no SCRIPT EXISTS / LOAD round trip per flush
    got = await store.read(None, [today()])
    assert sum(t.requests for t in got.values()) == 50 and sum(t.inputs for t in got.values()) == 500
    assert sum(t.cost_usd for t in got.values()) == pytest.approx(50e-5)
    ttl = await state_client.ttl(f"eg:usage:{{team-0}}:{today()}")
    assert 0 < ttl <= 3600


async def test_usage_on_a_redis_cluster(gateway: Gateway, cluster_url: str) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=20), state={"url": cluster_url}, prices=PRICES)
    sim = sim_of(client)
    sent = await run_workload(client, sim)
    status, report = await usage(client)
    assert status == 200, report
    assert_matches(report, sent, sim.tokens)


async def test_a_flush_after_the_scripts_were_flushed_loads_them_again(state_client: Any) -> None:
    recorder = UsageRecorder(RedisUsageStore(state_client, retention_s=60))
    await state_client.script_flush()
    recorder.record("a", MODEL, Tally(requests=1, upstream_tokens=9))
    assert await recorder.flush()
    got = await recorder.store.read(["a"], [today()])
    assert got[("a", MODEL, today())].upstream_tokens == 9


async def test_state_store_down_embeddings_still_served_usage_kept_until_it_is_back(
    gateway: Gateway, own_redis: RedisServer
) -> None:
    client = await gateway(state={"url": own_redis.url}, usage={"flush_interval_s": 3600})
    body = orjson.dumps({"model": MODEL, "input": ["kept while redis is down"]})
    own_redis.stop()
    resp = await client.post("/v1/embeddings", data=body, headers=auth(TEAM_A_KEY))
    assert resp.status == 200
    status, report = await usage(client)
    assert status == 503 and report["code"] == "STATE_UNAVAILABLE"
    assert (await scrape(client)).total("eg_store_errors_total", store="state", op="usage_flush") == 1
    own_redis.start()
    status, report = await usage(client)
    assert status == 200 and report["total"]["requests"] == 1 and report["total"]["misses"] == 1


ROOT = Path(__file__).resolve().parent.parent
README_BLOCKS = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
DEMO = load_config(ROOT / "config/demo.yaml")


async def test_the_readme_usage_example_works_on_the_demo_config(aiohttp_client: Any) -> None:
    from gateway.app import create_app

    args = shlex.split(next(b for b in README_BLOCKS if "/v1/usage" in b).replace("\\\n", " "))
    url = next(a for a in args if a.startswith("http://127.0.0.1:8080/"))
    header = args[args.index("-H") + 1]
    client = await aiohttp_client(create_app(DEMO))
    resp = await client.get(url.removeprefix("http://127.0.0.1:8080"), headers=dict([header.split(": ", 1)]))
    assert resp.status == 200
    assert (await resp.text()).splitlines()[0] == ",".join(["team", "model", *FIELDS])


async def test_serve_writes_the_tally_on_sigterm(redis_url: str, state_client: Any, tmp_path: Path) -> None:
    """A real `embedding-gateway serve` process: what it tallied reaches Redis when it is stopped normally."""
    config = base_config(state={"url": redis_url}, usage={"flush_interval_s": 3600}, listen={"port": free_port()})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        assert b"listening" in await asyncio.wait_for(proc.stdout.readline(), 30)
        base = f"http://127.0.0.1:{config['listen']['port']}"
        async with ClientSession() as session:
            for i in range(3):
                body = orjson.dumps({"model": MODEL, "input": [f"sigterm {i}", "shared"]})
                async with session.post(f"{base}/v1/embeddings", data=body, headers=auth(TEAM_A_KEY)) as resp:
                    assert resp.status == 200
        assert await state_client.keys("eg:usage:*") == []  # nothing written yet: the interval is an hour
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    got = await RedisUsageStore(state_client, retention_s=60).read(["team-a"], [today()])
    tally = got[("team-a", MODEL, today())]
    assert (tally.requests, tally.inputs, tally.hits, tally.misses) == (3, 6, 2, 4)


def test_tally_add_covers_every_field() -> None:
    tally = Tally(**dict.fromkeys(FIELDS, 1))  # type: ignore[arg-type]
    tally.add(Tally(**dict.fromkeys(FIELDS, 2)))  # type: ignore[arg-type]
    assert tally.as_dict() == dict.fromkeys(FIELDS, 3)
