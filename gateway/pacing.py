"""Pacing of an upstream key: its upstream's `limits.requests_per_minute / tokens_per_minute`, per key, kept by the
whole fleet through the state store, so work waits its turn (inside its deadline) instead of provoking 429s.

A sliding-window log, not a bucket: the upstream counts calls in its own window, and only a log can promise
"never more than N in any 60 s". Each call is given a slot (the earliest time it fits) and sleeps until then.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import xxhash

from . import config as cfg
from .breaker import StoreBreaker
from .errors import UpstreamRateLimited
from .keys import pacing_keys
from .metrics import Metrics
from .quota import STORE_ERRORS, Clock
from .store.redis import read_lua

log = logging.getLogger("gateway.pacing")

WINDOW_MS = 60_000


class PacingBackend(Protocol):
    async def acquire(
        self, *, window_ms: int, rpm: int, tpm: int, tokens: int, max_wait_ms: int, now_ms: int | None
    ) -> tuple[bool, int, int]:
        """(granted, slot ms, now ms): the earliest slot for the call, booked only if within `max_wait_ms`."""
        ...

    async def hold(self, ms: int, now_ms: int | None) -> None:
        """No slot before now + `ms` (the upstream answered 429 with that Retry-After)."""
        ...


class MemoryPacingBackend:
    """The same log in process: `memory://` state, and the fallback when the state store is down."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._log: deque[tuple[int, int]] = deque()
        self._sum = 0
        self._until = 0

    def _now(self, now_ms: int | None) -> int:
        return now_ms if now_ms is not None else math.floor(self.clock() * 1000)

    async def acquire(
        self, *, window_ms: int, rpm: int, tpm: int, tokens: int, max_wait_ms: int, now_ms: int | None
    ) -> tuple[bool, int, int]:
        now = self._now(now_ms)
        entries = self._log
        while entries and entries[0][0] <= now - window_ms:
            self._sum -= entries.popleft()[1]
        slot = max(now, self._until, entries[-1][0] if entries else now)
        if rpm and len(entries) >= rpm:
            slot = max(slot, entries[len(entries) - rpm][0] + window_ms)
        over = self._sum + min(tokens, tpm) - tpm if tpm else 0
        freed = 0
        for at, spent in entries if over > 0 else ():
            freed += spent
            if freed >= over:
                slot = max(slot, at + window_ms)
                break
        if slot - now > max_wait_ms:
            return False, slot, now
        entries.append((slot, tokens))
        self._sum += tokens
        return True, slot, now

    async def hold(self, ms: int, now_ms: int | None) -> None:
        self._until = max(self._until, self._now(now_ms) + ms)


class RedisPacingBackend:
    """One Lua script per upstream attempt over the budget's two `{budget}`-tagged keys."""

    def __init__(self, client: Any, budget: str) -> None:
        self._script = client.register_script(read_lua("pacing.lua"))
        self._keys = list(pacing_keys(budget))

    async def acquire(
        self, *, window_ms: int, rpm: int, tpm: int, tokens: int, max_wait_ms: int, now_ms: int | None
    ) -> tuple[bool, int, int]:
        args = [_arg(now_ms), "acquire", window_ms, rpm, tpm, tokens, max_wait_ms]
        granted, slot, now = await self._script(keys=self._keys, args=args)
        return bool(granted), int(slot), int(now)

    async def hold(self, ms: int, now_ms: int | None) -> None:
        await self._script(keys=self._keys, args=[_arg(now_ms), "hold", ms])


def _arg(now_ms: int | None) -> int | str:
    return "" if now_ms is None else now_ms


def budget_id(upstream: cfg.Upstream, key: str | None = None) -> str:
    """Names the budget of one key of `upstream` (default: its `api_key`) by upstream URL and key, without writing
    the key anywhere (a hash of both)."""
    return xxhash.xxh3_64_hexdigest(f"{upstream.url}\0{upstream.api_key if key is None else key}".encode())


class Pacer:
    """Called by the upstream client before every attempt; sleeps until the call's slot."""

    def __init__(
        self,
        limits: cfg.UpstreamLimits,
        backend: PacingBackend,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        error_backoff_s: float = 1.0,
    ) -> None:
        self.rpm = limits.requests_per_minute or 0
        self.tpm = limits.tokens_per_minute or 0
        self.window_ms = WINDOW_MS + round(limits.margin_s * 1000)
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.local = MemoryPacingBackend(clock.time if clock is not None else time.time)
        # Pacing is a courtesy to the upstream (its 429s are retried): without the store, pace per process.
        self.breaker = StoreBreaker(
            metrics, log, down=lambda: "pacing the upstream per process",
            back="pacing the upstream for the fleet again", backoff_s=lambda: error_backoff_s,
        )

    async def acquire(self, tokens: int, deadline: float) -> None:
        """Waits for the call's turn; raises UpstreamRateLimited when the turn comes after `deadline`."""
        max_wait_ms = math.floor((deadline - time.monotonic()) * 1000)
        granted, slot, now = await self._acquire(tokens, max_wait_ms)
        wait_s = (slot - now) / 1000
        if not granted:
            self.metrics.pacing_refusals.inc()
            raise UpstreamRateLimited(
                "the shared upstream key has no room for this request before its deadline",
                retry_after=math.ceil(wait_s),
            )
        self.metrics.pacing_wait_seconds.observe(wait_s)
        if wait_s > 0:
            await (self.clock.sleep(wait_s) if self.clock is not None else asyncio.sleep(wait_s))

    async def hold(self, seconds: float) -> None:
        """Keeps the whole fleet off the key for `seconds` (an upstream 429 said so)."""
        ms = math.ceil(seconds * 1000)
        try:
            await self.backend.hold(ms, self._now())
        except STORE_ERRORS as exc:
            self.breaker.failed(exc, "pacing")
        await self.local.hold(ms, self._now())

    async def _acquire(self, tokens: int, max_wait_ms: int) -> tuple[bool, int, int]:
        kwargs: dict[str, Any] = {"window_ms": self.window_ms, "rpm": self.rpm, "tpm": self.tpm, "tokens": tokens,
                                  "max_wait_ms": max_wait_ms, "now_ms": self._now()}
        if self.breaker.available():
            try:
                granted = await self.backend.acquire(**kwargs)
            except STORE_ERRORS as exc:
                self.breaker.failed(exc, "pacing")
            else:
                self.breaker.ok()
                return granted
        return await self.local.acquire(**kwargs)

    def _now(self) -> int | None:
        return None if self.clock is None else round(self.clock.time() * 1000)

