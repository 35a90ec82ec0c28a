"""The entry codec, the store contract (same tests on Redis and a Redis Cluster), the in-process tier, and cache
outages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import render
from gateway.cache import (
    ALLOCATOR_OVERHEAD,
    ENTRY_OVERHEAD,
    RENDERING_OVERHEAD,
    RENDERINGS_TABLE,
    EmbeddingCache,
    LocalTier,
    item_keys,
    key_prefix,
    unit_key,
)
from gateway.codec import Entry, decode, encode, encode_unit
from gateway.keys import CACHE_PREFIX
from gateway.protocol import parse_embedding_request
from gateway.store import CacheStore, open_cache_store

from .conftest import Gateway, auth, sim_of, upstream_answer
from .promtext import scrape
from .redis_server import RedisServer


def unit_vector(dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim, dtype=np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("dim", [8, 256, 1024, 2048])
def test_codec_round_trips_exactly(dim: int) -> None:
    vec = unit_vector(dim)
    entry = decode(encode(vec, 17))
    assert entry.tokens == 17
    assert isinstance(entry.vectors, np.ndarray)
    assert entry.vectors.dtype == np.dtype("<f4")
    assert entry.vectors.tobytes() == vec.tobytes()


def test_codec_keeps_incompressible_vectors_raw_and_exact() -> None:
    vec = np.random.default_rng(1).integers(0, 2**32, 512, dtype=np.uint32).view(np.float32)
    raw = encode(vec, 3)
    assert len(raw) == 8 + 512 * 4
    assert decode(raw).vectors.tobytes() == vec.tobytes()  # type: ignore[union-attr]


def test_codec_1024_dims_is_smaller_than_raw_float32() -> None:
    assert len(encode(unit_vector(1024), 9)) < 4096


def test_codec_multivector_and_unit() -> None:
    mv = np.stack([unit_vector(128, s) for s in range(5)])
    entry = decode(encode(mv, 40))
    assert entry.vectors.shape == (5, 128) and entry.vectors.tobytes() == mv.tobytes()  # type: ignore[union-attr]
    parts = [unit_vector(64, 1), np.stack([unit_vector(32, 2), unit_vector(32, 3)])]
    unit = decode(encode_unit(parts, 11))
    assert unit.tokens == 11 and isinstance(unit.vectors, list)
    assert [v.tobytes() for v in unit.vectors] == [p.tobytes() for p in parts]


def test_keys_ignore_field_order_and_render_fields_but_not_params() -> None:
    def keys(body: dict[str, Any], team: str | None = None) -> list[bytes]:
        req = parse_embedding_request(body, max_inputs=10)
        return item_keys(key_prefix(req, team), req.items)

    a = keys({"model": "m", "input": "x", "task": "t", "embedding_type": "binary", "user": "u"})
    b = keys({"task": "t", "input": ["x"], "model": "m", "encoding_format": "base64"})
    assert a == b
    assert keys({"model": "m", "input": "x", "task": "u"}) != a
    assert keys({"model": "m", "input": "x", "task": "t"}, team="a") != a
    assert keys({"model": "m", "input": ["x", {"text": "x"}]})[0] != keys({"model": "m", "input": [{"text": "x"}]})[0]
    req = parse_embedding_request({"model": "m", "input": ["ab", "c"]}, max_inputs=10)
    req2 = parse_embedding_request({"model": "m", "input": ["a", "bc"]}, max_inputs=10)
    assert unit_key(key_prefix(req, None), req.items) != unit_key(key_prefix(req2, None), req2.items)


# ---- the store contract, run on every backend ------------------------------------------------------------


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each backend's URL; a cluster is started only when a cluster-param test runs."""
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CacheStore]:
    s = open_cache_store(store_url, max_bytes=1 << 20)
    yield s
    await s.close()


async def test_store_get_many_preserves_order_and_misses(store: CacheStore) -> None:
    await store.set_many([(b"k1", b"v1"), (b"k3", b"\x00\xffbinary")], ttl_s=60)
    assert await store.get_many([b"k3", b"k2", b"k1"]) == [b"\x00\xffbinary", None, b"v1"]


async def test_store_overwrite_and_empty(store: CacheStore) -> None:
    await store.set_many([(b"k", b"old")], ttl_s=60)
    await store.set_many([(b"k", b"new")], ttl_s=60)
    assert await store.get_many([b"k"]) == [b"new"]
    assert await store.ping()


async def test_store_get_many_spans_every_slot_and_node(store: CacheStore) -> None:
    # 300 random 16-byte keys land on ~300 slots, i.e. on every node of a cluster.
    keys = [bytes([i % 256, i // 256]) * 8 for i in range(300)]
    await store.set_many([(k, k[::-1]) for k in keys[::2]], ttl_s=60)
    got = await store.get_many(keys)
    assert got == [k[::-1] if i % 2 == 0 else None for i, k in enumerate(keys)]


async def test_redis_entries_have_ttl_and_binary_keys(redis_url: str) -> None:
    s = open_cache_store(redis_url, max_bytes=0)
    await s.set_many([(b"\x01" * 16, b"v")], ttl_s=1234)
    client = aioredis.Redis.from_url(redis_url)
    ttl = await client.ttl(CACHE_PREFIX + b"\x01" * 16)
    await client.aclose()
    await s.close()
    assert 1200 < ttl <= 1234


async def test_one_cached_1024_dim_vector_fits_in_4200_bytes_of_redis(gateway: Gateway, redis_url: str) -> None:
    client = await gateway(cache={"url": redis_url})
    resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": ["size me"]},
                             headers=auth())
    assert resp.status == 200
    r = aioredis.Redis.from_url(redis_url)
    keys = await r.keys(CACHE_PREFIX + b"*")
    assert len(keys) == 1
    usage = await r.memory_usage(keys[0])
    await r.aclose()
    assert usage is not None and usage <= 4200, usage


async def test_cache_redis_killed_and_restarted(gateway: Gateway, own_redis: RedisServer) -> None:
    client = await gateway(cache={"url": own_redis.url, "error_backoff_s": 0.0, "socket_timeout_s": 0.2})
    sim = sim_of(client)

    async def embed(text: str) -> Any:
        resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": [text]},
                                 headers=auth())
        assert resp.status == 200
        return resp.headers

    await embed("before")
    assert (await embed("before"))["X-Cache-Hits"] == "1"
    own_redis.stop()
    for i in range(3):
        assert (await embed(f"during {i}"))["X-Cache-Misses"] == "1"
    calls = sim.calls
    # Redis could keep nothing, but the in-process tier did: a repeat costs no upstream call.
    assert (await embed("during 0"))["X-Cache-Hits"] == "1"
    assert sim.calls == calls
    own_redis.start()
    await embed("after")
    assert (await embed("after"))["X-Cache-Hits"] == "1"
    metrics = await scrape(client)
    assert metrics.total("eg_store_errors_total", store="cache", op="get") >= 1


async def test_gateway_on_a_redis_cluster_caches_and_hits(gateway: Gateway, cluster_url: str) -> None:
    client = await gateway(cache={"url": cluster_url}, state={"url": cluster_url})
    body = {"model": "jina-embeddings-v3", "input": [f"text {i}" for i in range(40)]}
    first = await client.post("/v1/embeddings", json=body, headers=auth())
    assert first.status == 200 and first.headers["X-Cache-Misses"] == "40"
    second = await client.post("/v1/embeddings", json=body, headers=auth())
    assert second.headers["X-Cache-Hits"] == "40"
    assert (await first.json())["data"] == (await second.json())["data"]
    assert (await client.get("/readyz")).status == 200


async def test_cache_errors_are_counted_and_bypassed_without_raising() -> None:
    class Broken:
        async def get_many(self, keys: Any) -> Any:
            raise ConnectionError("down")

        async def set_many(self, items: Any, ttl_s: int) -> None:
            raise ConnectionError("down")

    seen: list[str] = []
    cache = EmbeddingCache(Broken(), ttl_s=1, local_max_bytes=0, error_backoff_s=0.0,  # type: ignore[arg-type]
                           on_error=seen.append)
    assert await cache.get_many([b"a", b"b"]) == [None, None]
    await cache.put_many([(b"a", Entry(unit_vector(8), 1))])
    assert seen == ["get", "set"]


def test_undecodable_entry_is_a_miss() -> None:
    cache = EmbeddingCache(None, ttl_s=1, local_max_bytes=10)
    assert cache._decode(b"\x09garbage") is None
    assert cache._decode(encode(unit_vector(8), 2)[:-3]) is None


# ---- the in-process tier: the whole cache with memory://, in front of Redis otherwise ------------------------


def entry_cost(dim: int, key: bytes = b"a") -> int:
    return ENTRY_OVERHEAD + ALLOCATOR_OVERHEAD + len(key) + 4 * dim


def test_the_local_tier_is_an_lru_bounded_by_bytes_renderings_included() -> None:
    entries = {k: Entry(vectors=unit_vector(256, i), tokens=i) for i, k in enumerate([b"a", b"b", b"c", b"d"])}
    cost = entry_cost(256)
    tier = LocalTier(3 * cost, ttl_s=60)
    for key in (b"a", b"b", b"c"):
        tier.put(key, entries[key])
    (a,) = tier.get_many([b"a"])  # recency now: b, c, a
    assert a is not None and a.entry is entries[b"a"]
    tier.put(b"d", entries[b"d"])  # b goes: c, a, d
    assert tier.get_many([b"b"]) == [None] and len(tier) == 3 and tier.bytes == 3 * cost
    tier.keep_rendering(a, "float", b"x" * 96)  # a rendering is a use and counts too: c goes; d, a
    assert tier.get_many([b"c"]) == [None] and len(tier) == 2
    assert tier.bytes == 2 * cost + 96 + RENDERING_OVERHEAD + RENDERINGS_TABLE
    found = tier.get_many([b"a", b"x", b"d"])
    assert [h.entry if h else None for h in found] == [entries[b"a"], None, entries[b"d"]]
    assert found[0] is a and a.renderings == {"float": b"x" * 96}
    tiny = LocalTier(100, ttl_s=60)  # an entry bigger than the whole bound is not kept
    tiny.put(b"a", entries[b"a"])
    assert len(tiny) == 0 and tiny.bytes == 0


def test_the_local_tier_expires_entries() -> None:
    now = [100.0]
    tier = LocalTier(1 << 20, ttl_s=10, clock=lambda: now[0])
    tier.put(b"a", Entry(unit_vector(8), 1))
    now[0] = 109.0
    assert tier.get_many([b"a"])[0] is not None
    now[0] = 110.0
    assert tier.get_many([b"a"]) == [None] and len(tier) == 0 and tier.bytes == 0


def test_batch_lookups_leave_the_local_tiers_order_alone() -> None:
    tier = LocalTier(2 * entry_cost(8), ttl_s=60)
    tier.put(b"a", Entry(unit_vector(8, 1), 1))
    tier.put(b"b", Entry(unit_vector(8, 2), 1))
    assert tier.get_many([b"a"], promote=False)[0] is not None  # not a use: a is still the oldest
    tier.put(b"c", Entry(unit_vector(8, 3), 1))
    assert [h is not None for h in tier.get_many([b"a", b"b", b"c"])] == [False, True, True]


def test_a_view_into_an_upstream_batch_is_kept_as_its_own_array() -> None:
    batch = np.stack([unit_vector(64, i) for i in range(100)])
    tier = LocalTier(1 << 20, ttl_s=60)
    held = tier.put(b"a", Entry(batch[3], 1))
    assert isinstance(held.entry.vectors, np.ndarray) and held.entry.vectors.base is None
    assert np.array_equal(held.entry.vectors, batch[3]) and tier.bytes == entry_cost(64)


@pytest.mark.parametrize("dim", [32, 1024])
def test_the_local_tiers_bound_is_what_its_entries_cost_the_process(dim: int) -> None:
    """`max_bytes` bounds the process: what tracemalloc sees the tier take is within 10% of what it counts,
    whatever the vector size (each entry arrives as a view into an upstream batch, as from the coalescer, and its
    float rendering as orjson makes it)."""
    import tracemalloc

    n = 4000
    batch = np.random.default_rng(1).standard_normal((n, dim), dtype=np.float32)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    tier = LocalTier(1 << 40, ttl_s=60)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, key in enumerate(keys):
            held = tier.put(key, Entry(batch[i], 7))
            tier.keep_rendering(held, "base64", b'"' + b"A" * (dim * 4 * 4 // 3) + b'"')
            tier.keep_rendering(held, "float", render.fragment(batch[i], "float"))  # as orjson makes it
        taken = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The keys existed before: count them; the allocators' share is not what tracemalloc sees.
    counted = tier.bytes - sum(len(k) for k in keys) + n * (33 + 16) - n * ALLOCATOR_OVERHEAD
    assert abs(taken - counted) <= 0.1 * counted, (taken, counted)


async def test_local_entries_render_byte_identically_and_survive_a_flushed_redis(
    gateway: Gateway, redis_url: str
) -> None:
    client = await gateway(cache={"url": redis_url})
    sim = sim_of(client)
    body = {"model": "jina-embeddings-v3", "input": ["hot one", "hot two", "hot one"], "dimensions": 64}

    async def post(extra: dict[str, Any]) -> tuple[Any, bytes]:
        resp = await client.post("/v1/embeddings", data=orjson.dumps({**body, **extra}), headers=auth())
        assert resp.status == 200
        return resp.headers, await resp.read()

    await post({})  # misses: upstream, then Redis
    await post({})  # Redis hits: now hot
    calls = sim.calls
    r = aioredis.Redis.from_url(redis_url)
    await r.flushall()  # only the hot LRU has them now
    await r.aclose()
    for fmt in ({}, {"embedding_type": "base64"}, {"embedding_type": "binary"}, {"encoding_format": "float"},
                {"embedding_type": "ubinary"}):
        first_headers, first = await post(fmt)
        _, memoised = await post(fmt)  # the second rendering of a hot entry is the memoised one
        assert first_headers["X-Cache-Hits"] == "2"
        assert first == memoised == await upstream_answer(sim, {**body, **fmt})
    assert sim.calls == calls



@pytest.mark.parametrize("cache_url", ["memory://", "redis"])
async def test_an_answer_rendered_for_a_miss_is_kept_for_the_hits_after_it(
    gateway: Gateway, redis_url: str, cache_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    fragment = render.fragment

    def counted(vec: np.ndarray, output: str) -> bytes:
        made.append(output)
        return fragment(vec, output)

    monkeypatch.setattr(render, "fragment", counted)
    client = await gateway(cache={"url": redis_url if cache_url == "redis" else cache_url})
    body = orjson.dumps({"model": "jina-embeddings-v3", "input": ["kept one", "kept two"]})
    answers = []
    for _ in range(3):  # a miss, then two hits
        resp = await client.post("/v1/embeddings", data=body, headers=auth())
        assert resp.status == 200
        answers.append(await resp.read())
    assert made == ["float", "float"]  # one rendering per input, made for the miss
    assert answers[0] == answers[1] == answers[2]


def test_content_keys_are_stable_across_releases() -> None:
    """Keys address entries other replicas and earlier releases wrote: a change in how they are computed
    would silently empty the cache. These digests were computed by the first release's streaming hasher."""
    prefix = b'{"model":"m"}\x00\x00'
    keys = item_keys(prefix, ["hello world", {"text": "hi", "image": None}, "caf\u00e9 \ud800"])
    assert [k.hex() for k in keys] == [
        "e07b377de4822732bc001146cd758cb0", "240083a27742f810fa1243a58aa2070d", "ba7892f1ddaf4043da157afc8156d420",
    ]
