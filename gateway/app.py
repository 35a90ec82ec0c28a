"""The aiohttp Application factory: wiring of the parts, routes, and their start-up/cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from . import admin_api, batch_api, handlers, openai_batches
from . import appkeys as K
from . import config as cfg
from .admin import Admin, open_admin_store
from .auth import RuntimeKeys
from .batch import BatchWorker
from .budget import BudgetWatch, open_alert_claims
from .cache import EmbeddingCache
from .coalescer import Coalescer
from .jobs import JobStore, open_job_store
from .live import LiveConfig
from .metrics import Metrics, replace
from .middleware import Routes
from .pacing import MemoryPacingBackend, Pacer, PacingBackend, RedisPacingBackend, budget_id
from .protocol import ParseMemo
from .quota import STORE_ERRORS, MemoryQuotaBackend, QuotaBackend, QuotaGate, RedisQuotaBackend, budget_prices
from .service import EmbeddingService
from .sim import SimConfig, Simulator, start_sim
from .store import open_cache_store
from .store.redis import connect, preload_scripts
from .upstream import Router, UpstreamClient
from .usage import MemoryUsageStore, RedisUsageStore, UsageRecorder, UsageStore

log = logging.getLogger("gateway")


def create_app(
    config: cfg.Config, *, simulator: Simulator | None = None, config_path: str | Path | None = None
) -> web.Application:
    """Builds the app. With `upstream.url: sim://` it runs a simulator in-process (or the one given).

    `config_path` is the file `app[K.LIVE].reload()` re-reads (on SIGHUP).
    """
    app = web.Application(
        # aiohttp refuses a larger body while reading it; our handler turns that into the JSON 413.
        client_max_size=config.limits.max_body_bytes,
    )
    app[K.LIVE] = live = LiveConfig(config, config_path, RuntimeKeys())
    app[K.METRICS] = metrics = _metrics(config)
    live.on_change(lambda new: _prime(metrics, new))
    if simulator is not None:
        app[K.SIMULATOR] = simulator
    app.cleanup_ctx.append(_parts)
    routes = Routes(app.router)
    routes.add_post("/v1/embeddings", handlers.embeddings)
    routes.add_post("/embeddings", handlers.embeddings)
    routes.add_get("/healthz", handlers.healthz)
    routes.add_get("/readyz", handlers.readyz)
    routes.add_get("/metrics", handlers.metrics)
    routes.add_get("/v1/usage", handlers.usage)
    routes.add_get("/openapi.json", handlers.openapi)
    openai_batches.add_routes(routes)  # first: its job-file ids are matched before the files API's
    batch_api.add_routes(routes)
    admin_api.add_routes(routes)
    routes.add_unmatched()  # last: it matches every path
    app.on_shutdown.append(_stop_batch)  # a drain gives batch leases back before requests are cut
    return app


async def _parts(app: web.Application) -> AsyncIterator[None]:
    live = app[K.LIVE]
    config = live.config  # what is read once here needs a restart to change (see live.py)
    metrics = app[K.METRICS]
    sim_runners: list[web.AppRunner] = []
    # memory:// is the in-process tier alone; a shared store sits behind it otherwise.
    memory_only = config.cache.url.startswith("memory://")
    store = None if memory_only else open_cache_store(
        config.cache.url, max_bytes=config.cache.max_bytes, socket_timeout_s=config.cache.socket_timeout_s,
        options=config.cache.redis,
    )
    app[K.CACHE_STORE] = store
    cache = EmbeddingCache(
        store,
        ttl_s=config.cache.ttl_s,
        local_max_bytes=config.cache.max_bytes if memory_only else config.cache.hot_max_bytes,
        error_backoff_s=config.cache.error_backoff_s,
        on_error=lambda op: metrics.store_errors.labels("cache", op).inc(),
    )
    app[K.CACHE] = cache
    memo = app[K.PARSE_MEMO] = ParseMemo(config.cache.hot_requests_max_bytes)
    live.on_change(lambda _: memo.clear())  # parsing's rules come from the config
    metrics.on_scrape(functools.partial(_local_snapshot, cache, memo, metrics), name="hot_cache")
    state_redis = _state_client(config.state)
    app[K.STATE_REDIS] = state_redis
    usage = _usage_recorder(config, state_redis, metrics)
    app[K.USAGE] = usage
    if state_redis is not None:
        await preload_scripts(state_redis)
    admin = app[K.ADMIN] = await _admin(app, state_redis)
    quota = _quota(app, state_redis)
    app[K.QUOTA] = quota
    budget = app[K.BUDGET] = _budget(app, state_redis, quota, admin)
    upstream = app[K.ROUTER] = await _router(app, state_redis, sim_runners)
    coalescer = Coalescer(
        upstream, cache, config.coalesce, metrics, call_budget_s=config.limits.request_timeout_s,
    )
    app[K.COALESCER] = coalescer
    live.on_change(coalescer.reconfigure)
    service = app[K.SERVICE] = EmbeddingService(cache, coalescer, scope=config.cache.scope, admission=quota)
    app[K.BATCH_WORKER] = _batch_worker(app, state_redis, service, usage)
    publisher = asyncio.create_task(metrics.publish_every(1.0), name="metrics-publish")
    try:
        yield
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        metrics.publish()  # a worker's last requests reach its multiprocess file
        await app[K.BATCH_WORKER].stop()  # idempotent: on_shutdown has usually done it already
        await admin.close()
        await budget.close()
        await coalescer.close()
        await upstream.close()  # after the coalescer's calls have all finished
        await usage.close()  # after in-flight requests were tallied, before the state client closes
        if store is not None:
            await store.close()
        if state_redis is not None:
            await state_redis.aclose()
        for runner in sim_runners:
            await runner.cleanup()


def _metrics(config: cfg.Config) -> Metrics:
    metrics = Metrics()
    _prime(metrics, config)
    return metrics


def _prime(metrics: Metrics, config: cfg.Config) -> None:
    metrics.prime((t.name, dataclasses.asdict(t.quota)) for t in config.teams)


def _usage_recorder(config: cfg.Config, state_redis: Any, metrics: Metrics) -> UsageRecorder:
    store: UsageStore = MemoryUsageStore()
    if state_redis is not None:
        store = RedisUsageStore(state_redis, retention_s=config.usage.retention_days * 86400)
    usage = UsageRecorder(
        store,
        flush_interval_s=config.usage.flush_interval_s,
        on_error=lambda op: metrics.store_errors.labels("state", op).inc(),
    )
    usage.start()
    return usage


def _state_client(state: cfg.State) -> Any:
    """One Redis pool for all state (quotas, usage, jobs); parts keep in-process state when it is memory://."""
    if state.url.startswith("memory://"):
        return None
    return connect(state.url, socket_timeout_s=state.socket_timeout_s, options=state.redis)


def _quota(app: web.Application, state_redis: Any) -> QuotaGate:
    live, metrics, clock = app[K.LIVE], app[K.METRICS], app.get(K.CLOCK)
    backend: QuotaBackend
    if state_redis is None:
        backend = MemoryQuotaBackend(clock.time) if clock is not None else MemoryQuotaBackend()
    else:
        backend = RedisQuotaBackend(state_redis)
    quota = QuotaGate(live.config.quota, backend, metrics, clock=clock, prices=budget_prices(live.config))
    live.on_change(quota.reconfigure)

    async def quota_remaining() -> None:
        replace(metrics.quota_remaining, await quota.remaining_all(live.config.teams))

    metrics.on_scrape(quota_remaining, name="quota_remaining")
    return quota


async def _admin(app: web.Application, state_redis: Any) -> Admin:
    """Loads the API's teams and keys before the first request, then polls for changes."""
    live, clock = app[K.LIVE], app.get(K.CLOCK)
    runtime = live.runtime_keys
    assert runtime is not None
    if clock is not None:
        runtime.clock = clock.time
    admin = Admin(open_admin_store(state_redis), runtime, lambda: live.config,
                  clock=clock.time if clock is not None else time.time)
    try:
        await admin.refresh()
    except STORE_ERRORS as exc:  # the poller keeps trying; config-file teams work meanwhile
        log.warning("admin: could not load teams and keys from the state store: %s", exc)
    admin.start()
    return admin


def _budget(app: web.Application, state_redis: Any, quota: QuotaGate, admin: Admin) -> BudgetWatch:
    live, metrics = app[K.LIVE], app[K.METRICS]
    budget = BudgetWatch(open_alert_claims(state_redis), metrics)
    quota.watch = budget

    async def budget_spent() -> None:
        teams = [t for t in (*live.config.teams, *admin.teams.values()) if t.budget is not None]
        await budget.refresh(quota, teams)

    metrics.on_scrape(budget_spent, name="budget_spent")
    return budget


async def _router(app: web.Application, state_redis: Any, sim_runners: list[web.AppRunner]) -> Router:
    """One client per upstream, its session open; a `sim://` upstream gets a simulator in-process (the first one
    is `app[K.SIMULATOR]`, or the one given to create_app)."""
    config = app[K.LIVE].config
    sims = app[K.SIMULATORS] = {}
    clients = []
    for up in config.routes:
        base_url = up.url
        if base_url.startswith("sim://"):
            kind = base_url.removeprefix("sim://") or up.wire
            given = app.get(K.SIMULATOR) if not sims else None
            sim = sims[up.name] = given or Simulator(_sim_config(up.sim, kind))
            runner, base_url = await start_sim(sim)
            sim_runners.append(runner)
            if kind == "tei":
                base_url = base_url.removesuffix("/v1")  # TEI's routes are at the root
        pacers = [_pacer(app, state_redis, up, key) for key in up.pool]
        clock = app.get(K.CLOCK)
        clients.append(UpstreamClient(up, base_url, app[K.METRICS], pacers=pacers, prices=config.prices,
                                      monotonic=clock.time if clock is not None else time.monotonic))
    if sims:
        app[K.SIMULATOR] = next(iter(sims.values()))
    router = Router(clients, app[K.METRICS])
    app[K.LIVE].on_change(router.reconfigure)
    await router.start()
    return router


def _pacer(app: web.Application, state_redis: Any, upstream: cfg.Upstream, key: str) -> Pacer | None:
    """Paces one key when its upstream's `limits` set a rate; `max_concurrency` stays per process."""
    config, clock = app[K.LIVE].config, app.get(K.CLOCK)
    limits = upstream.limits
    if not (limits.requests_per_minute or limits.tokens_per_minute):
        return None
    backend: PacingBackend
    if state_redis is None:
        backend = MemoryPacingBackend(clock.time) if clock is not None else MemoryPacingBackend()
    else:
        backend = RedisPacingBackend(state_redis, budget_id(upstream, key))
    return Pacer(limits, backend, app[K.METRICS], clock=clock, error_backoff_s=config.quota.error_backoff_s)


def _batch_worker(
    app: web.Application, state_redis: Any, service: EmbeddingService, usage: UsageRecorder
) -> BatchWorker:
    live, metrics = app[K.LIVE], app[K.METRICS]
    batch = live.config.batch
    jobs = app[K.JOB_STORE] = open_job_store(state_redis, lease_s=batch.lease_s, retention_s=batch.retention_s)
    worker = BatchWorker(jobs, service, live, metrics, usage)
    metrics.on_scrape(functools.partial(_batch_snapshot, jobs, metrics), name="batch_jobs")
    worker.start()
    return worker


async def _local_snapshot(cache: EmbeddingCache, memo: ParseMemo, metrics: Metrics) -> None:
    metrics.hot_bytes.labels("entries").set(cache.local.bytes)
    metrics.hot_items.labels("entries").set(len(cache.local))
    metrics.hot_bytes.labels("requests").set(memo.lru.bytes)
    metrics.hot_items.labels("requests").set(len(memo.lru))


async def _batch_snapshot(jobs: JobStore, metrics: Metrics) -> None:
    replace(metrics.batch_jobs, {(status,): n for status, n in (await jobs.active_counts()).items()})


async def _stop_batch(app: web.Application) -> None:
    worker = app.get(K.BATCH_WORKER)
    if worker is not None:
        await worker.stop()


def _sim_config(s: cfg.SimSettings, kind: str) -> SimConfig:
    return SimConfig(
        kind=kind,
        latency_base_ms=s.latency_base_ms,
        latency_per_token_ms=s.latency_per_token_ms,
        rate_limit_requests=s.rate_limit_requests,
        rate_window_s=s.rate_window_s,
    )
