"""The `openai` SDK, unchanged but for its base URL and key, gets the vectors the upstream gives it."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from openai import AsyncOpenAI

from gateway.sim import Simulator, start_sim

from .conftest import TEAM_A_KEY, Gateway, sim_of

MODEL = "jina-embeddings-v3"
TEXTS = ["The gateway caches per input.", "Second text", "déjà vu"]


def as_array(embedding: object) -> np.ndarray:
    # The SDK decodes base64 itself when it chose the format; asked for explicitly, it hands the string back.
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
async def test_openai_sdk_gets_the_upstreams_vectors(gateway: Gateway, encoding_format: str | None) -> None:
    client = await gateway()
    sim = sim_of(client)
    twin = Simulator(sim.config)
    runner, upstream_url = await start_sim(twin)
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    try:
        async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TEAM_A_KEY, max_retries=0) as via, \
                AsyncOpenAI(base_url=upstream_url, api_key="upstream", max_retries=0) as straight:
            for _ in range(2):  # a miss, then a hit
                got = await via.embeddings.create(model=MODEL, input=TEXTS, **kwargs)  # type: ignore[arg-type]
                want = await straight.embeddings.create(model=MODEL, input=TEXTS, **kwargs)  # type: ignore[arg-type]
                assert len(got.data) == len(TEXTS)
                for g, w in zip(got.data, want.data, strict=True):
                    assert g.index == w.index
                    assert np.array_equal(as_array(g.embedding), as_array(w.embedding))
                assert got.usage.total_tokens == want.usage.total_tokens
    finally:
        await runner.cleanup()
    assert sim.calls == 1


async def test_the_sdks_exception_carries_the_reason(gateway: Gateway) -> None:
    client = await gateway()
    async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TEAM_A_KEY, max_retries=0) as via:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            await via.embeddings.create(model=MODEL, input=["fine", ""])
    assert str(caught.value) == "Error code: 422 - input[1]: must not be an empty string"
    assert caught.value.status_code == 422
    assert sim_of(client).calls == 0
