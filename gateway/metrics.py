"""Prometheus series. One registry per app (tests build many apps in one process); one prefix, `eg_`.

Labels are team *names* and model names, never keys or inputs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "eg_requests", "HTTP requests by route and status", ["route", "status", "team"], registry=r
        )
        self.request_seconds = Histogram(
            "eg_request_duration_seconds", "Request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inputs = Counter(
            "eg_inputs", "Inputs by outcome: hit, miss, joined (an in-flight input)",
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
        self.store_errors = Counter(
            "eg_store_errors", "Cache and state store errors", ["store", "op"], registry=r
        )
        self.queue_inputs = Gauge(
            "eg_coalescer_queue_inputs", "Inputs queued or in flight in the coalescer", registry=r
        )
        self.quota_rejections = Counter(
            "eg_quota_rejections", "Requests refused by a team policy", ["team", "policy"], registry=r
        )
