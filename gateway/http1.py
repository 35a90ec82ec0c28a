"""A lean HTTP/1.1 keep-alive client for the upstream's one endpoint: POST a JSON body, read the answer whole.

aiohttp's ClientSession cost the gateway ~0.5 ms of latency and ~0.3 ms of CPU per upstream call on the bench VM
(request and response objects, trace hooks, cookie handling, a stream reader, timer objects), for features the
upstream client does not use. Here: a pool of keep-alive connections (TCP or TLS), each request written at
once, the answer parsed by one small state machine (Content-Length, chunked or read-until-close bodies;
gzip/deflate), one timer per request. A reused connection that the server had already closed (its keep-alive
timeout) is retried once on a new connection when no byte of the answer came; any other failure closes the
connection and raises an `HTTPError` or `TimeoutError`, which the upstream client retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024 * 1024  # 2048 inputs x 4096 dims of base64 float32 is ~90 MB
# Servers close idle keep-alive connections after some seconds; one idle longer than this is not reused
# (aiohttp's default too), so a request rarely meets a connection the server is closing.
IDLE_S = 15.0


class HTTPError(Exception):
    """The exchange failed: no connection, a connection closed too early, or an answer that is not HTTP/1.1."""


class ConnectFailed(HTTPError):
    pass


class Disconnected(HTTPError):
    pass


class BadAnswer(HTTPError):
    pass


class _Stale(Disconnected):
    """A reused connection closed before any byte of the answer: the request can go again on a new one."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case; repeated headers joined with ", "
    body: bytes  # decoded (Content-Encoding undone)


# States of the answer being read.
_HEAD, _LENGTH, _TO_CLOSE, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(7)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reused = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._body = bytearray()
        self._state = _HEAD
        self._left = 0  # body or chunk bytes still to come
        self._got = False  # a byte of the current answer arrived
        self._status = 0
        self._headers: dict[str, str] = {}
        self.keep = True

    # ---- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        self._got = True
        try:
            if not self._buf and self._state == _HEAD:
                # The usual answer: head and whole body in one read. Parsed from `data` itself, without
                # copying it through the buffer.
                answer = self._whole(data)
            else:
                self._buf += data
                answer = self._parse()
        except HTTPError as exc:
            self._finish(exc)
            return
        if answer is not None:
            self._finish(answer)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)
        if self._waiter is None or self._waiter.done():
            return
        if self._state == _TO_CLOSE:
            try:
                self._finish(self._answer(bytes(self._buf)))
            except HTTPError as error:
                self._finish(error)
            return
        why = f": {exc}" if exc else ""
        if not self._got and self.reused:
            self._finish(_Stale(f"the upstream closed an idle connection{why}"))
        else:
            self._finish(Disconnected(f"the upstream closed the connection before the answer was complete{why}"))

    # ---- one exchange --------------------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes, deadline: float) -> Answer:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self._waiter = waiter
        self._timer = loop.call_at(deadline, self._time_out)
        self._got = False
        self.transport.writelines((head, body))
        try:
            return await waiter
        except BaseException:
            self.abort()  # timed out, failed or cancelled: whatever comes later would be out of step
            raise

    def _time_out(self) -> None:
        self._timer = None
        self._finish(TimeoutError("no complete answer from the upstream in time"))

    def _finish(self, outcome: Answer | BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(outcome, BaseException):
            self.keep = False
        if waiter is not None and not waiter.done():
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    @property
    def busy(self) -> bool:
        return self._waiter is not None

    def abort(self) -> None:
        self.keep = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # ---- parsing -------------------------------------------------------------------------------------

    def _parse(self) -> Answer | None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                head = _take(buf, b"\r\n\r\n", "answer head")
                if head is None:
                    return None
                self._read_head(head)
            elif state == _LENGTH:
                if len(buf) < self._left:
                    return None
                body = bytes(buf[: self._left])
                del buf[: self._left]
                return self._answer(body)
            elif state == _TO_CLOSE:
                if len(buf) > MAX_BODY_BYTES:
                    raise BadAnswer("answer body too large")
                return None
            elif state in (_CHUNK_SIZE, _TRAILER):
                line = _take(buf, b"\r\n", "chunk header")
                if line is None:
                    return None
                if state == _TRAILER:
                    if not line:
                        return self._answer(bytes(self._body))
                    continue
                self._chunk_size(line)
            elif state == _CHUNK_DATA:
                if not buf:
                    return None
                take = min(len(buf), self._left)
                self._body += buf[:take]
                del buf[:take]
                self._left -= take
                if not self._left:
                    self._state = _CHUNK_END
            else:  # _CHUNK_END
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise BadAnswer("chunk not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE

    def _whole(self, data: bytes) -> Answer | None:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            self._read_head(data[:end])
            start = end + 4
            if self._state == _LENGTH and len(data) - start == self._left:
                return self._answer(data[start:])
            data = data[start:]
        self._buf += data  # anything else (partial, interim, chunked...): the general parser
        return self._parse()

    def _read_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit():
            raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise BadAnswer(f"malformed header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        connection = headers.get("connection", "").lower()
        self.keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        self._status, self._headers, self._body = status, headers, bytearray()
        encoding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            self._state, self._left = _LENGTH, 0
        elif encoding:
            if encoding.rsplit(",", 1)[-1].strip() != "chunked":
                raise BadAnswer(f"unsupported transfer-encoding {encoding!r}")
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            length = headers["content-length"].split(",")[0].strip()
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise BadAnswer(f"bad content-length {headers['content-length']!r}")
            self._state, self._left = _LENGTH, int(length)
        else:
            self._state, self.keep = _TO_CLOSE, False

    def _chunk_size(self, line: bytes) -> None:
        digits = line.split(b";", 1)[0].strip()
        try:
            size = int(digits, 16)
        except ValueError:
            raise BadAnswer(f"bad chunk size {digits[:20]!r}") from None
        if size < 0 or len(self._body) + size > MAX_BODY_BYTES:
            raise BadAnswer("answer body too large")
        self._state, self._left = (_CHUNK_DATA, size) if size else (_TRAILER, 0)

    def _answer(self, body: bytes) -> Answer:
        if self._buf:
            self.keep = False  # more than one answer's bytes: the connection is out of step
        self._state = _HEAD
        encoding = self._headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            body = _decode(body, encoding)
        return Answer(self._status, self._headers, body)


def _decode(body: bytes, encoding: str) -> bytes:
    if encoding in ("gzip", "x-gzip"):
        wbits = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        wbits = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped as the RFC says, or raw as some servers send
    else:
        raise BadAnswer(f"unsupported content-encoding {encoding!r}")
    for bits in wbits:
        inflater = zlib.decompressobj(bits)
        try:
            out = inflater.decompress(body, MAX_BODY_BYTES)
        except zlib.error:
            continue
        if inflater.unconsumed_tail:
            raise BadAnswer("decoded answer body too large")
        return out
    raise BadAnswer(f"undecodable {encoding} body")


class Client:
    """Keep-alive connections to one origin, for POSTs to one path."""

    def __init__(self, url: str, headers: dict[str, str], *, max_idle: int = 16) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = {"Host": parts.netloc.rpartition("@")[2], "Accept-Encoding": "gzip, deflate",
                  "User-Agent": "embedding-gateway", **headers}
        self._head = f"POST {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self.max_idle = max_idle
        self._idle: deque[_Connection] = deque()
        self._all: set[_Connection] = set()

    async def post(self, body: bytes, timeout_s: float) -> Answer:
        """One exchange on an idle connection (or a new one), within `timeout_s` from now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        head = f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1")
        while True:
            conn = self._take(loop.time())
            if conn is None:
                conn = await self._connect(deadline)
            try:
                answer = await conn.exchange(head, body, deadline)
            except _Stale:
                continue  # reused connections only, each one once: the loop ends with a new connection
            finally:
                self._give_back(conn, loop.time())
            return answer

    def _take(self, now: float) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be closing
            if not conn.closed and now - conn.idle_since < IDLE_S:
                conn.reused = True
                return conn
            self._drop(conn)
        return None

    def _give_back(self, conn: _Connection, now: float) -> None:
        if conn.closed or not conn.keep or len(self._idle) >= self.max_idle:
            self._drop(conn)
            return
        conn.idle_since = now
        self._idle.append(conn)

    def _drop(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if not conn.closed and conn.transport is not None:
            conn.closed = True
            conn.transport.close()

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl, server_hostname=self.host if self.ssl else None
                )
        except OSError as exc:  # refused, unreachable, TLS handshake or certificate errors
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._all.add(conn)
        return conn

    async def close(self) -> None:
        """Closes every connection, idle or not, and waits (briefly) until they are gone."""
        conns = list(self._all)
        self._idle.clear()
        self._all.clear()
        for conn in conns:
            if conn.busy:
                conn.abort()
            else:
                self._drop(conn)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(c.lost for c in conns))


def _take(buf: bytearray, end_mark: bytes, what: str) -> bytes | None:
    """What `buf` holds before `end_mark` (both taken out of it), or None until the mark arrives; a part
    longer than MAX_HEAD_BYTES without it is a bad answer."""
    end = buf.find(end_mark)
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise BadAnswer(f"{what} too large")
        return None
    part = bytes(buf[:end])
    del buf[: end + len(end_mark)]
    return part
