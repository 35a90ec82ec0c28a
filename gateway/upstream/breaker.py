"""A circuit breaker per upstream (per process): calls stay off an upstream that keeps failing, and one probe
call finds out when it is back."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
STATES: tuple[State, ...] = ("closed", "half_open", "open")  # the gauge's value is the index


class CircuitBreaker:
    """closed → open after `failures` consecutive failed calls; open → half-open `open_s` later, when exactly one
    probe call may go: its success closes the breaker, its failure opens it for another `open_s`."""

    def __init__(self, failures: int, open_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.open_s = open_s
        self.monotonic = monotonic
        self.state: State = "closed"
        self._streak = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go now; True in half-open state means this call is the probe."""
        if self.state == "closed":
            return True
        if self.state == "open" and self.monotonic() >= self._opened_at + self.open_s:
            self.state = "half_open"
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._streak = 0
        self._probing = False
        self.state = "closed"

    def failure(self) -> None:
        self._streak += 1
        self._probing = False
        if self.state == "half_open" or self._streak >= self.failures:
            self.state = "open"
            self._opened_at = self.monotonic()

    def abandon(self) -> None:
        """The call this breaker allowed ended without telling whether the upstream works (a client error,
        a cancelled call): a probe slot is given back."""
        self._probing = False
