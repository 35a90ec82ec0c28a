"""In-process stores: the embedded default, and the reference semantics for the Redis backend."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence


class MemoryCacheStore:
    """An LRU bounded by the bytes of its values, with per-entry expiry checked on read."""

    def __init__(self, *, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        now = self.clock()
        out: list[bytes | None] = []
        for key in keys:
            hit = self._data.get(key)
            if hit is None:
                out.append(None)
            elif hit[1] <= now:
                self._drop(key)
                out.append(None)
            else:
                self._data.move_to_end(key)
                out.append(hit[0])
        return out

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> None:
        expires = self.clock() + ttl_s
        for key, value in items:
            if len(value) > self.max_bytes:
                continue
            self._drop(key)
            self._data[key] = (value, expires)
            self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, (value, _) = self._data.popitem(last=False)
            self.bytes -= len(value)

    def _drop(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self.bytes = 0
