"""The `openai` SDK, unchanged but for its base URL and key, gets the vectors the upstream gives it."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from gateway import appkeys as K
from gateway.sim import Simulator, start_sim

from .conftest import TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, sim_of
from .redis_server import RedisServer

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


FINAL = ("completed", "failed", "expired", "cancelled")


def batch_lines(texts: list[str]) -> bytes:
    rows = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": MODEL, "input": text}} for i, text in enumerate(texts)]
    rows.append({"custom_id": "no-model", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_the_sdks_batch_flow_runs_through_the_cache(gateway: Gateway, store: str,
                                                           request: pytest.FixtureRequest) -> None:
    stores: dict[str, Any] = {}
    if store == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        async with aioredis.Redis.from_url(server.url) as flushing:
            await flushing.flushall()
        stores = {"state": {"url": server.url}, "cache": {"url": server.url}}
    client = await gateway(**stores)
    sim, worker = sim_of(client), client.app[K.BATCH_WORKER]
    cached, new = TEXTS[:2], "only this one goes upstream"
    async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TEAM_A_KEY, max_retries=0) as via:
        asked = await via.embeddings.create(model=MODEL, input=cached, encoding_format="float")
        calls, inputs = sim.calls, sim.inputs
        uploaded = await via.files.create(file=("lines.jsonl", batch_lines([*cached, new])), purpose="batch")
        batch = await via.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                         completion_window="24h", metadata={"run": "nightly"})
        assert batch.status in ("validating", "in_progress") and batch.output_file_id is None
        while batch.status not in FINAL:
            await worker.settled("team-a", batch.id)
            batch = await via.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.completed_at is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 3, 1)
        assert batch.metadata == {"run": "nightly"} and batch.input_file_id == uploaded.id
        assert batch.output_file_id is not None and batch.error_file_id is not None
        output = [orjson.loads(x) for x in (await via.files.content(batch.output_file_id)).content.splitlines()]
        errors = [orjson.loads(x) for x in (await via.files.content(batch.error_file_id)).content.splitlines()]
    assert sorted(x["custom_id"] for x in output) == ["line-0", "line-1", "line-2"]
    by_id = {x["custom_id"]: x for x in output}
    for i, data in enumerate(asked.data):
        line = by_id[f"line-{i}"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        assert line["response"]["body"]["data"][0]["embedding"] == data.embedding
    assert len(by_id["line-2"]["response"]["body"]["data"][0]["embedding"]) == 1024
    assert [(x["custom_id"], x["response"], x["error"]["code"]) for x in errors] == [
        ("no-model", None, "VALIDATION_ERROR")]
    # The cached lines cost nothing: one upstream call, for the one new input.
    assert (sim.calls - calls, sim.inputs - inputs) == (1, 1)
    # Another team sees neither the batch nor its files.
    for path in (f"/v1/batches/{batch.id}", f"/v1/files/{batch.output_file_id}/content",
                 f"/v1/files/{batch.error_file_id}/content"):
        assert (await client.get(path, headers=auth(TEAM_B_KEY))).status == 404


async def test_the_sdk_cancels_and_lists_batches(gateway: Gateway) -> None:
    client = await gateway(batch={"workers": 0})  # no worker: the jobs wait, so a cancel ends them at once
    async with AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=TEAM_A_KEY, max_retries=0) as via:
        uploaded = await via.files.create(file=("lines.jsonl", batch_lines(TEXTS)), purpose="batch")
        created = [await via.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                            completion_window="24h") for _ in range(3)]
        cancelled = await via.batches.cancel(created[1].id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        assert (await via.batches.retrieve(created[1].id)).status == "cancelled"
        listed = [b async for b in via.batches.list(limit=2)]  # two pages, newest first
        assert [b.id for b in listed] == [b.id for b in reversed(created)]
        assert [b.status for b in listed] == ["validating", "cancelled", "validating"]
        with pytest.raises(openai.NotFoundError) as caught:
            await via.batches.retrieve("batch_000000000000000000000000")
        assert "no batch" in str(caught.value)
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            await via.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        assert "endpoint" in str(refused.value)
    assert sim_of(client).calls == 0
