"""The cache store on a real redis-server (redis-py's pooled client): exact binary values with their TTL,
concurrent and cancelled callers, AUTH and SELECT from the URL, a silent server, Redis killed and restarted,
one slow command (`DEBUG SLEEP`) failing only the requests that waited on it, and `/readyz` pinging the very
clients that serve traffic."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import config as cfg
from gateway.cache import EmbeddingCache
from gateway.codec import Entry
from gateway.keys import CACHE_PREFIX
from gateway.store import CacheStore, open_cache_store
from gateway.store.redis import SET_SCRIPT_KEYS, connect

from .conftest import Gateway, auth, sim_of
from .redis_server import RedisServer, free_port

MODEL = "jina-embeddings-v3"
NO_RETRY = cfg.RedisOptions(retries=0)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[CacheStore]:
    s = open_cache_store(redis_url, max_bytes=0, socket_timeout_s=2)
    yield s
    await s.close()


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A Redis for one test that accepts DEBUG (SLEEP blocks the whole server, as one slow command does)."""
    server = RedisServer(None, "--enable-debug-command", "yes").start()
    yield server
    server.cleanup()


async def test_values_come_back_byte_for_byte_with_their_ttl(store: CacheStore, redis_url: str) -> None:
    values = [os.urandom(4096) + b"\r\n$-1\r\n*3\r\n" for _ in range(32)]  # RESP-looking bytes too
    await store.set_many([(b"k%d" % i, v) for i, v in enumerate(values)], ttl_s=60)
    assert await store.get_many([b"k%d" % i for i in range(32)]) == values
    assert await store.get_many([b"k0", b"absent", b"k31"]) == [values[0], None, values[31]]
    observer = aioredis.Redis.from_url(redis_url)
    assert 55 <= await observer.ttl(CACHE_PREFIX + b"k0") <= 60
    await observer.aclose()


async def test_writes_bigger_than_one_script_and_after_a_script_flush_all_land(
    store: CacheStore, redis_url: str
) -> None:
    """Writes go as scripts of at most SET_SCRIPT_KEYS entries; a server that forgot the script (a restart, a
    failover to a replica, `SCRIPT FLUSH`) gets it again on the next write."""
    observer = aioredis.Redis.from_url(redis_url)
    values = [b"v%d" % i for i in range(2 * SET_SCRIPT_KEYS + 88)]
    before = await _calls(observer, "evalsha")
    await store.set_many([(b"w%d" % i, v) for i, v in enumerate(values)], ttl_s=60)
    assert await _calls(observer, "evalsha") - before == 3
    assert await store.get_many([b"w%d" % i for i in range(len(values))]) == values
    await observer.script_flush()
    await store.set_many([(b"after-flush", b"x")], ttl_s=30)
    assert await store.get_many([b"after-flush"]) == [b"x"]
    assert 25 <= await observer.ttl(CACHE_PREFIX + b"after-flush") <= 30
    assert 55 <= await observer.ttl(CACHE_PREFIX + b"w%d" % (len(values) - 1)) <= 60
    await observer.aclose()


async def test_concurrent_callers_each_get_their_own_values(store: CacheStore) -> None:
    await store.set_many([(b"k%d" % i, b"v%d" % i) for i in range(100)], ttl_s=60)

    async def read(i: int) -> list[bytes | None]:
        return await store.get_many([b"k%d" % i, b"missing", b"k%d" % ((i + 1) % 100)])

    replies = await asyncio.gather(*(read(i) for i in range(100)))
    assert replies == [[b"v%d" % i, None, b"v%d" % ((i + 1) % 100)] for i in range(100)]


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_next(store: CacheStore) -> None:
    await store.set_many([(b"x", b"ex"), (b"y", b"why")], ttl_s=60)
    slow = asyncio.ensure_future(store.get_many([b"x"]))
    await asyncio.sleep(0)  # sent, not yet answered
    slow.cancel()
    assert await store.get_many([b"y"]) == [b"why"]
    assert await store.get_many([b"x", b"y"]) == [b"ex", b"why"]


async def test_auth_and_database_come_from_the_url(own_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    base = f"redis://:s3cret@127.0.0.1:{own_redis.port}"
    s = open_cache_store(f"{base}/3", max_bytes=0, socket_timeout_s=2)
    await s.set_many([(b"here", b"db3")], ttl_s=60)
    await s.close()
    check = aioredis.Redis.from_url(f"{base}/3")
    assert await check.get(CACHE_PREFIX + b"here") == b"db3"
    await check.aclose()
    wrong = open_cache_store(f"redis://:nope@127.0.0.1:{own_redis.port}/0", max_bytes=0, socket_timeout_s=2)
    with pytest.raises(RedisError):
        await wrong.get_many([b"here"])
    await wrong.close()


async def test_a_server_that_never_answers_times_out_and_the_next_command_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    s = open_cache_store(f"redis://127.0.0.1:{port}/0", max_bytes=0, socket_timeout_s=0.05, options=NO_RETRY)
    try:
        for _ in range(2):
            with pytest.raises(TimeoutError):  # the builtin one: the cache tells a slow command by it
                await s.get_many([b"k"])
        assert len(accepted) == 2  # the timed-out connection was dropped; the next command opened another
    finally:
        await s.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_redis_killed_then_restarted(own_redis: RedisServer) -> None:
    s = open_cache_store(own_redis.url, max_bytes=0, socket_timeout_s=1)
    try:
        await s.set_many([(b"k", b"v")], ttl_s=60)
        own_redis.stop()
        with pytest.raises(RedisError) as info:
            await s.get_many([b"k"])
        assert not isinstance(info.value, TimeoutError)  # refused: the cache backs off at once
        own_redis.start()
        await s.set_many([(b"k", b"again")], ttl_s=60)
        assert await s.get_many([b"k"]) == [b"again"]
    finally:
        await s.close()


def test_on_uvloop_too(redis_url: str) -> None:
    """The served gateway runs on uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes | None]:
        s = open_cache_store(redis_url, max_bytes=0, socket_timeout_s=2)
        try:
            await s.set_many([(b"u", b"v")], ttl_s=60)
            return await s.get_many([b"u", b"none"])
        finally:
            await s.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [b"v", None]


# ---- reads of one event-loop turn share one MGET --------------------------------------------------------------


async def _calls(observer: aioredis.Redis, command: str) -> int:
    stats = await observer.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def _mget_calls(url: str) -> int:
    observer = aioredis.Redis.from_url(url)
    calls = await _calls(observer, "mget")
    await observer.aclose()
    return calls


async def test_lookups_asked_in_one_turn_share_one_mget_and_each_gets_its_own_entries(redis_url: str) -> None:
    store = open_cache_store(redis_url, max_bytes=0, socket_timeout_s=2)
    cache = EmbeddingCache(store, ttl_s=60, local_max_bytes=0)  # every lookup reads the store
    await cache.put_many([(b"e%d" % i, Entry(vectors=np.full(4, i, dtype=np.float32), tokens=i)) for i in range(40)])
    try:
        before = await _mget_calls(redis_url)
        asked = [[b"e%d" % i, b"absent", b"e%d" % (39 - i)] for i in range(20)]
        cancelled = asyncio.ensure_future(cache.get_many([b"e1", b"e2"]))
        lookups = [asyncio.ensure_future(cache.get_many(keys)) for keys in asked]
        await asyncio.sleep(0)
        cancelled.cancel()  # a caller that goes away while its read is out changes nobody else's answer
        found = await asyncio.gather(*lookups)
        assert [[None if h is None else h.entry.tokens for h in held] for held in found] == [
            [i, None, 39 - i] for i in range(20)]
        assert await _mget_calls(redis_url) - before == 1
        # A turn's read goes out as soon as it holds MAX_KEYS_PER_READ (1024) keys; the next one starts after it.
        before = await _mget_calls(redis_url)
        many = await asyncio.gather(*(cache.get_many([b"e%d" % (i % 40)] * 300) for i in range(7)))
        assert [h.entry.tokens for held in many for h in held if h is not None] == [
            i % 40 for i in range(7) for _ in range(300)]
        assert await _mget_calls(redis_url) - before == 2  # 4 x 300 keys sent on reaching 1024, then 3 x 300
    finally:
        await store.close()


# ---- one slow command ------------------------------------------------------------------------------------


async def _block(server: RedisServer, seconds: float) -> asyncio.Task[Any]:
    """Starts `DEBUG SLEEP seconds` and returns once the server is seen blocked (a PING goes unanswered)."""
    admin = aioredis.Redis.from_url(server.url, socket_timeout=seconds + 5)
    sleeper = asyncio.ensure_future(admin.execute_command("DEBUG", "SLEEP", seconds))
    sleeper.add_done_callback(lambda _: asyncio.ensure_future(admin.aclose()))
    probe = connect(server.url, socket_timeout_s=0.3, options=NO_RETRY)
    try:
        while True:
            try:
                await probe.ping()
            except RedisError:
                return sleeper
            await asyncio.sleep(0.01)
    finally:
        await probe.aclose()


async def test_a_slow_command_fails_only_its_callers_and_does_not_bypass_the_cache(
    debug_redis: RedisServer,
) -> None:
    store = open_cache_store(debug_redis.url, max_bytes=0, socket_timeout_s=0.2)
    cache = EmbeddingCache(store, ttl_s=60, local_max_bytes=0, error_backoff_s=30)  # every read asks Redis
    entry = Entry(vectors=np.ones(4, dtype=np.float32), tokens=3)
    await cache.put_many([(b"a", entry), (b"b", entry)])
    try:
        sleeper = await _block(debug_redis, 2)
        during = await asyncio.gather(*(cache.get_many([b"a", b"b"]) for _ in range(8)))
        assert not sleeper.done(), "the reads returned only after the slow command"
        assert during == [[None, None]] * 8 and cache.errors == 1  # the 8 asked in one turn: one read
        await sleeper
        after = await cache.get_many([b"a", b"b"])
        assert [held is not None and held.entry.tokens for held in after] == [3, 3]
    finally:
        await store.close()


async def test_a_refused_store_is_bypassed_for_the_backoff(own_redis: RedisServer) -> None:
    store = open_cache_store(own_redis.url, max_bytes=0, socket_timeout_s=0.5, options=NO_RETRY)
    cache = EmbeddingCache(store, ttl_s=60, local_max_bytes=0, error_backoff_s=30)
    try:
        own_redis.stop()
        assert await cache.get_many([b"a"]) == [None] and cache.errors == 1
        own_redis.start()
        assert await cache.get_many([b"a"]) == [None] and cache.errors == 1  # not even asked
    finally:
        await store.close()


async def test_a_store_silent_for_a_whole_backoff_period_is_bypassed() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    store = open_cache_store(f"redis://127.0.0.1:{port}/0", max_bytes=0, socket_timeout_s=0.05, options=NO_RETRY)
    cache = EmbeddingCache(store, ttl_s=60, local_max_bytes=0, error_backoff_s=1.0)
    try:
        reached = []  # whether each read opened a connection (a timed-out one is dropped, so each does)
        for _ in range(100):
            before = len(accepted)
            assert await cache.get_many([b"k"]) == [None]
            reached.append(len(accepted) > before)
            if not reached[-1]:
                break
        # Reads time out one by one while the last answer (none yet: the start) is under a second old;
        # past that the host is taken for dead and reads skip it.
        assert reached[0] and reached[1] and not reached[-1]
        assert cache.errors == len(reached) - 1
    finally:
        await store.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_gateway_requests_after_a_slow_command_hit(debug_redis: RedisServer, gateway: Gateway) -> None:
    client = await gateway(cache={"url": debug_redis.url, "socket_timeout_s": 0.2, "error_backoff_s": 30,
                                  "hot_max_bytes": 0})  # no hot tier: every hit is read from Redis
    body = {"model": MODEL, "input": ["slow one", "slow two"]}
    assert (await client.post("/v1/embeddings", json=body, headers=auth())).status == 200
    observer = aioredis.Redis.from_url(debug_redis.url)
    for _ in range(1000):  # until the write-behind has landed
        if await observer.dbsize() == 2:
            break
        await asyncio.sleep(0.01)
    await observer.aclose()
    sim = sim_of(client)
    calls = sim.calls
    sleeper = await _block(debug_redis, 3)
    during = await asyncio.gather(*(client.post("/v1/embeddings", json=body, headers=auth()) for _ in range(4)))
    assert not sleeper.done(), "the requests returned only after the slow command"
    assert [(r.status, r.headers["X-Cache-Hits"]) for r in during] == [(200, "0")] * 4
    assert sim.calls > calls  # what waited on the slow command was fetched upstream
    await sleeper
    calls = sim.calls
    after = await asyncio.gather(*(client.post("/v1/embeddings", json=body, headers=auth()) for _ in range(4)))
    assert [(r.status, r.headers["X-Cache-Hits"]) for r in after] == [(200, "2")] * 4
    assert sim.calls == calls


# ---- /readyz -----------------------------------------------------------------------------------------------


async def test_readyz_pings_the_cache_and_state_clients_that_serve(own_redis: RedisServer, gateway: Gateway) -> None:
    state = RedisServer().start()
    try:
        client = await gateway(cache={"url": own_redis.url, "socket_timeout_s": 0.2},
                               state={"url": state.url, "socket_timeout_s": 0.2})
        assert await _ready(client) == (200, "ready", {"cache": True, "state": True})
        own_redis.stop()
        assert await _ready(client) == (503, "unavailable", {"cache": False, "state": True})
        own_redis.start()
        state.stop()
        assert await _ready(client) == (503, "unavailable", {"cache": True, "state": False})
        state.start()
        assert await _ready(client) == (200, "ready", {"cache": True, "state": True})
    finally:
        state.cleanup()


async def _ready(client: Any) -> tuple[int, str, dict[str, bool]]:
    resp = await client.get("/readyz")
    body = await resp.json()
    return resp.status, body["status"], body["checks"]
