"""Every embeddings answer the gateway writes, byte for byte as the upstream renders it.

Each vector is rendered by orjson (or binascii) straight from its numpy array and the fragments are spliced
into the response shape, so no Python code touches individual floats and no dict is built per vector.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from itertools import chain, repeat
from typing import Any

import numpy as np
import orjson

OUTPUT_FORMATS: tuple[str, ...] = ("float", "base64", "binary", "ubinary")


def vector_json(vec: np.ndarray, output: str) -> Any:
    """One vector (or a multivector's rows) in the client's format, as a value orjson serialises."""
    if vec.ndim == 2:
        if output == "float":
            return vec.astype(np.float64)
        return [vector_json(row, output) for row in vec]
    if output == "float":
        # float64 of each float32 value: the number text is the shortest repr that reads back exactly.
        return vec.astype(np.float64)
    if output == "base64":
        return base64.b64encode(vec.astype("<f4", copy=False).tobytes()).decode("ascii")
    bits = np.packbits(vec > 0)
    if output == "ubinary":
        return bits
    return (bits.astype(np.int16) - 128).astype(np.int8)


def fragment(vec: np.ndarray, output: str) -> bytes:
    """The JSON of one `embedding` value, byte for byte what orjson renders of `vector_json(vec, output)`."""
    if output == "base64" and vec.ndim == 1:
        # base64 text never needs JSON escaping: quote it without building a str.
        return b'"' + binascii.b2a_base64(vec.astype("<f4", copy=False).tobytes(), newline=False) + b'"'
    return orjson.dumps(vector_json(vec, output), option=orjson.OPT_SERIALIZE_NUMPY)


def embeddings_body(model: str, tokens: int, fragments: Sequence[bytes]) -> bytes:
    """The upstream's answer shape around rendered `embedding` values: byte for byte what orjson emits for
    `{"model", "object", "usage", "data": [{"object", "index", "embedding"}]}`, with one copy of the fragments."""
    n = len(fragments)
    openers = _OPENERS if n <= len(_OPENERS) else [_opener(i) for i in range(n)]
    items = chain.from_iterable(zip(openers, fragments, repeat(b"}", n), strict=False))
    return b"".join([_head(model, tokens), *items, b"]}"])


def render_embeddings(model: str, vectors: Sequence[np.ndarray], tokens: int, output: str) -> bytes:
    return embeddings_body(model, tokens, [fragment(vec, output) for vec in vectors])


def _head(model: str, tokens: int) -> bytes:
    return b'{"model":%b,"object":"list","usage":{"total_tokens":%d,"prompt_tokens":%d},"data":[' % (
        orjson.dumps(model), tokens, tokens)


def _opener(i: int) -> bytes:
    return b'%b{"object":"embedding","index":%d,"embedding":' % (b"," if i else b"", i)


_OPENERS = [_opener(i) for i in range(4096)]  # one per index: cheaper than formatting one per item
