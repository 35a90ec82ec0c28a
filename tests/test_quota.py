"""Team quotas: the backend contract (memory and Redis, one set of tests), then the gateway end to end."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway import appkeys as K
from gateway.keys import quota_key
from gateway.quota import DAY_MS, Limits, MemoryQuotaBackend, QuotaBackend, RedisQuotaBackend

from .clock import FakeClock, utc
from .conftest import TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, sim_of
from .redis_server import RedisServer

MODEL = "jina-embeddings-v3"
T0 = round(utc(2025, 3, 14, 12, 0, 0) * 1000)  # a Friday noon, UTC, in ms


def limits(rpm: int = 0, tpm: int = 0, tpd: int = 0, tpmo: int = 0) -> Limits:
    return Limits((rpm, tpm, tpd, tpmo))


async def admit(b: QuotaBackend, lim: Limits, now: int, tokens: int, requests: int = 1, team: str = "t") -> Any:
    return await b.run(team, lim, mode="admit", requests=requests, tokens=tokens, now_ms=now)


# ---- the contract ----------------------------------------------------------------------------------------


async def test_token_bucket_admits_a_minute_then_says_exactly_when(quota_backend: QuotaBackend) -> None:
    lim = limits(tpm=10_000)
    verdicts = [await admit(quota_backend, lim, T0, 500) for _ in range(21)]
    assert [v.admitted for v in verdicts] == [True] * 20 + [False]
    refused = verdicts[-1]
    assert refused.blocking == 1 and refused.wait_ms == 3000  # 500 tokens at 10,000 per 60 s
    assert refused.states[1] == (0, 60_000)  # nothing left; the bucket is empty again in a minute
    assert not (await admit(quota_backend, lim, T0 + 2999, 500)).admitted
    assert (await admit(quota_backend, lim, T0 + 3000, 500)).admitted


async def test_all_policies_or_none(quota_backend: QuotaBackend) -> None:
    lim = limits(rpm=100, tpm=1000, tpd=5000)
    assert (await admit(quota_backend, lim, T0, 600)).admitted
    refused = await admit(quota_backend, lim, T0, 600)
    assert not refused.admitted and refused.blocking == 1
    # The refused request debited nothing: one request and 600 tokens are spent, not two and 1200.
    assert refused.states[0][0] == 99 and refused.states[2][0] == 4400
    peek = await admit(quota_backend, lim, T0, 0, requests=0)
    assert peek.admitted and [s[0] for s in peek.states[:3]] == [99, 400, 4400]


async def test_request_rate_counts_requests_whatever_their_tokens(quota_backend: QuotaBackend) -> None:
    lim = limits(rpm=2, tpm=1000)
    assert (await admit(quota_backend, lim, T0, 0)).admitted
    assert (await admit(quota_backend, lim, T0, 0)).admitted
    refused = await admit(quota_backend, lim, T0, 0)
    assert not refused.admitted and refused.blocking == 0 and refused.wait_ms == 30_000


async def test_longest_wait_decides_retry_after(quota_backend: QuotaBackend) -> None:
    lim = limits(rpm=1, tpm=100)
    assert (await admit(quota_backend, lim, T0, 100)).admitted
    refused = await admit(quota_backend, lim, T0 + 10_000, 100)
    # rpm frees in 50 s, tpm in 60 - 10 = 50 s as well; at T0 + 20 s the token bucket needs 40 s, rpm 40 s.
    assert refused.wait_ms == 50_000
    refused = await admit(quota_backend, lim, T0 + 20_000, 50)
    assert refused.blocking == 0 and refused.wait_ms == 40_000  # tpm would take only 10 s for 50 tokens


@pytest.mark.parametrize(
    ("start", "policy", "limit"),
    [
        (utc(2025, 3, 14, 23, 59, 59), 2, "tpd"),  # an ordinary midnight
        (utc(2024, 12, 31, 23, 59, 59), 2, "tpd"),  # new year
        (utc(2025, 1, 31, 23, 59, 59), 3, "tpmo"),  # 31-day month
        (utc(2024, 2, 29, 23, 59, 59), 3, "tpmo"),  # leap February
        (utc(2100, 2, 28, 23, 59, 59), 3, "tpmo"),  # 2100 is not a leap year
        (utc(2025, 12, 31, 23, 59, 59), 3, "tpmo"),  # December into January
    ],
)
async def test_day_and_month_roll_over_at_utc_boundaries(
    quota_backend: QuotaBackend, start: float, policy: int, limit: str
) -> None:
    lim = limits(**{limit: 1000})
    now = round(start * 1000)
    assert (await admit(quota_backend, lim, now - 3_600_000, 1000)).admitted  # spent an hour before the boundary
    refused = await admit(quota_backend, lim, now, 1)
    assert not refused.admitted and refused.blocking == policy and refused.wait_ms == 1000
    assert refused.states[policy] == (0, 1000)
    assert not (await admit(quota_backend, lim, now + 999, 1)).admitted
    after = await admit(quota_backend, lim, now + 1000, 1)
    assert after.admitted and after.states[policy][0] == 999


async def test_month_window_is_not_a_day_window(quota_backend: QuotaBackend) -> None:
    lim = limits(tpmo=1000)
    assert (await admit(quota_backend, lim, round(utc(2025, 4, 1) * 1000), 600)).admitted
    refused = await admit(quota_backend, lim, round(utc(2025, 4, 30, 12) * 1000), 600)
    assert not refused.admitted and refused.wait_ms == 12 * 3_600_000  # until May 1st


async def test_reconcile_refunds_and_charges(quota_backend: QuotaBackend) -> None:
    lim = limits(tpm=1000, tpd=1000)
    v = await admit(quota_backend, lim, T0, 800)
    await quota_backend.run("t", lim, mode="adjust", requests=0, tokens=-300, reserved=(v.day, v.month), now_ms=T0)
    assert [s[0] for s in (await admit(quota_backend, lim, T0, 0, requests=0)).states[1:3]] == [500, 500]
    # The upstream counted more than the estimate: the team pays, even past its quota (debt), and waits.
    await quota_backend.run("t", lim, mode="adjust", requests=0, tokens=700, reserved=(v.day, v.month), now_ms=T0)
    refused = await admit(quota_backend, lim, T0, 1)
    assert not refused.admitted and refused.states[2][0] == 0
    assert refused.wait_ms == DAY_MS // 2  # the day quota (1200 of 1000) decides: until midnight


async def test_a_refund_never_lands_in_a_later_day(quota_backend: QuotaBackend) -> None:
    lim = limits(tpd=1000)
    before = round(utc(2025, 3, 14, 23, 59, 59) * 1000)
    v = await admit(quota_backend, lim, before, 800)
    after = before + 2000
    assert (await admit(quota_backend, lim, after, 900)).admitted
    await quota_backend.run("t", lim, mode="adjust", requests=0, tokens=-800, reserved=(v.day, v.month), now_ms=after)
    assert (await admit(quota_backend, lim, after, 0, requests=0)).states[2][0] == 100


async def test_teams_are_independent(quota_backend: QuotaBackend) -> None:
    lim = limits(rpm=1)
    assert (await admit(quota_backend, lim, T0, 0, team="a")).admitted
    assert (await admit(quota_backend, lim, T0, 0, team="b")).admitted
    assert not (await admit(quota_backend, lim, T0, 0, team="a")).admitted


async def test_redis_and_memory_agree_on_a_random_history(redis_server: RedisServer) -> None:
    """Both backends replay one seeded history of admissions and refunds over three months: same answers."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    memory, shared = MemoryQuotaBackend(), RedisQuotaBackend(client)
    rng = random.Random(4)
    lim = limits(rpm=7, tpm=5000, tpd=40_000, tpmo=600_000)
    now = round(utc(2024, 1, 30) * 1000)
    for _ in range(1500):
        now += rng.choice([0, 1, 250, 7000, 60_000, 3_600_000, 9 * 3_600_000])
        tokens = rng.randint(0, 3000)
        kwargs: dict[str, Any] = {"mode": "admit", "requests": rng.randint(0, 1), "tokens": tokens, "now_ms": now}
        a = await memory.run("t", lim, **kwargs)
        b = await shared.run("t", lim, **kwargs)
        assert a == b
        if a.admitted and rng.random() < 0.5:
            adjust = {"mode": "adjust", "requests": 0, "tokens": rng.randint(-tokens, 500),
                      "reserved": (a.day, a.month), "now_ms": now + rng.choice([0, 3_600_000])}
            assert await memory.run("t", lim, **adjust) == await shared.run("t", lim, **adjust)
    await client.aclose()


async def test_redis_uses_its_own_clock_and_expires_idle_state(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    seconds, _ = await client.time()
    verdict = await RedisQuotaBackend(client).run("t", limits(tpm=600), mode="admit", requests=1, tokens=60)
    assert verdict.admitted and seconds * 1000 <= verdict.now_ms <= seconds * 1000 + 60_000
    assert 6000 < await client.pttl(quota_key("t")) <= 7000  # drained in 6 s (+1 s), then gone
    await client.aclose()


# ---- end to end ------------------------------------------------------------------------------------------


def quota_team(quota: dict[str, int], **extra: Any) -> dict[str, Any]:
    from gateway.auth import hash_key

    return {"teams": [{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "quota": quota, **extra},
                      {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)]}]}


def doc(i: int, words: int = 499) -> str:
    """About 500 tokens: the gateway estimates 503, the simulated upstream bills 502."""
    return f"r{i:04d} " + "abc " * words


async def post(client: Any, body: dict[str, Any], key: str = TEAM_A_KEY) -> tuple[int, Any, Any]:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth(key))
    return resp.status, resp.headers, orjson.loads(await resp.read())


async def metrics_text(client: Any) -> str:
    return str(await (await client.get("/metrics", headers=auth("metrics-token"))).text())


@pytest.mark.parametrize("state", ["memory", "redis", "cluster"])
async def test_100_concurrent_requests_admit_one_minute_of_tokens(
    gateway: Gateway, redis_url: str, state: str, request: pytest.FixtureRequest
) -> None:
    clock = FakeClock()
    url = {"memory": "memory://", "redis": redis_url}.get(state) or request.getfixturevalue("cluster_url")
    client = await gateway(state={"url": url}, clock=clock, **quota_team({"tokens_per_minute": 10_000}))
    sim = sim_of(client)
    answers = await asyncio.gather(*(post(client, {"model": MODEL, "input": [doc(i)]}) for i in range(100)))
    ok = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 429]
    # 19 x 503 estimated fit in 10,000; the refunds of the estimates' error (1 token each) never make room for
    # a 20th, whatever the interleaving.
    assert len(ok) == 19 and len(refused) == 81
    assert sim.tokens == 19 * 502 <= 10_000
    for _, headers, body in refused:
        assert body["code"] == "RATE_TOKEN_LIMIT_EXCEEDED" and "tokens_per_minute" in body["detail"]
        assert int(headers["Retry-After"]) >= 1
    assert f'eg_quota_rejections_total{{policy="tokens_per_minute",team="team-a"}} {len(refused)}.0' in (
        await metrics_text(client))

    # Wait what the gateway said, send the same request again: admitted.
    first = next(i for i, a in enumerate(answers) if a[0] == 429)
    clock.advance(int(answers[first][1]["Retry-After"]))
    assert (await post(client, {"model": MODEL, "input": [doc(first)]}))[0] == 200


async def test_two_gateways_on_one_redis_share_the_quota(gateway: Gateway, redis_url: str) -> None:
    clock = FakeClock()
    config = {"state": {"url": redis_url}, **quota_team({"tokens_per_minute": 10_000})}
    one = await gateway(clock=clock, **config)
    two = await gateway(clock=clock, simulator=sim_of(one), **config)
    answers = await asyncio.gather(
        *(post(one if i % 2 else two, {"model": MODEL, "input": [doc(i)]}) for i in range(100))
    )
    assert sum(a[0] == 200 for a in answers) == 19 and sum(a[0] == 429 for a in answers) == 81
    assert sim_of(one).tokens == 19 * 502


async def test_two_gateways_on_one_redis_with_redis_time(gateway: Gateway, redis_url: str) -> None:
    """No injected clock: the replicas agree through Redis TIME (a month quota: no refill during the test)."""
    config = {"state": {"url": redis_url}, **quota_team({"tokens_per_month": 5000})}
    one = await gateway(**config)
    two = await gateway(simulator=sim_of(one), **config)
    answers = await asyncio.gather(
        *(post(one if i % 2 else two, {"model": MODEL, "input": [doc(i)]}) for i in range(30))
    )
    assert sum(a[0] == 200 for a in answers) == 9  # 9 x 503 <= 5000 < 10 x 503 (refunds: 9 tokens)
    assert sim_of(one).tokens == 9 * 502


async def test_cached_inputs_cost_nothing_and_counters_equal_the_bill(gateway: Gateway) -> None:
    client = await gateway(clock=FakeClock(), **quota_team({"tokens_per_day": 100_000, "tokens_per_minute": 50_000}))
    sim = sim_of(client)
    first = [doc(i, words=i * 37 + 5) for i in range(4)]
    assert (await post(client, {"model": MODEL, "input": first}))[0] == 200
    mixed = [*first[:2], "a short new one", first[3], "and another new input, with punctuation!"]
    status, headers, _ = await post(client, {"model": MODEL, "input": mixed})
    assert status == 200 and headers["X-Cache-Hits"] == "3"
    again = await post(client, {"model": MODEL, "input": mixed})  # all hits: free
    assert again[0] == 200
    remaining = dict(_remaining(again[1]["RateLimit"]))
    assert 100_000 - remaining["tokens_per_day"] == sim.tokens  # estimates reconciled to the bill, exactly
    assert 50_000 - remaining["tokens_per_minute"] == sim.tokens


async def test_cached_token_weight_charges_hits(gateway: Gateway) -> None:
    client = await gateway(quota={"cached_token_weight": 0.5}, **quota_team({"tokens_per_day": 100_000}))
    sim = sim_of(client)
    await post(client, {"model": MODEL, "input": ["one two three", "four five"]})
    billed = sim.tokens
    _, headers, _ = await post(client, {"model": MODEL, "input": ["one two three", "four five"]})
    assert 100_000 - dict(_remaining(headers["RateLimit"]))["tokens_per_day"] == billed + -(-billed // 2)


async def test_request_rate_counts_all_hit_requests(gateway: Gateway) -> None:
    client = await gateway(**quota_team({"requests_per_minute": 2}))
    body = {"model": MODEL, "input": ["same"]}
    assert (await post(client, body))[0] == 200
    assert (await post(client, body))[1]["X-Cache-Hits"] == "1"
    status, headers, answer = await post(client, body)
    assert status == 429 and answer["code"] == "RATE_REQUEST_LIMIT_EXCEEDED"
    assert 1 <= int(headers["Retry-After"]) <= 30
    assert (await post(client, body, key=TEAM_B_KEY))[0] == 200  # another team is not affected


async def test_rate_limit_headers_on_every_answer(gateway: Gateway) -> None:
    clock = FakeClock()
    client = await gateway(clock=clock, **quota_team({"requests_per_minute": 60, "tokens_per_minute": 1000,
                                                      "tokens_per_day": 100_000, "tokens_per_month": 10**6}))
    status, headers, _ = await post(client, {"model": MODEL, "input": ["one two three"]})
    assert status == 200
    assert headers["RateLimit-Policy"] == (
        '"requests_per_minute";q=60;w=60, "tokens_per_minute";q=1000;qu="tokens";w=60, '
        '"tokens_per_day";q=100000;qu="tokens";w=86400, "tokens_per_month";q=1000000;qu="tokens";w=2592000'
    )  # November 2023 has 30 days
    # The estimate (6) is reserved, then reconciled to the bill (5) after the headers were taken.
    assert headers["RateLimit"] == (
        '"requests_per_minute";r=59;t=1, "tokens_per_minute";r=994;t=1, '
        '"tokens_per_day";r=99994;t=6400, "tokens_per_month";r=999994;t=1388800'
    )
    status, headers, _ = await post(client, {"model": MODEL, "input": []})  # 422, before admission
    assert status == 422 and headers["RateLimit"].startswith('"requests_per_minute";r=59;t=1, ')
    _, headers, _ = await post(client, {"model": MODEL, "input": ["x"]}, key=TEAM_B_KEY)
    assert "RateLimit" not in headers and "RateLimit-Policy" not in headers  # team-b has no quota


async def test_request_larger_than_a_whole_quota_is_413(gateway: Gateway) -> None:
    client = await gateway(**quota_team({"tokens_per_minute": 1000}))
    status, headers, body = await post(client, {"model": MODEL, "input": [doc(0), doc(1)]})
    assert status == 413 and body["code"] == "QUOTA_REQUEST_TOO_LARGE"
    assert "1006 tokens" in body["detail"] and "tokens_per_minute = 1000" in body["detail"]
    assert "Retry-After" not in headers and sim_of(client).calls == 0
    assert (await post(client, {"model": MODEL, "input": [doc(0)]}))[0] == 200


async def test_day_quota_rolls_over_at_utc_midnight(gateway: Gateway) -> None:
    clock = FakeClock(utc(2025, 6, 30, 23, 59, 30))
    client = await gateway(clock=clock, **quota_team({"tokens_per_day": 1000}))
    assert (await post(client, {"model": MODEL, "input": [doc(0)]}))[0] == 200
    status, headers, body = await post(client, {"model": MODEL, "input": [doc(1)]})
    assert status == 429 and headers["Retry-After"] == "30" and body["code"] == "RATE_TOKEN_LIMIT_EXCEEDED"
    clock.advance(30)
    assert (await post(client, {"model": MODEL, "input": [doc(1)]}))[0] == 200


async def test_upstream_failure_refunds_the_reservation(gateway: Gateway) -> None:
    from gateway.sim import Fault

    client = await gateway(upstream={"max_retries": 0}, **quota_team({"tokens_per_day": 1000}))
    sim_of(client).inject(Fault(kind="status", status=503))
    assert (await post(client, {"model": MODEL, "input": [doc(0)]}))[0] == 502
    status, headers, _ = await post(client, {"model": MODEL, "input": [doc(0)]})
    assert status == 200 and dict(_remaining(headers["RateLimit"]))["tokens_per_day"] == 1000 - 503


async def test_models_allow_list_and_per_team_input_limit(gateway: Gateway) -> None:
    client = await gateway(**quota_team({}, models=["jina-embeddings-v4"], max_inputs_per_request=2))
    status, _, body = await post(client, {"model": MODEL, "input": ["x"]})
    assert status == 403 and body["code"] == "MODEL_NOT_ALLOWED"
    status, _, body = await post(client, {"model": "jina-embeddings-v4", "input": ["a", "b", "c"]})
    assert status == 422 and "at most 2" in body["detail"]
    assert (await post(client, {"model": "jina-embeddings-v4", "input": ["a", "b"]}))[0] == 200
    assert sim_of(client).calls == 1
    assert (await post(client, {"model": MODEL, "input": ["a", "b", "c"]}, key=TEAM_B_KEY))[0] == 200


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_state_store_killed(
    gateway: Gateway, own_redis: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    client = await gateway(
        clock=clock, state={"url": own_redis.url, "socket_timeout_s": 0.5},
        quota={"on_store_error": policy, "error_backoff_s": 0.0}, **quota_team({"requests_per_minute": 2}),
    )
    assert (await post(client, {"model": MODEL, "input": ["shared"]}))[0] == 200
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="gateway.quota"):
        answers = [await post(client, {"model": MODEL, "input": [f"down {i}"]}) for i in range(3)]
    assert "state store unreachable" in caplog.text
    if policy == "open":
        # The local limiter applies the same policies per process: two more this minute, then 429.
        assert [a[0] for a in answers] == [200, 200, 429]
        assert answers[2][2]["code"] == "RATE_REQUEST_LIMIT_EXCEEDED"
    else:
        assert [a[0] for a in answers] == [503] * 3
        assert answers[0][2]["code"] == "QUOTA_STORE_UNAVAILABLE" and answers[0][1]["Retry-After"] == "1"
        assert sim_of(client).calls == 1
    text = await metrics_text(client)
    assert 'eg_store_errors_total{op="quota",store="state"}' in text
    own_redis.start()  # back, empty: the fleet's state is shared again
    assert (await post(client, {"model": MODEL, "input": ["back"]}))[0] == 200
    assert client.app[K.STATE_REDIS] is not None


def _remaining(header: str) -> list[tuple[str, int]]:
    out = []
    for item in header.split(", "):
        name, *params = item.split(";")
        values = dict(p.split("=") for p in params)
        out.append((name.strip('"'), int(values["r"])))
    return out


async def test_remaining_gauge_and_a_live_reload_of_quota_settings(gateway: Gateway) -> None:
    from gateway.config import from_data

    from .conftest import base_config

    client = await gateway(**quota_team({"tokens_per_day": 100_000}))
    sim = sim_of(client)
    await post(client, {"model": MODEL, "input": ["one two three", "four five"]})
    text = await metrics_text(client)
    assert f'eg_quota_remaining{{policy="tokens_per_day",team="team-a"}} {100_000 - sim.tokens}.0' in text
    # A reload (SIGHUP) makes hits cost half their tokens from the next request on.
    client.app[K.LIVE].swap(from_data(base_config(quota={"cached_token_weight": 0.5},
                                                  **quota_team({"tokens_per_day": 100_000}))))
    _, headers, _ = await post(client, {"model": MODEL, "input": ["one two three", "four five"]})
    spent = 100_000 - dict(_remaining(headers["RateLimit"]))["tokens_per_day"]
    assert spent == sim.tokens + -(-sim.tokens // 2)
