"""Money budgets: reserved with the token quotas in one atomic step (both backends), exact across three replicas
on one Redis, 429 BUDGET_EXCEEDED until the next month, free cached answers, and alerts that fire once each."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway.quota import QuotaBackend

from .clock import FakeClock, utc
from .conftest import TEAM_A_KEY, Gateway, auth, until
from .redis_server import free_port
from .test_quota import limits

MODEL = "jina-embeddings-v3"
PRICE = 1000.0  # USD per 1M tokens: a 3-token request costs USD 0.003 (3,000,000 nano-USD)
REQUEST_USD = 0.003
T0 = round(utc(2026, 3, 31, 23, 0, 0) * 1000)  # an hour before April, UTC




async def test_budget_is_checked_and_debited_with_the_other_policies(quota_backend: QuotaBackend) -> None:
    lim = limits(tpd=1000)
    lim = type(lim)(lim.values, budget=10_000)
    run = quota_backend.run
    first = await run("t", lim, mode="admit", requests=1, tokens=10, now_ms=T0, cost=6000)
    assert first.admitted and first.budget == (4000, 3_600_000) and first.states[2][0] == 990
    refused = await run("t", lim, mode="admit", requests=1, tokens=10, now_ms=T0, cost=6000)
    assert not refused.admitted and refused.blocking == 4 and refused.wait_ms == 3_600_000
    assert refused.states[2][0] == 990  # all policies or none: the refused request spent no tokens either
    free = await run("t", lim, mode="admit", requests=1, tokens=10, now_ms=T0, cost=0)
    assert free.admitted and free.budget[0] == 4000  # what costs nothing is never refused by the budget
    refund = await run("t", lim, mode="adjust", requests=0, tokens=-5, reserved=(first.day, first.month),
                       now_ms=T0, cost=-3000)
    assert refund.budget[0] == 7000
    april = await run("t", lim, mode="admit", requests=1, tokens=10, now_ms=T0 + 3_600_000, cost=9000)
    assert april.admitted and april.budget[0] == 1000  # a new month, a new budget
    # A refund of March's reservation does not land in April.
    late = await run("t", lim, mode="adjust", requests=0, tokens=-1, reserved=(first.day, first.month),
                     now_ms=T0 + 3_600_001, cost=-3000)
    assert late.budget[0] == 1000


def budget_team(usd: float, **budget: Any) -> list[dict[str, Any]]:
    from gateway.auth import hash_key

    return [{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "budget": {"usd_per_month": usd, **budget}}]


async def post(session_or_client: Any, url: str, text: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session_or_client.post(url, headers=auth(TEAM_A_KEY), json={"model": MODEL, "input": [text]}) as r:
        return r.status, dict(r.headers), await r.json()


@pytest.mark.slow
async def test_three_replicas_spend_exactly_the_budget(gateway: Gateway, redis_url: str) -> None:
    clock = FakeClock(T0 / 1000)
    replicas = [await gateway(cache={"url": redis_url}, state={"url": redis_url}, prices={MODEL: PRICE},
                              teams=budget_team(100 * REQUEST_USD), clock=clock) for _ in range(3)]
    # Each input is new and 4 characters: estimated and billed at exactly 3 tokens, so USD 0.003.
    answers = await asyncio.gather(*(
        replicas[i % 3].post("/v1/embeddings", headers=auth(TEAM_A_KEY), json={"model": MODEL, "input": [f"{i:04d}"]})
        for i in range(300)))
    statuses = [a.status for a in answers]
    bodies = [await a.json() for a in answers]
    assert statuses.count(200) == 100 and statuses.count(429) == 200
    for answer, body in zip(answers, bodies, strict=True):
        if answer.status == 429:
            assert body["code"] == "BUDGET_EXCEEDED"
            assert answer.headers["Retry-After"] == "3600"  # to 2026-04-01T00:00:00Z
            assert '"budget_usd_per_month";r=0.000;t=3600' in answer.headers["RateLimit"]
    assert sum(int(a.headers["X-Upstream-Tokens"]) for a in answers if a.status == 200) == 300
    assert sum(c.app[K.SIMULATOR].tokens for c in replicas) == 300
    # A cached answer costs nothing: it is served although the budget is spent.
    admitted = next(i for i, s in enumerate(statuses) if s == 200)
    status, headers, _ = await post(replicas[1], "/v1/embeddings", f"{admitted:04d}")
    assert status == 200 and headers["X-Upstream-Tokens"] == "0"
    policy = headers["RateLimit-Policy"]
    assert '"budget_usd_per_month";q=0.300;qu="usd";w=2678400' in policy  # March: 31 days


@pytest.mark.slow
async def test_three_serve_processes_spend_exactly_the_budget(redis_url: str, tmp_path: Path) -> None:
    """The same on three `serve` processes, on Redis TIME (no injected clock): Retry-After is the real time left
    until the next month (UTC)."""
    from .test_admin_replicas import serve_replicas

    with serve_replicas(redis_url, tmp_path, prices={MODEL: PRICE}, teams=budget_team(100 * REQUEST_USD)) as urls:
        before = time.time()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as session:
            answers = await asyncio.gather(*(post(session, f"{urls[i % 3]}/v1/embeddings", f"{i:04d}")
                                             for i in range(300)))
        after = time.time()
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 100 and statuses.count(429) == 200
    now = datetime.now(UTC)
    following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    for status, headers, body in answers:
        if status == 429:
            assert body["code"] == "BUDGET_EXCEEDED"
            assert following - after - 1 <= int(headers["Retry-After"]) <= following - before + 1
            assert '"budget_usd_per_month";r=0.000;' in headers["RateLimit"]
    assert sum(int(h["X-Upstream-Tokens"]) for s, h, _ in answers if s == 200) == 300


async def test_reconcile_charges_what_the_upstream_billed(gateway: Gateway) -> None:
    clock = FakeClock(T0 / 1000)
    client = await gateway(prices={MODEL: PRICE}, teams=budget_team(1.0), clock=clock)
    # 'a b c d e f g h' is estimated at 17 // 4 + 2 = 6 tokens; the simulator bills words + 2 = 10.
    status, headers, _ = await post(client, "/v1/embeddings", "a b c d e f g h")
    assert status == 200 and headers["X-Upstream-Tokens"] == "10"
    verdict = await client.app[K.QUOTA].budget_state(client.app[K.LIVE].config.teams[0])
    assert verdict is not None and verdict.budget[0] == 1_000_000_000 - 10 * 1_000_000
    # The usage API shows spend vs budget this month.
    usage = await (await client.get("/v1/usage", headers=auth(TEAM_A_KEY))).json()
    assert usage["budgets"] == [{"team": "team-a", "month": "2026-03", "spent_usd": 0.01, "budget_usd": 1.0,
                                 "spent_ratio": 0.01}]
    from .test_openapi import check

    check(usage, "UsageReport")


class Receiver:
    """A real local webhook receiver: counts POSTs, answers 503 to the first `fail` of them."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.posts: list[dict[str, Any]] = []
        self.refused = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail > 0:
            self.fail -= 1
            self.refused += 1
            return web.Response(status=503)
        self.posts.append(await request.json())
        return web.Response(status=204)

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def settle(clients: list[TestClient]) -> None:
    for client in clients:
        await client.app[K.BUDGET].idle()


@pytest.mark.parametrize("receiver_down", ["no", "refusing connections", "answering 503"])
async def test_each_alert_fires_exactly_once(gateway: Gateway, redis_url: str, receiver_down: str) -> None:
    port = free_port()
    receiver = Receiver(fail=2 if receiver_down == "answering 503" else 0)
    if receiver_down != "refusing connections":
        await receiver.start(port)
    clock = FakeClock(T0 / 1000)
    teams = budget_team(10 * REQUEST_USD, alerts=[0.5, 0.8, 1.0], webhook_url=f"http://127.0.0.1:{port}/hook")
    replicas = [await gateway(cache={"url": redis_url}, state={"url": redis_url}, prices={MODEL: PRICE},
                              teams=teams, clock=clock) for _ in range(2)]
    for client in replicas:
        client.app[K.BUDGET].backoff_s = 0.05
    try:
        statuses = [(await post(replicas[i % 2], "/v1/embeddings", f"{i:04d}"))[0] for i in range(14)]
        assert statuses == [200] * 10 + [429] * 4
        if receiver_down == "refusing connections":
            await until(lambda: sum(c.app[K.BUDGET].failures for c in replicas) >= 3)
            await receiver.start(port)
        await settle(replicas)
        thresholds = sorted(p["threshold"] for p in receiver.posts)
        assert thresholds == [0.5, 0.8, 1.0]
        assert {(p["team"], p["month"], p["budget"]) for p in receiver.posts} == {("team-a", "2026-03", 0.03)}
        assert [p["spent"] for p in sorted(receiver.posts, key=lambda p: p["threshold"])] == pytest.approx(
            [0.015, 0.024, 0.03])
        failures = sum(c.app[K.BUDGET].failures for c in replicas)
        assert failures >= (0 if receiver_down == "no" else 2)
        # More spending (cached, free) and refusals fire nothing again.
        await post(replicas[0], "/v1/embeddings", "0001")
        await post(replicas[1], "/v1/embeddings", "9999")
        await settle(replicas)
        assert len(receiver.posts) == 3
        texts = [await (await c.get("/metrics", headers=auth("metrics-token"))).text() for c in replicas]
        assert all('eg_budget_spent_ratio{team="team-a"} 1.0' in text for text in texts)
        lines = [line for text in texts for line in text.splitlines() if line.startswith("eg_budget_alerts_total")]
        assert sorted(line for line in lines if line.endswith(" 1.0")) == [
            f'eg_budget_alerts_total{{team="team-a",threshold="{t}"}} 1.0' for t in ("0.5", "0.8", "1")]
    finally:
        await receiver.stop()


async def test_budget_through_the_admin_api(gateway: Gateway) -> None:
    """A team made over the API with a budget is held to it like a config team."""
    from gateway.auth import hash_key

    from .conftest import ADMIN_KEY

    clock = FakeClock(T0 / 1000)
    client = await gateway(prices={MODEL: PRICE}, clock=clock, admin_keys=[hash_key(ADMIN_KEY)])
    resp = await client.post("/admin/teams", headers=auth(ADMIN_KEY),
                             json={"name": "api-team", "budget": {"usd_per_month": 2 * REQUEST_USD}})
    assert resp.status == 201
    key = (await (await client.post("/admin/teams/api-team/keys", headers=auth(ADMIN_KEY))).json())["key"]
    statuses = []
    for text in ("0001", "0002", "0003"):
        async with client.post("/v1/embeddings", headers=auth(key), json={"model": MODEL, "input": [text]}) as r:
            statuses.append((r.status, (await r.json()).get("code")))
    assert statuses == [(200, None), (200, None), (429, "BUDGET_EXCEEDED")]
    # A request that costs more than the whole monthly budget could never be admitted: 413, not a wait.
    async with client.post("/v1/embeddings", headers=auth(key), json={"model": MODEL, "input": ["x" * 40]}) as r:
        assert (r.status, (await r.json())["code"]) == (413, "QUOTA_REQUEST_TOO_LARGE")



@pytest.mark.parametrize(("budget", "error"), [
    ({"usd_per_month": 0}, "teams.0.budget.usd_per_month: must be > 0"),
    ({"usd_per_month": 5, "alerts": [0.5, 0]}, "teams.0.budget.alerts.1: must be > 0"),
    ({"usd_per_month": 5, "webhook_url": "ftp://x"}, "teams.0.budget.webhook_url: must be http:// or https://"),
    ({"alerts": [0.5]}, "teams.0.budget.usd_per_month: required key is missing"),
    ({"usd_per_month": 5, "limit": 1}, "teams.0.budget.limit: unknown key"),
])
def test_a_bad_budget_in_the_config_names_its_key(budget: dict[str, Any], error: str) -> None:
    from gateway import config as cfg

    from .conftest import base_config

    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_data(base_config(teams=[{"name": "t", "budget": budget}]))
    assert str(caught.value).startswith(error)


def test_a_model_is_budgeted_at_the_dearest_upstream_that_may_serve_it() -> None:
    from gateway import config as cfg
    from gateway.quota import budget_prices

    from .conftest import base_config

    data = base_config(prices={"m": 1.0, "only-global": 0.5})
    data.pop("upstream")
    data["upstreams"] = [
        {"name": "cheap", "url": "sim://", "models": ["m", "n"], "prices": {"m": 0.2, "n": 0.1}, "priority": 1},
        {"name": "dear", "url": "sim://", "models": ["m"], "prices": {"m": 3.0}, "priority": 2},
        {"name": "rest", "url": "sim://", "prices": {"k": 0.0}},
    ]
    prices = budget_prices(cfg.from_data(data))
    assert prices == {"m": 3.0, "n": 0.1, "only-global": 0.5, "k": 0.0}
