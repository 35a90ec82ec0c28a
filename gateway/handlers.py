"""HTTP handlers: thin adapters between aiohttp and the parts (service, stores, metrics)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import time
from datetime import UTC, datetime

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import appkeys as K
from . import config as cfg
from . import openapi as openapi_doc
from .answer import JsonAnswer, header_lines
from .auth import Principal
from .errors import Forbidden, GatewayError, PayloadTooLarge, RequestTimeout, StateUnavailable
from .memo import Replay
from .protocol import parse_embedding_request, parse_json_object
from .quota import Reservation
from .usage import build_report, parse_query


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


async def embeddings(request: web.Request) -> web.StreamResponse:
    # This runs for every request: one coroutine for an exact repeat (the common case), the parts looked up
    # once and passed on.
    team = principal_of(request).team
    if team is None:
        raise Forbidden("admin keys cannot embed; use a team key")
    app = request.app
    config = app[K.LIVE].config
    started = time.monotonic()  # the request's deadline counts from here, the body's reading included
    try:
        raw = body_now(request, config.limits)
        if raw is None:
            raw = await _read_rest(request, config.limits)
        max_inputs = config.limits.max_inputs_per_request
        if team.max_inputs_per_request is not None:
            max_inputs = min(max_inputs, team.max_inputs_per_request)
        service = app[K.SERVICE]
        scope = team.name if service.scope == "team" else ""
        replay = app[K.REPEATS].get(scope, raw)
        # A repeat this team may ask as it is (else the full path answers, with its error), still hot.
        if replay is not None and replay.inputs <= max_inputs and (team.models is None or replay.model in team.models):
            payload = app[K.CACHE].hot_answer(replay.serial, replay.model, replay.tokens, replay.keys, replay.output)
            if payload is not None:
                service.interactive_at = started
                reservation = await service.admit_cached(team, replay.cached_tokens) if service.admits(team) else None
                return _replayed(request, app, config, team, replay, payload, reservation)
        return await _embed(request, app, config, team, raw, max_inputs, scope, started)
    except GatewayError as exc:
        # Every answer to a team with a quota tells it where it stands; a 429 already carries it.
        if "RateLimit" not in exc.headers:
            exc.headers.update(await app[K.QUOTA].peek(team))
        raise


async def _embed(
    request: web.Request, app: web.Application, config: cfg.Config, team: cfg.Team, raw: bytes, max_inputs: int,
    scope: str, started: float,
) -> JsonAnswer:
    """The full path: decode, validate, look up each input, fetch the misses."""
    req = parse_embedding_request(parse_json_object(raw, max_depth=config.limits.max_json_depth), max_inputs=max_inputs)
    model, inputs = req.model, len(req.items)
    # Logged even when the request fails below (429, 5xx): who asked for what is the useful part then.
    fields = request[K.LOG_FIELDS]
    fields["model"] = model
    fields["inputs"] = inputs
    if team.models is not None and model not in team.models:
        raise Forbidden(f"team {team.name!r} may not use model {model!r}", code="MODEL_NOT_ALLOWED")
    outcome = await app[K.SERVICE].embed(team, req, deadline=started + config.limits.request_timeout_s)
    payload = app[K.CACHE].answer(model, outcome.tokens, outcome.keys, outcome.vectors, outcome.item_tokens,
                                  req.output)
    hits, misses, joined = outcome.hits, outcome.misses, outcome.joined
    _account(app, config, fields, team.name, model, inputs, hits, misses, joined, outcome.upstream_tokens,
             outcome.cached_tokens)
    response = JsonAnswer(payload, _cache_headers(hits, misses, joined, outcome.upstream_tokens))
    memo = app[K.REPEATS]
    # Served whole from the cache (a unit has no keys): kept for a repeat, when the memo would keep it.
    if not misses and not joined and outcome.keys and memo.keeps(raw):
        memo.put(scope, raw, Replay(model, inputs, hits, outcome.duplicates, outcome.tokens, outcome.cached_tokens,
                                    app[K.CACHE].canonical(outcome.keys), req.output))
    if isinstance(outcome.reservation, Reservation):
        response.headers.update(outcome.reservation.headers)
    return response


def _replayed(
    request: web.Request, app: web.Application, config: cfg.Config, team: cfg.Team, replay: Replay,
    payload: tuple[list[bytes], int], reservation: object,
) -> JsonAnswer:
    """An exact repeat of an all-hit request, admitted: the answer, with this request's accounting."""
    # `_account` of an all-hit answer: only the figures a repeat can have (no misses, no upstream tokens).
    model, cached = replay.model, replay.cached_tokens
    saved = cached * config.prices.get(model, 0.0) / 1e6
    app[K.METRICS].count_hits(team.name, model, replay.hits, cached, saved)
    app[K.USAGE].count_hits(team.name, model, replay.inputs, replay.hits, cached, saved)
    request[K.LOG_FIELDS].update(replay.log_fields)
    response = JsonAnswer(payload[0], _cache_headers(replay.hits, 0, 0, 0), payload[1])
    if isinstance(reservation, Reservation):
        response.headers.update(reservation.headers)
    return response


@functools.lru_cache(maxsize=4096)
def _cache_headers(hits: int, misses: int, joined: int, upstream_tokens: int) -> str:
    """The answer's cache headers, rendered once per combination of counts (all-hit answers share a few)."""
    return header_lines({
        "X-Cache-Hits": str(hits),
        "X-Cache-Misses": str(misses),
        "X-Cache-Joined": str(joined),
        "X-Upstream-Tokens": str(upstream_tokens),
    })


def _account(
    app: web.Application, config: cfg.Config, fields: dict[str, object], team: str, model: str, inputs: int,
    hits: int, misses: int, joined: int, upstream: int, cached: int,
) -> None:
    """Metrics, durable usage and the access log's counts of one answered request (no I/O here)."""
    price = config.prices.get(model, 0.0)
    cost, saved = upstream * price / 1e6, cached * price / 1e6
    app[K.METRICS].count_embed(team, model, (hits, misses, joined, upstream, cached, cost, saved))
    app[K.USAGE].count(team, model, inputs, hits, misses, joined, upstream, cached, cost, saved)
    fields["hits"] = hits
    fields["misses"] = misses
    fields["joined"] = joined
    fields["upstream_tokens"] = upstream


async def openapi(request: web.Request) -> web.Response:
    """The gateway's own OpenAPI document; like every route but the probes, it needs a key."""
    return web.Response(body=openapi_doc.served(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    # The pid tells apart the workers that share one port (`serve --workers N`).
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    checks = {"cache": await _ping(request.app[K.CACHE_STORE])}
    ready = all(checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return web.Response(
        status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json"
    )


async def _ping(store: object) -> bool:
    try:
        return bool(await store.ping())  # type: ignore[attr-defined]
    except Exception:
        return False


async def metrics(request: web.Request) -> web.Response:
    """Needs `metrics.token` (what a Prometheus scrape config carries) or an admin key."""
    authorization = request.headers.get("Authorization", "")
    token = request.app[K.LIVE].config.metrics.token
    presented = authorization.removeprefix("Bearer ").strip()
    if not (token and hmac.compare_digest(presented.encode(), token.encode())):
        principal = request.app[K.LIVE].keyring.authenticate(authorization)
        if not principal.admin:
            raise Forbidden("metrics need the metrics token or an admin key")
    metrics_ = request.app[K.METRICS]
    await metrics_.refresh()
    return web.Response(body=metrics_.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def usage(request: web.Request) -> web.Response:
    """`GET /v1/usage`: a team key sees its own team, an admin key every team (or those named in `team`)."""
    config = request.app[K.LIVE].config
    today = datetime.now(UTC).date()
    query = parse_query(request.query, today=today, max_days=config.usage.max_query_days)
    teams = _visible_teams(principal_of(request), query.teams)
    recorder = request.app[K.USAGE]
    # This process's latest requests belong in the answer: without them it would be silently short.
    if not await recorder.flush():
        raise StateUnavailable("the usage store cannot be written now; retry shortly")
    try:
        tallies = await recorder.store.read(teams, query.days())
    except Exception as exc:
        request.app[K.METRICS].store_errors.labels("state", "usage_read").inc()
        raise StateUnavailable("the usage store cannot be read now; retry shortly") from exc
    report = build_report(query, tallies)
    if query.format == "csv":
        name = f"usage_{query.start.isoformat()}_{query.end.isoformat()}.csv"
        return web.Response(
            text=report.csv(), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return web.Response(body=report.json(), content_type="application/json")


def _visible_teams(principal: Principal, asked: tuple[str, ...] | None) -> list[str] | None:
    if principal.admin:
        return None if asked is None else list(asked)
    own = principal.name
    others = sorted(set(asked or ()) - {own})
    if others:
        raise Forbidden(f"a team key sees only its own team's usage, not {others[0]!r}", code="USAGE_FORBIDDEN")
    return [own]
