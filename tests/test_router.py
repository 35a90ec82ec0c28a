"""Several upstreams and keys: routing by public model (each wire format), key pools (sharing, 429 cool-down, 401
ejection), per-upstream input limits, the breaker, cache namespaces, and no pool key anywhere. Failover with a
killed upstream process is in test_failover.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway.auth import hash_key
from gateway.keys import CACHE_PREFIX
from gateway.sim import Fault, SimConfig, Simulator
from gateway.tokens import estimate
from gateway.upstream.breaker import CircuitBreaker

from .clock import FakeClock
from .conftest import TEAM_A_KEY, Gateway, auth, upstream_answer
from .gateways import SimProcess

POOL = ("sk-pool-key-one-0123456789", "sk-pool-key-two-9876543210")
THREE = [
    {"name": "jina", "kind": "jina", "url": "sim://jina", "models": ["jina-embeddings-v3", "jina-clip-v2"]},
    {"name": "oai", "kind": "openai", "url": "sim://openai", "models": ["text-embedding-3-small"]},
    {"name": "tei", "kind": "tei", "url": "sim://tei", "models": ["bge-m3"]},
]


async def post(client: TestClient, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth(TEAM_A_KEY))
    return resp.status, resp.headers, await resp.read()


def sims(client: TestClient) -> dict[str, Simulator]:
    return client.app[K.SIMULATORS]


async def scrape(client: TestClient) -> str:
    return await (await client.get("/metrics", headers=auth("metrics-token"))).text()


def one_upstream(**over: Any) -> dict[str, Any]:
    return {"name": "jina", "kind": "jina", "url": "sim://", "keys": list(POOL), "backoff_base_s": 0.01, **over}


# ---- routing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["float", "base64", "binary", "ubinary"])
async def test_each_model_reaches_its_upstream_in_its_wire_format_and_answers_in_the_contracts_shape(
    gateway: Gateway, output: str
) -> None:
    client = await gateway(upstreams=THREE)
    reference = Simulator(SimConfig())
    for model, upstream in [("jina-embeddings-v3", "jina"), ("text-embedding-3-small", "oai"), ("bge-m3", "tei")]:
        body = {"model": model, "input": [f"{model} one", f"{model} two"], "embedding_type": output}
        status, _headers, raw = await post(client, body)
        assert status == 200, raw
        assert raw == await upstream_answer(reference, body), f"{model} via {upstream}"
        assert {name: sim.calls for name, sim in sims(client).items() if sim.calls} == {upstream: 1}
        for sim in sims(client).values():
            sim.reset_counters()
    tei_call = sims(client)["tei"]
    assert tei_call.requests == []  # reset above; check the wire of one more TEI call
    _, headers, _ = await post(client, {"model": "bge-m3", "input": ["native wire"], "normalized": False})
    assert tei_call.requests == [{"inputs": ["native wire"], "normalize": False}]
    assert tei_call.tokenize_calls == 1  # TEI answers no usage: the tokens come from /tokenize
    assert headers["X-Upstream-Tokens"] == str(reference.token_count("native wire"))


async def test_tei_tokens_without_its_tokenize_are_estimated_and_marked_so_in_the_usage_api(
    gateway: Gateway, sim_process: Callable[..., SimProcess]
) -> None:
    tei = sim_process("--kind", "tei", "--no-tokenize")  # TEI's /embed answers no usage; /tokenize is 404
    client = await gateway(upstreams=[THREE[0], {**THREE[2], "url": tei.url}])
    texts = ["an estimate", "of the tokens of each input"]
    guessed = sum(estimate(t) for t in texts)
    assert guessed != sum(Simulator(SimConfig()).token_count(t) for t in texts)  # what /tokenize would have said
    _, headers, _ = await post(client, {"model": "bge-m3", "input": texts})
    assert headers["X-Upstream-Tokens"] == str(guessed)
    _, headers, _ = await post(client, {"model": "jina-embeddings-v3", "input": texts})
    reported = int(headers["X-Upstream-Tokens"])  # Jina's usage, not an estimate

    usage = await (await client.get("/v1/usage?group_by=model", headers=auth(TEAM_A_KEY))).json()
    rows = {row["model"]: (row["upstream_tokens"], row["estimated_tokens"]) for row in usage["data"]}
    assert rows == {"bge-m3": (guessed, guessed), "jina-embeddings-v3": (reported, 0)}
    assert usage["total"]["estimated_tokens"] == guessed
    csv = await (await client.get("/v1/usage?group_by=model&format=csv", headers=auth(TEAM_A_KEY))).text()
    header, *lines = [line.split(",") for line in csv.splitlines()]
    assert [{"model": line[0], "estimated_tokens": line[header.index("estimated_tokens")]} for line in lines] == [
        {"model": "bge-m3", "estimated_tokens": str(guessed)}, {"model": "jina-embeddings-v3", "estimated_tokens": "0"}]


async def test_the_openai_upstream_gets_openai_fields_and_its_own_model_name(gateway: Gateway) -> None:
    upstreams = [{"name": "vllm", "kind": "openai", "url": "sim://openai",
                  "models": {"jina-embeddings-v3": "jinaai/jina-embeddings-v3"}}]
    client = await gateway(upstreams=upstreams)
    status, _, raw = await post(client, {"model": "jina-embeddings-v3", "input": ["x"], "dimensions": 64})
    assert status == 200, raw
    assert sims(client)["vllm"].requests == [
        {"model": "jinaai/jina-embeddings-v3", "input": ["x"], "dimensions": 64, "encoding_format": "base64"}]
    assert orjson.loads(raw)["model"] == "jina-embeddings-v3"


async def test_an_unknown_model_is_a_422_listing_the_models(gateway: Gateway) -> None:
    client = await gateway(upstreams=THREE)
    status, _, raw = await post(client, {"model": "no-such-model", "input": ["x"]})
    body = orjson.loads(raw)
    assert status == 422 and body["code"] == "VALIDATION_ERROR", body
    assert body["detail"] == ("model: no upstream serves 'no-such-model'; models: bge-m3, jina-clip-v2, "
                              "jina-embeddings-v3, text-embedding-3-small")
    assert sum(sim.calls for sim in sims(client).values()) == 0


async def test_an_unknown_model_lists_only_the_models_the_team_may_use(gateway: Gateway) -> None:
    team = {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "models": ["bge-m3", "jina-embeddings-v3", "gone"]}
    client = await gateway(upstreams=THREE, teams=[team])
    status, _, raw = await post(client, {"model": "gone", "input": ["x"]})
    assert status == 422 and orjson.loads(raw)["detail"] == (
        "model: no upstream serves 'gone'; models: bge-m3, jina-embeddings-v3")


async def test_a_field_the_upstream_cannot_take_is_a_422_unless_it_drops_params(gateway: Gateway) -> None:
    client = await gateway(upstreams=THREE)
    status, _, raw = await post(client, {"model": "bge-m3", "input": ["x"], "task": "retrieval.query"})
    body = orjson.loads(raw)
    assert status == 422 and body["errors"][0]["field"] == "task" and "'tei'" in body["detail"], body
    assert sims(client)["tei"].calls == 0
    dropping = await gateway(upstreams=[{**THREE[2], "drop_params": True}])
    status, _, raw = await post(dropping, {"model": "bge-m3", "input": ["x"], "task": "retrieval.query"})
    assert status == 200 and sims(dropping)["tei"].requests == [{"inputs": ["x"]}]


async def test_a_batch_bigger_than_the_upstreams_limit_is_split(gateway: Gateway) -> None:
    client = await gateway(upstreams=[one_upstream(keys=[], max_inputs_per_call={"jina-embeddings-v3": 3})])
    texts = [f"split {i}" for i in range(10)]
    status, _, raw = await post(client, {"model": "jina-embeddings-v3", "input": texts})
    assert status == 200 and raw == await upstream_answer(Simulator(SimConfig()), {"model": "jina-embeddings-v3",
                                                                                  "input": texts})
    assert sorted(len(r["input"]) for r in sims(client)["jina"].requests) == [1, 3, 3, 3]


async def test_equal_priorities_share_the_calls_by_weight(gateway: Gateway) -> None:
    heavy = {**one_upstream(keys=[]), "weight": 3.0}
    light = {**one_upstream(keys=[]), "name": "light", "weight": 1.0}
    client = await gateway(upstreams=[heavy, light], coalesce={"max_batch_inputs": 1})
    for i in range(400):
        assert (await post(client, {"model": "jina-embeddings-v3", "input": [f"weighted {i}"]}))[0] == 200
    calls = {name: sim.calls for name, sim in sims(client).items()}
    assert calls["jina"] + calls["light"] == 400 and 260 <= calls["jina"] <= 340, calls  # 75% expected


async def test_an_openai_upstream_refuses_jina_only_fields_unless_it_drops_them(gateway: Gateway) -> None:
    strict = await gateway(upstreams=[THREE[1]])
    status, _, raw = await post(strict, {"model": "text-embedding-3-small", "input": ["x"], "late_chunking": True})
    assert status == 422 and orjson.loads(raw)["errors"][0]["field"] == "late_chunking"
    lenient = await gateway(upstreams=[{**THREE[1], "drop_params": True}])
    status, _, _ = await post(lenient, {"model": "text-embedding-3-small", "input": ["x"], "task": "text-matching"})
    assert status == 200 and "task" not in sims(lenient)["oai"].requests[0]


# ---- key pools -------------------------------------------------------------------------------------------


async def test_a_pool_of_two_shares_400_misses(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(api_keys=POOL), upstreams=[one_upstream()],
                           coalesce={"max_batch_inputs": 1})
    statuses = await asyncio.gather(*(post(client, {"model": "jina-embeddings-v3", "input": [f"miss {i}"]})
                                      for i in range(400)))
    assert [s for s, _, _ in statuses] == [200] * 400
    calls = sims(client)["jina"].key_calls
    assert sum(calls.values()) == 400
    for key in POOL:
        assert 160 <= calls[key] <= 240, calls  # 40-60%


async def test_a_429_cools_its_key_for_retry_after_while_the_other_serves(gateway: Gateway) -> None:
    clock = FakeClock()
    client = await gateway(sim=SimConfig(api_keys=POOL), upstreams=[one_upstream()], clock=clock)
    sim = sims(client)["jina"]
    sim.inject(Fault("status", status=429, headers={"Retry-After": "5"}, key=POOL[0]))
    for i in range(20):
        status, _, _ = await post(client, {"model": "jina-embeddings-v3", "input": [f"cooling {i}"]})
        assert status == 200
    assert sim.key_calls == {POOL[0]: 1, POOL[1]: 20}  # the 429, then nothing for the cooling key
    clock.advance(4.9)
    await post(client, {"model": "jina-embeddings-v3", "input": ["still cooling"]})
    assert sim.key_calls[POOL[0]] == 1
    clock.advance(0.2)
    for i in range(4):
        await post(client, {"model": "jina-embeddings-v3", "input": [f"warm again {i}"]})
    assert sim.key_calls[POOL[0]] == 3, "both keys share the calls again"
    assert 'eg_upstream_key_cooldowns_total{key="jina#1",upstream="jina"} 1.0' in await scrape(client)


async def test_a_refused_key_is_ejected_after_its_first_401_and_the_calls_move_on(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await gateway(sim=SimConfig(api_keys=POOL[:1]), upstreams=[one_upstream()])
    for i in range(20):
        status, _, raw = await post(client, {"model": "jina-embeddings-v3", "input": [f"eject {i}"]})
        assert status == 200, raw
    assert sims(client)["jina"].key_calls == {POOL[0]: 20, POOL[1]: 1}
    metrics = await scrape(client)
    assert 'eg_upstream_key_ejections_total{key="jina#2",upstream="jina"} 1.0' in metrics
    assert 'eg_upstream_key_calls_total{key="jina#2",status="401",upstream="jina"} 1.0' in metrics
    assert "upstream jina refused key jina#2 (HTTP 401)" in caplog.text


async def test_every_key_refused_is_a_502_upstream_auth_failed(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(api_keys=("something else",)), upstreams=[one_upstream()])
    status, _, raw = await post(client, {"model": "jina-embeddings-v3", "input": ["refused"]})
    assert status == 502 and orjson.loads(raw)["code"] == "UPSTREAM_AUTH_FAILED"
    assert sims(client)["jina"].calls == 2  # each key once: retrying cannot fix a refused key
    status, _, raw = await post(client, {"model": "jina-embeddings-v3", "input": ["refused again"]})
    assert status == 502 and sims(client)["jina"].calls == 2  # ejected keys are left out


async def test_no_pool_key_appears_in_a_response_a_log_line_or_metrics(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await gateway(sim=SimConfig(api_keys=POOL[:1]), upstreams=[one_upstream()])
    sims(client)["jina"].inject(Fault("status", status=429, headers={"Retry-After": "1"}, key=POOL[0]),
                                Fault("status", status=503))
    seen = b""
    for i in range(6):
        _status, headers, raw = await post(client, {"model": "jina-embeddings-v3", "input": [f"secret {i}"]})
        seen += raw + str(dict(headers)).encode()
    seen += (await scrape(client)).encode() + await (await client.get("/readyz")).read()
    seen += caplog.text.encode()
    for key in POOL:
        assert key.encode() not in seen and key[3:15].encode() not in seen


# ---- the breaker -----------------------------------------------------------------------------------------


def test_the_breaker_opens_after_n_failures_and_one_probe_closes_it() -> None:
    now = [0.0]
    breaker = CircuitBreaker(3, 10.0, lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    breaker.success()  # a success resets the streak
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 9.99
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow(), "one probe at a time"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


async def test_readyz_reports_breakers_and_stays_ready_with_one_open(gateway: Gateway) -> None:
    clock = FakeClock()
    upstreams = [one_upstream(keys=[], max_retries=0, breaker_failures=1),
                 {**one_upstream(keys=[]), "name": "backup", "priority": 2}]
    client = await gateway(upstreams=upstreams, clock=clock)
    sims(client)["jina"].inject(Fault("status", status=503))
    status, _, _ = await post(client, {"model": "jina-embeddings-v3", "input": ["fails over"]})
    assert status == 200 and sims(client)["backup"].ok_calls == 1
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["upstreams"] == {"jina": "open", "backup": "closed"}
    metrics = await scrape(client)
    assert 'eg_upstream_breaker_state{upstream="jina"} 2.0' in metrics
    assert 'eg_upstream_failovers_total{upstream="jina"} 1.0' in metrics
    assert 'eg_upstream_failovers_total{upstream="backup"} 0.0' in metrics
    await post(client, {"model": "jina-embeddings-v3", "input": ["while open"]})
    assert sims(client)["jina"].calls == 1, "an open breaker keeps calls off the upstream"
    clock.advance(10.0)  # breaker_open_s: the next call is the probe
    await post(client, {"model": "jina-embeddings-v3", "input": ["probe"]})
    assert sims(client)["jina"].ok_calls == 1
    assert (await (await client.get("/readyz")).json())["upstreams"]["jina"] == "closed"


# ---- cache namespaces ------------------------------------------------------------------------------------

V3 = "jina-embeddings-v3"


def deployments(a: SimProcess, b: SimProcess, namespace: str | None, *, first: str) -> list[dict[str, Any]]:
    """Two deployments of V3 in their own processes: `a` (in `namespace`) and `b` (shared); `first` is tried
    first."""
    a_ns = {} if namespace is None else {"cache_namespace": namespace}
    return [
        {"name": "a", "kind": "jina", "url": a.url + "/v1", "models": [V3], "max_retries": 0,
         "priority": 1 if first == "a" else 2, **a_ns},
        {"name": "b", "kind": "jina", "url": b.url + "/v1", "models": [V3], "max_retries": 0,
         "priority": 1 if first == "b" else 2},
    ]


async def hits(client: TestClient, text: str, **fields: Any) -> int:
    """Embeds `text` through `client` and waits until its answer is in the cache (it is written after the
    answer); the request's cache hits."""
    status, headers, raw = await post(client, {"model": V3, "input": [text], **fields})
    assert status == 200, raw
    await client.app[K.COALESCER].settled()
    return int(headers["X-Cache-Hits"])


@pytest.mark.parametrize("namespace", ["a-only", None])
async def test_a_namespaced_upstreams_vectors_are_not_served_for_another_upstream_and_the_reverse(
    gateway: Gateway, redis_url: str, sim_process: Callable[..., SimProcess], namespace: str | None
) -> None:
    """Two gateways on one Redis cache, one trying `a` first, the other `b`: without a namespace they share every
    vector; with `a` namespaced, neither serves what the other's first choice computed."""
    a, b = sim_process(), sim_process("--kind", "openai")
    shared = namespace is None
    via_a = await gateway(upstreams=deployments(a, b, namespace, first="a"), cache={"url": redis_url})
    via_b = await gateway(upstreams=deployments(a, b, namespace, first="b"), cache={"url": redis_url})
    assert await hits(via_a, "computed by a") == 0
    assert await hits(via_b, "computed by a") == (1 if shared else 0)
    assert await hits(via_b, "computed by b") == 0
    assert await hits(via_a, "computed by b") == (1 if shared else 0)
    assert (a.stats()["calls"], b.stats()["calls"]) == ((1, 1) if shared else (2, 2))
    for client in (via_a, via_b):  # each namespace answers its own lookups
        assert [await hits(client, text) for text in ("computed by a", "computed by b")] == [1, 1]
    assert (a.stats()["calls"], b.stats()["calls"]) == ((1, 1) if shared else (2, 2))


async def test_an_answer_is_cached_in_the_namespace_of_the_upstream_that_answered_it(
    gateway: Gateway, redis_url: str, sim_process: Callable[..., SimProcess]
) -> None:
    a, b = sim_process(), sim_process("--kind", "openai")
    via_a = await gateway(upstreams=deployments(a, b, "a-only", first="a"), cache={"url": redis_url})
    via_b = await gateway(upstreams=deployments(a, b, "a-only", first="b"), cache={"url": redis_url})
    unit = {"late_chunking": True}  # one key over the whole input list
    a.kill()  # via_a fails over from namespaced a to shared b: b's answers go to the shared namespace
    assert [await hits(via_a, "failed over to b"), await hits(via_a, "failed over to b", **unit)] == [0, 0]
    assert [await hits(via_b, "failed over to b"), await hits(via_b, "failed over to b", **unit)] == [1, 1]
    assert b.stats()["ok_calls"] == 2
    a.start()
    b.kill()  # via_b fails over from shared b to namespaced a: a's answers go to a's namespace
    assert [await hits(via_b, "failed over to a"), await hits(via_b, "failed over to a", **unit)] == [0, 0]
    assert [await hits(via_a, "failed over to a"), await hits(via_a, "failed over to a", **unit)] == [1, 1]
    assert a.stats()["ok_calls"] == 2


async def test_without_namespaces_cache_keys_are_those_of_before_namespaces(gateway: Gateway, redis_url: str) -> None:
    """The digests are the ones the gateway wrote before `cache_namespace` existed: caches filled then stay
    valid. A namespace on another model's upstream changes nothing for this model."""
    upstreams = [*THREE[:2], {**THREE[2], "cache_namespace": "tei"}]
    store = aioredis.Redis.from_url(redis_url)
    try:
        for scope, digests in (  # the two items', then the late-chunking unit's
            ("global", ["6f04a28e28f9d4f9eb0c7db0e49e9cfe", "e477803b7962d8d218791268029d4d76",
                        "ccd61b7b47624714671eedca15f08ee4"]),
            ("team", ["b786f0ac21318cf16c479aebd642321e", "f5402aad75dd20b17222b28f15f21012",
                      "dba19e78ed073ef64bd77f8b24318707"]),
        ):
            await store.flushall()
            client = await gateway(upstreams=upstreams, cache={"url": redis_url, "scope": scope})
            body = {"model": V3, "input": ["golden one", "golden two"]}
            assert (await post(client, body))[0] == 200
            assert (await post(client, {**body, "late_chunking": True}))[0] == 200
            await client.app[K.COALESCER].settled()
            assert set(await store.keys(CACHE_PREFIX + b"*")) == {CACHE_PREFIX + bytes.fromhex(d) for d in digests}
    finally:
        await store.aclose()
