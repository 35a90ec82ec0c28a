"""`/v1/embeddings`' 200 answer, written to the socket in one call: status line, headers and the body's pieces.

aiohttp's `web.Response` goes through `prepare()` (header preparation, the `on_response_prepare` hook, header
serialisation) and `write_eof()`, and joins the headers and the body into one new bytes object before writing
(it only hands a list of buffers to the transport on Python >= 3.12.9). That machinery was ~16% of an all-hit
request's CPU time on the bench machine, and the join a second copy of an answer that may be megabytes.

An embeddings answer needs none of it: its status is 200, its headers are known when it is made (the cache
headers are even the same text for every answer with the same counts), and its body is already a list of
buffers: memoised renderings from the hot tier, spliced without a copy. Under uvloop (what `serve` runs on)
they go out in one `writev`; elsewhere they are joined once and written.

What this skips, and why that is sound here: compression (the gateway never enables it), cookies (it sets
none) and `on_response_prepare` (the app registers no handler, and a test fails if one is added: this class
would have to call it too). Keep-alive and the `Connection` header follow aiohttp's rules exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11

Buffer = bytes | memoryview
_SPLITS = "a header name or value holds a CR or LF"


def header_lines(headers: Mapping[str, str]) -> str:
    """`Name: value\r\n` per header. A CR or LF inside a name or value would split the header block: refused,
    as aiohttp's own serialiser does (one count over the whole text instead of a test per header)."""
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if text.count("\n") != len(headers) or text.count("\r") != len(headers):
        raise ValueError(_SPLITS)
    return text


class JsonAnswer(web.StreamResponse):
    """A 200 `application/json` answer of `parts` (joined, they are the body). `fixed` holds header lines
    rendered once (`header_lines`); `identify` adds the request id, and headers set on `.headers` after creation
    (a quota's `RateLimit-*`) are rendered when the answer is sent."""

    def __init__(self, parts: Sequence[Buffer], fixed: str, size: int | None = None) -> None:
        super().__init__()
        self._parts = parts
        self._fixed = fixed
        self._size = sum(map(len, parts)) if size is None else size  # the body's length, when known
        self._request_id = ""

    def identify(self, request_id: str) -> None:
        """Sets `X-Request-Id`, as `.headers` would, at a tenth of the cost: every answer has one."""
        if "\r" in request_id or "\n" in request_id:
            raise ValueError(_SPLITS)
        self._request_id = f"X-Request-Id: {request_id}\r\n"

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        writer = request.writer
        self._req = request
        self._payload_writer = writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        parts = self._parts
        size = self._size
        # aiohttp's rule: say keep-alive where 1.0 would close by default, close where 1.1 would keep it.
        if keep_alive:
            connection = "Connection: keep-alive\r\n" if version == HttpVersion10 else ""
        else:
            connection = "Connection: close\r\n" if version == HttpVersion11 else ""
        lines = header_lines(self._headers) if self._headers else ""
        # One text, encoded once: one piece. aiohttp decodes request headers as UTF-8 with surrogateescape, so an
        # echoed value (the request id) goes back as its bytes came.
        head = (
            f"HTTP/{version.major}.{version.minor} 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nDate: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n"
            f"{connection}{self._fixed}{self._request_id}{lines}\r\n"
        ).encode("utf-8", "surrogateescape")
        transport: Any = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self._eof_sent = True  # finish_response's write_eof() then has nothing to do
        if _gathers(transport):
            transport.writelines((head, *parts))
        else:
            transport.write(b"".join((head, *parts)))
        if transport.get_write_buffer_size():  # what the socket did not take at once
            await writer.drain()  # as write_eof() would: wait while the client is slower than we write
        return writer


def _gathers(transport: object) -> bool:
    """Whether the transport's `writelines` sends a list of buffers without joining them first (uvloop's
    does, in one writev). asyncio's joins them on 3.11; on 3.12.0–3.12.8 it has CVE-2024-12254."""
    kind = type(transport)
    known = _GATHERS.get(kind)
    if known is None:
        known = _GATHERS[kind] = kind.__module__.startswith("uvloop")
    return known


_GATHERS: dict[type, bool] = {}
