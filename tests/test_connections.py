"""Client connection limits of a serving process: a deadline for a new connection's headers, idle keep-alive
connections closed, and a bound on open connections (gateway/connections.py and aiohttp's keepalive_timeout)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway import appkeys as K
from gateway import config as cfg
from gateway.app import create_app
from gateway.connections import ConnectionGuard
from gateway.server import drain, start
from gateway.sim import Simulator

from .conftest import auth, base_config

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def serving(**limits: Any) -> AsyncIterator[tuple[int, ConnectionGuard]]:
    """The gateway as `serve` runs it (limits and listener included), on a free loopback port."""
    config = cfg.build(cfg.Config, base_config(limits={"request_timeout_s": 10, **limits}), "")
    app = create_app(config, simulator=Simulator())
    runner, listener = await start(app, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1], app[K.CONNECTIONS]
    finally:
        assert await drain(runner, app, listener) == 0


async def stalled(port: int, count: int) -> list[Stream]:
    """`count` connections that send half of a request's headers, then nothing."""
    streams = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bear")
        streams.append((reader, writer))
    return streams


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (b"" for nothing)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def close_all(streams: list[Stream]) -> None:
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def usage_status(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/v1/usage", headers=auth()) as resp:
        return resp.status


@pytest.mark.slow
async def test_500_connections_stalling_their_headers_are_all_closed_and_a_request_meanwhile_succeeds() -> None:
    loop = asyncio.get_running_loop()
    async with serving(header_timeout_s=1, max_connections=1000) as (port, guard):
        streams = await stalled(port, 500)
        last_opened = loop.time()
        assert await usage_status(port) == 200  # while all 500 are held open
        # All closed by header_timeout_s + 1 s after the last of them opened; none got an answer.
        sent = await asyncio.wait_for(
            asyncio.gather(*(closed_by_server(reader) for reader, _ in streams)),
            timeout=max(0.0, last_opened + 1 + 1 - loop.time()),
        )
        assert sent == [b""] * 500
        assert guard.timed_out == 500
        await close_all(streams)


async def test_a_connection_over_the_bound_gets_503_and_a_slot_freed_serves_again() -> None:
    async with serving(header_timeout_s=30, max_connections=3) as (port, guard):
        held = await stalled(port, 3)
        over = await stalled(port, 1)
        answer = await asyncio.wait_for(closed_by_server(over[0][0]), timeout=10)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert answer.endswith(b'{"detail":"too many open connections; retry shortly","code":"OVERLOADED"}')
        assert guard.refused == 1 and guard.open == 3
        await close_all(held[:1])
        for _ in range(200):  # the server sees the close on its next loop turns
            if guard.open == 2:
                break
            await asyncio.sleep(0.01)
        assert await usage_status(port) == 200
        assert guard.refused == 1 and guard.timed_out == 0
        await close_all(held[1:] + over)


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() -> None:
    async with serving(keepalive_timeout_s=0.5) as (port, guard):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = auth()["Authorization"].encode()
        writer.write(b"GET /v1/usage HTTP/1.1\r\nHost: gateway\r\nAuthorization: " + key + b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" not in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert await asyncio.wait_for(closed_by_server(reader), timeout=10) == b""  # closed, not answered
        assert guard.timed_out == 0  # the header deadline of a connection that sent a request is met
        await close_all([(reader, writer)])
