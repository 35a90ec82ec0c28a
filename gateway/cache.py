"""The per-input embedding cache: content keys, and one lookup through two tiers: the in-process tier (decoded
entries and their renderings) and, behind it, the shared store (Redis) when one is configured. With
`cache.url: memory://` the in-process tier is the whole cache.

Store errors are logged, counted and bypassed, never raised: losing the cache costs money, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from .codec import Entry, decode, encode_entry
from .lru import ByteLRU
from .protocol import EmbeddingRequest, Item, canonical_item
from .store import CacheStore

log = logging.getLogger("gateway.cache")


# ---- keys ------------------------------------------------------------------------------------------------


def key_prefix(request: EmbeddingRequest, team: str | None, namespace: bytes = b"") -> bytes:
    """The part of every key shared by a request's items: canonical params, the team when scoped, and last the
    cache namespace's `namespace_part` (b"" for the shared namespace)."""
    team_part = b"" if team is None else team.encode()
    return request.canonical_params + b"\x00" + team_part + b"\x00" + namespace


def namespace_part(name: str | None) -> bytes:
    """What an upstream's `cache_namespace` adds to its keys' prefix; None adds nothing, so keys stay as they were
    before namespaces. Tagged `n`, which no item's canonical form starts with (s, t, o, `unit`)."""
    return b"" if name is None else b"n" + name.encode() + b"\x00"


def renamespaced(prefix: bytes, old: bytes, new: bytes) -> bytes:
    """`prefix` (from `key_prefix` with namespace part `old`) with namespace part `new` instead."""
    return prefix[: len(prefix) - len(old)] + new


def request_keys(request: EmbeddingRequest, prefix: bytes) -> list[bytes]:
    """`item_keys` of the request's items, made once per request and prefix and kept with the request."""
    keys = request.keys.get(prefix)
    if keys is None:
        keys = request.keys[prefix] = item_keys(prefix, request.items)
    return keys


def item_keys(prefix: bytes, items: Sequence[Item]) -> list[bytes]:
    """xxh3-128 of prefix + canonical item, one call per item (the same digest as hashing the two parts in
    a stream, without a hasher object per item); text items skip `canonical_item`'s call."""
    text_prefix = prefix + b"s"
    return [
        _digest(text_prefix + item.encode("utf-8", "surrogatepass")) if type(item) is str
        else _digest(prefix + canonical_item(item))
        for item in items
    ]


_digest = xxhash.xxh3_128_digest


def unit_key(prefix: bytes, items: Sequence[Item]) -> bytes:
    """One key over the ordered list (length-prefixed so item boundaries are unambiguous)."""
    h = xxhash.xxh3_128(prefix + b"unit\x00")
    for item in items:
        c = canonical_item(item)
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.digest()


# ---- the in-process tier -------------------------------------------------------------------------------


@dataclass(slots=True)
class Held:
    """One key's entry as the in-process tier holds it, with its `embedding` JSON per output format."""

    key: bytes
    entry: Entry
    expires: float
    renderings: dict[str, bytes] = field(default_factory=dict)


# What holding one entry costs the process beyond its vectors' bytes and its key's length: the key object,
# the LRU's node and tuple, `Held`, `Entry`, the renderings dict and one array header (tests/test_cache.py
# checks it against tracemalloc).
ENTRY_OVERHEAD = 500
# What the allocators add per entry beyond what its objects request, under the tier's churn (process RSS against
# the counted bytes, bench/memory_bound.py): small entries pay it in full.
ALLOCATOR_OVERHEAD = 400
ARRAY_OVERHEAD = 112  # each further array of a unit
RENDERING_OVERHEAD = 40  # a rendering's bytes object and its dict slot, beyond its length
RENDERINGS_TABLE = 110  # the entry's renderings dict growing to hold its first


class LocalTier:
    """Decoded entries by key in a byte-bounded LRU, each kept at most `ttl_s`. The bound counts what an entry
    really costs the process (see ENTRY_OVERHEAD), renderings included, so it bounds the process's memory."""

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.lru: ByteLRU[bytes, Held] = ByteLRU(max_bytes)

    def get_many(self, keys: Sequence[bytes], *, promote: bool = True) -> list[Held | None]:
        """What the tier holds of `keys` (None for the rest); `promote=False` leaves the LRU order as it is."""
        found = self.lru.get_many(keys) if promote else [self.lru.peek(k) for k in keys]
        now = self.clock()
        for i, held in enumerate(found):
            if held is not None and held.expires <= now:
                self.lru.pop(held.key)
                found[i] = None
        return found

    def put(self, key: bytes, entry: Entry) -> Held:
        """Keeps `entry` (as arrays of its own, so a view never pins a whole upstream batch)."""
        entry, cost = _owned(entry)
        held = Held(key, entry, self.clock() + self.ttl_s)
        self.lru.put(key, held, ENTRY_OVERHEAD + ALLOCATOR_OVERHEAD + len(key) + cost)
        return held

    def keep_rendering(self, held: Held, output: str, rendering: bytes) -> None:
        # Kept as a copy of its own size: orjson's outputs keep a 4 KB allocation however short they are.
        rendering = bytes(memoryview(rendering))
        first = not held.renderings
        held.renderings[output] = rendering
        if self.lru.peek(held.key) is held:  # counted only while the tier holds this very record
            self.lru.grow(held.key, RENDERING_OVERHEAD + len(rendering) + (RENDERINGS_TABLE if first else 0))

    @property
    def bytes(self) -> int:
        return self.lru.bytes

    def __len__(self) -> int:
        return len(self.lru)


def _owned(entry: Entry) -> tuple[Entry, int]:
    """`entry` with every array owning its data, and the bytes those arrays take beyond the first header."""
    vectors = entry.vectors
    if isinstance(vectors, list):
        owned = [v if v.flags.owndata else v.copy() for v in vectors]
        cost = sum(v.nbytes for v in owned) + ARRAY_OVERHEAD * (len(owned) - 1)
        return (entry if all(a is b for a, b in zip(owned, vectors, strict=True)) else Entry(owned, entry.tokens)), cost
    if vectors.flags.owndata:
        return entry, vectors.nbytes
    return Entry(vectors.copy(), entry.tokens), vectors.nbytes


# ---- the cache -----------------------------------------------------------------------------------------


# Reads asked for in the same event-loop turn share one MGET, sent early once it holds this many keys.
MAX_KEYS_PER_READ = 1024


class EmbeddingCache:
    """Lookups through the in-process tier, then the store; writes to both.

    Store reads asked for during one event-loop turn (concurrent requests' misses of the in-process tier) go out
    together as one read at the turn's end: one round trip and one client call instead of one per request.

    After a store connection error, or once the store has answered nothing for a whole `error_backoff_s`, the
    store is skipped for `error_backoff_s`, so an outage costs one failed call per period instead of one per
    request; a timed-out command alone fails only the lookups that waited on it.
    """

    def __init__(
        self,
        store: CacheStore | None,
        *,
        ttl_s: int,
        local_max_bytes: int,
        error_backoff_s: float = 1.0,
        on_error: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.on_error = on_error
        self.ttl_s = ttl_s
        self.error_backoff_s = error_backoff_s
        self.errors = 0
        self._skip_until = 0.0
        self._answered_at = time.monotonic()  # when the store last answered a command
        self.local = LocalTier(local_max_bytes, ttl_s, clock)
        self._reads: list[tuple[Sequence[bytes], asyncio.Future[list[bytes | None]]]] = []  # this turn's
        self._read_keys = 0
        self._sending: set[asyncio.Task[None]] = set()

    async def get_many(self, keys: Sequence[bytes], *, promote: bool = True) -> list[Held | None]:
        """Each key's entry or None. `promote=False` (batch jobs) leaves the in-process tier as it is: a
        50,000-line re-index must not push interactive traffic's entries out."""
        found = self.local.get_many(keys, promote=promote)
        if self.store is None or None not in found:
            return found
        cold = [i for i, held in enumerate(found) if held is None]
        raws = await self._fetch([keys[i] for i in cold])
        for i, raw in zip(cold, raws, strict=True):
            entry = self._decode(raw)
            if entry is not None:
                found[i] = self.local.put(keys[i], entry) if promote else Held(keys[i], entry, 0.0)
        return found

    def keep(self, items: Sequence[tuple[bytes, Entry]], *, promote: bool = True) -> None:
        """The in-process half of `put_many`, done at once: callers woken after it find their entries in the tier."""
        if promote or self.store is None:
            for key, entry in items:
                self.local.put(key, entry)

    async def put_many(
        self, items: Sequence[tuple[bytes, Entry]], *, promote: bool = True, kept: bool = False
    ) -> None:
        """Keeps fresh upstream answers: in the in-process tier (always when it is the whole cache; `kept` when
        `keep` already did) and in the store."""
        if not kept:
            self.keep(items, promote=promote)
        if self.store is None or not items or not self._available():
            return
        writes = [(key, encode_entry(entry)) for key, entry in items]
        try:
            await self.store.set_many(writes, self.ttl_s)
        except Exception as exc:
            self._failed("set", exc)
            return
        self._answered()

    def held(self, key: bytes, entry: Entry) -> Held:
        """`entry`, just answered for `key`, as the in-process tier holds it when it does: a rendering made for this
        answer is then kept for the next hit instead of being made again."""
        held = self.local.lru.peek(key)
        return held if held is not None and held.entry.tokens == entry.tokens else Held(key, entry, 0.0)

    def renderings(self, found: Sequence[Held], output: str, render: Callable[[np.ndarray, str], bytes]) -> list[bytes]:
        """Each entry's `embedding` JSON in `output`, made by `render` once per entry and format, then kept."""
        out = [held.renderings.get(output) for held in found]
        if None in out:
            for i, held in enumerate(found):
                if out[i] is None:
                    made = render(held.entry.vectors, output)  # type: ignore[arg-type]  # items are 1-D or 2-D
                    self.local.keep_rendering(held, output, made)
                    out[i] = made
        return out  # type: ignore[return-value]  # no None is left

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _answered(self) -> None:
        self._answered_at = time.monotonic()

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(op)
        now = time.monotonic()
        # A timeout is one slow command and fails only its callers; a store that refuses us, or has answered
        # nothing for a whole backoff period (a dead host), is bypassed so an outage is not paid per request.
        if isinstance(exc, TimeoutError) and now - self._answered_at < self.error_backoff_s:
            log.warning("cache %s timed out: %r", op, exc)
            return
        self._skip_until = now + self.error_backoff_s
        log.warning("cache %s failed, bypassing the cache for %.1fs: %r", op, self.error_backoff_s, exc)

    async def _fetch(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys or self.store is None or not self._available():
            return [None] * len(keys)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[list[bytes | None]] = loop.create_future()
        self._reads.append((keys, reply))
        self._read_keys += len(keys)
        if self._read_keys >= MAX_KEYS_PER_READ:
            self._send_reads()
        elif len(self._reads) == 1:
            loop.call_soon(self._send_reads)
        return await reply

    def _send_reads(self) -> None:
        reads, self._reads, self._read_keys = self._reads, [], 0
        if reads and self.store is not None:
            task = asyncio.ensure_future(self._read(self.store, reads))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _read(
        self, store: CacheStore, reads: list[tuple[Sequence[bytes], asyncio.Future[list[bytes | None]]]]
    ) -> None:
        """One store read for the keys of `reads`; each caller gets its own slice, or Nones when the read failed."""
        keys = [key for asked, _ in reads for key in asked]
        raws: list[bytes | None] = [None] * len(keys)
        try:
            raws = await store.get_many(keys)
            self._answered()
        except Exception as exc:
            self._failed("get", exc)
        finally:  # cancelled too (shutdown): no caller is left waiting
            start = 0
            for asked, reply in reads:
                if not reply.done():  # a caller that went away has a cancelled reply
                    reply.set_result(raws[start:start + len(asked)])
                start += len(asked)

    def _decode(self, raw: bytes | None) -> Entry | None:
        if raw is None:
            return None
        try:
            return decode(raw)
        except (ValueError, struct.error, zlib.error):
            log.warning("dropping an undecodable cache entry of %d bytes", len(raw))
            return None
