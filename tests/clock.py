"""A fake wall clock for quota and pacing tests: time moves only when a test moves it, never by sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime


def utc(*args: int) -> float:
    """Unix seconds of a UTC date and time: utc(2024, 2, 29, 23, 59, 59)."""
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """Returns when a driver (`run`) has moved the clock to now + `seconds`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), future))
        self._poke()
        await future

    async def run(self, tasks: Sequence[asyncio.Future[object]]) -> None:
        """Drives `tasks` to completion: whenever every unfinished task sleeps on this clock, moves the clock to
        the earliest wake-up and wakes whoever is due. Each task may sleep at most once at a time."""
        for task in tasks:
            task.add_done_callback(lambda _: self._poke())
        while not all(t.done() for t in tasks):
            self._event().clear()
            busy = sum(not t.done() for t in tasks)
            if self._sleepers and len(self._sleepers) >= busy:
                self._wake_next()
                continue
            await self._event().wait()

    def _wake_next(self) -> None:
        self.now = max(self.now, self._sleepers[0][0])
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _poke(self) -> None:
        self._event().set()
