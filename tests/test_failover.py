"""Failover: the priority-1 upstream is a simulator in its own process, killed mid-load and restarted; per-key
pacing of a key pool holds across three replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway.auth import hash_key
from gateway.sim import SimConfig, Simulator

from .clock import FakeClock
from .conftest import TEAM_A_KEY, Gateway, auth
from .gateways import SimProcess
from .promtext import scrape

MODEL = "jina-embeddings-v3"
OPEN_S = 30.0  # the primary's breaker stays open this long (fake clock) before its probe


@pytest.fixture
def primary(sim_process: Callable[..., SimProcess]) -> SimProcess:
    return sim_process()


async def load(client: TestClient, bodies: list[dict[str, Any]], *, kill_after: int = 0,
               kill: Any = None) -> tuple[list[int], int]:
    """Sends `bodies`, 16 at a time; after `kill_after` answers calls `kill()`. Returns the statuses, and the
    requests that were in flight at the kill."""
    url = str(client.make_url("/v1/embeddings"))
    statuses: list[int] = []
    gate = asyncio.Semaphore(16)
    in_flight = 0
    at_kill = 0

    async def send(session: aiohttp.ClientSession, body: dict[str, Any]) -> None:
        nonlocal in_flight, at_kill
        async with gate:
            in_flight += 1
            async with session.post(url, data=orjson.dumps(body), headers=auth(TEAM_A_KEY)) as resp:
                await resp.read()
                statuses.append(resp.status)
            in_flight -= 1
            if kill is not None and len(statuses) == kill_after:
                at_kill = in_flight
                kill()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(send(session, b) for b in bodies))
    return statuses, at_kill


def billed(metrics: str) -> dict[str, float]:
    """Tokens billed per upstream (summed over its keys) from a scrape."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("eg_upstream_key_tokens_total{"):
            upstream = line.split('upstream="', 1)[1].split('"', 1)[0]
            out[upstream] = out.get(upstream, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.slow
async def test_the_primary_killed_mid_load_fails_over_and_traffic_returns_after_its_restart(
    gateway: Gateway, primary: SimProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    upstreams = [
        {"name": "primary", "kind": "jina", "url": primary.url + "/v1", "models": [MODEL], "max_retries": 1,
         "backoff_base_s": 0.01, "breaker_failures": 3, "breaker_open_s": OPEN_S},
        {"name": "backup", "kind": "openai", "url": "sim://", "priority": 2,
         "models": {MODEL: "jinaai/jina-embeddings-v3"}, "max_inputs_per_call": {MODEL: 2}},
    ]
    client = await gateway(upstreams=upstreams, clock=clock, coalesce={"max_batch_inputs": 8})
    backup = client.app[K.SIMULATORS]["backup"]
    texts = [f"failover input {i}: a sentence of some words" for i in range(400)]
    bodies = [{"model": MODEL, "input": texts[2 * i : 2 * i + 2]} for i in range(200)]

    statuses, at_kill = await load(client, bodies, kill_after=60, kill=primary.kill)
    errors = sum(1 for s in statuses if s != 200)
    with capsys.disabled():
        print(f"\nfailover: {len(statuses)} requests, {at_kill} in flight at the kill, {errors} client errors")
    assert errors == 0, statuses
    ready = await (await client.get("/readyz")).json()
    assert ready["upstreams"] == {"primary": "open", "backup": "closed"}
    assert backup.ok_calls > 0 and all(len(r["input"]) <= 2 for r in backup.requests)

    primary.start()  # back, with fresh counters
    clock.advance(OPEN_S)  # the breaker's open period: the next call is its probe
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["after the restart"]},
                             headers=auth(TEAM_A_KEY))
    assert resp.status == 200
    backup_calls = backup.calls
    statuses, _ = await load(client, [*bodies, {"model": MODEL, "input": ["after the restart, again"]}])
    assert statuses == [200] * 201
    assert primary.stats()["calls"] == 2 and backup.calls == backup_calls, "traffic is back on the primary"
    ready = await (await client.get("/readyz")).json()
    assert ready["upstreams"]["primary"] == "closed"

    # Cost 1.00: every unique input billed once over both upstreams, nothing again after the failover.
    reference = Simulator(SimConfig())
    unique = [*texts, "after the restart", "after the restart, again"]
    want = sum(reference.token_count(t) for t in unique)
    scrape = await (await client.get("/metrics", headers=auth("metrics-token"))).text()
    assert sum(billed(scrape).values()) == want
    assert billed(scrape)["backup"] == backup.tokens


@pytest.mark.slow
async def test_each_pool_key_keeps_its_rpm_across_three_replicas(gateway: Gateway, redis_url: str) -> None:
    """150 calls over 3 gateways sharing one state Redis and a pool of two keys, each allowed 30 calls in any
    60 s by the simulator (which counts per key and would answer 429): every call waits its key's turn."""
    keys = ("sk-rpm-key-one-abcdef", "sk-rpm-key-two-abcdef")
    clock = FakeClock()
    sim = Simulator(SimConfig(api_keys=keys, rate_limit_requests=30, rate_window_s=60, rate_limit_per_key=True),
                    clock=clock.time)
    upstreams = [{"name": "jina", "url": "sim://", "keys": list(keys),
                  "limits": {"requests_per_minute": 30, "max_concurrency": 100}}]
    config: dict[str, Any] = {"state": {"url": redis_url}, "upstreams": upstreams,
                              "coalesce": {"max_batch_inputs": 1}, "limits": {"request_timeout_s": 3600}}
    fleet = [await gateway(simulator=sim, clock=clock, **config) for _ in range(3)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send(i: int) -> int:
            body = orjson.dumps({"model": MODEL, "input": [f"paced input {i}"]})
            async with session.post(fleet[i % 3].make_url("/v1/embeddings"), data=body,
                                    headers=auth(TEAM_A_KEY)) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.ensure_future(send(i)) for i in range(150)]
        await clock.run(tasks)
    assert [t.result() for t in tasks] == [200] * 150
    assert sim.calls == sim.ok_calls == 150  # not one 429: no key went past 30 calls in any 60 s
    assert sorted(sim.key_calls) == sorted(keys) and min(sim.key_calls.values()) >= 30


async def test_a_failover_to_a_self_hosted_upstream_costs_nothing_and_hits_save_the_primarys_price(
    gateway: Gateway, sim_process: Callable[..., SimProcess]
) -> None:
    """The primary bills USD 0.02 per 1M tokens, the self-hosted failover 0 (over a top-level price of 0.05):
    a team pays the primary's price for what the primary embedded and nothing for what the failover did, in the
    usage API, the metrics and its money budget; a hit saves what the primary would have billed."""
    primary, selfhosted = sim_process(), sim_process("--kind", "openai")
    upstreams = [
        {"name": "primary", "kind": "jina", "url": primary.url + "/v1", "models": [MODEL], "max_retries": 0,
         "prices": {MODEL: 0.02}},
        {"name": "selfhosted", "kind": "openai", "url": selfhosted.url + "/v1", "models": [MODEL], "priority": 2,
         "prices": {MODEL: 0}},
    ]
    team = {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "budget": {"usd_per_month": 1.0}}
    client = await gateway(upstreams=upstreams, prices={MODEL: 0.05}, teams=[team])
    reference = Simulator(SimConfig())
    before, after = ["billed at the primary", "at two cents a million"], ["served after the kill", "for free"]
    primary_tokens = sum(reference.token_count(t) for t in before)
    failover_tokens = sum(reference.token_count(t) for t in after)
    assert (primary_tokens, failover_tokens) == (13, 10)  # so USD 2.6e-07 billed, 4.6e-07 saved

    async def embed(texts: list[str]) -> int:
        resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": texts}, headers=auth(TEAM_A_KEY))
        assert resp.status == 200, await resp.text()
        return int(resp.headers["X-Upstream-Tokens"])

    assert await embed(before) == primary_tokens
    primary.kill()
    assert await embed(after) == failover_tokens
    assert selfhosted.stats()["tokens"] == failover_tokens
    assert await embed(before + after) == 0  # hits: saved at the primary's price, wherever they were computed

    cost = round(primary_tokens * 0.02 / 1e6, 9)
    saved = round((primary_tokens + failover_tokens) * 0.02 / 1e6, 9)
    usage = await (await client.get("/v1/usage", headers=auth(TEAM_A_KEY))).json()
    total = usage["total"]
    assert (total["upstream_tokens"], total["cached_tokens"]) == (primary_tokens + failover_tokens,
                                                                  primary_tokens + failover_tokens)
    assert (total["cost_usd"], total["cost_saved_usd"]) == (cost, saved)
    assert usage["budgets"][0]["spent_usd"] == cost  # reserved at the dearest price, reconciled to the billed
    metrics = await scrape(client)
    assert round(metrics.total("eg_cost_usd_total", team="team-a", kind="billed"), 9) == cost
    assert round(metrics.total("eg_cost_usd_total", team="team-a", kind="saved"), 9) == saved
    assert round(metrics.total("eg_upstream_cost_usd_total", upstream="primary"), 9) == cost
    assert metrics.total("eg_upstream_cost_usd_total", upstream="selfhosted") == 0
