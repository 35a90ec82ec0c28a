"""An upstream's pool of API keys: each key has its own concurrency, its own fleet-wide pacing window, and is
cooled after a 429 or ejected after a 401/403. A key is named by its id (`jina#2`), never by its secret."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UpstreamFailed, UpstreamRateLimited
from ..metrics import Metrics
from ..pacing import Pacer

log = logging.getLogger("gateway.upstream")

AUTH_FAILED = "UPSTREAM_AUTH_FAILED"  # the 502's code when every key of a pool was refused (401/403)


@dataclass(eq=False)
class ApiKey:
    id: str  # "<upstream>#<n>", n from 1: what logs and metrics name
    secret: str = field(repr=False)
    pacer: Pacer | None
    slots: int
    busy: int = 0
    cool_until: float = 0.0  # monotonic; after a 429
    ejected_until: float = 0.0  # monotonic; after a 401/403
    used: int = 0  # when this key was last given a call (a pool-wide count): ties go to the least recent

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        return headers


class AllKeysCooling(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"every key is cooling for {retry_after:.2f}s")
        self.retry_after = retry_after


class KeyPool:
    def __init__(
        self, upstream: str, keys: list[ApiKey], metrics: Metrics, *, eject_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.keys = keys
        self.metrics = metrics
        self.eject_s = eject_s
        self.monotonic = monotonic
        self._freed = asyncio.Event()
        self._turn = 0
        for key in keys:  # every series from the start, so a dashboard rate() sees 0, not nothing
            for series in (metrics.upstream_key_cooldowns, metrics.upstream_key_ejections, metrics.upstream_key_tokens):
                metrics.child(series, upstream, key.id)

    async def acquire(self, tokens: int, deadline: float) -> ApiKey:
        """A key with a free slot and pacing room, the least busy first; waits for a slot while every usable key
        is busy. Raises UpstreamFailed(AUTH_FAILED) when every key is ejected, AllKeysCooling when every usable one
        is cooling, UpstreamRateLimited when no key's pacing has room before `deadline`."""
        refused: set[int] = set()
        limited: UpstreamRateLimited | None = None
        while True:
            key = self._pick(refused)
            if key is None:
                if limited is not None and len(refused) == len(self._usable()):
                    raise limited
                self._freed.clear()
                await self._freed.wait()
                continue
            key.busy += 1
            self._turn += 1
            key.used = self._turn
            try:
                if key.pacer is not None:
                    await key.pacer.acquire(tokens, deadline)
            except UpstreamRateLimited as exc:
                self.release(key)
                refused.add(id(key))
                if limited is None or _wait(exc) < _wait(limited):
                    limited = exc  # the key whose turn comes first says when to come back
                continue
            except BaseException:
                self.release(key)
                raise
            return key

    def release(self, key: ApiKey) -> None:
        key.busy -= 1
        self._freed.set()

    def _usable(self) -> list[ApiKey]:
        now = self.monotonic()
        usable = [k for k in self.keys if k.ejected_until <= now]
        if not usable:
            raise UpstreamFailed(f"every key of upstream {self.upstream!r} was refused by it", code=AUTH_FAILED)
        warm = [k for k in usable if k.cool_until <= now]
        if not warm:
            raise AllKeysCooling(min(k.cool_until for k in usable) - now)
        return warm

    def _pick(self, refused: set[int]) -> ApiKey | None:
        free = [k for k in self._usable() if k.busy < k.slots and id(k) not in refused]
        return min(free, key=lambda k: (k.busy, k.used)) if free else None

    async def cool(self, key: ApiKey, seconds: float) -> None:
        """An upstream 429 for `key`: no call on it for `seconds` here, nor (through its pacer) on any replica.
        A key alone in its pool is not cooled here: the call's own retry waits the `Retry-After`, and other calls
        try their luck (as they would with no pool at all)."""
        if len(self.keys) > 1:
            key.cool_until = max(key.cool_until, self.monotonic() + seconds)
        self.metrics.child(self.metrics.upstream_key_cooldowns, self.upstream, key.id).inc()
        if key.pacer is not None:
            await key.pacer.hold(seconds)
        self._freed.set()

    def eject(self, key: ApiKey, status: int) -> None:
        key.ejected_until = self.monotonic() + self.eject_s
        self.metrics.child(self.metrics.upstream_key_ejections, self.upstream, key.id).inc()
        log.error("upstream %s refused key %s (HTTP %d): left out for %ds", self.upstream, key.id, status,
                  math.ceil(self.eject_s))
        self._freed.set()

    def warm(self) -> bool:
        """Whether a key is neither ejected nor cooling now."""
        now = self.monotonic()
        return any(k.ejected_until <= now and k.cool_until <= now for k in self.keys)

    @property
    def ejected(self) -> int:
        now = self.monotonic()
        return sum(1 for k in self.keys if k.ejected_until > now)


def _wait(exc: UpstreamRateLimited) -> int:
    return int(exc.headers["Retry-After"])
