"""HTTP handlers of the embeddings API and the operational routes (health, metrics, usage, OpenAPI): thin
adapters between aiohttp and the parts (service, stores, metrics)."""

from __future__ import annotations

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
from . import render
from .auth import Principal
from .budget import budget_rows
from .errors import Forbidden, GatewayError, StateUnavailable
from .incoming import principal_of, read_body
from .middleware import check_query
from .quota import STORE_ERRORS, Reservation
from .service import Outcome
from .usage import build_report, parse_query


async def embeddings(request: web.Request) -> web.Response:
    """`POST /v1/embeddings`: authenticate → parse → embed → render → account, the same steps for every request."""
    team = principal_of(request).team
    if team is None:
        raise Forbidden("admin keys cannot embed; use a team key")
    app = request.app
    config = app[K.LIVE].config
    started = time.monotonic()  # the request's deadline counts from here, the body's reading included
    try:
        raw = await read_body(request)
        req = app[K.PARSE_MEMO].parse(raw, max_inputs=_max_inputs(config, team),
                                      max_depth=config.limits.max_json_depth, token_ids=config.reads_token_ids)
        fields = request[K.LOG_FIELDS]  # logged even when the request fails below: who asked for what
        fields["model"] = req.model
        fields["inputs"] = len(req.items)
        if team.models is not None and req.model not in team.models:
            raise Forbidden(f"team {team.name!r} may not use model {req.model!r}", code="MODEL_NOT_ALLOWED")
        app[K.ROUTER].check_model(req.model, team.models)
        outcome = await app[K.SERVICE].embed(team, req, deadline=started + config.limits.request_timeout_s)
        if outcome.unit is not None:
            fragments = [render.fragment(vec, req.output) for vec in outcome.unit]
        else:
            fragments = app[K.CACHE].renderings(outcome.held, req.output, render.fragment)
        body = render.embeddings_body(req.model, outcome.tokens, fragments)
        _account(app, config, fields, team.name, req.model, len(req.items), outcome)
        headers = _cache_headers(outcome.hits, outcome.misses, outcome.joined, outcome.upstream_tokens)
        if isinstance(outcome.reservation, Reservation):
            headers = {**headers, **outcome.reservation.headers}
        return web.Response(body=body, headers=headers)
    except GatewayError as exc:
        # Every answer to a team with a quota tells it where it stands; a 429 already carries it.
        if "RateLimit" not in exc.headers:
            exc.headers.update(await app[K.QUOTA].peek(team))
        raise


def _max_inputs(config: cfg.Config, team: cfg.Team) -> int:
    limit = config.limits.max_inputs_per_request
    return limit if team.max_inputs_per_request is None else min(limit, team.max_inputs_per_request)


@functools.lru_cache(maxsize=4096)
def _cache_headers(hits: int, misses: int, joined: int, upstream_tokens: int) -> dict[str, str]:
    """An answer's cache headers, made once per combination of counts (read, never changed)."""
    return {
        "Content-Type": "application/json",
        "X-Cache-Hits": str(hits),
        "X-Cache-Misses": str(misses),
        "X-Cache-Joined": str(joined),
        "X-Upstream-Tokens": str(upstream_tokens),
    }


def _account(
    app: web.Application, config: cfg.Config, fields: dict[str, object], team: str, model: str, inputs: int,
    outcome: Outcome,
) -> None:
    """Metrics, durable usage and the access log's counts of one answered request (no I/O here)."""
    hits, misses, joined = outcome.hits, outcome.misses, outcome.joined
    upstream, cached = outcome.upstream_tokens, outcome.cached_tokens
    # Billed as the answering upstreams bill; saved as the model's first choice would have billed.
    cost, saved = outcome.cost_usd, cached * config.hit_prices.get(model, 0.0) / 1e6
    app[K.METRICS].count_embed(team, model, (hits, misses, joined, upstream, cached, cost, saved))
    app[K.USAGE].count(team, model, inputs, hits, misses, joined, upstream, cached, cost, saved,
                       outcome.estimated_tokens)
    fields["hits"] = hits
    fields["misses"] = misses
    fields["joined"] = joined
    fields["upstream_tokens"] = upstream


async def openapi(request: web.Request) -> web.Response:
    """The gateway's own OpenAPI document; like every route but the probes, it needs a key."""
    token_ids = any(upstream.wire != "jina" for upstream in request.app[K.LIVE].config.routes)
    return web.Response(body=openapi_doc.served(token_ids), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    # The pid tells apart the workers that share one port (`serve --workers N`).
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Pings the very clients that serve traffic: the cache store's, and the state store's when it is Redis."""
    store = request.app[K.CACHE_STORE]
    checks = {"cache": True if store is None else await _ping(store)}
    state = request.app[K.STATE_REDIS]
    if state is not None:
        checks["state"] = await _ping(state)
    ready = all(checks.values())
    # Breaker states are reported, not checked: an open breaker sends calls elsewhere, the replica still serves.
    body = {"status": "ready" if ready else "unavailable", "checks": checks,
            "upstreams": request.app[K.ROUTER].breakers()}
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
    check_query(request, _USAGE_PARAMS)
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
    if query.format != "csv":
        report.budgets = await _budgets(request, teams)
    if query.format == "csv":
        name = f"usage_{query.start.isoformat()}_{query.end.isoformat()}.csv"
        return web.Response(
            text=report.csv(), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return web.Response(body=report.json(), content_type="application/json")


async def _budgets(request: web.Request, visible: list[str] | None) -> list[dict[str, object]]:
    """Spend vs budget of the visible teams (config-file and admin API ones) this month."""
    app = request.app
    teams = [*app[K.LIVE].config.teams, *app[K.ADMIN].teams.values()]
    try:
        return await budget_rows(app[K.QUOTA], [t for t in teams if visible is None or t.name in visible])
    except STORE_ERRORS as exc:
        app[K.METRICS].store_errors.labels("state", "usage_read").inc()
        raise StateUnavailable("the budget store cannot be read now; retry shortly") from exc


_USAGE_PARAMS = frozenset({"start", "end", "group_by", "team", "format"})


def _visible_teams(principal: Principal, asked: tuple[str, ...] | None) -> list[str] | None:
    if principal.admin:
        return None if asked is None else list(asked)
    own = principal.name
    others = sorted(set(asked or ()) - {own})
    if others:
        raise Forbidden(f"a team key sees only its own team's usage, not {others[0]!r}", code="USAGE_FORBIDDEN")
    return [own]
