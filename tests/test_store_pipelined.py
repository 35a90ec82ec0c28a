"""The cache's pipelined Redis client against a real redis-server: replies matched in order across
concurrent and cancelled callers, error replies, AUTH and SELECT from the URL, a silent server timing out,
and reconnecting after Redis is killed and restarted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.store.pipelined import PipelinedRedis, RedisReplyError

from .redis_server import RedisServer, free_port


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[PipelinedRedis]:
    c = PipelinedRedis.from_url(redis_url, timeout_s=2)
    yield c
    await c.close()


async def test_concurrent_callers_each_get_their_own_replies_on_one_connection(client: PipelinedRedis) -> None:
    await client.execute(*[(b"SET", f"k{i}", f"v{i}") for i in range(100)])

    async def read(i: int) -> list[object]:
        return await client.execute((b"MGET", f"k{i}", "missing", f"k{(i + 1) % 100}"))

    replies = await asyncio.gather(*(read(i) for i in range(100)))
    assert replies == [[[f"v{i}".encode(), None, f"v{(i + 1) % 100}".encode()]] for i in range(100)]


async def test_an_error_reply_fails_that_command_only(client: PipelinedRedis) -> None:
    await client.execute((b"SET", b"a", b"1"))
    with pytest.raises(RedisReplyError):
        await client.execute((b"INCRBY", b"a", b"not a number"))
    assert await client.execute((b"GET", b"a"), (b"SET", b"b", b"2", b"EX", 60)) == [b"1", b"OK"]


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_next(client: PipelinedRedis) -> None:
    await client.execute((b"SET", b"x", b"ex"), (b"SET", b"y", b"why"))
    slow = asyncio.ensure_future(client.execute((b"GET", b"x")))
    await asyncio.sleep(0)  # sent, not yet answered
    slow.cancel()
    assert await client.execute((b"GET", b"y")) == [b"why"]


async def test_an_idle_connection_sends_at_once_and_a_busy_one_gathers_an_iteration_into_one_write(
    client: PipelinedRedis,
) -> None:
    await client.execute((b"PING",))  # connected
    conn = client._conn
    assert conn is not None and conn.transport is not None
    writes: list[bytes] = []
    real_write = conn.transport.write

    def write(data: bytes) -> None:
        writes.append(bytes(data))
        real_write(data)

    conn.transport.write = write  # type: ignore[method-assign]
    # Six callers in one iteration: the first finds nothing in flight and its command leaves at once; the
    # other five, with its reply pending, leave together in one write.
    replies = await asyncio.gather(
        client.execute((b"SET", b"p", b"1")), *(client.execute((b"GET", b"p")) for _ in range(5))
    )
    assert replies == [[b"OK"]] + [[b"1"]] * 5
    assert len(writes) == 2 and b"SET" in writes[0] and writes[1].count(b"GET") == 5


async def test_auth_and_database_come_from_the_url(own_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    base = f"redis://:s3cret@127.0.0.1:{own_redis.port}"
    c = PipelinedRedis.from_url(f"{base}/3", timeout_s=2)
    await c.execute((b"SET", b"here", b"db3"))
    await c.close()
    check = aioredis.Redis.from_url(f"{base}/3")
    assert await check.get(b"here") == b"db3"
    await check.aclose()
    wrong = PipelinedRedis.from_url(f"redis://:nope@127.0.0.1:{own_redis.port}/0", timeout_s=2)
    with pytest.raises(RedisReplyError):
        await wrong.execute((b"GET", b"here"))
    await wrong.close()


async def test_a_server_that_never_answers_times_out_and_the_next_command_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    port = free_port()
    server = await asyncio.start_server(silent, "127.0.0.1", port)
    c = PipelinedRedis(port=port, timeout_s=0.05)
    try:
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await c.execute((b"GET", b"k"))
        assert len(accepted) == 2  # the timed-out connection was dropped; the next command opened another
    finally:
        await c.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_redis_killed_then_restarted(own_redis: RedisServer) -> None:
    c = PipelinedRedis.from_url(own_redis.url, timeout_s=1)
    try:
        await c.execute((b"SET", b"k", b"v"))
        own_redis.stop()
        with pytest.raises(ConnectionError):
            await c.execute((b"GET", b"k"))
        own_redis.start()
        assert await c.execute((b"SET", b"k", b"again"), (b"GET", b"k")) == [b"OK", b"again"]
    finally:
        await c.close()


def test_on_uvloop_too(redis_url: str) -> None:
    """The served gateway runs on uvloop, whose transports are not asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[object]:
        c = PipelinedRedis.from_url(redis_url, timeout_s=2)
        try:
            await c.execute((b"SET", b"u", b"v", b"EX", 60))
            return await c.execute((b"GET", b"u"), (b"MGET", b"u", b"none"))
        finally:
            await c.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [b"v", [b"v", None]]
