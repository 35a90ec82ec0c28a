"""Every client unchanged: what client libraries send (Jina's `encoding_type`, token arrays), then the real
libraries of the `clients` extra driving one served gateway each, against the simulated upstream.

Each library test asserts the dimensions, the same vectors on a repeat, and that the repeat was a cache hit
(the simulator saw no new call). A library not installed skips its tests, naming the extra to install.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from gateway.sim import SimConfig

from .conftest import Gateway, auth, sim_of

MODEL = "jina-embeddings-v3"  # 1024 dimensions


async def post(client: Any, body: dict[str, Any]) -> tuple[int, Any, Any]:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth())
    return resp.status, resp.headers, await resp.json()


# ---- Jina's `encoding_type` --------------------------------------------------------------------------------


async def test_encoding_type_is_the_output_format_neither_keyed_nor_forwarded(gateway: Gateway) -> None:
    client = await gateway()
    sim = sim_of(client)
    status, _, floats = await post(client, {"model": MODEL, "input": ["cached as float"]})
    assert status == 200
    for form in ("ubinary", ["ubinary"]):
        status, headers, body = await post(client, {"model": MODEL, "input": ["cached as float"],
                                                    "encoding_type": form})
        assert status == 200 and headers["X-Cache-Hits"] == "1" and headers["X-Upstream-Tokens"] == "0"
        bits = body["data"][0]["embedding"]
        assert len(bits) == 1024 // 8 and all(0 <= b <= 255 for b in bits)
        assert bits == np.packbits(np.asarray(floats["data"][0]["embedding"]) > 0).tolist()
    assert sim.calls == 1
    # A miss asked with encoding_type: the upstream is asked with the gateway's own format field only.
    status, headers, body = await post(client, {"model": MODEL, "input": ["new"], "encoding_type": "binary"})
    assert status == 200 and headers["X-Cache-Misses"] == "1" and len(body["data"][0]["embedding"]) == 128
    assert sim.calls == 2 and "encoding_type" not in sim.requests[-1]
    assert sim.requests[-1]["embedding_type"] == "base64"


async def test_encoding_type_and_embedding_type_must_agree(gateway: Gateway) -> None:
    client = await gateway()
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "embedding_type": "float",
                                          "encoding_type": "ubinary"})
    assert status == 422
    assert "embedding_type" in body["detail"] and "encoding_type" in body["detail"]
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "embedding_type": "base64",
                                          "encoding_type": ["base64"]})
    assert status == 200 and isinstance(body["data"][0]["embedding"], str)
    status, _, body = await post(client, {"model": MODEL, "input": ["x"], "encoding_type": ["float", "binary"]})
    assert status == 422 and body["errors"][0]["field"] == "encoding_type"
    assert sim_of(client).calls == 1


# ---- token arrays ------------------------------------------------------------------------------------------


async def test_token_arrays_are_keyed_by_their_ids_and_forwarded_to_an_openai_upstream(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(api="openai"), upstream={"api": "openai"})
    sim = sim_of(client)
    status, headers, first = await post(client, {"model": MODEL, "input": [[15339, 1917], [9906, 11, 1917, 0]]})
    assert status == 200 and headers["X-Cache-Misses"] == "2"
    assert sim.requests[-1]["input"] == [[15339, 1917], [9906, 11, 1917, 0]]
    assert first["usage"]["total_tokens"] == 6  # one token per id
    # One array alone is one input, the same one: a hit. Other ids, or the text, are other inputs.
    status, headers, again = await post(client, {"model": MODEL, "input": [15339, 1917]})
    assert status == 200 and headers["X-Cache-Hits"] == "1" and again["usage"]["total_tokens"] == 2
    assert again["data"][0]["embedding"] == first["data"][0]["embedding"]
    status, headers, _ = await post(client, {"model": MODEL, "input": [[15339, 1918], "15339 1917"]})
    assert status == 200 and headers["X-Cache-Misses"] == "2"
    assert sim.calls == 2
    for bad in ([[1, -2]], [[1, True]], [[]], [[1.5]]):
        status, _, body = await post(client, {"model": MODEL, "input": bad})
        assert status == 422 and body["errors"][0]["field"] == "input[0]", bad
    assert sim.calls == 2


async def test_token_arrays_to_a_jina_upstream_are_refused_naming_langchains_setting(gateway: Gateway) -> None:
    client = await gateway()
    status, _, body = await post(client, {"model": MODEL, "input": [[15339, 1917]]})
    assert status == 422 and body["errors"][0]["field"] == "input[0]"
    assert "tokenizer ids" in body["detail"] and "check_embedding_ctx_length=False" in body["detail"]
    assert body["error"]["message"] == body["detail"]
    assert sim_of(client).calls == 0
