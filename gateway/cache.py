"""The per-input embedding cache: content keys, the binary entry codec, and store access that never fails
a request.

An entry is a few header bytes + the float32 vector. The float's top byte (sign and high exponent bits) is
highly redundant in embeddings, so it is deflated as one plane when that saves space; the three low bytes
stay raw. A 1024-dim vector takes ~3.5 KB instead of 4 KB, which also keeps it under Redis's 4 KB jemalloc
size class. Entries are immutable and content-addressed, so there is nothing to invalidate.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from .protocol import (
    END,
    EmbeddingRequest,
    Item,
    canonical_item,
    render_fragment,
    render_items,
    render_parts,
    render_solo,
)
from .store import CacheStore

log = logging.getLogger("gateway.cache")

VERSION = 1
# version, flags, rows (0 = one vector; n = n rows of a multivector / n vectors of a unit), tokens
_HEADER = struct.Struct("<BBHI")
_FLAG_PLANE = 1  # top byte plane deflated
_FLAG_UNIT = 2  # a list of vectors (late chunking / multivector unit), rows = how many
_UNIT_SHAPE = struct.Struct("<HH")  # per vector of a unit: rows (0 = 1-D), dim


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer: a vector (1-D), a multivector (2-D), or a unit (list of arrays), and its tokens."""

    vectors: np.ndarray | list[np.ndarray]
    tokens: int


# ---- keys ------------------------------------------------------------------------------------------------


def key_prefix(request: EmbeddingRequest, team: str | None) -> bytes:
    """The part of every key shared by a request's items: canonical params, and the team when scoped."""
    team_part = b"" if team is None else team.encode()
    return request.canonical_params + b"\x00" + team_part + b"\x00"


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


# ---- codec -----------------------------------------------------------------------------------------------


def encode(vec: np.ndarray, tokens: int, *, compact: bool = True) -> bytes:
    """`compact=False` keeps the floats raw: ~15% larger, ~10x faster to write (`decode` reads both)."""
    arr = np.ascontiguousarray(vec, dtype="<f4")
    rows = arr.shape[0] if arr.ndim == 2 else 0
    payload, flags = _pack_floats(arr.reshape(-1)) if compact else (arr.tobytes(), 0)
    return _HEADER.pack(VERSION, flags, rows, tokens) + payload


def encode_unit(vectors: Sequence[np.ndarray], tokens: int) -> bytes:
    shapes = b"".join(
        _UNIT_SHAPE.pack(v.shape[0] if v.ndim == 2 else 0, v.shape[-1]) for v in vectors
    )
    flat = np.concatenate([np.asarray(v, dtype="<f4").reshape(-1) for v in vectors])
    payload, flags = _pack_floats(flat)
    return _HEADER.pack(VERSION, flags | _FLAG_UNIT, len(vectors), tokens) + shapes + payload


def decode(raw: bytes) -> Entry:
    version, flags, rows, tokens = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise ValueError(f"cache entry version {version}")
    offset = _HEADER.size
    if flags & _FLAG_UNIT:
        shapes = [_UNIT_SHAPE.unpack_from(raw, offset + i * _UNIT_SHAPE.size) for i in range(rows)]
        offset += rows * _UNIT_SHAPE.size
        flat = _unpack_floats(memoryview(raw)[offset:], flags)
        if flat.size != sum(max(r, 1) * dim for r, dim in shapes):
            raise ValueError("cache entry unit of the wrong size")
        if not shapes or any(dim == 0 for _, dim in shapes):  # serving it would answer with an empty embedding
            raise ValueError("cache entry unit with an empty vector")
        return Entry(vectors=_split_unit(flat, shapes), tokens=tokens)
    flat = _unpack_floats(memoryview(raw)[offset:], flags)
    if not flat.size:  # a bare header: serving it would answer with an empty embedding
        raise ValueError("cache entry without a vector")
    return Entry(vectors=flat.reshape(rows, -1) if rows else flat, tokens=tokens)


def _split_unit(flat: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    out, pos = [], 0
    for rows, dim in shapes:
        n = max(rows, 1) * dim
        part = flat[pos : pos + n]
        out.append(part.reshape(rows, dim) if rows else part)
        pos += n
    return out


def _pack_floats(flat: np.ndarray) -> tuple[bytes, int]:
    planes = flat.view(np.uint8).reshape(-1, 4)
    # Huffman coding alone: the plane holds a dozen distinct bytes with no long repeats to find, so skipping
    # the match search is both faster and ~20% smaller than deflate level 1. Raw deflate either way.
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    top = deflate.compress(planes[:, 3].tobytes()) + deflate.flush()
    if len(top) + 2 >= flat.size:  # incompressible: raw is smaller and faster
        return flat.tobytes(), 0
    low = planes[:, :3].tobytes()
    return len(top).to_bytes(2, "little") + top + low, _FLAG_PLANE


def _unpack_floats(buf: memoryview, flags: int) -> np.ndarray:
    if not flags & _FLAG_PLANE:
        return np.frombuffer(buf, dtype="<f4")
    size = int.from_bytes(buf[:2], "little")
    top = np.frombuffer(zlib.decompress(buf[2 : 2 + size], wbits=-15), dtype=np.uint8)
    out = np.empty((top.size, 4), dtype=np.uint8)
    out[:, :3] = np.frombuffer(buf[2 + size :], dtype=np.uint8).reshape(-1, 3)
    out[:, 3] = top
    return out.reshape(-1).view("<f4")


# ---- the cache -------------------------------------------------------------------------------------------


class HotCache:
    """A bounded in-process LRU of decoded entries, and of their rendered JSON per output format, in front of
    a shared store: a hot input costs no store round trip, no decode and no re-rendering.

    Entries are immutable and content-addressed, so nothing here is ever invalidated. The bound counts each
    vector's bytes, each memoised rendering's bytes and a fixed per-entry overhead.

    Renderings live in tables of their own, one per output format, beside the LRU: key → the input's item
    after its opener (its `embedding` JSON and the closing `}`), and key → the JSON before that in an answer
    to that input alone. A many-input answer looks its items up with one `map` over one dict and puts each
    after its opener; a single-input answer is those two and a constant end. The pieces are bytes, never
    views: the transport takes bytes as they are, where each view would cost it two new objects.

    An exact repeat (a memo's `Replay`, named by its serial) goes one step further: its answer's list of
    pieces and their length are kept once assembled, so the repeat costs one lookup and the LRU moves. On
    the bench (32 base64 inputs) that took the gateway from ~380k to ~300k instructions per request.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._data: OrderedDict[bytes, _Hot] = OrderedDict()
        self._heads: dict[str, dict[bytes, bytes]] = {}  # output → key → the answer to the key alone, up to...
        self._items: dict[str, dict[bytes, bytes]] = {}  # ...output → key → its `embedding` JSON + `}`
        # serial → an answer's pieces and length, assembled from the tables above (`assemble`). Valid while no
        # entry has left: renderings are only ever added, so until an eviction the same keys give the same
        # pieces. Emptied at every eviction, which also keeps it from holding bytes the bound no longer counts.
        self._assembled: dict[int, tuple[list[bytes], int]] = {}
        self._assembled_bytes = 0
        self.max_assembled_bytes = max(64 * 1024, max_bytes // 16)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Entry | None:
        hot = self._data.get(key)
        if hot is None:
            return None
        self._data.move_to_end(key)
        return hot.entry

    def get_many(self, keys: Sequence[bytes]) -> list[Entry | None]:
        data = self._data
        if len(keys) == 1:  # the most common request: one input
            hot = data.get(keys[0])
            if hot is None:
                return [None]
            data.move_to_end(keys[0])
            return [hot.entry]
        move = data.move_to_end
        out: list[Entry | None] = []
        for key in keys:  # inlined get(): this runs per input of every request
            hot = data.get(key)
            if hot is None:
                out.append(None)
            else:
                move(key)
                out.append(hot.entry)
        return out

    def put(self, key: bytes, entry: Entry) -> None:
        if key in self._data:
            return
        vectors = entry.vectors if isinstance(entry.vectors, list) else [entry.vectors]
        cost = _HOT_OVERHEAD + sum(v.nbytes for v in vectors)
        if cost > self.max_bytes:
            return
        self._data[key] = _Hot(key, entry, (), cost)
        self.bytes += cost
        self._shrink()

    def solo(self, key: bytes, output: str) -> list[bytes] | None:
        """The memoised answer to a request of this one input in `output`, in pieces (a use of the key)."""
        heads = self._heads.get(output)
        head = None if heads is None else heads.get(key)
        if head is None:
            return None
        self._data.move_to_end(key)
        return [head, self._items[output][key], END]

    def items(self, keys: Sequence[bytes], output: str) -> tuple[list[bytes | None], int]:
        """Each key's memoised item (`embedding` JSON and `}`) or None, and how many are None; the found keys
        are used."""
        table = self._items.get(output)
        if table is None:
            return [None] * len(keys), len(keys)
        found = list(map(table.get, keys))
        # Both passes in C. Comparing bytes with None is settled in C (a view would raise and clear a TypeError).
        missing = found.count(None)
        if not missing:
            deque(map(self._data.move_to_end, keys), maxlen=0)  # every key used
            return found, 0
        move = self._data.move_to_end
        for key, item in zip(keys, found, strict=True):
            if item is not None:
                move(key)
        return found, missing

    def canonical(self, keys: Sequence[bytes]) -> tuple[bytes, ...]:
        """`keys`, each replaced by the equal object this tier is keyed by where it holds one. A lookup of that
        very object is settled by identity, where an equal copy costs a byte comparison per lookup."""
        data = self._data
        return tuple([hot.key if (hot := data.get(key)) is not None else key for key in keys])

    def assembled(self, serial: int, keys: Sequence[bytes]) -> tuple[list[bytes], int] | None:
        """The pieces and length `assemble` kept for `serial` (its keys are used), or None."""
        done = self._assembled.get(serial)
        if done is None:
            return None
        # Each key is used; all are resident, since none has left since.
        if len(keys) == 1:  # the most common request: one input
            self._data.move_to_end(keys[0])
        else:
            deque(map(self._data.move_to_end, keys), maxlen=0)
        return done

    def assemble(self, serial: int, pieces: list[bytes]) -> tuple[list[bytes], int]:
        """Keeps an answer's `pieces` (made of this tier's renderings alone) under `serial`, with their length.
        Bounded by the list's own bytes (the pieces are the tables'); at the bound, what was kept goes."""
        done = (pieces, sum(map(len, pieces)))
        cost = _ASSEMBLED_OVERHEAD + 8 * len(pieces)
        if self._assembled_bytes + cost > self.max_assembled_bytes:
            self._assembled.clear()
            self._assembled_bytes = 0
            if cost > self.max_assembled_bytes:
                return done
        self._assembled[serial] = done
        self._assembled_bytes += cost
        return done

    def remember(self, key: bytes, output: str, head: bytes, item: bytes) -> None:
        """Keeps `key`'s rendering in `output`: its item, and what comes before it in an answer to `key` alone
        (`render_solo`'s first two pieces). An entry no longer resident is not brought back."""
        hot = self._data.get(key)
        if hot is None or output in hot.outputs:
            return
        self._data.move_to_end(key)
        self._heads.setdefault(output, {})[key] = head
        self._items.setdefault(output, {})[key] = item
        hot.outputs += (output,)
        cost = len(head) + len(item) + _VIEW_OVERHEAD
        hot.cost += cost
        self.bytes += cost
        self._shrink()

    def clear(self) -> None:
        self._data.clear()
        self._heads.clear()
        self._items.clear()
        self._forget_assembled()
        self.bytes = 0

    def _forget_assembled(self) -> None:
        self._assembled.clear()
        self._assembled_bytes = 0

    def _shrink(self) -> None:
        if self.bytes > self.max_bytes and self._assembled:
            self._forget_assembled()
        while self.bytes > self.max_bytes and self._data:
            key, old = self._data.popitem(last=False)
            self.bytes -= old.cost
            for output in old.outputs:
                del self._heads[output][key]
                del self._items[output][key]


@dataclass(slots=True)
class _Hot:
    key: bytes  # the very object the tables are keyed by (`HotCache.canonical`)
    entry: Entry
    # The output formats it has a memoised rendering in (`HotCache._heads` / `_items` hold them).
    outputs: tuple[str, ...]
    cost: int


# Bytes a hot entry costs beyond its vectors: the key, the record, the dict slot and the array header.
_HOT_OVERHEAD = 400
_VIEW_OVERHEAD = 200  # a rendering's two bytes objects and their table slots
_ASSEMBLED_OVERHEAD = 200  # an assembled answer's list, tuple, length and dict slot, beyond 8 B per piece


class EmbeddingCache:
    """get_many/set_many over a store; store errors are logged, counted and bypassed, never raised.

    After an error the store is skipped for `error_backoff_s`, so an outage costs one timeout per backoff
    period instead of one per request, and caching resumes by itself when the store is back. With
    `hot_max_bytes`, a `HotCache` answers hot keys first (and keeps answering them while the store is down).
    """

    def __init__(
        self,
        store: CacheStore,
        *,
        ttl_s: int,
        error_backoff_s: float = 1.0,
        on_error: Callable[[str], None] | None = None,
        hot_max_bytes: int = 0,
    ) -> None:
        self.store = store
        self.on_error = on_error
        self.ttl_s = ttl_s
        self.error_backoff_s = error_backoff_s
        self.errors = 0
        self._skip_until = 0.0
        self.hot = HotCache(hot_max_bytes) if hot_max_bytes > 0 else None

    def _available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        self._skip_until = time.monotonic() + self.error_backoff_s
        if self.on_error is not None:
            self.on_error(op)
        log.warning("cache %s failed, bypassing the cache for %.1fs: %r", op, self.error_backoff_s, exc)

    async def get_many(self, keys: Sequence[bytes], *, promote: bool = True) -> list[Entry | None]:
        """`promote=False` (batch jobs) reads the hot tier but leaves it as it is: a 50,000-line re-index must
        not push interactive traffic's hot entries out."""
        return await self.get_cold(keys, self.get_hot(keys), promote=promote)

    def get_hot(self, keys: Sequence[bytes]) -> list[Entry | None]:
        """What the hot tier holds of `keys` (None for the rest), without an await."""
        return [None] * len(keys) if self.hot is None else self.hot.get_many(keys)

    async def get_cold(
        self, keys: Sequence[bytes], hot: list[Entry | None], *, promote: bool = True
    ) -> list[Entry | None]:
        """Fills the Nones of `get_hot`'s answer from the store (in place; returned)."""
        cold = [i for i, entry in enumerate(hot) if entry is None]
        if not cold:
            return hot
        fetched = await self._fetch([keys[i] for i in cold])
        for i, entry in zip(cold, fetched, strict=True):
            if entry is not None:
                hot[i] = entry
                if promote and self.hot is not None:
                    self.hot.put(keys[i], entry)
        return hot

    async def _fetch(self, keys: Sequence[bytes]) -> list[Entry | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            raws = await self.store.get_many(keys)
        except Exception as exc:
            self._failed("get", exc)
            return [None] * len(keys)
        return [self._decode(raw) for raw in raws]

    def _decode(self, raw: bytes | None) -> Entry | None:
        if raw is None:
            return None
        try:
            return decode(raw)
        except (ValueError, struct.error, zlib.error):
            log.warning("dropping an undecodable cache entry of %d bytes", len(raw))
            return None

    async def set_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items or not self._available():
            return
        try:
            await self.store.set_many(items, self.ttl_s)
        except Exception as exc:
            self._failed("set", exc)

    def answer(
        self, model: str, tokens: int, keys: Sequence[bytes], vectors: Sequence[np.ndarray],
        item_tokens: Sequence[int], output: str,
    ) -> list[bytes]:
        """The response body for `vectors`, as pieces to send in order (keys[i] and item_tokens[i] are
        vectors[i]'s; a unit has no keys). A hot entry's rendering is made once per output format and reused."""
        hot = self.hot
        if hot is None or len(keys) != len(vectors):
            return render_parts(model, tokens, [render_fragment(vec, output) for vec in vectors])
        if len(keys) == 1:
            solo = hot.solo(keys[0], output)
            return solo if solo is not None else list(self._memoise(hot, keys[0], vectors[0], model, tokens, output))
        items, missing = hot.items(keys, output)
        if missing:
            for i, memoised in enumerate(items):
                if memoised is None:
                    items[i] = self._memoise(hot, keys[i], vectors[i], model, item_tokens[i], output)[1]
        return render_items(model, tokens, items)  # type: ignore[arg-type]  # no None is left

    @staticmethod
    def _memoise(
        hot: HotCache, key: bytes, vec: np.ndarray, model: str, tokens: int, output: str
    ) -> tuple[bytes, bytes, bytes]:
        """Renders `vec` alone and keeps it in the hot tier; returns the answer to it alone, in three pieces."""
        solo = render_solo(model, tokens, render_fragment(vec, output))
        hot.remember(key, output, solo[0], solo[1])
        return solo

    def canonical(self, keys: Sequence[bytes]) -> tuple[bytes, ...]:
        """`keys` as the hot tier holds them (`HotCache.canonical`): what a kept `Replay` should look up."""
        return tuple(keys) if self.hot is None else self.hot.canonical(keys)

    def hot_answer(
        self, serial: int, model: str, tokens: int, keys: Sequence[bytes], output: str
    ) -> tuple[list[bytes], int] | None:
        """The response body's pieces and their length, from memoised renderings alone, or None when one of
        them is no longer hot. `serial` names the (model, tokens, keys, output) asked (a memo's `Replay`): the
        pieces are assembled once and kept for as long as no hot entry leaves (`HotCache.assembled`)."""
        hot = self.hot
        if hot is None:
            return None
        done = hot.assembled(serial, keys)
        if done is not None:
            return done
        if len(keys) == 1:
            pieces = hot.solo(keys[0], output)
        else:
            items, missing = hot.items(keys, output)
            pieces = None if missing else render_items(model, tokens, items)  # type: ignore[arg-type]  # no None
        return None if pieces is None else hot.assemble(serial, pieces)
