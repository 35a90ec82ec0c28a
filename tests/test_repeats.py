"""Exact repeats of all-hit requests (gateway/memo.py): answered from their kept keys, byte for byte as the
full path answers, with every per-caller rule (models, input limits, quotas, usage) still applied."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway import appkeys as K
from gateway import handlers
from gateway.auth import hash_key
from gateway.memo import Replay, ResponseMemo

from .conftest import ADMIN_KEY, TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, base_config, sim_of, upstream_answer

MODEL = "jina-embeddings-v3"


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full path's request parsing: a repeat answered from the memo does none."""
    calls = [0]
    real = handlers.parse_embedding_request

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(handlers, "parse_embedding_request", counting)
    return calls


async def post(client: Any, body: bytes, key: str = TEAM_A_KEY) -> tuple[int, Any, bytes]:
    resp = await client.post("/v1/embeddings", data=body, headers=auth(key))
    return resp.status, resp.headers, await resp.read()


def request(inputs: list[str], **extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "input": inputs, **extra})


@pytest.mark.parametrize("inputs", [["one query"], ["doc a", "doc b", "doc a", "doc c"]])
@pytest.mark.parametrize("fmt", [{}, {"encoding_format": "base64"}, {"embedding_type": "ubinary"}])
async def test_a_repeat_is_answered_from_its_keys_byte_for_byte(
    gateway: Gateway, redis_url: str, parsed: list[int], inputs: list[str], fmt: dict[str, str]
) -> None:
    client = await gateway(cache={"url": redis_url})
    sim = sim_of(client)
    body = request(inputs, dimensions=32, **fmt)
    first = await post(client, body)  # misses
    second = await post(client, body)  # all hits, by the full path: kept
    assert parsed[0] == 2 and len(client.app[K.REPEATS]) == 1
    third = await post(client, body)
    fourth = await post(client, body)
    assert parsed[0] == 2  # the repeats were not parsed
    replay, hot = client.app[K.REPEATS].get("", body), client.app[K.CACHE].hot
    assert replay is not None and hot.assembled(replay.serial, replay.keys) is not None  # the fourth's pieces
    want = await upstream_answer(sim, orjson.loads(body))
    assert first[2] == second[2] == third[2] == fourth[2] == want
    distinct = len(set(inputs))
    for _, headers, _ in (second, third, fourth):
        assert headers["X-Cache-Hits"] == str(distinct) and headers["X-Cache-Misses"] == "0"
        assert headers["X-Upstream-Tokens"] == "0"
    assert sim.calls == 1

    status, report = await usage(client)
    assert status == 200
    total = report["total"]
    assert total["requests"] == 4 and total["inputs"] == 4 * len(inputs)
    assert total["hits"] == 3 * distinct and total["misses"] == distinct
    assert total["upstream_tokens"] == sim.tokens and total["cached_tokens"] == 3 * sim.tokens


async def usage(client: Any) -> tuple[int, Any]:
    resp = await client.get("/v1/usage", headers=auth(ADMIN_KEY))
    return resp.status, orjson.loads(await resp.read())


async def test_a_repeat_is_held_to_the_asking_teams_rules(gateway: Gateway, redis_url: str) -> None:
    teams = [
        {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)]},
        {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)], "models": ["jina-embeddings-v4"],
         "max_inputs_per_request": 1},
        {"name": "team-c", "keys": [hash_key("eg-test-team-c")], "max_inputs_per_request": 1,
         "quota": {"requests_per_minute": 2}},
    ]
    client = await gateway(cache={"url": redis_url}, teams=teams)
    two = request(["x one", "x two"])
    one = request(["x one"])
    for body in (two, two, one, one):
        assert (await post(client, body))[0] == 200
    assert len(client.app[K.REPEATS]) == 2

    status, _, raw = await post(client, one, key=TEAM_B_KEY)  # a model team-b may not use
    assert status == 403 and orjson.loads(raw)["code"] == "MODEL_NOT_ALLOWED"
    status, _, raw = await post(client, two, key="eg-test-team-c")  # over team-c's inputs per request
    assert status == 422 and "at most 1 allowed" in orjson.loads(raw)["errors"][0]["message"]
    statuses = [(await post(client, one, key="eg-test-team-c"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]  # repeats count against the request rate


async def test_a_team_scoped_cache_keeps_repeats_per_team(gateway: Gateway, redis_url: str) -> None:
    client = await gateway(cache={"url": redis_url, "scope": "team"})
    sim = sim_of(client)
    body = request(["scoped"])
    for _ in range(3):
        assert (await post(client, body))[0] == 200
    status, headers, _ = await post(client, body, key=TEAM_B_KEY)  # team-b's cache has nothing yet
    assert status == 200 and headers["X-Cache-Misses"] == "1" and sim.calls == 2


async def test_a_repeat_whose_entry_left_the_hot_tier_takes_the_full_path(
    gateway: Gateway, redis_url: str, parsed: list[int]
) -> None:
    client = await gateway(cache={"url": redis_url})
    sim = sim_of(client)
    body = request(["soon evicted"])
    await post(client, body)
    await post(client, body)
    hot = client.app[K.CACHE].hot
    assert hot is not None
    hot.clear()  # as if evicted by other traffic
    status, headers, raw = await post(client, body)  # from Redis again, by the full path
    assert status == 200 and headers["X-Cache-Hits"] == "1" and parsed[0] == 3
    assert raw == await upstream_answer(sim, orjson.loads(body)) and sim.calls == 1


async def test_a_reload_forgets_the_repeats(gateway: Gateway, redis_url: str) -> None:
    from gateway import config as cfg

    client = await gateway(cache={"url": redis_url})
    body = request(["reloaded"])
    await post(client, body)
    await post(client, body)
    assert len(client.app[K.REPEATS]) == 1
    new = cfg.build(cfg.Config, base_config(cache={"url": redis_url}, limits={"max_inputs_per_request": 5}), "")
    client.app[K.LIVE].swap(new)
    assert len(client.app[K.REPEATS]) == 0


async def test_no_repeats_without_the_hot_tier(gateway: Gateway, parsed: list[int]) -> None:
    client = await gateway()  # memory:// cache: no hot tier, hence no memo
    body = request(["plain"])
    for _ in range(3):
        assert (await post(client, body))[0] == 200
    assert parsed[0] == 3 and len(client.app[K.REPEATS]) == 0


def replay(n_keys: int) -> Replay:
    return Replay(MODEL, n_keys, n_keys, 0, n_keys, n_keys, tuple(bytes(16) for _ in range(n_keys)), "float")


def test_the_memo_is_an_lru_bounded_by_bytes() -> None:
    cost = 440 + 10 + 60  # overhead + body + one key
    memo = ResponseMemo(max_bytes=3 * cost, max_body_bytes=100)
    for name in (b"body-0001", b"body-0002", b"body-0003"):
        memo.put("", name + b"x", replay(1))
    assert len(memo) == 3 and memo.bytes == 3 * cost
    assert memo.get("", b"body-0001x") is not None  # a use: 0002 is now the oldest
    memo.put("", b"body-0004x", replay(1))
    assert memo.get("", b"body-0002x") is None and len(memo) == 3 and memo.bytes == 3 * cost
    assert memo.get("team-a", b"body-0001x") is None  # another scope
    assert memo.keeps(b"y" * 100) and not memo.keeps(b"y" * 101) and not memo.keeps(b"")
    assert not ResponseMemo(max_bytes=0).keeps(b"{}")  # off
    memo.put("", b"y" * 101, replay(1))  # over max_body_bytes: not kept
    assert memo.get("", b"y" * 101) is None and len(memo) == 3
    memo.clear()
    assert len(memo) == 0 and memo.bytes == 0


async def test_the_hot_tiers_fill_is_exported(gateway: Gateway, redis_url: str) -> None:
    client = await gateway(cache={"url": redis_url})
    body = request(["measured a", "measured b"])
    for _ in range(2):
        assert (await post(client, body))[0] == 200
    resp = await client.get("/metrics", headers={"Authorization": "Bearer metrics-token"})
    text = (await resp.read()).decode()
    hot, memo = client.app[K.CACHE].hot, client.app[K.REPEATS]
    assert hot is not None and len(hot) == 2 and len(memo) == 1
    assert 'eg_hot_cache_items{tier="entries"} 2.0' in text
    assert f'eg_hot_cache_bytes{{tier="entries"}} {float(hot.bytes)}' in text
    assert 'eg_hot_cache_items{tier="requests"} 1.0' in text
    assert f'eg_hot_cache_bytes{{tier="requests"}} {float(memo.bytes)}' in text


def test_replays_of_one_shape_share_their_log_fields() -> None:
    one, other = replay(1), replay(1)
    assert one.serial != other.serial  # each names its own assembled answer
    assert one.log_fields is other.log_fields  # kept once, not once per kept body
    assert one.log_fields == {"model": MODEL, "inputs": 1, "hits": 1, "misses": 0, "joined": 0, "upstream_tokens": 0}
    assert replay(2).log_fields["inputs"] == 2
