"""What every provider module (jina, openai, tei) offers: the request body for a call, and the decoded answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ValidationFailed
from ..protocol import Item


@dataclass(slots=True)
class Decoded:
    vectors: list[np.ndarray]
    tokens: int | None  # None: the upstream reports no usage (TEI)


class BadAnswer(Exception):
    """The upstream answered 200 with something that is not a complete embeddings response."""


class Provider(Protocol):
    path: str  # appended to the upstream's URL

    def body(self, params: dict[str, Any], items: list[Item], model: str) -> bytes:
        """The request for `items` with the canonical `params`; `model` is this upstream's name for it.
        Raises ValidationFailed for a field this kind cannot take (unless the upstream drops them)."""
        ...

    def decode(self, raw: bytes, n: int) -> Decoded:
        """Raises BadAnswer unless `raw` holds exactly `n` finite embeddings."""
        ...


def refuse_or_drop(params: dict[str, Any], allowed: frozenset[str], upstream: str, drop: bool) -> dict[str, Any]:
    """`params` without the fields this kind cannot take: dropped when `drop`, else a 422 naming the first."""
    extra = sorted(set(params) - allowed)
    if extra and not drop:
        raise ValidationFailed(extra[0], f"upstream {upstream!r} cannot take this field (its `drop_params` is off)")
    return {k: v for k, v in params.items() if k in allowed}
