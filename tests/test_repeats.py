"""Exact repeats go through the one request path: answered byte for byte from the cache, on every store, with
every per-caller rule (models, input limits, quotas, usage) applied to each of them."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway import appkeys as K
from gateway import config as cfg
from gateway import protocol
from gateway.auth import hash_key

from .conftest import ADMIN_KEY, TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, base_config, sim_of, upstream_answer

MODEL = "jina-embeddings-v3"


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the decoding and validation of request bodies (the parse memo spares exact repeats those)."""
    calls = [0]
    real = protocol.parse_embedding_request

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "parse_embedding_request", counting)
    return calls


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


async def post(client: Any, body: bytes, key: str = TEAM_A_KEY) -> tuple[int, Any, bytes]:
    resp = await client.post("/v1/embeddings", data=body, headers=auth(key))
    return resp.status, resp.headers, await resp.read()


def request(inputs: list[str], **extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "input": inputs, **extra})


async def usage(client: Any) -> tuple[int, Any]:
    resp = await client.get("/v1/usage", headers=auth(ADMIN_KEY))
    return resp.status, orjson.loads(await resp.read())


@pytest.mark.parametrize("inputs", [["one query"], ["doc a", "doc b", "doc a", "doc c"]])
@pytest.mark.parametrize("fmt", [{}, {"encoding_format": "base64"}, {"embedding_type": "ubinary"}])
async def test_a_repeat_is_answered_byte_for_byte_by_the_same_path(
    gateway: Gateway, cache_url: str, parsed: list[int], inputs: list[str], fmt: dict[str, str]
) -> None:
    client = await gateway(cache={"url": cache_url})
    sim = sim_of(client)
    body = request(inputs, dimensions=32, **fmt)
    answers = [await post(client, body) for _ in range(4)]
    assert parsed[0] == 1  # the repeats came from the parse memo, and went through every later step
    want = await upstream_answer(sim, orjson.loads(body))
    assert [a[2] for a in answers] == [want] * 4
    distinct = len(set(inputs))
    for _, headers, _ in answers[1:]:
        assert headers["X-Cache-Hits"] == str(distinct) and headers["X-Cache-Misses"] == "0"
        assert headers["X-Upstream-Tokens"] == "0"
    assert sim.calls == 1

    status, report = await usage(client)
    assert status == 200
    total = report["total"]
    assert total["requests"] == 4 and total["inputs"] == 4 * len(inputs)
    assert total["hits"] == 3 * distinct and total["misses"] == distinct
    assert total["upstream_tokens"] == sim.tokens and total["cached_tokens"] == 3 * sim.tokens


async def test_a_repeat_is_held_to_the_asking_teams_rules(gateway: Gateway, cache_url: str) -> None:
    teams = [
        {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)]},
        {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)], "models": ["jina-embeddings-v4"],
         "max_inputs_per_request": 1},
        {"name": "team-c", "keys": [hash_key("eg-test-team-c")], "max_inputs_per_request": 1,
         "quota": {"requests_per_minute": 2}},
    ]
    client = await gateway(cache={"url": cache_url}, teams=teams)
    two = request(["x one", "x two"])
    one = request(["x one"])
    for body in (two, two, one, one):
        assert (await post(client, body))[0] == 200

    status, _, raw = await post(client, one, key=TEAM_B_KEY)  # a model team-b may not use
    assert status == 403 and orjson.loads(raw)["code"] == "MODEL_NOT_ALLOWED"
    status, _, raw = await post(client, two, key="eg-test-team-c")  # over team-c's inputs per request
    assert status == 422 and "at most 1 allowed" in orjson.loads(raw)["errors"][0]["message"]
    statuses = [(await post(client, one, key="eg-test-team-c"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]  # repeats count against the request rate
    assert (await post(client, two, key="eg-test-team-c"))[0] == 422  # still over the limit, remembered or not


async def test_a_reload_that_takes_a_model_away_refuses_the_next_repeat(
    gateway: Gateway, cache_url: str, parsed: list[int]
) -> None:
    client = await gateway(cache={"url": cache_url})
    body = request(["reloaded"])
    assert (await post(client, body))[0] == 200
    status, headers, _ = await post(client, body)
    assert status == 200 and headers["X-Cache-Hits"] == "1"
    teams = [{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "models": ["jina-embeddings-v4"]}]
    client.app[K.LIVE].swap(cfg.build(cfg.Config, base_config(cache={"url": cache_url}, teams=teams), ""))
    status, _, raw = await post(client, body)
    assert status == 403 and orjson.loads(raw)["code"] == "MODEL_NOT_ALLOWED"
    assert parsed[0] == 2  # the reload emptied the parse memo: its rules come from the config


async def test_a_team_scoped_cache_keeps_entries_per_team(gateway: Gateway, cache_url: str) -> None:
    client = await gateway(cache={"url": cache_url, "scope": "team"})
    sim = sim_of(client)
    body = request(["scoped"])
    for _ in range(3):
        assert (await post(client, body))[0] == 200
    status, headers, _ = await post(client, body, key=TEAM_B_KEY)  # team-b's cache has nothing yet
    assert status == 200 and headers["X-Cache-Misses"] == "1" and sim.calls == 2


async def test_an_entry_that_left_the_local_tier_comes_from_redis(gateway: Gateway, redis_url: str) -> None:
    client = await gateway(cache={"url": redis_url})
    sim = sim_of(client)
    body = request(["soon evicted"])
    await post(client, body)
    client.app[K.CACHE].local.lru.clear()  # as if evicted by other traffic
    status, headers, raw = await post(client, body)
    assert status == 200 and headers["X-Cache-Hits"] == "1"
    assert raw == await upstream_answer(sim, orjson.loads(body)) and sim.calls == 1


def test_the_parse_memo_is_bounded_and_keyed_by_the_input_limit() -> None:
    memo = protocol.ParseMemo(max_bytes=3000)
    one, two = request(["memo a"]), request(["memo a", "memo b"])
    first = memo.parse(one, max_inputs=8)
    assert memo.parse(one, max_inputs=8) is first and memo.parse(one, max_inputs=4) is not first
    with pytest.raises(protocol.ValidationFailed):
        memo.parse(two, max_inputs=1)  # refused whatever was remembered for other limits
    for i in range(10):  # over the bound, the oldest go first
        memo.parse(request([f"filler {i}"]), max_inputs=8)
    assert memo.parse(one, max_inputs=8) is not first and memo.lru.bytes <= 3000
    off = protocol.ParseMemo(max_bytes=0)
    assert off.parse(one, max_inputs=8) is not off.parse(one, max_inputs=8)


@pytest.mark.parametrize("inputs", [1, 8])
def test_the_parse_memos_bound_is_what_its_requests_cost_the_process(inputs: int) -> None:
    """What tracemalloc sees remembered requests (keyed, as the cache keys them) take is within 10% of what the memo
    counts: its bound bounds the process."""
    import tracemalloc

    from gateway.cache import key_prefix, request_keys

    bodies = [request([f"remembered {i}-{j}" for j in range(inputs)], dimensions=32) for i in range(5000)]
    memo = protocol.ParseMemo(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for raw in bodies:
            remembered = memo.parse(raw, max_inputs=64)
            request_keys(remembered, key_prefix(remembered, None))
        taken = tracemalloc.get_traced_memory()[0] - before + sum(len(b) + 33 for b in bodies)  # the bodies it holds
    finally:
        tracemalloc.stop()
    assert abs(taken - memo.lru.bytes) <= 0.1 * memo.lru.bytes, (taken, memo.lru.bytes)


async def test_the_local_tiers_fill_is_exported(gateway: Gateway, cache_url: str) -> None:
    client = await gateway(cache={"url": cache_url})
    body = request(["measured a", "measured b"])
    for _ in range(2):
        assert (await post(client, body))[0] == 200
    resp = await client.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
    text = (await resp.read()).decode()
    local = client.app[K.CACHE].local
    assert len(local) == 2
    assert 'eg_hot_cache_items{tier="entries"} 2.0' in text
    assert f'eg_hot_cache_bytes{{tier="entries"}} {float(local.bytes)}' in text
    memo = client.app[K.PARSE_MEMO].lru
    assert len(memo) == 1 and 'eg_hot_cache_items{tier="requests"} 1.0' in text
    assert f'eg_hot_cache_bytes{{tier="requests"}} {float(memo.bytes)}' in text
