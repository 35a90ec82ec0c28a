"""The Jina wire format (`POST /embeddings`, `embedding_type: base64`), and the answer shape Jina and OpenAI share:
`data[].embedding` (base64 float32 or numbers) and `usage.total_tokens`."""

from __future__ import annotations

import binascii
from typing import Any

import numpy as np
import orjson

from ..protocol import Item
from .provider import BadAnswer, Decoded


class JinaProvider:
    path = "/embeddings"
    format_field = "embedding_type"

    def __init__(self, upstream: str, *, drop_params: bool = False) -> None:
        self.upstream = upstream
        self.drop_params = drop_params

    def body(self, params: dict[str, Any], items: list[Item], model: str) -> bytes:
        return orjson.dumps({**params, "model": model, "input": items, self.format_field: "base64"})

    def decode(self, raw: bytes, n: int) -> Decoded:
        return decode_answer(raw, n)


def decode_answer(raw: bytes, n: int) -> Decoded:
    try:
        body = orjson.loads(raw)
        data = body["data"]
        tokens = body["usage"]["total_tokens"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadAnswer(f"not an embeddings response: {type(exc).__name__}") from None
    if not isinstance(data, list) or len(data) != n:
        raise BadAnswer(f"{len(data) if isinstance(data, list) else 'no'} embeddings for {n} inputs")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise BadAnswer("usage.total_tokens is not a count")
    vectors: list[np.ndarray | None] = [None] * n
    for pos, obj in enumerate(data):
        index = obj.get("index", pos) if isinstance(obj, dict) else None
        if not isinstance(index, int) or not 0 <= index < n or vectors[index] is not None:
            raise BadAnswer("data indices are not a permutation of the inputs")
        vectors[index] = decode_embedding(obj.get("embedding"))
    return Decoded(vectors=vectors, tokens=tokens)  # type: ignore[arg-type]


def decode_embedding(value: Any) -> np.ndarray:
    try:
        # strict_mode: only the base64 alphabet, correct padding (what b64decode's validate=True checks with a regex)
        if isinstance(value, str):
            raw = binascii.a2b_base64(value, strict_mode=True)
            vec = np.frombuffer(raw, dtype="<f4")
            top = raw[3::4]  # each float's sign and 7 high exponent bits
            if vec.size and b"\x7f" not in top and b"\xff" not in top:
                # Only a top byte of 0x7f or 0xff can begin an infinity or a NaN: with neither, every value is
                # finite without numpy's isfinite.
                return vec
        elif isinstance(value, list) and value and isinstance(value[0], str):
            vec = np.stack([np.frombuffer(binascii.a2b_base64(v, strict_mode=True), dtype="<f4") for v in value])
        else:
            # An OpenAI-compatible upstream that ignored the format and sent numbers.
            vec = np.asarray(value, dtype=np.float32)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadAnswer(f"undecodable embedding ({exc})") from None
    if vec.size == 0 or vec.ndim not in (1, 2) or not np.isfinite(vec).all():
        raise BadAnswer("empty or non-finite embedding")
    return vec
