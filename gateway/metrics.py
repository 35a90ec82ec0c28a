"""Prometheus series. One registry per app (tests build many apps in one process); one prefix, `eg_`.

Labels are team *names* and model names, never keys or inputs.

Values that live elsewhere (quota remaining, batch jobs by status) are read at scrape time: a part registers an
async hook with `Metrics.on_scrape`; `GET /metrics` awaits every hook (each bounded by a timeout), then renders.
A hook sets plain Gauges, usually with `replace` so a label set that disappeared disappears from the scrape:

    async def quota_snapshot() -> None:
        remaining = await quota.remaining_all()          # {(team, policy): units}
        replace(metrics.quota_remaining, remaining)
    metrics.on_scrape(quota_snapshot)

The per-request series (requests, latency, inputs, tokens, cost, in flight) are not touched per request: a
request adds its figures to plain dicts (`count_request`, `count_embed`), and `publish()` moves the sums into
the Prometheus series before each scrape and once a second (so other workers' files are at most a second
behind): prometheus-client takes a lock per increment, which the request path need not wait for.

Only plain Counter / Histogram / Gauge objects live here, so prometheus-client's multiprocess mode can aggregate
them across `serve --workers` processes (each Gauge says how: `multiprocess_mode`): every worker writes its series
to files in PROMETHEUS_MULTIPROC_DIR (set by the supervisor before the workers import prometheus_client) and
`/metrics` on any worker renders the sum.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("gateway.metrics")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# What `count_embed` adds per request: (Metrics attribute, its last label), in order.
_EMBED_FIGURES = (
    ("inputs", "hit"), ("inputs", "miss"), ("inputs", "joined"), ("tokens", "upstream"), ("tokens", "cache"),
    ("cost", "billed"), ("cost", "saved"),
)

ScrapeHook = Callable[[], Awaitable[None]]
_Series = TypeVar("_Series", Counter, Histogram)

# Quota policy label values: the `Quota` config field a rejection or a remaining figure is about.
QUOTA_POLICIES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._hooks: list[tuple[str, ScrapeHook]] = []
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Histogram] = {}
        # Pending per-request figures, published by `publish()` (see the module docstring).
        self._requests: dict[tuple[str, int, str], int] = {}
        self._latency: dict[str, list[float]] = {}  # route → seconds of each request since the last publish
        self._embeds: dict[tuple[str, str], list[float]] = {}  # (team, model) → _EMBED_FIGURES
        self._add_request_series()
        self._add_upstream_series()
        self._add_state_series()
        self._add_process_series()

    def child(self, metric: _Series, *labels: str) -> _Series:
        """`metric.labels(*labels)`, memoised for the per-request series: prometheus-client's lookup (label
        checks, a lock) costs several times the increment. Counters and histograms only, which are never
        cleared; their children live as long as the registry does anyway."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def count_request(self, route: str, status: int, team: str, seconds: float) -> None:
        key = (route, status, team)
        self._requests[key] = self._requests.get(key, 0) + 1
        latencies = self._latency.get(route)
        if latencies is None:
            self._latency[route] = [seconds]
        else:
            latencies.append(seconds)

    def count_embed(self, team: str, model: str, figures: tuple[float, ...]) -> None:
        """`figures` in the order of `_EMBED_FIGURES`."""
        sums = self._embeds.get((team, model))
        if sums is None:
            self._embeds[(team, model)] = list(figures)
            return
        hits, misses, joined, upstream, cached, cost, saved = figures  # spelt out: a loop costs twice as much
        sums[0] += hits
        sums[1] += misses
        sums[2] += joined
        sums[3] += upstream
        sums[4] += cached
        sums[5] += cost
        sums[6] += saved

    def publish(self) -> None:
        """Moves the pending per-request figures into the Prometheus series (synchronous: nothing is counted
        twice or lost between the swap and the increments)."""
        self.in_flight.set(self.active.count)
        requests, self._requests = self._requests, {}
        latency, self._latency = self._latency, {}
        embeds, self._embeds = self._embeds, {}
        for (route, status, team), n in requests.items():
            self.child(self.requests, route, str(status), team).inc(n)
        for route, latencies in latency.items():
            histogram = self.child(self.request_seconds, route)
            for seconds in latencies:
                histogram.observe(seconds)
        for (team, model), sums in embeds.items():
            for (series, label), value in zip(self._embed_series, sums, strict=True):
                if value:
                    self.child(series, team, model, label).inc(value)

    async def publish_every(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.publish()

    def _add_request_series(self) -> None:
        r = self.registry
        self.requests = Counter(
            "eg_requests", "HTTP requests by route and status", ["route", "status", "team"], registry=r
        )
        self.request_seconds = Histogram(
            "eg_request_duration_seconds", "Request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inputs = Counter(
            "eg_inputs", "Distinct inputs per request by outcome: hit, miss, joined (an in-flight input)",
            ["team", "model", "outcome"], registry=r,
        )
        self.tokens = Counter(
            "eg_tokens", "Tokens by source: upstream (billed) or cache (saved)",
            ["team", "model", "source"], registry=r,
        )
        self.cost = Counter(
            "eg_cost_usd", "Estimated cost in USD: billed upstream or saved by the cache",
            ["team", "model", "kind"], registry=r,
        )
        self.in_flight = Gauge(
            "eg_requests_in_flight", "API requests being handled (probes and /metrics not counted)", registry=r,
            multiprocess_mode="livesum",
        )
        self.workers = Gauge(
            "eg_workers", "Worker processes serving (1 per process; summed over live workers)", registry=r,
            multiprocess_mode="livesum",
        )
        self.workers.set(1)
        self.active = InFlight()
        self._embed_series = tuple((getattr(self, name), label) for name, label in _EMBED_FIGURES)

    def _add_upstream_series(self) -> None:
        r = self.registry
        self.upstream_calls = Counter(
            "eg_upstream_calls", "Upstream HTTP attempts by status", ["model", "status"], registry=r
        )
        self.upstream_seconds = Histogram(
            "eg_upstream_duration_seconds", "Upstream call latency", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_batch_inputs = Histogram(
            "eg_upstream_batch_inputs", "Inputs per upstream call", ["model"], buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "eg_upstream_retries", "Upstream retries by reason", ["reason"], registry=r
        )
        self.upstream_tokens = Counter(
            "eg_upstream_tokens", "Tokens the upstream reported, per call (the bill)", ["model"], registry=r
        )
        # Per upstream and key id (`jina#2`, never the key itself).
        self.upstream_key_calls = Counter(
            "eg_upstream_key_calls", "Upstream HTTP attempts by upstream, key id and status",
            ["upstream", "key", "status"], registry=r,
        )
        self.upstream_call_seconds = Histogram(
            "eg_upstream_call_duration_seconds", "Upstream call latency by upstream", ["upstream"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_key_tokens = Counter(
            "eg_upstream_key_tokens", "Tokens billed by upstream and key id", ["upstream", "key"], registry=r
        )
        self.upstream_cost = Counter(
            "eg_upstream_cost_usd", "Cost billed by upstream (its own prices)", ["upstream"], registry=r
        )
        self.upstream_key_cooldowns = Counter(
            "eg_upstream_key_cooldowns", "Keys cooled by an upstream 429", ["upstream", "key"], registry=r
        )
        self.upstream_key_ejections = Counter(
            "eg_upstream_key_ejections", "Keys ejected after an upstream 401/403", ["upstream", "key"], registry=r
        )
        self.upstream_failovers = Counter(
            "eg_upstream_failovers", "Calls that left this upstream for the next one serving the model",
            ["upstream"], registry=r,
        )
        self.upstream_breaker = Gauge(
            "eg_upstream_breaker_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            ["upstream"], registry=r, multiprocess_mode="max",
        )
        self.queue_inputs = Gauge(
            "eg_coalescer_queue_inputs", "Inputs queued or in flight in the coalescer", registry=r,
            multiprocess_mode="livesum",
        )
        self.pacing_wait_seconds = Histogram(
            "eg_upstream_pacing_wait_seconds", "Time upstream calls waited for the shared key's budget",
            buckets=(0.0, *_LATENCY_BUCKETS, 60.0), registry=r,
        )
        self.pacing_refusals = Counter(
            "eg_upstream_pacing_refusals", "Calls refused because the shared key had no room before the deadline",
            registry=r,
        )

    def _add_state_series(self) -> None:
        r = self.registry
        self.store_errors = Counter(
            "eg_store_errors", "Cache and state store errors", ["store", "op"], registry=r
        )
        self.quota_rejections = Counter(
            "eg_quota_rejections", "Requests refused by a team policy", ["team", "policy"], registry=r
        )
        # Shared state read at scrape time: every process reads the same store, so the latest value wins.
        self.quota_remaining = Gauge(
            "eg_quota_remaining", "Units (tokens or requests) a team may still use under a policy now",
            ["team", "policy"], registry=r, multiprocess_mode="mostrecent",
        )
        self.quota_limit = Gauge(
            "eg_quota_limit", "A team policy's limit (tokens or requests per window)",
            ["team", "policy"], registry=r, multiprocess_mode="mostrecent",
        )
        # Money budgets (gateway/budget.py): spent / budget this UTC month, reservations in flight included.
        self.budget_spent_ratio = Gauge(
            "eg_budget_spent_ratio", "Share of a team's monthly money budget spent", ["team"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.budget_alerts = Counter(
            "eg_budget_alerts", "Budget alert thresholds crossed (once per team, month and threshold, fleet-wide)",
            ["team", "threshold"], registry=r,
        )
        self.budget_webhook_failures = Counter(
            "eg_budget_webhook_failures", "Budget alert webhook attempts that failed (each is retried)", ["team"],
            registry=r,
        )
        self.batch_jobs = Gauge(
            "eg_batch_jobs", "Batch jobs by status", ["status"], registry=r, multiprocess_mode="mostrecent"
        )
        self.scrape_hook_errors = Counter(
            "eg_scrape_hook_errors", "Scrape-time hooks that failed or timed out", ["hook"], registry=r
        )

    def _add_process_series(self) -> None:
        # The registry is per app, so prometheus-client's default process collector is not in it; these are
        # what a soak test or a leak alert watches (livesum: summed over `serve --workers` processes).
        r = self.registry
        self.process_tasks = Gauge(
            "eg_process_asyncio_tasks", "asyncio tasks alive in the process", registry=r, multiprocess_mode="livesum"
        )
        self.process_rss = Gauge(
            "eg_process_resident_memory_bytes", "Resident set size", registry=r, multiprocess_mode="livesum"
        )
        self.process_fds = Gauge(
            "eg_process_open_fds", "Open file descriptors, sockets included", ["kind"], registry=r,
            multiprocess_mode="livesum",
        )
        # The in-process tier of entries (gateway/cache.py) and the parse memo of requests (gateway/protocol.py): how
        # full they are says whether `cache.hot_max_bytes` / `cache.hot_requests_max_bytes` fit the traffic's hot set.
        self.hot_bytes = Gauge(
            "eg_hot_cache_bytes", "Bytes the in-process hot tiers hold (tier = entries / requests)", ["tier"],
            registry=r, multiprocess_mode="livesum",
        )
        self.hot_items = Gauge(
            "eg_hot_cache_items", "Items the in-process hot tiers hold (tier = entries / requests)", ["tier"],
            registry=r, multiprocess_mode="livesum",
        )
        self.on_scrape(self._process_snapshot, name="process")

    async def _process_snapshot(self) -> None:
        self.process_tasks.set(len(asyncio.all_tasks()))
        rss, fds = process_figures()
        if rss is not None:
            self.process_rss.set(rss)
        replace(self.process_fds, {(kind,): n for kind, n in fds.items()})

    def prime(self, teams: Iterable[tuple[str, Mapping[str, int | None]]]) -> None:
        """Creates the series known up front at 0, so rate() sees their first increment and panels show 0.

        `teams` is (team name, {policy: limit or None}) per team. Called again on a config reload: limits
        follow the new config exactly (a removed policy's limit disappears; its rejection count stays).
        """
        limits: dict[tuple[str, ...], float] = {}
        for name, policies in teams:
            for policy, limit in policies.items():
                if limit is not None:
                    self.quota_rejections.labels(name, policy)
                    limits[(name, policy)] = float(limit)
        replace(self.quota_limit, limits)
        for store, op in (("cache", "get"), ("cache", "set"), ("state", "usage_flush"), ("state", "usage_read"),
                          ("state", "quota"), ("state", "reconcile"), ("state", "pacing")):
            self.store_errors.labels(store, op)

    def on_scrape(self, hook: ScrapeHook, *, name: str | None = None) -> None:
        """Registers an async hook that `refresh` awaits before each scrape (it sets Gauges)."""
        self._hooks.append((name or str(getattr(hook, "__name__", "hook")), hook))

    async def refresh(self, timeout_s: float = 2.0) -> None:
        """Runs every scrape hook concurrently; a failing or slow hook leaves its gauges as they were."""
        if self._hooks:
            await asyncio.gather(*(self._run_hook(name, hook, timeout_s) for name, hook in self._hooks))

    async def _run_hook(self, name: str, hook: ScrapeHook, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await hook()
        except Exception:
            log.warning("scrape hook %s failed", name, exc_info=True)
            self.scrape_hook_errors.labels(name).inc()

    def render(self) -> bytes:
        """The exposition text: this registry, or with workers the sum over every worker's files."""
        self.publish()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(self.registry, self.multiprocess_dir))
        return generate_latest(merged)


def process_figures(pid: int | str = "self") -> tuple[int | None, dict[str, int]]:
    """RSS in bytes and open descriptors by kind (socket, other) of a process, from /proc (Linux only)."""
    rss = None
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None, {}
    fds = {"socket": 0, "other": 0}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = "socket" if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") else "other"
        except OSError:
            continue  # closed while we looked
        fds[kind] += 1
    return rss, fds


def replace(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Sets a labelled Gauge to exactly `values` (label tuple → value), dropping label sets not in it.

    In multiprocess mode (`serve --workers`) prometheus-client cannot drop a label set from a worker's file
    (`clear` only warns), so one that disappeared is set to 0 there instead. Synchronous on purpose: no scrape
    can render between the drop and the sets.
    """
    if _multiprocess():
        for labels in _label_sets(gauge) - values.keys():
            gauge.labels(*labels).set(0)
    else:
        gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


def _multiprocess() -> bool:
    # The test prometheus-client itself makes before it refuses to remove label sets.
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


def _label_sets(gauge: Gauge) -> set[tuple[str, ...]]:
    """The label values of every series this process's `gauge` holds (samples keep label-name order)."""
    return {tuple(sample.labels.values()) for family in gauge.collect() for sample in family.samples}


class InFlight:
    """API requests being handled (published as the `eg_requests_in_flight` gauge); `idle()` waits until there
    are none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self.count == 1:  # the Event is touched only on the edges: this runs twice per request
            self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


class _Merged:
    """Every worker's series from the multiprocess files, plus any family only this registry has.

    A family the files have is taken from them (the total over workers); another family of the registry (a
    custom collector, should one be added) is this process's own answer.
    """

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.registry = registry
        self.files = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        families: Iterable[Metric] = self.files.collect()  # type: ignore[no-untyped-call]
        names = set()
        for family in families:
            names.add(family.name)
            yield family
        for family in self.registry.collect():
            if family.name not in names:
                yield family
