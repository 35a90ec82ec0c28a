"""The router: a request's public model picks the upstreams serving it, lower `priority` first and equal
priorities by `weight`; a call that fails on one upstream past its retries (5xx, timeouts, connection errors,
every key refused or rate limited) moves to the next, inside the caller's deadline. An upstream's 4xx answer is
the client's error: passed through, no failover."""

from __future__ import annotations

import logging
import random
from typing import Any

from .. import config as cfg
from ..cache import namespace_part
from ..errors import GatewayError, UpstreamFailed, UpstreamRejected, ValidationFailed
from ..metrics import Metrics
from ..protocol import Item
from .breaker import STATES
from .client import UpstreamClient, UpstreamResult
from .keypool import AUTH_FAILED

log = logging.getLogger("gateway.upstream")


class Router:
    def __init__(self, clients: list[UpstreamClient], metrics: Metrics) -> None:
        self.clients = clients
        self.metrics = metrics
        self._served: dict[str, list[UpstreamClient]] = {}
        self._any = [c for c in clients if c.config.models is None]  # serve every model
        for client in clients:
            for model in client.config.models or {}:
                self._served.setdefault(model, []).append(client)
        routes = [c.config for c in clients]
        # Lookups go to the first choice's namespace; answers are stored under the answering upstream's.
        self._namespaces = {m: _namespace(routes, m) for m in self._served}
        self._namespace_any = _namespace(routes, None)
        for client in clients:  # every series from the start, so a dashboard rate() sees 0, not nothing
            metrics.upstream_breaker.labels(client.name).set(0)
            metrics.child(metrics.upstream_failovers, client.name)
            metrics.child(metrics.upstream_cost, client.name)

    @property
    def models(self) -> list[str]:
        """The public models some upstream names (an upstream without `models` serves any other model too)."""
        return sorted(self._served)

    @property
    def capacity(self) -> int:
        """Calls in flight at once over every upstream."""
        return sum(c.capacity for c in self.clients)

    def max_inputs_for(self, model: str) -> int:
        """The first-choice upstream's per-call input limit (another one splits a bigger batch)."""
        serving = self._serving(model)
        return min(serving, key=lambda c: c.config.priority).config.max_inputs_for(model) if serving else 1

    def namespace_for(self, model: str) -> bytes:
        """The cache namespace `model`'s entries are looked up in (cache.namespace_part of its first-choice
        upstream's `cache_namespace`; b"" when shared)."""
        return self._namespaces.get(model, self._namespace_any)

    def reconfigure(self, config: cfg.Config) -> None:
        """A reload: the top-level `prices` apply from the next call on."""
        for client in self.clients:
            client.reprice(config.prices)

    def breakers(self) -> dict[str, str]:
        return {c.name: c.breaker.state for c in self.clients}

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def _serving(self, model: str) -> list[UpstreamClient]:
        return [*self._served.get(model, ()), *self._any]

    def check_model(self, model: str, allowed: tuple[str, ...] | None = None) -> None:
        """A 422 on `model` when no upstream serves it, listing the served models among `allowed` (a team's)."""
        if model not in self._served and not self._any:  # `_serving(model)` is empty, without making it
            listed = [m for m in self.models if allowed is None or m in allowed]
            raise ValidationFailed("model", f"no upstream serves {model!r}; models: {', '.join(listed)}")

    def candidates(self, model: str) -> list[UpstreamClient]:
        """The upstreams to try, in order: by priority, then a weighted shuffle within a priority."""
        self.check_model(model)
        serving = self._serving(model)
        # Efraimidis–Spirakis: sorting by u^(1/weight) draws without replacement in proportion to weight.
        return sorted(serving, key=lambda c: (c.config.priority, -random.random() ** (1 / c.config.weight)))

    async def embed(
        self, params: dict[str, Any], items: list[Item], deadline: float, *, defer_metrics: bool = False
    ) -> UpstreamResult:
        model = str(params.get("model", ""))
        failed: GatewayError | None = None
        previous: UpstreamClient | None = None
        candidates = self.candidates(model)
        for i, client in enumerate(candidates):
            # An open breaker sends the call elsewhere; with nowhere else to go, the last upstream is tried anyway.
            if not client.breaker.allow() and (i < len(candidates) - 1 or previous is not None):
                continue
            if previous is not None:
                self.metrics.child(self.metrics.upstream_failovers, previous.name).inc()
                log.warning("upstream %s failed for %s (%s); failing over to %s", previous.name, model,
                            failed, client.name)
            try:
                result = await client.embed(params, items, deadline, defer_metrics=defer_metrics)
            except UpstreamRejected:
                self._settle(client, None)
                raise
            except ValidationFailed:
                self._settle(client, None)
                if previous is None:
                    raise  # the first choice cannot take the request: the client's error
                continue  # a failover target of another kind cannot: the earlier failure stands
            except GatewayError as exc:
                self._settle(client, exc)
                failed, previous = exc, client
                continue
            except BaseException:
                self._settle(client, None)
                raise
            self._settle(client, "ok")
            return result
        if failed is not None:
            raise failed
        raise UpstreamFailed(f"every upstream serving {model!r} is failing (circuit open); retry shortly")

    def _settle(self, client: UpstreamClient, outcome: GatewayError | str | None) -> None:
        """Tells the breaker how the call went: a success, a failure of the upstream, or nothing about it (a
        client error, a cancelled call, keys refused or rate limited: the upstream itself is up)."""
        breaker = client.breaker
        if outcome == "ok":
            breaker.success()
        elif isinstance(outcome, GatewayError) and outcome.status in (502, 504) and outcome.code != AUTH_FAILED:
            breaker.failure()
        else:
            breaker.abandon()
        self.metrics.upstream_breaker.labels(client.name).set(STATES.index(breaker.state))

    @staticmethod
    def record(result: UpstreamResult) -> None:
        UpstreamClient.record(result)


def _namespace(routes: list[cfg.Upstream], model: str | None) -> bytes:
    first = cfg.first_choices(routes, model)  # they share one namespace (config._check_namespaces)
    return namespace_part(first[0].cache_namespace) if first else b""
