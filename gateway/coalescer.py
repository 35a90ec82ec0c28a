"""Micro-batching and single-flight of cache misses across callers.

Misses that share a batch group (canonical params, plus the team when the cache is team-scoped) wait in one
queue and leave together in one upstream call. A group with no call in flight sends at once, so an idle
gateway adds no latency; while a call is in flight the next batch grows until it is full (inputs or
estimated tokens) or its first input has waited `max_wait_ms`, or the call in flight returns.

A key queued or in flight is never sent twice: later callers join its future. Upstream calls run in tasks
owned by the coalescer, so a caller that goes away never cancels work other callers wait for, and the
result is still cached.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import config as cfg
from .cache import EmbeddingCache, Entry, encode, encode_unit
from .errors import GatewayError, Overloaded, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from .metrics import Metrics
from .protocol import Item
from .tokens import split
from .upstream import UpstreamClient

log = logging.getLogger("gateway.coalescer")

Priority = Literal["interactive", "batch"]


@dataclass(slots=True)
class Miss:
    """One input that must go upstream: its key, the input itself, and its token estimate."""

    key: bytes
    item: Item
    estimate: int


@dataclass(slots=True)
class _Pending:
    miss: Miss
    owner: int
    future: asyncio.Future[Entry]
    enqueued: float


@dataclass(slots=True)
class _Group:
    params: dict[str, Any]
    max_inputs: int
    queue: deque[_Pending] = field(default_factory=deque)
    inflight: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """What `submit` returns: an entry per miss, and which of them joined another caller's flight."""

    entries: list[Entry]
    joined: list[bool]


class Coalescer:
    def __init__(
        self,
        upstream: UpstreamClient,
        cache: EmbeddingCache,
        config: cfg.Coalesce,
        upstream_config: cfg.Upstream,
        metrics: Metrics,
        *,
        call_budget_s: float = 60.0,
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.config = config
        self.upstream_config = upstream_config
        self.metrics = metrics
        self.call_budget_s = call_budget_s
        self._flights: dict[bytes, asyncio.Future[Entry]] = {}
        self._groups: dict[bytes, _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._owners = itertools.count(1)
        self.calls = 0

    def reconfigure(self, config: cfg.Config) -> None:
        """A reload: new batching settings apply from the next batch on (queued inputs keep their place)."""
        self.config = config.coalesce
        self.call_budget_s = config.limits.request_timeout_s

    @property
    def pending_inputs(self) -> int:
        """Inputs queued or in flight (the bounded quantity)."""
        return len(self._flights)

    def new_owner(self) -> int:
        return next(self._owners)

    # ---- callers ---------------------------------------------------------------------------------------

    async def submit(
        self,
        group_key: bytes,
        params: dict[str, Any],
        misses: Sequence[Miss],
        *,
        owner: int,
        deadline: float,
        team: str = "",
        priority: Priority = "interactive",
    ) -> Joined:
        """Resolves every miss (distinct keys) through one shared flight each; waits until `deadline`.

        `team` and `priority` order queued work (fair share across teams; batch jobs after interactive).
        """
        futures, joined = self._register(group_key, params, misses, owner)
        entries = await self._wait(futures, deadline)
        return Joined(entries=entries, joined=joined)

    async def submit_unit(
        self, key: bytes, params: dict[str, Any], items: list[Item], *, deadline: float
    ) -> tuple[Entry, bool]:
        """A late-chunking / multivector request: one call for the whole list, never merged, single-flight."""
        future = self._flights.get(key)
        if future is not None:
            return (await self._wait([future], deadline))[0], True
        self._check_capacity(len(items))
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._flights[key] = future
        self._spawn(self._send_unit(key, params, items, future))
        return (await self._wait([future], deadline))[0], False

    def _register(
        self, group_key: bytes, params: dict[str, Any], misses: Sequence[Miss], owner: int
    ) -> tuple[list[asyncio.Future[Entry]], list[bool]]:
        flights = self._flights
        self._check_capacity(sum(1 for m in misses if m.key not in flights))
        group = self._groups.get(group_key)
        if group is None:
            max_inputs = self.upstream_config.max_inputs_for(str(params.get("model", "")))
            group = self._groups[group_key] = _Group(params, min(max_inputs, self.config.max_batch_inputs))
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures, joined = [], []
        for miss in misses:
            future = flights.get(miss.key)
            joined.append(future is not None)
            if future is None:
                future = flights[miss.key] = loop.create_future()
                future.add_done_callback(_consume)
                group.queue.append(_Pending(miss, owner, future, now))
            futures.append(future)
        self.metrics.queue_inputs.set(len(flights))
        self._pump(group_key, group)
        return futures, joined

    def _check_capacity(self, new_inputs: int) -> None:
        if new_inputs and len(self._flights) + new_inputs > self.config.max_queue_inputs:
            raise Overloaded("the gateway's upstream queue is full; retry shortly", retry_after=1)

    @staticmethod
    async def _wait(futures: list[asyncio.Future[Entry]], deadline: float) -> list[Entry]:
        async def all_of() -> list[Entry]:
            # shield: a caller that times out or disconnects must not cancel a flight others share.
            return [await asyncio.shield(f) for f in futures]

        try:
            return await asyncio.wait_for(all_of(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise UpstreamTimeout("no upstream answer within the request deadline") from None

    # ---- batching --------------------------------------------------------------------------------------

    def _pump(self, group_key: bytes, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.config.max_wait_ms / 1000
        while group.queue:
            oldest = group.queue[0].enqueued
            if group.inflight and not self._full(group) and loop.time() - oldest < wait_s:
                if group.timer is None:
                    group.timer = loop.call_at(oldest + wait_s, self._on_timer, group_key, group)
                return
            batch = self._take(group)
            group.inflight += 1
            self._spawn(self._send(group_key, group, batch))
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None

    def _on_timer(self, group_key: bytes, group: _Group) -> None:
        group.timer = None
        self._pump(group_key, group)

    def _full(self, group: _Group) -> bool:
        if len(group.queue) >= group.max_inputs:
            return True
        tokens = 0
        for p in group.queue:
            tokens += p.miss.estimate
            if tokens >= self.config.max_batch_tokens:
                return True
        return False

    def _take(self, group: _Group) -> list[_Pending]:
        batch = [group.queue.popleft()]
        tokens = batch[0].miss.estimate
        while group.queue and len(batch) < group.max_inputs:
            nxt = group.queue[0].miss.estimate
            if tokens + nxt > self.config.max_batch_tokens:
                break
            batch.append(group.queue.popleft())
            tokens += nxt
        return batch

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- upstream calls --------------------------------------------------------------------------------

    async def _send(self, group_key: bytes, group: _Group, batch: list[_Pending]) -> None:
        try:
            await self._call(group.params, batch)
        finally:
            group.inflight -= 1
            if group.queue:
                self._pump(group_key, group)
            elif not group.inflight and self._groups.get(group_key) is group:
                del self._groups[group_key]

    async def _call(self, params: dict[str, Any], batch: list[_Pending]) -> None:
        self.calls += 1
        deadline = time.monotonic() + self.call_budget_s
        try:
            result = await self.upstream.embed(params, [p.miss.item for p in batch], deadline)
        except UpstreamRejected as exc:
            await self._isolate(params, batch, exc)
            return
        except GatewayError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            log.exception("upstream call failed unexpectedly")
            self._fail(batch, UpstreamFailed(f"upstream call failed: {type(exc).__name__}"))
            return
        shares = split(result.tokens, [p.miss.estimate for p in batch])
        writes = []
        for p, vec, tokens in zip(batch, result.vectors, shares, strict=True):
            entry = Entry(vectors=vec, tokens=tokens)
            if not p.future.done():
                p.future.set_result(entry)
            writes.append((p.miss.key, encode(vec, tokens)))
        # Callers already have their answers; the write happens once per key, then the flight ends.
        try:
            await self.cache.set_many(writes)
        finally:
            self._land(batch)

    async def _isolate(self, params: dict[str, Any], batch: list[_Pending], exc: UpstreamRejected) -> None:
        """A 4xx for a merged batch: re-send it split by caller, so only the offending caller fails."""
        owners: dict[int, list[_Pending]] = {}
        for p in batch:
            owners.setdefault(p.owner, []).append(p)
        if len(owners) == 1:
            self._fail(batch, exc)
            return
        await asyncio.gather(*(self._call(params, part) for part in owners.values()))

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
        self._land(batch)

    def _land(self, batch: list[_Pending]) -> None:
        for p in batch:
            if self._flights.get(p.miss.key) is p.future:
                del self._flights[p.miss.key]
        self.metrics.queue_inputs.set(len(self._flights))

    async def _send_unit(
        self, key: bytes, params: dict[str, Any], items: list[Item], future: asyncio.Future[Entry]
    ) -> None:
        self.calls += 1
        try:
            result = await self.upstream.embed(params, items, time.monotonic() + self.call_budget_s)
            vectors: list[np.ndarray] = result.vectors
            future.set_result(Entry(vectors=vectors, tokens=result.tokens))
            await self.cache.set_many([(key, encode_unit(vectors, result.tokens))])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, GatewayError) else UpstreamFailed(repr(exc)))
        finally:
            if self._flights.get(key) is future:
                del self._flights[key]

    async def close(self) -> None:
        """Lets in-flight calls finish (their results are cached), then returns."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _consume(future: asyncio.Future[Entry]) -> None:
    # A flight whose every waiter has gone still completes; reading its exception keeps asyncio from
    # reporting it as never retrieved.
    if not future.cancelled():
        future.exception()
