"""What every request gets (request id, in-flight count, authentication, errors → JSON, latency, the access
log), as a wrapper around each route's handler.

The access log is one INFO record per request on the `gateway.access` logger (probes excepted): its message is
the line as JSON, and `record.access` holds the same fields as a dict for handlers that ship them structured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from . import appkeys as K
from .errors import GatewayError, Unauthorized, ValidationFailed, error_body

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

# Paths that answer without a key: liveness and readiness probes (metrics has its own optional token).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Probes are polled every few seconds and carry no work: not in the access log, and no Authorization is read.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_REQUEST_ID_MAX = 64

_HTTP_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def json_error(status: int, detail: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(status, detail, code)),
        content_type="application/json",
        headers=headers,
    )


def next_request_id() -> str:
    """32 hex digits, unique like a uuid4's: a random per-process prefix and a counter (no getrandom()
    system call per request)."""
    return f"{_ids.prefix}{next(_ids.counter):016x}"


class _Ids:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)  # a forked child must not repeat its parent's ids


def request_id_of(request: web.Request) -> tuple[str, bool]:
    """The caller's `X-Request-Id` (its first 64 characters), or a new id when it sent none; a value that is not
    printable UTF-8 text is replaced by a new id too, and the second item says so (the access line records it)."""
    sent = request.headers.get("X-Request-Id", "")
    if not sent:
        return next_request_id(), False
    if _is_utf8(sent) and sent.isprintable():
        return sent[:_REQUEST_ID_MAX], False
    return next_request_id(), True


def _is_utf8(value: str) -> bool:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: each byte that was not UTF-8 is a lone surrogate.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_authorization(request: web.Request) -> None:
    """An Authorization header that is not UTF-8 text is a 401 on every route that reads the header."""
    value = request.headers.get("Authorization")
    if value is not None and not _is_utf8(value):
        raise Unauthorized("the Authorization header is not valid UTF-8 text", code="AUTH_INVALID_API_KEY")


def dumps_lenient(value: object) -> bytes:
    """JSON of `value`; a string holding bytes that were not UTF-8 (from a header or a path) gets U+FFFD for them
    instead of failing the answer or the log line."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace")


def endpoint(handler: Handler, *, route: str, public: bool = False) -> Handler:
    """`handler` with what every request gets: request id, in-flight count, authentication (unless `public`),
    errors → JSON, the latency metric and the access log line (every route but the probes).

    A wrapper per route rather than an aiohttp middleware: having any middleware at all costs aiohttp a
    wrapper chain and a coroutine per request, and the route's label and publicness are known here once
    instead of being looked up per request.
    """
    probe = route in PROBE_PATHS

    async def impl(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id, replaced = request_id_of(request)
        # The access line itself: the handler adds what it knows (model, counts); the rest is filled in below.
        fields: dict[str, object] = {"request_id": request_id, "method": request.method, "path": route, "team": "",
                                     "status": 500, "latency_ms": 0.0}
        if replaced:
            fields["request_id_replaced"] = True  # the one sent was not printable UTF-8 text
        request[K.LOG_FIELDS] = fields
        app = request.app
        connections = app.get(K.CONNECTIONS)
        if connections is not None:
            connections.started(request.transport)  # its headers are in: the header deadline is met
        in_flight = None if public else app[K.METRICS].active
        if in_flight is not None:
            in_flight.enter()
        status = 500
        team = ""
        try:
            try:
                if not probe:
                    _check_authorization(request)
                if not public:
                    principal = app[K.LIVE].keyring.authenticate(request.headers.get("Authorization"))
                    request[K.PRINCIPAL] = principal
                    team = principal.name
                response = await handler(request)
            except GatewayError as exc:
                response = web.Response(
                    status=exc.status, body=dumps_lenient(exc.body()), content_type="application/json",
                    headers=exc.headers,
                )
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise
                code = _HTTP_CODES.get(exc.status, "HTTP_ERROR")
                headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
                response = json_error(exc.status, exc.reason, code, headers)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.path)
                response = json_error(500, "internal error", "INTERNAL_ERROR")
            status = response.status
            response.headers["X-Request-Id"] = request_id
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away before its answer (nginx's code for it)
            raise
        finally:
            if in_flight is not None:
                in_flight.leave()
            seconds = time.perf_counter() - started
            app[K.METRICS].count_request(route, status, team, seconds)
            if not probe:
                fields["team"] = team
                fields["status"] = status
                fields["latency_ms"] = round(seconds * 1e6) / 1000
                write_access(fields)

    return impl


def write_access(fields: dict[str, object]) -> None:
    """One INFO record on `gateway.access`: the line as JSON for its message, the fields as `record.access`.
    Never raises: a line that cannot be written must not change the answer."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    try:
        access_log.handle(_access_record(dumps_lenient(fields).decode(), fields))
    except Exception:
        log.exception("access log line not written")


class _AccessRecords:
    """Access records as copies of one `LogRecord` made by `logging` itself, with the time and message of their
    own: `LogRecord.__init__` (time, path splitting, thread and process look-ups) costs a sixth of a cached hit.
    A program that installs its own record factory (OpenTelemetry does) gets records from that factory."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        prototype = logging.LogRecord(access_log.name, logging.INFO, __file__, 0, "", (), None)
        self.started = prototype.created - prototype.relativeCreated / 1000
        self.template = {**vars(prototype), "access": None}

    def __call__(self, message: str, fields: dict[str, object]) -> logging.LogRecord:
        if logging.getLogRecordFactory() is not logging.LogRecord:
            return access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, message, (), None,
                                         extra={"access": fields})
        record = logging.LogRecord.__new__(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(self.template)
        now = time.time()
        attributes["created"] = now
        attributes["msecs"] = int((now - int(now)) * 1000) + 0.0
        attributes["relativeCreated"] = (now - self.started) * 1000
        attributes["msg"] = message
        attributes["access"] = fields
        return record


_access_record = _AccessRecords()
os.register_at_fork(after_in_child=_access_record.reset)  # the process and thread a record names are the child's


def check_query(request: web.Request, known: frozenset[str]) -> None:
    """A query parameter the route does not take is a 422 naming it, not silently ignored."""
    for name in request.query:
        if name not in known:
            raise ValidationFailed(name, f"unknown parameter (known: {', '.join(sorted(known))})")


def query_int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    """Query parameter `name` as an integer from `low` to `high` (`default` when absent). Anything but ASCII digits
    (`¹` and `٣` pass `str.isdigit`), or a number out of range, is a 422 naming the parameter."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18 and low <= int(raw) <= high):
        raise ValidationFailed(name, f"must be an integer from {low} to {high}")
    return int(raw)


def _wrapped(path: str, handler: Handler) -> Handler:
    route = _VARIABLE.sub(r"{\1}", path)  # the metric and log label: `{batch_id}`, without its pattern
    return endpoint(handler, route=route, public=path in PUBLIC_PATHS)


_VARIABLE = re.compile(r"\{(\w+):[^}]*\}")


class Routes:
    """Adds routes to a router with every handler wrapped by `endpoint`, and, last, the catch-all that answers
    what no route matches (404, or 405 with `Allow`) in the same JSON shape, through the same wrapper."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self.router = router

    def add_get(self, path: str, handler: Handler) -> None:
        self.router.add_get(path, _wrapped(path, handler))

    def add_post(self, path: str, handler: Handler) -> None:
        self.router.add_post(path, _wrapped(path, handler))

    def add_delete(self, path: str, handler: Handler) -> None:
        self.router.add_delete(path, _wrapped(path, handler))

    def add_patch(self, path: str, handler: Handler) -> None:
        self.router.add_patch(path, _wrapped(path, handler))

    def add_unmatched(self) -> None:
        resource = self.router.add_resource("/{unmatched:.*}")

        async def unmatched(request: web.Request) -> web.StreamResponse:
            allowed: set[str] = set()
            for other in self.router.resources():
                if other is not resource:
                    _, methods = await other.resolve(request)
                    allowed |= methods
            if allowed:
                raise web.HTTPMethodNotAllowed(request.method, allowed)
            raise web.HTTPNotFound()

        keyed, open_ = endpoint(unmatched, route="unmatched"), endpoint(unmatched, route="unmatched", public=True)

        async def answer(request: web.Request) -> web.StreamResponse:
            # A probe path asked with another method gets its 405 without a key, as the probe itself would.
            return await (open_ if request.path in PUBLIC_PATHS else keyed)(request)

        resource.add_route("*", answer)
