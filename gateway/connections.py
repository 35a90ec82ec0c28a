"""What aiohttp's server has no setting for: a deadline for a new connection's first request headers, and a bound
on the open client connections of one process.

aiohttp covers the rest: its `keepalive_timeout` closes a connection idle that long (between requests, and a new
one that has completed no request by then), and its parser bounds header lines, fields and counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import orjson
from aiohttp import web

_REFUSAL_BODY = orjson.dumps({"detail": "too many open connections; retry shortly", "code": "OVERLOADED"})
# The one answer a refused connection gets before it is closed: written whole, nothing of the client's is read.
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class ConnectionGuard:
    """Counts this process's client connections: one over `max_connections` is answered 503 and closed; one that
    has not completed its first request's headers `header_timeout_s` after it opened is closed.

    `protocol_factory(server)` is what `loop.create_server` takes; the request path calls `started(transport)`
    when a request's headers are in (see middleware.endpoint).
    """

    def __init__(self, *, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections answered 503 because `max_connections` were open
        self.timed_out = 0  # connections closed for not completing their headers in time
        self.waiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        return lambda: GuardedConnection(self, server)

    def started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's headers arrived on `transport`: its deadline is met."""
        if transport is not None and (timer := self.waiting.pop(transport, None)) is not None:
            timer.cancel()

    def admit(self, transport: asyncio.Transport) -> bool:
        if self.open >= self.max_connections:
            self.refused += 1
            transport.write(_REFUSAL)
            transport.close()
            return False
        self.open += 1
        loop = asyncio.get_running_loop()
        self.waiting[transport] = loop.call_later(self.header_timeout_s, self._expire, transport)
        return True

    def release(self, transport: asyncio.BaseTransport) -> None:
        self.open -= 1
        self.started(transport)

    def _expire(self, transport: asyncio.Transport) -> None:
        if self.waiting.pop(transport, None) is not None:
            self.timed_out += 1
            transport.abort()  # a client that stalls its headers is not owed a graceful close


class GuardedConnection(asyncio.Protocol):
    """One client connection: admitted by the guard, then served by aiohttp's own protocol, which gets every call."""

    def __init__(self, guard: ConnectionGuard, server: web.Server) -> None:
        self.guard = guard
        self.server = server
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but has its methods
        if self.guard.admit(transport):
            self.transport = transport
            self.inner = self.server()
            self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None and self.transport is not None:
            self.guard.release(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
