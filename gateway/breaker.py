"""What quota and pacing do when the shared state store fails: count the error, skip the store for a backoff
period (so an outage costs one timeout per period, not one per request), and log the outage once when it starts
and once when the store answers again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .metrics import Metrics


class StoreBreaker:
    def __init__(
        self, metrics: Metrics, log: logging.Logger, *, down: Callable[[], str], back: str,
        backoff_s: Callable[[], float], monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`down()` and `back` end the two log lines (what the caller does meanwhile, and again); `down` and
        `backoff_s` are read at each failure, so a reloaded setting applies from the next one."""
        self.metrics = metrics
        self.log = log
        self.down_msg = down
        self.back_msg = back
        self.backoff_s = backoff_s
        self.monotonic = monotonic
        self.down = False
        self._retry_at = 0.0

    def available(self) -> bool:
        """False while backing off after a failure."""
        return self.monotonic() >= self._retry_at

    def failed(self, exc: BaseException, op: str) -> None:
        self.metrics.store_errors.labels("state", op).inc()
        self._retry_at = self.monotonic() + self.backoff_s()
        if not self.down:
            self.down = True
            self.log.warning("state store unreachable (%s: %s); %s", type(exc).__name__, exc, self.down_msg())

    def ok(self) -> None:
        if self.down:
            self.down = False
            self.log.warning("state store reachable again; %s", self.back_msg)
