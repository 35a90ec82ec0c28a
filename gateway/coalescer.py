"""Micro-batching, single-flight and fair ordering of cache misses across callers.

Misses that share a batch group (canonical params, plus the team when the cache is team-scoped) wait in one
queue and leave together in one upstream call. An input takes a free call slot at once when the group has no
call in flight, or when it arrives alone (more than `quiet_ms` after the group's previous input), so neither
an idle gateway nor a light load adds latency. Inputs arriving in a burst while a call of their group is in
flight batch instead: the batch leaves when the burst pauses for `quiet_ms`, it is full (inputs or estimated
tokens), its oldest input has waited `max_wait_ms`, or the group's calls have all returned. Sending every
input of a burst at once while slots are free would not do: a burst arrives over more than one upstream
round trip (the gateway parses it at a finite rate), so each freed slot would leave with one input.

Batches are formed only when one of the router's call slots (`limits.max_concurrency` per key of every
upstream) is free, so work that cannot go yet waits here, where its order is decided: interactive before
batch-priority work, and across teams in proportion to their `weight` (start-time fair queuing over estimated
tokens), not first come.

A key queued or in flight is never sent twice: later callers join it. Upstream calls run in tasks owned by
the coalescer, so a caller that goes away never cancels work other callers wait for, and the result is
still cached.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from . import config as cfg
from .cache import EmbeddingCache, item_keys, renamespaced, unit_key
from .codec import Entry
from .errors import GatewayError, Overloaded, UpstreamFailed, UpstreamRejected, UpstreamTimeout
from .metrics import Metrics
from .protocol import Item
from .tokens import split
from .upstream import Router

log = logging.getLogger("gateway.coalescer")

Priority = Literal["interactive", "batch"]
# Lower ranks leave first: batch-priority work only fills what interactive work leaves in a batch.
_RANK: dict[str, int] = {"interactive": 0, "batch": 1}
# asyncio may run a timer a clock tick early; a deadline this close counts as reached.
_EPSILON_S = 1e-6
# How many answers of ended flights stay findable (`Coalescer._landed`): a lookup outlives a flight by at most a
# store round trip, in which far fewer inputs land; references to entries the cache holds anyway.
LANDED_KEPT = 1024
_INPUT_FIELD = re.compile(r"^(?:body[.])?input(?:\[(\d+)\]|[.](\d+))?(?:$|[.\[])")


@dataclass(slots=True)
class Miss:
    """One input that must go upstream: its key, the input itself, and its token estimate."""

    key: bytes
    item: Item
    estimate: int
    position: int = -1  # its index in the caller's request, to name it in an upstream error; -1: as submitted


@dataclass(slots=True, eq=False)
class _Waiter:
    """One `submit`: its own future, resolved when the last of its inputs lands or at its first failure.

    Resolved right where a result is set, so the caller's task wakes one loop iteration later (waiting on the
    shared flights with `asyncio.wait` took two: a done-callback, then the wake-up). Its future is its own, so
    a caller that goes away cancels nothing that others wait for."""

    owner: int
    future: asyncio.Future[None]
    left: int  # inputs still in flight
    billed: float = 0.0  # what the inputs it pays for cost: tokens × USD per 1M tokens of the upstream that billed them
    estimated: int = 0  # of their tokens, those the gateway estimated (the upstream reported no usage)

    def landed(self, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
            return
        self.left -= 1
        if not self.left:
            self.future.set_result(None)


@dataclass(slots=True, eq=False)
class _Pending:
    miss: Miss
    owner: int  # the caller that queued it
    future: asyncio.Future[Entry]  # holds the result for callers that join while the cache write runs
    rank: int
    tag: float  # fair-queuing start tag
    seq: int  # tie-break, and marks older heap entries of a promoted input as stale
    waiters: list[_Waiter]  # callers still waiting for it, first come first
    deadline: float  # the latest of its callers' deadlines: no retry after it
    payer: int = 0  # set when it lands: the first caller still waiting pays for it
    queued: bool = False  # in its group's queue (not yet in a batch)


@dataclass(slots=True)
class _Group:
    key: bytes  # the misses' key prefix (cache.key_prefix)
    params: dict[str, Any]
    max_inputs: int
    namespace: bytes  # the prefix's cache namespace part: the model's first choice's
    heap: list[tuple[int, float, int, _Pending]] = field(default_factory=list)
    queued: int = 0
    queued_tokens: int = 0
    since: float | None = None  # when the queue last went from empty to non-empty
    inflight: int = 0
    last_arrival: float = -math.inf  # when inputs last joined the queue
    burst: bool = False  # the queue holds inputs that arrived within quiet_ms of the group's previous ones


@dataclass(frozen=True, slots=True)
class _Caller:
    owner: int
    team: str
    weight: float
    rank: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Joined:
    """What `submit` returns: an entry per miss, and which of them joined another caller's flight; what the others
    (this caller's own) cost, each priced as the upstream that billed it bills, and how many of their tokens are
    the gateway's estimate."""

    entries: list[Entry]
    joined: list[bool]
    cost_usd: float = 0.0
    estimated_tokens: int = 0


class _FairClock:
    """Start-time fair queuing per rank: a team's inputs are tagged by the virtual time it has used, divided
    by its weight; the lowest tag leaves first. A team that was idle starts at the current virtual time, so
    it neither banks credit nor waits behind another team's backlog."""

    def __init__(self) -> None:
        self._now = [0.0] * len(_RANK)
        self._finish: list[dict[str, float]] = [{} for _ in _RANK]

    def tag(self, rank: int, team: str, weight: float, cost: int) -> float:
        start = max(self._now[rank], self._finish[rank].get(team, 0.0))
        self._finish[rank][team] = start + max(cost, 1) / weight
        return start

    def served(self, rank: int, tag: float) -> None:
        self._now[rank] = max(self._now[rank], tag)


class Coalescer:
    def __init__(
        self,
        upstream: Router,
        cache: EmbeddingCache,
        config: cfg.Coalesce,
        metrics: Metrics,
        *,
        call_budget_s: float = 60.0,
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.config = config
        self.metrics = metrics
        self.call_budget_s = call_budget_s
        self._flights: dict[bytes, _Pending] = {}
        # The answers of the latest flights to end, by key, with the `landings` count they ended at: a caller whose
        # cache lookup began before a flight ended, and came here after, joins that answer instead of paying again.
        self._landed: OrderedDict[bytes, tuple[int, Entry]] = OrderedDict()
        self.landings = 0  # flights ended so far; read it before a cache lookup and pass it to `submit`
        self._units: dict[bytes, asyncio.Future[Joined]] = {}
        self._unit_inputs = 0
        self._groups: dict[bytes, _Group] = {}
        self._waiting: dict[bytes, _Group] = {}  # the groups with queued inputs (scanned per dispatch)
        self._tasks: set[asyncio.Task[None]] = set()
        self._owners = itertools.count(1)
        self._seq = itertools.count()
        self._fair = _FairClock()
        self._slots = upstream.capacity
        # Unit calls (never merged) waiting for a call slot, first come first served; a freed slot goes to them
        # before batches are formed, so a steady stream of batches cannot starve a unit.
        self._unit_waiters: deque[asyncio.Future[None]] = deque()
        # A plain Handle is possible: uvloop's call_at runs a callback less than 0.5 ms away as call_soon, and
        # such a Handle has no when(), so the moment it was armed for is kept beside it.
        self._timer: asyncio.Handle | None = None
        self._timer_when = 0.0
        self._closing = False
        self.calls = 0  # upstream calls made (re-sends of a rejected batch included)
        self.joins = 0  # inputs answered by a flight another caller started
        self.peak_inputs = 0  # the most inputs ever queued or in flight at once

    def reconfigure(self, config: cfg.Config) -> None:
        """A reload: new batching settings apply from the next batch on (queued inputs keep their place)."""
        self.config = config.coalesce
        self.call_budget_s = config.limits.request_timeout_s

    @property
    def pending_inputs(self) -> int:
        """Inputs queued or in flight (the bounded quantity)."""
        return len(self._flights) + self._unit_inputs

    @property
    def queued_inputs(self) -> int:
        """Inputs waiting for a batch (not yet sent)."""
        return sum(g.queued for g in self._waiting.values())

    @property
    def idle(self) -> bool:
        """Nothing queued, in flight, or running: no task or future is left behind."""
        return not (self._flights or self._units or self._groups or self._tasks)

    def new_owner(self) -> int:
        return next(self._owners)

    # ---- callers ---------------------------------------------------------------------------------------

    async def submit(
        self,
        prefix: bytes,
        params: dict[str, Any],
        misses: Sequence[Miss],
        *,
        owner: int,
        deadline: float,
        team: str = "",
        weight: float = 1.0,
        priority: Priority = "interactive",
        looked_up_at: int | None = None,
    ) -> Joined:
        """Resolves every miss (distinct keys) through one shared flight each; waits until `deadline`.

        `looked_up_at` is `landings` when the caller's cache lookup began: a miss whose flight ended since then
        (its store write raced the lookup) is given that flight's answer.

        `prefix` is the misses' key prefix (cache.key_prefix): misses of one prefix batch together, and answers are
        cached under their keys, or under the answering upstream's namespace when it is not the prefix's.
        `team` and `weight` order queued work across teams; `priority="batch"` queues behind interactive work.
        """
        if not misses:
            return Joined(entries=[], joined=[])
        if looked_up_at is not None and looked_up_at < self.landings:
            landed = {}
            for m in misses:
                ended = self._landed.get(m.key)
                if ended is not None and ended[0] > looked_up_at:
                    landed[m.key] = ended[1]
            if landed:
                return await self._submit_after_landed(prefix, params, misses, landed, owner=owner, deadline=deadline,
                                                       team=team, weight=weight, priority=priority)
        caller = _Caller(owner, team, weight if weight > 0 else 1.0, _RANK[priority], deadline)
        waiter = _Waiter(owner, asyncio.get_running_loop().create_future(), len(misses))
        pendings = self._register(prefix, params, misses, caller, waiter)
        self._dispatch()
        try:
            await _until(waiter.future, deadline)
        except BaseException as exc:
            # Gone (error, deadline, disconnect): a caller still waiting pays for what lands instead.
            for p in pendings:
                if waiter in p.waiters:
                    p.waiters.remove(waiter)
            if isinstance(exc, _Blamed):
                raise exc.told_to(misses) from None
            raise
        return Joined([p.future.result() for p in pendings], [p.payer != owner for p in pendings],
                      waiter.billed / 1e6, waiter.estimated)

    async def _submit_after_landed(
        self, prefix: bytes, params: dict[str, Any], misses: Sequence[Miss], landed: dict[bytes, Entry], **caller: Any
    ) -> Joined:
        """`submit` of misses some of which (`landed`) a flight that ended during the lookup answered."""
        self.joins += len(landed)
        rest = await self.submit(prefix, params, [m for m in misses if m.key not in landed], **caller)
        fetched = iter(zip(rest.entries, rest.joined, strict=True))
        answers = [(landed[m.key], True) if m.key in landed else next(fetched) for m in misses]
        return Joined([entry for entry, _ in answers], [joined for _, joined in answers], rest.cost_usd,
                      rest.estimated_tokens)

    async def submit_unit(
        self, key: bytes, params: dict[str, Any], items: list[Item], *, deadline: float, prefix: bytes = b""
    ) -> Joined:
        """A late-chunking / multivector request: one call for the whole list, never merged, single-flight.
        `key` is `cache.unit_key(prefix, items)`; one entry in the answer."""
        future = self._units.get(key)
        if future is not None:
            self.joins += 1
            return Joined([(await self._wait([future], deadline))[0].entries[0]], [True])
        self._check_capacity(len(items))
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._units[key] = future
        self._count_units(len(items))
        self._spawn(self._send_unit(key, prefix, params, items, future))
        return (await self._wait([future], deadline))[0]

    def _register(
        self, prefix: bytes, params: dict[str, Any], misses: Sequence[Miss], caller: _Caller, waiter: _Waiter
    ) -> list[_Pending]:
        flights = self._flights
        self._check_capacity(sum(1 for m in misses if m.key not in flights))
        group = self._group(prefix, params)
        queued = group.queued
        pendings = []
        for miss in misses:
            pending = flights.get(miss.key)
            if pending is None:
                future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
                pending = _Pending(miss, caller.owner, future, caller.rank, 0.0, 0, [waiter], caller.deadline)
                flights[miss.key] = pending
                self._enqueue(group, pending, caller)
            else:
                self._join(group, pending, caller, waiter)
            pendings.append(pending)
        if group.queued != queued:
            self._arrived(group)
        self._gauge()
        return pendings

    def _group(self, prefix: bytes, params: dict[str, Any]) -> _Group:
        group = self._groups.get(prefix)
        if group is None:
            model = str(params.get("model", ""))
            max_inputs = self.upstream.max_inputs_for(model)
            group = _Group(prefix, params, max(1, min(max_inputs, self.config.max_batch_inputs)),
                           self.upstream.namespace_for(model))
            self._groups[prefix] = group
        return group

    def _enqueue(self, group: _Group, pending: _Pending, caller: _Caller) -> None:
        pending.rank = caller.rank
        pending.tag = self._fair.tag(caller.rank, caller.team, caller.weight, pending.miss.estimate)
        pending.seq = next(self._seq)
        heapq.heappush(group.heap, (caller.rank, pending.tag, pending.seq, pending))
        if pending.queued:  # a promotion: counted already, its older heap entry is now stale
            return
        pending.queued = True
        group.queued += 1
        group.queued_tokens += pending.miss.estimate
        if group.since is None:
            group.since = asyncio.get_running_loop().time()
            self._waiting[group.key] = group

    def _arrived(self, group: _Group) -> None:
        now = asyncio.get_running_loop().time()
        if now - group.last_arrival < self.config.quiet_ms / 1000:
            group.burst = True
        group.last_arrival = now

    def _join(self, group: _Group, pending: _Pending, caller: _Caller, waiter: _Waiter) -> None:
        pending.waiters.append(waiter)
        pending.deadline = max(pending.deadline, caller.deadline)
        self.joins += 1
        if pending.future.done():  # landed, its cache write still running: the result is here already
            waiter.landed(None)
        if pending.queued and caller.rank < pending.rank:
            # An interactive caller waits for an input a batch job queued: it leaves as interactive work.
            self._enqueue(group, pending, caller)

    def _check_capacity(self, new_inputs: int) -> None:
        if new_inputs and self.pending_inputs + new_inputs > self.config.max_queue_inputs:
            raise Overloaded("the gateway's upstream queue is full; retry shortly", retry_after=1)

    def _count_units(self, delta: int) -> None:
        self._unit_inputs += delta
        self._gauge()

    def _gauge(self) -> None:
        pending = self.pending_inputs
        self.peak_inputs = max(self.peak_inputs, pending)
        self.metrics.queue_inputs.set(pending)

    @staticmethod
    async def _wait(futures: list[asyncio.Future[Joined]], deadline: float) -> list[Joined]:
        """All results, or the first failure as soon as it happens (the caller stops waiting for the rest).

        `asyncio.wait` never cancels what it waits for: a caller that times out or disconnects leaves the
        flights that others share untouched."""
        timeout = max(0.0, deadline - time.monotonic())
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for f in futures:
            error = f.exception() if f.done() else None
            if error is not None:
                raise error
        if not all(f.done() for f in futures):
            raise UpstreamTimeout("no upstream answer within the request deadline")
        return [f.result() for f in futures]

    # ---- batching --------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Forms batches while call slots are free, best-placed due group first; then arms the wait timer."""
        now = asyncio.get_running_loop().time()
        while self._slots > 0:
            group = self._next_group(now)
            if group is None:
                break
            batch = self._take(group)
            if not batch:  # all it held was abandoned
                self._forget(group)
                continue
            self._slots -= 1
            group.inflight += 1
            self._spawn(self._send(group, batch))
        self._arm()

    def _next_group(self, now: float) -> _Group | None:
        best: _Group | None = None
        best_head: tuple[int, float, int] | None = None
        for group in self._waiting.values():
            if not self._due(group, now):
                continue
            head = self._head(group)
            if best_head is None or head < best_head:
                best, best_head = group, head
        return best

    def _due(self, group: _Group, now: float) -> bool:
        # Idle groups and lone arrivals send at once; a burst's batch grows until full, the burst pauses, or
        # its oldest input has waited.
        if self._closing or not group.inflight or not group.burst:
            return True
        if group.queued >= group.max_inputs or group.queued_tokens >= self.config.max_batch_tokens:
            return True
        return now + _EPSILON_S >= self._due_at(group)

    def _due_at(self, group: _Group) -> float:
        assert group.since is not None
        config = self.config
        return min(group.since + config.max_wait_ms / 1000, group.last_arrival + config.quiet_ms / 1000)

    @staticmethod
    def _head(group: _Group) -> tuple[int, float, int]:
        heap = group.heap
        while not _live(heap[0]):
            heapq.heappop(heap)
        rank, tag, seq, _ = heap[0]
        return rank, tag, seq

    def _take(self, group: _Group) -> list[_Pending]:
        batch: list[_Pending] = []
        abandoned: list[_Pending] = []
        tokens = 0
        heap = group.heap
        while heap and len(batch) < group.max_inputs:
            rank, tag, _, pending = entry = heap[0]
            if _live(entry):
                estimate = pending.miss.estimate
                if pending.waiters:
                    if batch and tokens + estimate > self.config.max_batch_tokens:
                        break
                    batch.append(pending)
                    tokens += estimate
                    self._fair.served(rank, tag)
                else:  # every caller has gone (deadline, disconnect): not worth an upstream call
                    abandoned.append(pending)
                pending.queued = False
                group.queued -= 1
                group.queued_tokens -= estimate
            heapq.heappop(heap)
        if not group.queued:
            heap.clear()
            group.since = None
            group.burst = False
            del self._waiting[group.key]
        if abandoned:
            self._fail(abandoned, UpstreamTimeout("every caller of this input has gone"))
        return batch

    def _arm(self) -> None:
        """One timer for the earliest moment a waiting group becomes due (none while no slot is free: a
        returning call dispatches anyway). Every input of a burst moves its group's moment later; a timer
        already armed earlier is kept (it fires, finds nothing due, and arms again) rather than re-armed per
        input."""
        when = None
        if self._slots > 0 and self._waiting:
            when = min(self._due_at(g) for g in self._waiting.values())
        if self._timer is not None and (when is None or self._timer_when > when):
            self._timer.cancel()
            self._timer = None
        if when is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)
            self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- upstream calls --------------------------------------------------------------------------------

    async def _send(self, group: _Group, batch: list[_Pending]) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                group.inflight -= 1
                self._forget(group)
                self._free_slot()

        try:
            await self._call(group, batch, answered=release)
        finally:
            release()

    def _forget(self, group: _Group) -> None:
        if not group.queued and not group.inflight and self._groups.get(group.key) is group:
            del self._groups[group.key]

    async def _call(self, group: _Group, batch: list[_Pending], answered: Callable[[], None] | None = None) -> None:
        params = group.params
        self.calls += 1
        # Retries stop when the last caller stops waiting (a call formed late must not outlive them all).
        deadline = min(time.monotonic() + self.call_budget_s, max(p.deadline for p in batch))
        try:
            items = [p.miss.item for p in batch]
            result = await self.upstream.embed(params, items, deadline, defer_metrics=True)
        except UpstreamRejected as exc:
            await self._isolate(group, batch, exc)
            return
        except GatewayError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            log.exception("upstream call failed unexpectedly")
            self._fail(batch, UpstreamFailed(f"upstream call failed: {type(exc).__name__}"))
            return
        except BaseException:
            self._fail(batch, UpstreamFailed("the upstream call was cancelled"))
            raise
        shares = split(result.tokens, [p.miss.estimate for p in batch])
        price, estimated = result.price, result.estimated
        keys = [p.miss.key for p in batch]
        if result.namespace != group.namespace:  # another namespace's upstream answered: stored in its own
            prefix = renamespaced(group.key, group.namespace, result.namespace)
            keys = item_keys(prefix, [p.miss.item for p in batch])
        fresh = [(key, Entry(vectors=vec, tokens=tokens)) for key, vec, tokens in zip(keys, result.vectors, shares,
                                                                                       strict=True)]
        promote = any(p.rank == _RANK["interactive"] for p in batch)
        # In the in-process tier before the callers wake: what they render for their answers is kept there.
        self.cache.keep(fresh, promote=promote)
        for p, (_, entry) in zip(batch, fresh, strict=True):
            if p.waiters:
                payer = p.waiters[0]
                p.payer = payer.owner
                payer.billed += entry.tokens * price
                if estimated:
                    payer.estimated += entry.tokens
            else:
                p.payer = p.owner
            if not p.future.done():
                p.future.set_result(entry)
                for waiter in p.waiters:
                    waiter.landed(None)
        # Callers already have their answers; the write happens once per key, then the flight ends (until
        # then a new caller joins the flight instead of missing the cache and sending the input again).
        # The upstream call is over, though: its slot is free before the write, so the next batch of an idle
        # group leaves at once instead of waiting for a cache round trip.
        if answered is not None:
            answered()
        try:
            # Let the woken callers answer their clients before this task encodes the entries and records the
            # call's metrics: a big batch's encoding would otherwise come before every answer.
            await asyncio.sleep(0)
            await self.cache.put_many(fresh, promote=promote, kept=True)
        finally:
            self.upstream.record(result)
            self._land(batch)

    async def _isolate(self, group: _Group, batch: list[_Pending], exc: UpstreamRejected) -> None:
        """A 4xx for a merged batch: only the callers whose input caused it fail; the rest goes again."""
        bad = _blamed_input(exc.upstream_body, len(batch))
        if isinstance(bad, int):
            exc = _Blamed(exc, batch[bad].miss.key, bad)
        if bad == "all" or len(batch) == 1:
            self._fail(batch, exc)  # the params are the group's, so every caller would be refused alike
            return
        if isinstance(bad, int):
            culprit = batch[bad].owner
            # The culprit's request fails anyway: its other inputs go again only if another caller waits too.
            drop = [i == bad or [w.owner for w in p.waiters] == [culprit] for i, p in enumerate(batch)]
            rest = [p for p, d in zip(batch, drop, strict=True) if not d]
            self._fail([p for p, d in zip(batch, drop, strict=True) if d], exc)
            if rest:
                await self._call(group, rest)
            return
        owners = list(dict.fromkeys(p.owner for p in batch))
        if len(owners) == 1:
            self._fail(batch, exc)
            return
        # The answer does not say which input: bisect by caller, so k callers cost O(log k) calls, not k.
        half = set(owners[: len(owners) // 2])
        await asyncio.gather(
            self._call(group, [p for p in batch if p.owner in half]),
            self._call(group, [p for p in batch if p.owner not in half]),
        )

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)
                p.future.exception()  # retrieved: its callers are told through their own futures
                for waiter in p.waiters:
                    waiter.landed(exc)
        self._land(batch)

    def _land(self, batch: list[_Pending]) -> None:
        landed = self._landed
        self.landings += 1
        for p in batch:
            if self._flights.get(p.miss.key) is p:
                del self._flights[p.miss.key]
            if p.future.done() and not p.future.cancelled() and p.future.exception() is None:
                landed[p.miss.key] = (self.landings, p.future.result())
                landed.move_to_end(p.miss.key)
        while len(landed) > LANDED_KEPT:
            landed.popitem(last=False)
        self._gauge()

    async def _send_unit(
        self, key: bytes, prefix: bytes, params: dict[str, Any], items: list[Item], future: asyncio.Future[Joined]
    ) -> None:
        slot = False
        try:
            await self._take_slot()  # a unit takes a call slot like a batch
            slot = True
            self.calls += 1
            result = await self.upstream.embed(params, items, time.monotonic() + self.call_budget_s)
            vectors: list[np.ndarray] = result.vectors
            tokens = result.tokens
            future.set_result(Joined([Entry(vectors=vectors, tokens=tokens)], [False], tokens * result.price / 1e6,
                                     tokens if result.estimated else 0))
            slot = False  # answered: the slot is free before the cache write, as a batch's is
            self._free_slot()
            stored, looked_up = key, self.upstream.namespace_for(str(params.get("model", "")))
            if result.namespace != looked_up:  # another namespace's upstream answered: stored in its own
                stored = unit_key(renamespaced(prefix, looked_up, result.namespace), items)
            await self.cache.put_many([(stored, Entry(vectors=vectors, tokens=tokens))])
        except Exception as exc:
            if not future.done():
                future.set_exception(exc if isinstance(exc, GatewayError) else UpstreamFailed(repr(exc)))
        finally:
            if slot:
                self._free_slot()
            if not future.done():
                future.set_exception(UpstreamFailed("the upstream call was cancelled"))
            if self._units.get(key) is future:
                del self._units[key]
            self._count_units(-len(items))

    async def _take_slot(self) -> None:
        """A call slot for a unit: at once when one is free and no unit waits before it, else in turn."""
        if self._slots > 0 and not self._unit_waiters:
            self._slots -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unit_waiters.append(turn)
        try:
            await turn  # `_free_slot` took the slot for this unit before waking it
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._free_slot()  # woken and cancelled in the same step: hand the slot on
            raise

    def _free_slot(self) -> None:
        self._slots += 1
        while self._slots > 0 and self._unit_waiters:
            turn = self._unit_waiters.popleft()
            if not turn.done():
                self._slots -= 1
                turn.set_result(None)
        self._dispatch()

    async def settled(self) -> None:
        """Returns once every upstream call and cache write started so far (and those they start) has ended."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Sends whatever is queued without waiting, lets every call finish (results are cached), returns."""
        self._closing = True
        self._dispatch()
        await self.settled()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Blamed(UpstreamRejected):
    """A 4xx that names one input of a merged call: each caller is told that input's index in its own request."""

    def __init__(self, exc: UpstreamRejected, key: bytes, index: int) -> None:
        super().__init__(exc.status, exc.upstream_body, exc.headers)
        self.key = key
        self.index = index

    def told_to(self, misses: Sequence[Miss]) -> UpstreamRejected:
        for i, miss in enumerate(misses):
            if miss.key == self.key:
                position = miss.position if miss.position >= 0 else i
                return UpstreamRejected(self.status, _reindex(self.upstream_body, self.index, position), self.headers)
        return self


def _reindex(value: Any, old: int, new: int) -> Any:
    """An error body with input `old` (of the upstream call) renamed `new`: `input[3]` texts, pydantic locs."""
    if isinstance(value, str):
        return value.replace(f"input[{old}]", f"input[{new}]")
    if isinstance(value, dict):
        return {k: _reindex(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        out = [_reindex(v, old, new) for v in value]
        for i in range(1, len(out)):
            if out[i - 1] == "input" and type(out[i]) is int and out[i] == old:
                out[i] = new
        return out
    return value


def _live(entry: tuple[int, float, int, _Pending]) -> bool:
    # A promoted input has a newer heap entry; the older one is skipped when it comes up.
    pending = entry[3]
    return pending.queued and pending.seq == entry[2]


def _blamed_input(body: dict[str, Any], n: int) -> int | Literal["all"] | None:
    """Which input of an n-input call a 4xx body blames: its index; "all" when it names only request
    fields (model, task, dimensions...), which every caller of the group shares; None when it does not say."""
    fields: list[str] = []
    errors = body.get("errors")
    if isinstance(errors, list):  # Jina / the simulator: [{"field": "input[3]", ...}]
        fields += [str(e["field"]) for e in errors if isinstance(e, dict) and "field" in e]
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI / pydantic: [{"loc": ["body", "input", 3], ...}]
        fields += [".".join(map(str, e["loc"])) for e in detail if isinstance(e, dict) and "loc" in e]
    if not fields:
        return None
    for name in fields:
        m = _INPUT_FIELD.match(name)
        index = m and (m.group(1) or m.group(2))
        if index and int(index) < n:
            return int(index)
    return None if any(_INPUT_FIELD.match(name) for name in fields) else "all"


async def _until(future: asyncio.Future[None], deadline: float) -> None:
    """Waits for `future` until `deadline` (time.monotonic()), then fails it with UpstreamTimeout."""
    if not future.done():
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), _expire, future)
        try:
            await future
        finally:
            timer.cancel()
    future.result()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(UpstreamTimeout("no upstream answer within the request deadline"))


def _consume(future: asyncio.Future[Joined]) -> None:
    # A flight whose every waiter has gone still completes; reading its exception keeps asyncio from
    # reporting it as never retrieved.
    if not future.cancelled():
        future.exception()
