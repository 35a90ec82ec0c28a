"""Typed keys for what the app shares with handlers and middlewares (aiohttp `web.AppKey`)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .admin import Admin
from .auth import Principal
from .batch import BatchWorker
from .budget import BudgetWatch
from .cache import EmbeddingCache
from .coalescer import Coalescer
from .connections import ConnectionGuard
from .jobs import JobStore
from .live import LiveConfig
from .metrics import Metrics
from .protocol import ParseMemo
from .quota import Clock, QuotaGate
from .service import EmbeddingService
from .sim import Simulator
from .store import CacheStore
from .upstream import Router
from .usage import UsageRecorder

# The config and key ring, swapped whole by a reload (SIGHUP): read `app[LIVE].config` / `.keyring` when you
# need them, once per request, never copy a live setting at start-up (or register with `on_change`).
LIVE = web.AppKey("live", LiveConfig)
METRICS = web.AppKey("metrics", Metrics)
# The shared cache store, or None when `cache.url` is memory:// (the in-process tier is the whole cache).
CACHE_STORE: web.AppKey[CacheStore | None] = web.AppKey("cache_store")
CACHE = web.AppKey("cache", EmbeddingCache)
COALESCER = web.AppKey("coalescer", Coalescer)
# Recently parsed request bodies (emptied by a config reload).
PARSE_MEMO = web.AppKey("parse_memo", ParseMemo)
SERVICE = web.AppKey("service", EmbeddingService)
USAGE = web.AppKey("usage", UsageRecorder)
QUOTA = web.AppKey("quota", QuotaGate)
# A wall clock for quota and pacing instead of the state store's (tests set it before the app starts).
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
# The state store's Redis client (quotas, usage, jobs), or None when `state.url` is memory://.
STATE_REDIS: web.AppKey[Any] = web.AppKey("state_redis")
# Batch files and jobs (in the state store, or in memory), and this process's worker that runs jobs.
JOB_STORE: web.AppKey[JobStore] = web.AppKey("job_store")
BATCH_WORKER = web.AppKey("batch_worker", BatchWorker)
# Client connection limits of a serving process (absent under a test client).
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
# The in-process simulated upstream when `upstream.url` is `sim://` (tests read its counters).
SIMULATOR = web.AppKey("simulator", Simulator)
# Every in-process simulated upstream, by upstream name.
SIMULATORS = web.AppKey("simulators", dict[str, Simulator])
# The upstreams: model → upstreams, their clients, key pools and breakers.
ROUTER = web.AppKey("router", Router)

# Teams and keys made over the admin API, and the poller that keeps this replica's key ring current.
ADMIN = web.AppKey("admin", Admin)
# Budget alerts (fired once per team, month and threshold) and the spend gauge.
BUDGET = web.AppKey("budget", BudgetWatch)

# Per-request values (set by middlewares, read by handlers and the access log).
PRINCIPAL = web.RequestKey("principal", Principal)
LOG_FIELDS = web.RequestKey("log_fields", dict[str, object])
