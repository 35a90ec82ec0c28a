"""Text Embeddings Inference's native API: `POST /embed` with `inputs` (`normalize`, `truncate`, `dimensions`),
answered with bare float arrays and no usage; tokens come from `POST /tokenize`."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from ..errors import ValidationFailed
from ..protocol import Item
from .provider import BadAnswer, Decoded, refuse_or_drop

# Request fields TEI's /embed takes, by their Jina/OpenAI names → TEI's.
FIELDS = {"normalized": "normalize", "truncate": "truncate", "dimensions": "dimensions"}


class TEIProvider:
    path = "/embed"
    tokenize_path = "/tokenize"

    def __init__(self, upstream: str, *, drop_params: bool = False) -> None:
        self.upstream = upstream
        self.drop_params = drop_params

    def body(self, params: dict[str, Any], items: list[Item], model: str) -> bytes:
        """`model` is not sent: a TEI server serves one model."""
        kept = refuse_or_drop(params, frozenset({"model", *FIELDS}), self.upstream, self.drop_params)
        body: dict[str, Any] = {FIELDS[k]: v for k, v in kept.items() if k in FIELDS}
        body["inputs"] = [self._text(item, i) for i, item in enumerate(items)]
        return orjson.dumps(body)

    def tokenize_body(self, items: list[Item]) -> bytes:
        texts = [self._text(item, i) for i, item in enumerate(items)]
        return orjson.dumps({"inputs": texts, "add_special_tokens": True})

    def _text(self, item: Item, index: int) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("text"), str) and len(item) == 1:
            return str(item["text"])
        raise ValidationFailed(f"input[{index}]", f"upstream {self.upstream!r} (TEI) takes text inputs only")

    def decode(self, raw: bytes, n: int) -> Decoded:
        try:
            rows = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadAnswer(f"not an embeddings response: {exc}") from None
        if not isinstance(rows, list) or len(rows) != n:
            raise BadAnswer(f"{len(rows) if isinstance(rows, list) else 'no'} embeddings for {n} inputs")
        vectors = []
        for row in rows:
            try:
                vec = np.asarray(row, dtype=np.float32)
            except (ValueError, TypeError) as exc:
                raise BadAnswer(f"undecodable embedding ({exc})") from None
            if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
                raise BadAnswer("empty or non-finite embedding")
            vectors.append(vec)
        return Decoded(vectors=vectors, tokens=None)

    def count_tokens(self, raw: bytes, n: int) -> int:
        """Tokens of the inputs from a /tokenize answer (one list of tokens per input)."""
        try:
            rows = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadAnswer(f"not a tokenize response: {exc}") from None
        if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, list) for r in rows):
            raise BadAnswer("not one token list per input")
        return sum(len(r) for r in rows)
