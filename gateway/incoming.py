"""What every API's handlers read of a request: who asked (set by the route wrapper) and its body, bounded."""

from __future__ import annotations

import asyncio

from aiohttp import web

from . import appkeys as K
from . import config as cfg
from .auth import Principal
from .errors import PayloadTooLarge, RequestTimeout


def principal_of(request: web.Request) -> Principal:
    principal: Principal = request[K.PRINCIPAL]
    return principal


def body_now(request: web.Request, limits: cfg.Limits) -> bytes | None:
    """The body when it came whole with the headers (the usual case: no await), else None; over the limit,
    413 before it is buffered whole."""
    limit = limits.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the {limit}-byte limit")
    content = request.content
    if not content.is_eof():
        return None
    # Take the buffer as it is (no timer, and none of read()'s chunk loop), checking the size read() would.
    body = content.read_nowait()
    if len(body) > limit:
        raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
    return body


async def read_body(request: web.Request) -> bytes:
    """The body, refused before it is buffered whole when it is over the limit.

    Reading is bounded by the request deadline: aiohttp has no body read timeout of its own, so a client
    trickling its body in would otherwise hold a handler (and its buffer) for as long as it likes.
    """
    limits = request.app[K.LIVE].config.limits
    body = body_now(request, limits)
    return body if body is not None else await _read_rest(request, limits)


async def _read_rest(request: web.Request, limits: cfg.Limits) -> bytes:
    """The body `body_now` did not have whole, read within the request deadline."""
    limit = limits.max_body_bytes
    try:
        async with asyncio.timeout(limits.request_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit") from None
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {limits.request_timeout_s:g}s") from None
