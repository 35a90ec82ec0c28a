"""The entry codec, the store contract (same tests on memory and Redis), and cache outages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.cache import EmbeddingCache, Entry, HotCache, decode, encode, encode_unit, item_keys, key_prefix, unit_key
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


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each backend's URL; a cluster is started only when a cluster-param test runs."""
    if request.param == "memory":
        return "memory://"
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


async def test_memory_store_is_bounded_by_bytes_lru() -> None:
    s = open_cache_store("memory://", max_bytes=100)
    await s.set_many([(b"a", b"x" * 40), (b"b", b"x" * 40)], ttl_s=60)
    await s.get_many([b"a"])  # a is now most recent
    await s.set_many([(b"c", b"x" * 40)], ttl_s=60)
    assert await s.get_many([b"a", b"b", b"c"]) == [b"x" * 40, None, b"x" * 40]


async def test_memory_store_expires_entries() -> None:
    from gateway.store.memory import MemoryCacheStore

    now = [100.0]
    s = MemoryCacheStore(max_bytes=1000, clock=lambda: now[0])
    await s.set_many([(b"a", b"1")], ttl_s=10)
    now[0] = 109.0
    assert await s.get_many([b"a"]) == [b"1"]
    now[0] = 110.0
    assert await s.get_many([b"a"]) == [None]
    assert len(s) == 0 and s.bytes == 0


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
    assert (await embed("during 0"))["X-Cache-Misses"] == "1"  # nothing could be cached
    assert sim.calls == calls + 1
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
    cache = EmbeddingCache(Broken(), ttl_s=1, error_backoff_s=0.0, on_error=seen.append)  # type: ignore[arg-type]
    assert await cache.get_many([b"a", b"b"]) == [None, None]
    await cache.set_many([(b"a", encode(unit_vector(8), 1))])
    assert seen == ["get", "set"]


def test_undecodable_entry_is_a_miss() -> None:
    cache = EmbeddingCache(open_cache_store("memory://", max_bytes=10), ttl_s=1)
    assert cache._decode(b"\x09garbage") is None
    assert cache._decode(encode(unit_vector(8), 2)[:-3]) is None


# ---- the hot LRU in front of a shared store ----------------------------------------------------------------


def test_hot_cache_is_an_lru_bounded_by_bytes_renderings_included() -> None:
    entries = {k: Entry(vectors=unit_vector(256, i), tokens=i) for i, k in enumerate([b"a", b"b", b"c", b"d"])}
    cost = 256 * 4 + 400
    hot = HotCache(3 * cost)
    for key in (b"a", b"b", b"c"):
        hot.put(key, entries[key])
    assert hot.get(b"a") is entries[b"a"]  # recency now: b, c, a
    hot.put(b"d", entries[b"d"])  # b goes: c, a, d
    assert hot.get(b"b") is None and len(hot) == 3 and hot.bytes == 3 * cost
    head, fragment = b"{" * 4, b"x" * 96  # what precedes the item in an answer to a alone, and the item
    hot.remember(b"a", "float", head, fragment)  # a rendering is a use and counts too: c goes; d, a
    assert hot.solo(b"a", "float") == [head, fragment, b"]}"]
    assert hot.get(b"c") is None and hot.get(b"d") is entries[b"d"]
    assert len(hot) == 2 and hot.bytes == 2 * cost + 100 + 200  # the rendering and its record
    found, missing = hot.items([b"a", b"d"], "float")
    assert found == [fragment, None] and missing == 1
    assert hot.solo(b"a", "base64") is None
    hot.remember(b"b", "float", b"{", b"y")  # b is not resident: nothing is kept for it
    assert hot.solo(b"b", "float") is None and hot.bytes == 2 * cost + 100 + 200
    found, missing = hot.items([b"a", b"a"], "float")
    assert found == [fragment] * 2 and missing == 0
    # Fragment lookups are uses too (d, a): a new entry evicts d, then another evicts a, rendering and all.
    hot.items([b"d", b"a"], "float")
    hot.put(b"b", entries[b"b"])
    assert hot.get(b"d") is None and len(hot) == 2  # a, b
    hot.put(b"c", entries[b"c"])
    assert hot.get(b"a") is None and hot.solo(b"a", "float") is None
    assert hot.items([b"a", b"b"], "float")[1] == 2 and len(hot) == 2 and hot.bytes == 2 * cost
    tiny = HotCache(100)  # an entry bigger than the whole bound is not kept
    tiny.put(b"a", entries[b"a"])
    assert len(tiny) == 0 and tiny.bytes == 0


def test_hot_lookups_of_several_keys_are_uses_of_each() -> None:
    entries = {k: Entry(vectors=unit_vector(256, i), tokens=i) for i, k in enumerate([b"a", b"b", b"c", b"d"])}
    hot = HotCache(3 * (256 * 4 + 400))
    for key in (b"a", b"b", b"c"):
        hot.put(key, entries[key])
    assert hot.get_many([b"b", b"x", b"a"]) == [entries[b"b"], None, entries[b"a"]]  # recency now: c, b, a
    assert hot.get_many([b"c"]) == [entries[b"c"]]  # the one-key path: b, a, c
    hot.put(b"d", entries[b"d"])  # b goes
    assert hot.get_many([b"a", b"b", b"c", b"d"]) == [entries[b"a"], None, entries[b"c"], entries[b"d"]]


async def test_hot_entries_render_byte_identically_and_survive_a_flushed_redis(
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



def test_content_keys_are_stable_across_releases() -> None:
    """Keys address entries other replicas and earlier releases wrote: a change in how they are computed
    would silently empty the cache. These digests were computed by the first release's streaming hasher."""
    prefix = b'{"model":"m"}\x00\x00'
    keys = item_keys(prefix, ["hello world", {"text": "hi", "image": None}, "caf\u00e9 \ud800"])
    assert [k.hex() for k in keys] == [
        "e07b377de4822732bc001146cd758cb0", "240083a27742f810fa1243a58aa2070d", "ba7892f1ddaf4043da157afc8156d420",
    ]


def test_an_assembled_answer_is_kept_until_an_entry_leaves_and_uses_its_keys() -> None:
    entries = {k: Entry(vectors=unit_vector(256, i), tokens=i) for i, k in enumerate([b"a", b"b", b"c", b"d"])}
    cost = 256 * 4 + 400
    hot = HotCache(3 * cost + 2 * (100 + 200))
    for key in (b"a", b"b", b"c"):
        hot.put(key, entries[key])
    hot.remember(b"a", "float", b"<a", b"A}")
    hot.remember(b"b", "float", b"<b", b"B}")
    assert hot.assembled(7, [b"a", b"b"]) is None  # nothing kept under serial 7 yet
    pieces = [b"head", b"<a", b"A}", b",", b"B}", b"]}"]
    done = hot.assemble(7, pieces)
    assert done == (pieces, 13) and done[0] is pieces
    hot.get(b"c")  # recency: a, b, c
    assert hot.assembled(7, [b"a", b"b"]) is done  # and each key is used: c, a, b
    assert hot.assembled(8, [b"a"]) is None
    hot.put(b"d", entries[b"d"])  # c leaves (a would have, unused): every assembled answer goes with it
    assert hot.get(b"c") is None and hot.get(b"a") is entries[b"a"] and hot.get(b"b") is entries[b"b"]
    assert hot.assembled(7, [b"a", b"b"]) is None


def test_assembled_answers_are_bounded_by_their_own_bytes() -> None:
    hot = HotCache(1 << 20)
    hot.max_assembled_bytes = 2 * (200 + 8 * 3)  # room for two answers of three pieces
    for serial in range(3):
        hot.assemble(serial, [b"h", b"i", b"e"])
    # The third did not fit: what was kept went, and the third is kept alone.
    assert [hot.assembled(s, []) is not None for s in range(3)] == [False, False, True]
    assert hot.assemble(9, [b"x"] * 100) == ([b"x"] * 100, 100)  # over the whole bound: answered, not kept
    assert hot.assembled(9, []) is None and hot.assembled(2, []) is None


def test_canonical_keys_are_the_objects_the_hot_tier_holds() -> None:
    hot = HotCache(1 << 20)
    stored = bytes.fromhex("00" * 15 + "01")
    hot.put(stored, Entry(vectors=unit_vector(8), tokens=1))
    copy, other = bytes.fromhex("00" * 15 + "01"), b"\x02" * 16
    assert copy == stored and copy is not stored
    keys = hot.canonical([copy, other])
    assert keys == (stored, other) and keys[0] is stored and keys[1] is other
    cache = EmbeddingCache(open_cache_store("memory://", max_bytes=1 << 20), ttl_s=1)  # no hot tier
    assert cache.canonical([copy]) == (copy,) and cache.canonical([copy])[0] is copy
