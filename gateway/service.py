"""The embedding pipeline, independent of HTTP: keys → cache → admission → coalescer → one answer.

Both the `/v1/embeddings` handler and the batch worker call `EmbeddingService.embed`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from . import config as cfg
from .cache import EmbeddingCache, Held, key_prefix, request_keys, unit_key
from .coalescer import Coalescer, Miss, Priority
from .protocol import EmbeddingRequest
from .tokens import estimate


@dataclass(slots=True)
class Outcome:
    """How one request was served; the numbers behind headers, usage, quota and metrics."""

    tokens: int = 0  # usage reported to the client: every input's tokens, hits included
    hits: int = 0  # distinct inputs answered from the cache
    misses: int = 0  # distinct inputs this request sent upstream
    joined: int = 0  # distinct inputs answered by another caller's flight
    duplicates: int = 0  # inputs repeated inside the request (served once)
    upstream_tokens: int = 0  # tokens billed for this request's own misses
    cost_usd: float = 0.0  # what they cost, each priced by the upstream that billed it
    estimated_tokens: int = 0  # of upstream_tokens, those the gateway estimated (the upstream reported no usage)
    cached_tokens: int = 0  # tokens this request did not pay for (hits and joined)
    reservation: object = None  # what admission returned (the quota headers ride on it)
    held: list[Held] = field(default_factory=list)  # each input's entry, in request order (not for units)
    unit: list[np.ndarray] | None = None  # a late-chunking / multivector unit's vectors

    @property
    def vectors(self) -> list[np.ndarray]:
        if self.unit is not None:
            return self.unit
        # Item requests hold 1-D or 2-D arrays only (units are above).
        return cast(list[np.ndarray], [h.entry.vectors for h in self.held])

    @property
    def item_tokens(self) -> list[int]:
        return [h.entry.tokens for h in self.held]


class Admission(Protocol):
    """Quota admission: reserve an estimate before the upstream call, reconcile with the actual after.

    Called for every request, all-hit ones included (request-rate policies count them; cached tokens may
    be weighted); `reserve` returns None when there is nothing to reconcile.
    """

    def applies(self, team: cfg.Team) -> bool:
        """False when the team has no policy at all: then there is nothing to reserve (checked without an
        await, on every request)."""
        ...

    async def reserve(
        self, team: cfg.Team, *, estimate_tokens: int, cached_tokens: int, model: str = ""
    ) -> object:
        """`model` prices the estimate against a money budget."""
        ...

    async def reconcile(self, reservation: object, *, actual_tokens: int, actual_cost_usd: float = 0.0) -> None:
        """`actual_cost_usd`: what the tokens cost as billed (a money budget is charged that)."""
        ...


class EmbeddingService:
    def __init__(
        self,
        cache: EmbeddingCache,
        coalescer: Coalescer,
        *,
        scope: str,
        admission: Admission | None = None,
    ) -> None:
        self.cache = cache
        self.coalescer = coalescer
        self.scope = scope
        self.admission = admission
        self.namespace_for = coalescer.upstream.namespace_for  # the cache namespace a model is looked up in
        # When the last interactive request came in (monotonic): batch jobs yield to interactive work.
        self.interactive_at = float("-inf")

    async def embed(
        self, team: cfg.Team, request: EmbeddingRequest, *, deadline: float, priority: Priority = "interactive"
    ) -> Outcome:
        """Serves one request. `priority="batch"` (batch jobs) queues behind interactive work."""
        if priority == "interactive":
            self.interactive_at = time.monotonic()
        prefix = key_prefix(request, team.name if self.scope == "team" else None, self.namespace_for(request.model))
        if request.unit:
            return await self._embed_unit(team, request, prefix, deadline)
        keys = request_keys(request, prefix)
        unique = list(dict.fromkeys(keys)) if len(keys) > 1 else keys  # first occurrences, in order
        landings = self.coalescer.landings
        looked_up = await self.cache.get_many(unique, promote=priority == "interactive")
        found = {key: held for key, held in zip(unique, looked_up, strict=True) if held is not None}
        outcome = Outcome(hits=len(found), duplicates=len(keys) - len(unique))
        if len(found) == len(keys):  # every input a hit and none repeated: the lookup is the answer, in order
            outcome.held = cast(list[Held], looked_up)
            outcome.tokens = outcome.cached_tokens = sum(h.entry.tokens for h in outcome.held)
            if self.admits(team):
                outcome.reservation = await self.admit_cached(team, outcome.cached_tokens)
            return outcome
        if len(found) < len(unique):
            first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each key's first index
            misses = [Miss(key, request.items[first[key]], estimate(request.items[first[key]]), first[key])
                      for key in unique if key not in found]
            if self.admits(team):
                outcome.reservation = await self._reserve(team, sum(m.estimate for m in misses), found, request.model)
            try:
                await self._fetch(team, request, prefix, misses, found, outcome, deadline, priority, landings)
            finally:
                await self._reconcile(outcome.reservation, outcome.upstream_tokens, outcome.cost_usd)
        elif self.admits(team):
            outcome.reservation = await self.admit_cached(team, sum(h.entry.tokens for h in found.values()))
        outcome.held = [found[k] for k in keys]
        outcome.tokens = sum(h.entry.tokens for h in outcome.held)
        outcome.cached_tokens = sum(h.entry.tokens for h in found.values()) - outcome.upstream_tokens
        return outcome

    async def _fetch(
        self,
        team: cfg.Team,
        request: EmbeddingRequest,
        prefix: bytes,
        misses: list[Miss],
        found: dict[bytes, Held],
        outcome: Outcome,
        deadline: float,
        priority: Priority,
        landings: int,
    ) -> None:
        """`landings`: the coalescer's count of ended flights when the cache lookup began."""
        owner = self.coalescer.new_owner()
        result = await self.coalescer.submit(
            prefix, request.params, misses, owner=owner, deadline=deadline,
            team=team.name, weight=team.weight, priority=priority, looked_up_at=landings,
        )
        outcome.cost_usd, outcome.estimated_tokens = result.cost_usd, result.estimated_tokens
        for miss, entry, joined in zip(misses, result.entries, result.joined, strict=True):
            found[miss.key] = self.cache.held(miss.key, entry)
            if joined:
                outcome.joined += 1
            else:
                outcome.misses += 1
                outcome.upstream_tokens += entry.tokens

    def admits(self, team: cfg.Team) -> bool:
        """Whether `team`'s requests go through admission (checked without an await)."""
        return self.admission is not None and self.admission.applies(team)

    async def admit_cached(self, team: cfg.Team, cached_tokens: int) -> object:
        """Admission of an answer served whole from the cache: reserved and settled at once (no upstream
        tokens). Quota errors propagate (429, 413)."""
        assert self.admission is not None
        reservation = await self.admission.reserve(team, estimate_tokens=0, cached_tokens=cached_tokens)
        await self._reconcile(reservation, 0, 0.0)
        return reservation

    async def _reconcile(self, reservation: object, actual_tokens: int, actual_cost_usd: float) -> None:
        if reservation is not None and self.admission is not None:
            await self.admission.reconcile(reservation, actual_tokens=actual_tokens, actual_cost_usd=actual_cost_usd)

    async def _reserve(self, team: cfg.Team, estimate_tokens: int, found: dict[bytes, Held], model: str) -> object:
        if self.admission is None:
            return None
        cached = sum(h.entry.tokens for h in found.values())
        return await self.admission.reserve(team, estimate_tokens=estimate_tokens, cached_tokens=cached, model=model)

    async def _embed_unit(
        self, team: cfg.Team, request: EmbeddingRequest, prefix: bytes, deadline: float
    ) -> Outcome:
        key = unit_key(prefix, request.items)
        (held,) = await self.cache.get_many([key])
        if held is not None:
            return Outcome(
                unit=list(held.entry.vectors),
                tokens=held.entry.tokens,
                hits=len(request.items),
                cached_tokens=held.entry.tokens,
                reservation=await self._reserve(team, 0, {key: held}, request.model),
            )
        reservation = await self._reserve(team, sum(estimate(i) for i in request.items), {}, request.model)
        actual, cost = 0, 0.0
        try:
            result = await self.coalescer.submit_unit(
                key, request.params, request.items, deadline=deadline, prefix=prefix
            )
            entry, joined, cost = result.entries[0], result.joined[0], result.cost_usd
            actual = 0 if joined else entry.tokens
        finally:
            await self._reconcile(reservation, actual, cost)
        return Outcome(
            unit=list(entry.vectors),
            tokens=entry.tokens,
            misses=0 if joined else len(request.items),
            joined=len(request.items) if joined else 0,
            upstream_tokens=actual,
            cost_usd=cost,
            estimated_tokens=result.estimated_tokens,
            cached_tokens=entry.tokens - actual,
            reservation=reservation,
        )
