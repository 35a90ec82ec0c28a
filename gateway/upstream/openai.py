"""The OpenAI-compatible wire format (OpenAI, vLLM, Infinity, TEI's /v1): `POST /embeddings` with
`encoding_format: base64`; the answer has Jina's shape."""

from __future__ import annotations

from typing import Any

import orjson

from ..protocol import Item
from .jina import decode_answer
from .provider import Decoded, refuse_or_drop

# What the OpenAI embeddings API takes besides `input` and the format.
FIELDS = frozenset({"model", "dimensions", "user"})
# Jina's fields an OpenAI-compatible server refuses (other fields pass, as extensions some servers take).
JINA_ONLY = frozenset({"task", "late_chunking", "normalized", "truncate", "return_multivector"})


class OpenAIProvider:
    path = "/embeddings"

    def __init__(self, upstream: str, *, drop_params: bool = False) -> None:
        self.upstream = upstream
        self.drop_params = drop_params

    def body(self, params: dict[str, Any], items: list[Item], model: str) -> bytes:
        jina = {k: v for k, v in params.items() if k in JINA_ONLY}
        kept = {k: v for k, v in params.items() if k not in JINA_ONLY}
        refuse_or_drop(jina, frozenset(), self.upstream, self.drop_params)
        return orjson.dumps({**kept, "model": model, "input": [_text(i) for i in items], "encoding_format": "base64"})

    def decode(self, raw: bytes, n: int) -> Decoded:
        return decode_answer(raw, n)


def _text(item: Item) -> Any:
    # {"text": s} is Jina's object form of a text input; OpenAI takes the string (or token arrays, passed as sent).
    if isinstance(item, dict) and item.keys() == {"text"}:
        return item["text"]
    return item
