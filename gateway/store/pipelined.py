"""A lean pipelined Redis client for the cache's hot path (MGET, SET … EX) over plain TCP or a unix socket.

redis-py spends 100-200 µs of Python per command here (pool, retry, health-check and timeout wrappers), and
the cache sends one command per request. Here every command shares one connection, the commands issued in
one event-loop iteration leave in one write (concurrent callers pipeline on the wire; a command issued while
nothing is in flight or queued leaves at once, since there is nobody to pipeline with), and replies are
matched in order and parsed by hiredis. An error or a timeout closes the connection and fails every command
waiting on it (replies could no longer be matched to callers); the next command reconnects. The cache
treats any failure as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

Arg = bytes | str | int


class RedisReplyError(Exception):
    """Redis answered a command with an error reply."""


class PipelinedRedis:
    """One lazily (re)opened connection; `execute` sends commands in one write and returns their replies."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 0.5,
        connect_timeout_s: float | None = None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s or timeout_s
        self._hello: list[tuple[Arg, ...]] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float, connect_timeout_s: float | None = None) -> PipelinedRedis:
        """`redis://[[user]:password@]host[:port][/db]` or `unix:///path.sock?db=N&password=…`."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
        username = unquote(parts.username) if parts.username else None
        common: dict[str, Any] = {"username": username, "password": password, "timeout_s": timeout_s,
                                  "connect_timeout_s": connect_timeout_s}
        if parts.scheme == "unix":
            return cls(path=parts.path, db=int(query.get("db", ["0"])[0]), **common)
        db = int(parts.path.strip("/") or query.get("db", ["0"])[0])
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=db, **common)

    async def execute(self, *commands: tuple[Arg, ...]) -> list[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        return await conn.execute(commands, self.timeout_s)

    async def _connect(self) -> _Connection:
        # Callers arriving while a connection is being opened wait for that one, not for one each.
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        task = self._connecting
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            if self.path is not None:
                _, conn = await loop.create_unix_connection(_Connection, self.path)
            else:
                _, conn = await loop.create_connection(_Connection, self.host, self.port)
        try:
            if self._hello:
                await conn.execute(tuple(self._hello), self.connect_timeout_s)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
            self._connecting = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.outbox: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same interface.
        self.transport = cast(asyncio.Transport, transport)

    async def execute(self, commands: tuple[tuple[Arg, ...], ...], timeout_s: float) -> list[Any]:
        if self.closed or self.transport is None:
            raise ConnectionError("the cache Redis connection is closed")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        packed = [hiredis.pack_command(c) for c in commands]  # type: ignore[arg-type]
        if not self.waiting and not self.outbox:
            # Nothing in flight: nobody to pipeline with, so the command leaves now rather than one loop
            # iteration later (under load replies are pending, and commands gather into one write as below).
            self.transport.write(packed[0] if len(packed) == 1 else b"".join(packed))
        else:
            if not self.outbox:
                loop.call_soon(self._flush)
            self.outbox.extend(packed)
        self.waiting.extend(futures)
        last = futures[-1]
        # Replies come in order: when the last one is late, everything after it is stuck behind it too.
        timer = loop.call_later(timeout_s, self._expire, last)
        try:
            if len(futures) == 1:
                return [await last]
            replies = await asyncio.gather(*futures, return_exceptions=True)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            return replies
        finally:
            timer.cancel()

    def _flush(self) -> None:
        # Every command of this loop iteration in one write: on loopback the sender pays for delivering each
        # segment (and waking Redis), so under load one system call per burst instead of one per request.
        outbox, self.outbox = self.outbox, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(outbox))

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            self._abort(TimeoutError("the cache Redis did not answer in time"))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._abort(ConnectionError(f"bad reply from the cache Redis: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self._abort(ConnectionError("a reply from the cache Redis that nobody asked for"))
                return
            future = self.waiting.popleft()
            if future.done():  # its caller went away (cancelled): the reply still had to be consumed
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"the cache Redis connection was lost ({exc or 'closed'})"))

    def _abort(self, exc: Exception) -> None:
        self._fail(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._fail(ConnectionError("the cache Redis connection was closed"))

    def _fail(self, exc: Exception) -> None:
        waiting, self.waiting = self.waiting, deque()
        for future in waiting:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # a caller that already gave up must not leave it "never retrieved"
