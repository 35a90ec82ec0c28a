"""In front of the hot tier: exact repeats of an all-hit `/v1/embeddings` request, by body.

A request's body fixes its model, parameters and inputs, hence its cache keys; the entries behind those keys
are immutable and content-addressed. So an all-hit answer is a pure function of the body (and of the team,
when the cache is scoped by team). Kept here are the body's keys and the figures of its answer: a repeat
costs one dict lookup instead of a JSON decode, validation and a hash per input, then its answer comes from
the hot tier's memoised renderings (`EmbeddingCache.hot_answer`), assembled once per kept body. The same
query asked again (search boxes, retries, re-run pipelines) is the common case of an embedding gateway's
traffic.

What depends on the caller rather than the body (authentication, the team's model list and input limit,
quotas, usage, metrics, the access log) is still done per request, from the figures kept with the answer.
Only answers that needed no upstream call are kept, and the memo is emptied when the config is reloaded (a
reload may change what a body is allowed to ask).
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

_serials = itertools.count()


@dataclass(frozen=True, slots=True)
class Replay:
    """An all-hit answer and the figures of how it was served (what `Outcome` would say of it)."""

    model: str
    inputs: int  # inputs in the request, repeats included
    hits: int  # distinct inputs
    duplicates: int
    tokens: int  # usage reported: every input's tokens
    cached_tokens: int  # the distinct inputs' tokens (nothing was paid for)
    keys: tuple[bytes, ...]  # each input's cache key, in order
    output: str
    # Names this replay's assembled answer in the hot tier (`HotCache.assembled`): unique in the process,
    # unlike id(), which a later object may reuse.
    serial: int = field(default_factory=_serials.__next__, compare=False)
    # What the access log says of it, as `handlers._embed` would have said it: one update per repeat.
    log_fields: dict[str, object] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_fields", _log_fields(self.model, self.inputs, self.hits))


@functools.lru_cache(maxsize=1024)
def _log_fields(model: str, inputs: int, hits: int) -> dict[str, object]:
    """Shared by every `Replay` with these figures (read, never changed): most repeats are of a few shapes."""
    return {"model": model, "inputs": inputs, "hits": hits, "misses": 0, "joined": 0, "upstream_tokens": 0}


# Bytes a kept request costs beyond its body's length (tracemalloc: ~400 + the body object's 33): the
# (scope, body) key, the record and its serial, the LRU's node; and per input, its key object and tuple slot (~57).
_OVERHEAD = 440
_PER_KEY = 60


class ResponseMemo:
    """A bounded LRU of `Replay`s by (scope, request body), bounded by bytes. `max_body_bytes` bounds what is
    worth keeping: a large body is rarely repeated byte for byte, and would crowd out many small ones."""

    def __init__(self, max_bytes: int, max_body_bytes: int = 64 * 1024) -> None:
        self.max_bytes = max_bytes
        self.max_body_bytes = max_body_bytes
        self.bytes = 0
        self._data: OrderedDict[tuple[str, bytes], tuple[Replay, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, scope: str, body: bytes) -> Replay | None:
        key = (scope, body)
        found = self._data.get(key)
        if found is None:
            return None
        self._data.move_to_end(key)
        return found[0]

    def keeps(self, body: bytes) -> bool:
        """Whether a request of this body could be kept (checked before its `Replay` is built)."""
        return 0 < len(body) <= self.max_body_bytes and len(body) + _OVERHEAD < self.max_bytes

    def put(self, scope: str, body: bytes, replay: Replay) -> None:
        if len(body) > self.max_body_bytes:
            return
        key = (scope, body)
        cost = _OVERHEAD + len(body) + _PER_KEY * len(replay.keys)
        if cost > self.max_bytes or key in self._data:
            return
        self._data[key] = (replay, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes:
            _, (_, old) = self._data.popitem(last=False)
            self.bytes -= old

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0
