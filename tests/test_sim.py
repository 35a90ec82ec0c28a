"""Tests for gateway.sim: the simulated Jina Embeddings API the rest of the suite stands on."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
import pytest
import xxhash
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from gateway.sim import Fault, SimConfig, SimError, Simulator, start_sim

from .conftest import until

MODEL = "jina-embeddings-v3"
Client = TestClient[web.Request, web.Application]
F32 = npt.NDArray[np.float32]


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class SleepRecorder:
    """Stands in for asyncio.sleep so delays are asserted by value, never by waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, sim: Simulator) -> Client:
    return await aiohttp_client(sim.app())


async def post(client: Client, body: Any, headers: dict[str, str] | None = None) -> ClientResponse:
    return await client.post("/v1/embeddings", data=orjson.dumps(body), headers=headers)


async def ok_json(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = await post(client, body)
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


def unb64(text: str) -> F32:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


async def vectors(client: Client, **fields: Any) -> list[F32]:
    body = {"model": MODEL, "input": ["hello world"], "embedding_type": "base64", **fields}
    data = (await ok_json(client, body))["data"]
    return [unb64(item["embedding"]) for item in data]


async def assert_error(resp: ClientResponse, status: int, code: str, field: str | None = None) -> None:
    assert resp.status == status
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert body["errors"][0]["field"] == field


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("item", "tokens"),
    [
        ("hello world", 4),
        ("Hello, world!", 6),
        ("don't stop", 6),
        ("  spaced   out  ", 4),
        ("naïve café", 4),
        ({"text": "hi"}, 3),
        ({"image": "https://example.com/cat.png"}, 1000),
        ({"pdf": "https://example.com/a.pdf"}, 2000),
        # canonical text '{"a":"x y","b":1}' -> { " a " : " x y " , " b " : 1 } = 16 + 2
        ({"b": 1, "a": "x y"}, 18),
    ],
)
def test_token_count(sim: Simulator, item: str | dict[str, Any], tokens: int) -> None:
    assert sim.token_count(item) == tokens


async def test_usage_is_the_sum_of_item_tokens(client: Client) -> None:
    inputs = ["hello world", {"text": "Hello, world!"}, {"image": "img"}]
    body = await ok_json(client, {"model": MODEL, "input": inputs, "embedding_type": "ubinary"})
    assert body["usage"] == {"total_tokens": 1010, "prompt_tokens": 1010}


# ---------------------------------------------------------------- vectors


async def test_same_request_same_bytes(client: Client) -> None:
    body = {"model": MODEL, "input": ["hello world", "again"]}
    first, second = await post(client, body), await post(client, body)
    assert await first.read() == await second.read()


async def test_exact_response_bytes(client: Client, sim: Simulator) -> None:
    body = {"model": MODEL, "input": ["hello world", {"image": "img"}], "dimensions": 40}
    vecs, tokens = sim.embed(body)
    expected = {
        "model": MODEL,
        "object": "list",
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
        "data": [
            {"object": "embedding", "index": i, "embedding": v.astype(np.float64)} for i, v in enumerate(vecs)
        ],
    }
    resp = await post(client, body)
    assert resp.content_type == "application/json"
    assert await resp.read() == orjson.dumps(expected, option=orjson.OPT_SERIALIZE_NUMPY)
    assert tokens == 1004


async def test_vector_generation_convention(client: Client) -> None:
    parts = [MODEL, "retrieval.query", 64, True, "hello world"]
    seed = xxhash.xxh3_64_intdigest(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS))
    raw = np.random.default_rng(seed).standard_normal(1024, dtype=np.float32)[:64]
    (got,) = await vectors(client, task="retrieval.query", dimensions=64)
    assert np.array_equal(got, raw / np.linalg.norm(raw))
    (unnormalized,) = await vectors(client, task="retrieval.query", dimensions=64, normalized=False)
    seed = xxhash.xxh3_64_intdigest(orjson.dumps([*parts[:3], False, "hello world"]))
    raw = np.random.default_rng(seed).standard_normal(1024, dtype=np.float32)[:64]
    assert np.array_equal(unnormalized, raw * np.float32(3.0))


@pytest.mark.parametrize(
    "change",
    [
        {"task": "retrieval.passage"},
        {"dimensions": 512},
        {"normalized": False},
        {"model": "jina-embeddings-v5-text-small"},
        {"input": ["hello world!"]},
    ],
)
async def test_parameters_change_the_vector(client: Client, change: dict[str, Any]) -> None:
    (base,) = await vectors(client, task="retrieval.query")
    (other,) = await vectors(client, **{"task": "retrieval.query", **change})
    n = min(base.size, other.size)
    assert not np.allclose(base[:n], other[:n])


async def test_dimensions_and_native_dims(client: Client) -> None:
    assert (await vectors(client, dimensions=32))[0].shape == (32,)
    assert (await vectors(client))[0].shape == (1024,)
    assert (await vectors(client, model="jina-embeddings-v4"))[0].shape == (2048,)
    assert (await vectors(client, model="jina-embeddings-v5-text-nano"))[0].shape == (768,)
    # Asking for the native size is the same request as not asking.
    assert np.array_equal((await vectors(client, dimensions=1024))[0], (await vectors(client))[0])


async def test_text_object_embeds_like_the_bare_string(client: Client) -> None:
    bare, wrapped, other = await vectors(client, input=["hi", {"text": "hi"}, {"text": "hi", "lang": "en"}])
    assert np.array_equal(bare, wrapped)
    assert not np.array_equal(bare, other)


async def test_normalization(client: Client) -> None:
    for vec in await vectors(client, input=["a", "b c", {"image": "x"}]):
        assert vec.dtype == np.float32
        assert abs(float(np.linalg.norm(vec.astype(np.float64))) - 1.0) < 1e-6
    for vec in await vectors(client, input=["a", "b c"], normalized=False):
        assert abs(float(np.linalg.norm(vec)) - 1.0) > 0.5


async def test_late_chunking_depends_on_neighbours(client: Client) -> None:
    _, b_after_a = await vectors(client, input=["a", "b"], late_chunking=True)
    _, b_after_c = await vectors(client, input=["c", "b"], late_chunking=True)
    assert not np.array_equal(b_after_a, b_after_c)
    _, plain_a = await vectors(client, input=["a", "b"])
    _, plain_c = await vectors(client, input=["c", "b"])
    assert np.array_equal(plain_a, plain_c)
    again = await vectors(client, input=["a", "b"], late_chunking=True)
    assert np.array_equal(again[1], b_after_a)
    # Position is context too: a repeated item embeds differently in each place.
    first, second = await vectors(client, input=["x", "x"], late_chunking=True)
    assert not np.array_equal(first, second)


# ---------------------------------------------------------------- output formats


async def test_output_formats_agree(client: Client) -> None:
    body = {"model": MODEL, "input": ["hello world", "bye"], "dimensions": 36}
    rendered = {
        fmt: [d["embedding"] for d in (await ok_json(client, {**body, "embedding_type": fmt}))["data"]]
        for fmt in ("float", "base64", "binary", "ubinary")
    }
    for i in range(2):
        vec = unb64(rendered["base64"][i])
        assert vec.shape == (36,)
        floats = np.array(rendered["float"][i], dtype=np.float64)
        # Every printed number is exactly a float32 value, and it is the same one base64 carries.
        assert np.array_equal(floats, vec.astype(np.float64))
        assert np.array_equal(floats.astype(np.float32), vec)
        ubits = np.array(rendered["ubinary"][i], dtype=np.uint8)
        assert ubits.shape == (5,)  # 36 bits zero-padded to 5 bytes
        bits = np.unpackbits(ubits)
        assert np.array_equal(bits[:36], (vec > 0).astype(np.uint8))
        assert not bits[36:].any()
        assert rendered["binary"][i] == [u - 128 for u in rendered["ubinary"][i]]


async def test_float_rendering_bytes(client: Client, sim: Simulator) -> None:
    body = {"model": MODEL, "input": "hello world", "dimensions": 32}
    text = (await (await post(client, body)).read()).decode()
    (vec,), _ = sim.embed(body)
    expected = ",".join(repr(float(x)) for x in vec.astype(np.float64))
    assert f'"embedding":[{expected}]' in text


async def test_openai_encoding_format(client: Client) -> None:
    body = {"model": MODEL, "input": ["hello world"], "encoding_format": "base64"}
    b64 = (await ok_json(client, body))["data"][0]["embedding"]
    assert isinstance(b64, str)
    (expected,) = await vectors(client)
    assert np.array_equal(unb64(b64), expected)
    # Jina's own field wins over OpenAI's.
    both = await ok_json(client, {**body, "embedding_type": "float"})
    assert isinstance(both["data"][0]["embedding"], list)


async def test_multivector(client: Client) -> None:
    long_text = " ".join(f"w{i}" for i in range(30))  # 32 tokens -> capped at 16 rows
    body = {"model": MODEL, "input": ["hello world", long_text], "return_multivector": True, "dimensions": 64}
    data = (await ok_json(client, body))["data"]
    shapes = [np.array(d["embedding"]).shape for d in data]
    assert shapes == [(4, 128), (16, 128)]
    rows = np.array(data[0]["embedding"], dtype=np.float64)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    b64 = (await ok_json(client, {**body, "embedding_type": "base64"}))["data"][0]["embedding"]
    assert len(b64) == 4
    assert np.array_equal(np.stack([unb64(r) for r in b64]).astype(np.float64), rows)
    ubin = (await ok_json(client, {**body, "embedding_type": "ubinary"}))["data"][1]["embedding"]
    assert np.array(ubin).shape == (16, 16)


# ---------------------------------------------------------------- validation

VALID: dict[str, Any] = {"model": MODEL, "input": ["a", "b"]}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": None}, "model"),
        ({"model": "jina-embeddings-v9"}, "model"),
        ({"model": 3}, "model"),
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": 5}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": ["a", "b", "c", 3]}, "input[3]"),
        ({"input": ["a", None]}, "input[1]"),
        ({"input": [["a"]]}, "input[0]"),
        ({"input": [{"text": 5}]}, "input[0]"),
        ({"input": ["a", {"image": ""}]}, "input[1]"),
        ({"task": "summarize"}, "task"),
        ({"task": 1}, "task"),
        ({"dimensions": 31}, "dimensions"),
        ({"dimensions": 1025}, "dimensions"),
        ({"dimensions": "64"}, "dimensions"),
        ({"dimensions": 64.0}, "dimensions"),
        ({"dimensions": True}, "dimensions"),
        ({"normalized": "yes"}, "normalized"),
        ({"normalized": 1}, "normalized"),
        ({"embedding_type": "int8"}, "embedding_type"),
        ({"embedding_type": ["float"]}, "embedding_type"),
        ({"encoding_format": "binary"}, "encoding_format"),
        ({"late_chunking": "true"}, "late_chunking"),
        ({"return_multivector": 1}, "return_multivector"),
        ({"truncate": "no"}, "truncate"),
    ],
)
async def test_validation_errors(client: Client, change: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    await assert_error(await post(client, body), 422, "VALIDATION_ERROR", field)


async def test_body_must_be_an_object(client: Client) -> None:
    await assert_error(await post(client, ["a"]), 422, "VALIDATION_ERROR", "body")


async def test_invalid_json(client: Client) -> None:
    for raw in (b"{not json", b""):
        resp = await client.post("/v1/embeddings", data=raw)
        await assert_error(resp, 400, "INVALID_JSON")


async def test_optional_nulls_and_unknown_fields_are_accepted(client: Client) -> None:
    body = {**VALID, "task": None, "dimensions": None, "user": "someone", "extra": {"x": 1}}
    assert len((await ok_json(client, body))["data"]) == 2


async def test_token_limit_and_truncate(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(Simulator(SimConfig(max_tokens_per_input=5)).app())
    body = {"model": MODEL, "input": ["a b", "a b c d e f"], "embedding_type": "ubinary"}
    await assert_error(await post(client, body), 422, "VALIDATION_ERROR", "input[1]")
    await assert_error(await post(client, {**body, "truncate": False}), 422, "VALIDATION_ERROR", "input[1]")
    usage = (await ok_json(client, {**body, "truncate": True}))["usage"]
    assert usage == {"total_tokens": 4 + 5, "prompt_tokens": 4 + 5}


@pytest.mark.parametrize(("model", "limit"), [("jina-embeddings-v4", 512), ("jina-embeddings-v3", 2048)])
async def test_input_limit_per_model(client: Client, model: str, limit: int) -> None:
    body = {"model": model, "embedding_type": "ubinary", "dimensions": 32}
    over = await post(client, {**body, "input": ["x"] * (limit + 1)})
    await assert_error(over, 422, "VALIDATION_ERROR", "input")
    assert len((await ok_json(client, {**body, "input": ["x"] * limit}))["data"]) == limit


async def test_input_limit_overrides(aiohttp_client: AiohttpClient) -> None:
    config = SimConfig(max_inputs={MODEL: 3}, default_max_inputs=2)
    client = await aiohttp_client(Simulator(config).app())
    too_many = await post(client, {"model": MODEL, "input": ["x"] * 4})
    await assert_error(too_many, 422, "VALIDATION_ERROR", "input")
    assert len((await ok_json(client, {"model": MODEL, "input": ["x"] * 3}))["data"]) == 3
    clip = {"model": "jina-clip-v2", "input": ["x"] * 3}
    await assert_error(await post(client, clip), 422, "VALIDATION_ERROR", "input")
    # v4's own limit is not the default's business.
    v4 = {"model": "jina-embeddings-v4", "input": ["x"] * 3, "embedding_type": "ubinary"}
    assert len((await ok_json(client, v4))["data"]) == 3


async def test_auth(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(Simulator(SimConfig(api_key="secret")).app())
    await assert_error(await post(client, VALID), 401, "AUTH_MISSING_API_KEY")
    await assert_error(await post(client, VALID, {"Authorization": "Bearer "}), 401, "AUTH_MISSING_API_KEY")
    wrong = await post(client, VALID, {"Authorization": "Bearer nope"})
    await assert_error(wrong, 401, "AUTH_INVALID_API_KEY")
    resp = await post(client, VALID, {"Authorization": "Bearer secret"})
    assert resp.status == 200


# ---------------------------------------------------------------- rate limit


async def test_rate_limit_sliding_window(aiohttp_client: AiohttpClient) -> None:
    clock = FakeClock(100.0)
    sim = Simulator(SimConfig(rate_limit_requests=2, rate_window_s=10.0), clock=clock)
    client = await aiohttp_client(sim.app())
    assert (await post(client, VALID)).status == 200
    clock.now = 101.0
    assert (await post(client, VALID)).status == 200
    clock.now = 103.5
    resp = await post(client, VALID)
    await assert_error(resp, 429, "RATE_REQUEST_LIMIT_EXCEEDED")
    assert resp.headers["Retry-After"] == "7"  # the call at 100 leaves the window at 110
    clock.now = 109.99
    resp = await post(client, VALID)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    clock.now = 110.0
    assert (await post(client, VALID)).status == 200
    # Had the rejected calls at 103.5 and 109.99 entered the window, this one would be refused.
    clock.now = 111.0
    assert (await post(client, VALID)).status == 200
    assert (sim.calls, sim.ok_calls) == (6, 4)


# ---------------------------------------------------------------- latency and faults


async def test_latency_is_base_plus_per_token(aiohttp_client: AiohttpClient) -> None:
    sleep = SleepRecorder()
    sim = Simulator(SimConfig(latency_base_ms=5.0, latency_per_token_ms=0.5), sleep=sleep)
    client = await aiohttp_client(sim.app())
    await ok_json(client, {"model": MODEL, "input": ["hello world", "a"]})  # 4 + 3 tokens
    assert sleep.calls == [(5.0 + 0.5 * 7) / 1000]
    await assert_error(await post(client, {"model": MODEL}), 422, "VALIDATION_ERROR", "input")
    assert len(sleep.calls) == 1


async def test_no_sleep_without_latency(aiohttp_client: AiohttpClient) -> None:
    sleep = SleepRecorder()
    client = await aiohttp_client(Simulator(sleep=sleep).app())
    await ok_json(client, VALID)
    assert sleep.calls == []


async def test_fault_status(client: Client, sim: Simulator) -> None:
    sim.inject(
        Fault("status", status=503, headers={"Retry-After": "1"}),
        Fault("status", status=429, body={"detail": "slow down", "code": "RATE_TOKEN_LIMIT_EXCEEDED"}),
    )
    first = await post(client, VALID)
    assert first.status == 503
    assert first.headers["Retry-After"] == "1"
    assert await first.json() == {"detail": "simulated error", "code": "UPSTREAM_ERROR"}
    second = await post(client, VALID)
    assert second.status == 429
    assert await second.json() == {"detail": "slow down", "code": "RATE_TOKEN_LIMIT_EXCEEDED"}
    assert (await post(client, VALID)).status == 200
    assert (sim.calls, sim.ok_calls, len(sim.requests)) == (3, 1, 3)


async def test_fault_close(client: Client, sim: Simulator) -> None:
    sim.inject(Fault("close"))
    resp = await post(client, VALID)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert (await post(client, VALID)).status == 200
    assert (sim.calls, sim.ok_calls) == (2, 1)


async def test_fault_malformed(client: Client, sim: Simulator) -> None:
    sim.inject(Fault("malformed"))
    resp = await post(client, VALID)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    raw = await resp.read()
    assert raw == b'{"model": '
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    assert (sim.ok_calls, sim.inputs, sim.tokens) == (0, 0, 0)


async def test_fault_short(client: Client, sim: Simulator) -> None:
    sim.inject(Fault("short"))
    body = {"model": MODEL, "input": ["a", "b", "c"]}
    short = await ok_json(client, body)
    full = await ok_json(client, body)
    assert [d["index"] for d in short["data"]] == [0, 1]
    assert short["data"] == full["data"][:2]
    assert short["usage"] == full["usage"] == {"total_tokens": 9, "prompt_tokens": 9}
    assert (sim.calls, sim.ok_calls, sim.inputs, sim.tokens) == (2, 1, 3, 9)


async def test_fault_short_keeps_errors(client: Client, sim: Simulator) -> None:
    sim.inject(Fault("short"))
    await assert_error(await post(client, {"model": MODEL}), 422, "VALIDATION_ERROR", "input")


async def test_fault_delay(aiohttp_client: AiohttpClient) -> None:
    sleep = SleepRecorder()
    sim = Simulator(sleep=sleep)
    client = await aiohttp_client(sim.app())
    sim.inject(Fault("delay", delay_s=2.5))
    delayed = await post(client, VALID)
    assert sleep.calls == [2.5]
    normal = await post(client, VALID)
    assert await delayed.read() == await normal.read()
    assert (sim.calls, sim.ok_calls, sim.inputs) == (2, 2, 4)


def test_unknown_fault_kind_is_refused(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.inject(Fault("explode"))


# ---------------------------------------------------------------- counters, routes, serving


async def test_counters_and_recorded_requests(client: Client, sim: Simulator) -> None:
    sent = {"model": MODEL, "input": ["hello world", "a"], "user": "team-a"}
    await ok_json(client, sent)
    await post(client, {"model": MODEL})
    await client.post("/v1/embeddings", data=b"{oops")
    sim.inject(Fault("status"))
    await post(client, VALID)
    await ok_json(client, {"model": MODEL, "input": "Hello, world!"})
    assert (sim.calls, sim.ok_calls, sim.inputs, sim.tokens) == (5, 2, 3, 4 + 3 + 6)
    # The unparseable body is the only one not recorded; unknown fields are kept as sent.
    assert sim.requests == [sent, {"model": MODEL}, VALID, {"model": MODEL, "input": "Hello, world!"}]
    sim.reset_counters()
    assert (sim.calls, sim.ok_calls, sim.inputs, sim.tokens, sim.requests) == (0, 0, 0, 0, [])


async def test_config_can_be_replaced(client: Client, sim: Simulator) -> None:
    sim.config = SimConfig(api_key="k")
    await assert_error(await post(client, VALID), 401, "AUTH_MISSING_API_KEY")


async def test_routes(client: Client) -> None:
    health = await client.get("/")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    alias = await client.post("/embeddings", data=orjson.dumps(VALID))
    direct = await post(client, VALID)
    assert await alias.read() == await direct.read()


def test_embed_raises_on_invalid_body(sim: Simulator) -> None:
    with pytest.raises(SimError) as info:
        sim.embed({"model": MODEL, "input": ["a", 1]})
    err = info.value
    assert (err.status, err.code, err.field_name) == (422, "VALIDATION_ERROR", "input[1]")


async def test_start_sim_serves_and_cleans_up() -> None:
    sim = Simulator()
    runner, base_url = await start_sim(sim)
    try:
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        assert not base_url.startswith("http://127.0.0.1:0/")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{base_url}/embeddings", json=VALID) as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert sim.ok_calls == 1
    finally:
        await runner.cleanup()
    assert runner.addresses == []


# ---------------------------------------------------------------- control of a standalone sim


async def test_pause_holds_answers_and_a_caller_that_left_is_not_billed() -> None:
    # start_sim serves like `embedding-gateway sim`: a handler runs on after its caller hangs up.
    sim = Simulator()
    runner, url = await start_sim(sim)
    try:
        async with aiohttp.ClientSession() as session:
            base = url.removesuffix("/v1")
            await session.post(base + "/_sim/pause")
            held = asyncio.ensure_future(session.post(url + "/embeddings", data=orjson.dumps(VALID)))
            await until(lambda: sim.stats()["held"] == 1)
            assert sim.ok_calls == 0
            await session.post(base + "/_sim/resume")
            assert (await held).status == 200
            assert (sim.ok_calls, sim.dropped) == (1, 0)

            sim.pause()
            gone = asyncio.ensure_future(session.post(url + "/embeddings", data=orjson.dumps(VALID)))
            await until(lambda: sim.stats()["held"] == 1)
            gone.cancel()  # the caller hangs up while its request is held
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            await until(lambda: sim.stats()["held_gone"] == 1)
            sim.resume()
            await until(lambda: sim.dropped == 1)
            async with session.get(base + "/_sim/stats") as resp:
                stats = await resp.json()
    finally:
        await runner.cleanup()
    assert stats == {"calls": 2, "ok_calls": 1, "inputs": 2, "tokens": sim.tokens, "dropped": 1, "held": 0,
                     "held_gone": 0}
