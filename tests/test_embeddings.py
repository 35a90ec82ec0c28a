"""POST /v1/embeddings end to end: per-input caching, keys, renderings, units, errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.sim import Fault

from .conftest import TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, sim_of, upstream_answer

MODEL = "jina-embeddings-v3"


async def post(client: Any, body: dict[str, Any], key: str = TEAM_A_KEY) -> tuple[int, Any, Any]:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth(key))
    raw = await resp.read()
    return resp.status, resp.headers, raw


async def direct(client: Any, body: dict[str, Any]) -> bytes:
    """The same request answered by a twin of the app's simulated upstream (same config, own counters)."""
    return await upstream_answer(sim_of(client), body)


def texts(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} number {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]


async def test_mixed_request_sends_only_new_inputs(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    old, new = texts(4, "old"), texts(4, "new")
    status, _, _ = await post(client, {"model": MODEL, "input": old})
    assert status == 200
    sim.reset_counters()

    mixed = [old[0], new[0], old[1], new[1], new[2], old[2], old[3], new[3]]
    status, headers, raw = await post(client, {"model": MODEL, "input": mixed})
    assert status == 200
    assert sim.calls == 1
    assert sim.requests[0]["input"] == [new[0], new[1], new[2], new[3]]
    assert sim.tokens == sum(sim.token_count(t) for t in new)
    assert headers["X-Cache-Hits"] == "4" and headers["X-Cache-Misses"] == "4"
    assert headers["X-Upstream-Tokens"] == str(sim.tokens)
    body = orjson.loads(raw)
    assert body["usage"]["total_tokens"] == sum(sim.token_count(t) for t in mixed)
    assert [d["index"] for d in body["data"]] == list(range(8))


async def test_response_order_and_vectors_match_the_upstream(gateway: Gateway) -> None:
    client = await gateway()
    items = texts(5)
    await post(client, {"model": MODEL, "input": items[1:3]})  # warm two of them
    status, _, raw = await post(client, {"model": MODEL, "input": items, "embedding_type": "base64"})
    assert status == 200
    want = await direct(client, {"model": MODEL, "input": items, "embedding_type": "base64"})
    assert raw == want


async def test_repeated_input_inside_one_request_goes_upstream_once(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    status, _, raw = await post(client, {"model": MODEL, "input": ["a b c", "x y", "a b c", "a b c"]})
    assert status == 200
    assert sim.requests[0]["input"] == ["a b c", "x y"]
    body = orjson.loads(raw)
    assert body["data"][0]["embedding"] == body["data"][2]["embedding"] == body["data"][3]["embedding"]
    assert body["usage"]["total_tokens"] == 3 * sim.token_count("a b c") + sim.token_count("x y")


@pytest.mark.parametrize(
    "change",
    [
        {"model": "jina-embeddings-v4"},
        {"task": "retrieval.passage"},
        {"dimensions": 64},
        {"normalized": False},
        {"late_chunking": True},
        {"some_future_field": 1},
    ],
)
async def test_changing_an_embedding_param_is_a_miss(gateway: Gateway, change: dict[str, Any]) -> None:
    client = await gateway()
    sim = sim_of(client)
    base = {"model": MODEL, "input": ["hello world"], "task": "retrieval.query"}
    assert (await post(client, base))[0] == 200
    sim.reset_counters()
    status, headers, _ = await post(client, {**base, **change})
    assert status == 200
    assert sim.calls == 1
    assert headers["X-Cache-Hits"] == "0"


@pytest.mark.parametrize("fmt", [("embedding_type", "float"), ("embedding_type", "base64"),
                                 ("embedding_type", "binary"), ("embedding_type", "ubinary"),
                                 ("encoding_format", "float"), ("encoding_format", "base64")])
async def test_output_format_is_a_hit_and_byte_identical(gateway: Gateway, fmt: tuple[str, str]) -> None:
    client = await gateway()
    sim = sim_of(client)
    items = ["first input", "second, with punctuation!", "déjà vu — ünïcode"]
    base = {"model": MODEL, "input": items, "dimensions": 100}
    assert (await post(client, base))[0] == 200
    calls = sim.calls
    request = {**base, fmt[0]: fmt[1]}
    status, headers, raw = await post(client, request)
    assert status == 200
    assert sim.calls == calls  # served from the cache
    assert headers["X-Cache-Hits"] == "3"
    assert raw == await direct(client, request)


async def test_openai_user_field_is_not_part_of_the_key(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    await post(client, {"model": MODEL, "input": "same text", "user": "alice"})
    status, headers, _ = await post(client, {"model": MODEL, "input": ["same text"], "user": "bob"})
    assert status == 200 and headers["X-Cache-Hits"] == "1" and sim.calls == 1
    assert "user" not in sim.requests[0]


async def test_late_chunking_is_one_unsplit_unit_and_cached(gateway: Gateway) -> None:
    client = await gateway(upstream={"max_inputs_per_call": {MODEL: 2}}, coalesce={"max_batch_inputs": 2})
    sim = sim_of(client)
    items = texts(5, "chunk")
    request = {"model": MODEL, "input": items, "late_chunking": True}
    status, _, raw = await post(client, request)
    assert status == 200
    assert sim.calls == 1 and sim.requests[0]["input"] == items
    assert raw == await direct(client, request)
    status, headers, raw2 = await post(client, request)
    assert status == 200 and sim.calls == 1 and raw2 == raw
    assert headers["X-Cache-Hits"] == "5"
    # A single chunk of the list is not answered from the unit's entry: its vector depends on its neighbours.
    await post(client, {"model": MODEL, "input": items[:1], "late_chunking": True})
    assert sim.calls == 2


async def test_multivector_round_trips_through_the_cache(gateway: Gateway) -> None:
    client = await gateway()
    request = {"model": "jina-embeddings-v4", "input": ["a short text", "another text here"],
               "return_multivector": True}
    status, _, first = await post(client, request)
    assert status == 200
    status, headers, second = await post(client, request)
    assert status == 200 and headers["X-Cache-Hits"] == "2"
    assert first == second == await direct(client, request)
    for fmt in ("base64", "binary"):
        req = {**request, "embedding_type": fmt}
        assert (await post(client, req))[2] == await direct(client, req)


async def test_large_miss_lists_are_split_at_the_upstream_limit(gateway: Gateway) -> None:
    client = await gateway(upstream={"max_inputs_per_call": {MODEL: 3}})
    sim = sim_of(client)
    items = texts(8)
    status, _, raw = await post(client, {"model": MODEL, "input": items})
    assert status == 200
    # The three calls go at once, on three pooled connections: they may reach the upstream in any order.
    assert sorted(len(r["input"]) for r in sim.requests) == [2, 3, 3]
    assert sorted(x for r in sim.requests for x in r["input"]) == sorted(items)
    assert orjson.loads(raw)["usage"]["total_tokens"] == sim.tokens


async def test_team_scope_never_shares_entries(gateway: Gateway) -> None:
    client = await gateway(cache={"scope": "team"})
    sim = sim_of(client)
    await post(client, {"model": MODEL, "input": ["shared"]}, key=TEAM_A_KEY)
    _, headers, _ = await post(client, {"model": MODEL, "input": ["shared"]}, key=TEAM_B_KEY)
    assert headers["X-Cache-Hits"] == "0" and sim.calls == 2
    _, headers, _ = await post(client, {"model": MODEL, "input": ["shared"]}, key=TEAM_B_KEY)
    assert headers["X-Cache-Hits"] == "1" and sim.calls == 2


async def test_global_scope_shares_entries_across_teams(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    await post(client, {"model": MODEL, "input": ["shared"]}, key=TEAM_A_KEY)
    _, headers, _ = await post(client, {"model": MODEL, "input": ["shared"]}, key=TEAM_B_KEY)
    assert headers["X-Cache-Hits"] == "1" and sim.calls == 1


async def test_object_inputs_are_keyed_by_canonical_json(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    await post(client, {"model": "jina-clip-v2", "input": [{"image": "https://x/cat.png"}, {"text": "a cat"}]})
    _, headers, _ = await post(client, {"model": "jina-clip-v2", "input": [{"text": "a cat"}]})
    assert headers["X-Cache-Hits"] == "1" and sim.calls == 1
    assert sim.requests[0]["input"] == [{"image": "https://x/cat.png"}, {"text": "a cat"}]


async def test_upstream_429_is_retried_after_retry_after(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    sim.inject(Fault(kind="status", status=429, headers={"Retry-After": "1"},
                     body={"detail": "slow down", "code": "RATE_REQUEST_LIMIT_EXCEEDED"}))
    status, _, raw = await post(client, {"model": MODEL, "input": ["retry me"]})
    assert status == 200
    assert sim.calls == 2 and sim.ok_calls == 1
    assert len(orjson.loads(raw)["data"]) == 1
    text = (await (await client.get("/metrics", headers=auth("metrics-token"))).text())
    assert 'eg_upstream_retries_total{reason="429"} 1.0' in text


async def test_upstream_5xx_is_retried_then_502(gateway: Gateway) -> None:
    client = await gateway(upstream={"max_retries": 2})
    sim = sim_of(client)
    sim.inject(*[Fault(kind="status", status=503) for _ in range(3)])
    status, _, raw = await post(client, {"model": MODEL, "input": ["never"]})
    assert status == 502
    assert orjson.loads(raw)["code"] == "UPSTREAM_ERROR"
    assert sim.calls == 3
    # Nothing was cached: the next request goes upstream and succeeds.
    status, headers, _ = await post(client, {"model": MODEL, "input": ["never"]})
    assert status == 200 and headers["X-Cache-Misses"] == "1"


@pytest.mark.parametrize("kind", ["malformed", "short", "close"])
async def test_bad_upstream_answers_are_retried_and_never_cached(gateway: Gateway, kind: str) -> None:
    client = await gateway()
    sim = sim_of(client)
    sim.inject(Fault(kind=kind))
    status, _, raw = await post(client, {"model": MODEL, "input": ["one", "two"]})
    assert status == 200 and sim.calls == 2
    assert raw == await direct(client, {"model": MODEL, "input": ["one", "two"]})


async def test_upstream_4xx_is_passed_through_and_not_cached(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    status, _, raw = await post(client, {"model": "no-such-model", "input": ["x"]})
    assert status == 422
    body = orjson.loads(raw)
    assert body["code"] == "VALIDATION_ERROR" and body["errors"][0]["field"] == "model"
    await post(client, {"model": "no-such-model", "input": ["x"]})
    assert sim.calls == 2

