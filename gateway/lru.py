"""The one byte-bounded LRU of the gateway: the in-process cache tier and the parse memo both use it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """A map that forgets its least recently used items when the bytes they cost pass `max_bytes`.

    Each `put` names the item's cost (what holding it takes from the process, overheads included); `grow` adds
    to it when a held value takes more (a rendering kept beside a vector). An item costlier than the whole bound
    is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        held = self._data.get(key)
        if held is None:
            return None
        self._data.move_to_end(key)
        return held[0]

    def peek(self, key: K) -> V | None:
        """`get` without making it a use."""
        held = self._data.get(key)
        return None if held is None else held[0]

    def get_many(self, keys: Sequence[K]) -> list[V | None]:
        """`get` of each key, in order (a use of each found key)."""
        data, move = self._data, self._data.move_to_end
        out: list[V | None] = []
        for key in keys:
            held = data.get(key)
            if held is None:
                out.append(None)
            else:
                move(key)
                out.append(held[0])
        return out

    def put(self, key: K, value: V, cost: int) -> bool:
        """Keeps `value` under `key` (replacing what was there); False when it costs more than the bound."""
        self.pop(key)
        if cost > self.max_bytes:
            return False
        self._data[key] = (value, cost)
        self.bytes += cost
        self._shrink()
        return True

    def grow(self, key: K, extra: int) -> None:
        """`key`'s value now costs `extra` bytes more (it is used, and may push older items out)."""
        held = self._data.get(key)
        if held is None:
            return
        self._data[key] = (held[0], held[1] + extra)
        self._data.move_to_end(key)
        self.bytes += extra
        self._shrink()

    def pop(self, key: K) -> V | None:
        held = self._data.pop(key, None)
        if held is None:
            return None
        self.bytes -= held[1]
        return held[0]

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0

    def _shrink(self) -> None:
        while self.bytes > self.max_bytes and self._data:
            _, (_, cost) = self._data.popitem(last=False)
            self.bytes -= cost
