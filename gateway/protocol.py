"""The wire format: parsing and validating embedding requests (Jina and OpenAI field names), rendering
responses exactly as the upstream renders them, and error bodies.

One `orjson.loads` per request; each vector is rendered by orjson (or binascii) straight from its numpy
array and the fragments are spliced into the response, so no Python code touches individual floats and no
dict is built per vector.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Literal

import numpy as np
import orjson

from .errors import BadRequest, ValidationFailed

OutputFormat = Literal["float", "base64", "binary", "ubinary"]
OUTPUT_FORMATS: tuple[str, ...] = ("float", "base64", "binary", "ubinary")

# Fields that choose how the answer is rendered, not what is embedded: never part of a cache key.
RENDER_FIELDS = frozenset({"input", "embedding_type", "encoding_format", "user"})
_BOOL_FIELDS = ("normalized", "late_chunking", "return_multivector", "truncate")

Item = str | dict[str, Any]


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    items: list[Item]
    # Every field but `input` and the render fields, forwarded upstream unchanged and hashed into the key.
    params: dict[str, Any]
    output: OutputFormat
    # late_chunking / return_multivector: every vector depends on the whole list, so the list is one unit.
    unit: bool

    @property
    def canonical_params(self) -> bytes:
        return orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS)


# `limits.max_json_depth`'s default: well under orjson's serialising limit (255), which keying must never meet.
MAX_JSON_DEPTH = 64


def parse_json_object(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="INVALID_JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="INVALID_JSON")
    if raw.count(b"[") + raw.count(b"{") > max_depth:  # fewer brackets cannot nest that deep: no walk
        check_depth(body, max_depth)
    return body


def check_depth(value: Any, max_depth: int) -> None:
    """422 naming the field (`input[0].a`) where arrays and objects nest deeper than `max_depth` levels, the
    value itself being level 1."""
    parents: list[tuple[int, str | int]] = [(-1, "")]  # (parent's index, key) of each container seen
    stack: list[tuple[Any, int, int]] = [(value, 1, 0)]
    while stack:
        node, depth, index = stack.pop()
        if depth > max_depth:
            raise ValidationFailed(_path(parents, index), f"nested deeper than {max_depth} arrays and objects")
        for key, child in node.items() if type(node) is dict else enumerate(node):
            if type(child) is dict or type(child) is list:
                parents.append((index, key))
                stack.append((child, depth + 1, len(parents) - 1))


def _path(parents: list[tuple[int, str | int]], index: int) -> str:
    keys: list[str | int] = []
    while index > 0:
        index, key = parents[index]
        keys.append(key)
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in reversed(keys)).lstrip(".") or "body"


def parse_embedding_request(body: dict[str, Any], *, max_inputs: int) -> EmbeddingRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed("model", "required, a non-empty string")
    items = _parse_input(body.get("input"), max_inputs)
    output = _parse_output(body)
    _check_types(body)
    params = {k: v for k, v in body.items() if k not in RENDER_FIELDS}
    unit = bool(body.get("late_chunking")) or bool(body.get("return_multivector"))
    return EmbeddingRequest(model=model, items=items, params=params, output=output, unit=unit)


def _parse_input(value: Any, max_inputs: int) -> list[Item]:
    if value is None:
        raise ValidationFailed("input", "required: a string, a list of strings, or a list of objects")
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list):
        raise ValidationFailed("input", "must be a string, a list of strings, or a list of objects")
    if not items:
        raise ValidationFailed("input", "must not be empty")
    if len(items) > max_inputs:
        raise ValidationFailed("input", f"{len(items)} inputs, at most {max_inputs} allowed per request")
    if all(type(item) is str for item in items) and "" not in items:  # the common shape, checked in bulk
        return items
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise ValidationFailed(f"input[{i}]", "must not be an empty string")
        elif not isinstance(item, dict) or not item:
            raise ValidationFailed(f"input[{i}]", "must be a non-empty string or a non-empty object")
    return items


def _parse_output(body: dict[str, Any]) -> OutputFormat:
    """Jina's `embedding_type` wins over OpenAI's `encoding_format`; each one sent must be valid."""
    chosen: OutputFormat | None = None
    for name in ("embedding_type", "encoding_format"):
        value = body.get(name)
        if value is None:
            continue
        if value not in OUTPUT_FORMATS:
            raise ValidationFailed(name, f"must be one of {', '.join(OUTPUT_FORMATS)}")
        chosen = chosen or value
    return chosen or "float"


def _check_types(body: dict[str, Any]) -> None:
    for name in _BOOL_FIELDS:
        if name in body and not isinstance(body[name], bool):
            raise ValidationFailed(name, "must be a boolean")
    dims = body.get("dimensions")
    if isinstance(dims, float) and dims.is_integer() and abs(dims) <= 2**53:  # JSON Schema's integer: 64.0 is 64
        dims = body["dimensions"] = int(dims)
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise ValidationFailed("dimensions", "must be a positive integer")
    task = body.get("task")
    if task is not None and not isinstance(task, str):
        raise ValidationFailed("task", "must be a string")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ValidationFailed("user", "must be a string")


def canonical_item(item: Item) -> bytes:
    """A byte string that identifies an input: text as UTF-8, objects as sorted-key JSON (tagged apart)."""
    if isinstance(item, str):
        return b"s" + item.encode("utf-8", "surrogatepass")
    return b"o" + orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


# ---- rendering -------------------------------------------------------------------------------------------


def render_vector(vec: np.ndarray, output: str) -> Any:
    """One vector (or a multivector's rows) in the client's format, as the upstream renders it."""
    if vec.ndim == 2:
        if output == "float":
            return vec.astype(np.float64)
        return [render_vector(row, output) for row in vec]
    if output == "float":
        # float64 of each float32 value: the number text is the shortest repr that reads back exactly.
        return vec.astype(np.float64)
    if output == "base64":
        return base64.b64encode(vec.astype("<f4", copy=False).tobytes()).decode("ascii")
    bits = np.packbits(vec > 0)
    if output == "ubinary":
        return bits
    return (bits.astype(np.int16) - 128).astype(np.int8)


def render_fragment(vec: np.ndarray, output: str) -> bytes:
    """The JSON of one `embedding` value, byte for byte as orjson renders `render_vector(vec, output)`."""
    if output == "base64" and vec.ndim == 1:
        # base64 text never needs JSON escaping: quote it without building a str.
        return b'"' + binascii.b2a_base64(vec.astype("<f4", copy=False).tobytes(), newline=False) + b'"'
    return orjson.dumps(render_vector(vec, output), option=orjson.OPT_SERIALIZE_NUMPY)


def render_body(model: str, tokens: int, fragments: Sequence[bytes]) -> bytes:
    """Splices rendered `embedding` values into the upstream's response shape, byte for byte what orjson
    emits for `{"model", "object", "usage", "data": [{"object", "index", "embedding"}]}`: no dict per vector,
    and one copy of the (possibly large) fragments."""
    return b"".join(render_parts(model, tokens, fragments))


def render_parts(model: str, tokens: int, fragments: Sequence[bytes]) -> list[bytes]:
    """`render_body`'s pieces, not joined: the fragments themselves (no copy) between the JSON around them."""
    n = len(fragments)
    # Each item is opener, fragment, "}": interleaved by zip/chain, so no Python loop runs per item.
    items = chain.from_iterable(zip(_openers(n), fragments, repeat(b"}", n), strict=False))
    return [_head(model, tokens), *items, END]


def render_items(model: str, tokens: int, items: Sequence[bytes]) -> list[bytes]:
    """`render_parts` of fragments that already end with the `}` closing their item (`render_solo`'s middle
    piece): two pieces per item instead of three."""
    return [_head(model, tokens), *chain.from_iterable(zip(_openers(len(items)), items, strict=False)), END]


def render_solo(model: str, tokens: int, fragment: bytes) -> tuple[bytes, bytes, bytes]:
    """The answer to one input in three pieces: all before its fragment, the fragment with the `}` that closes
    its item (what `render_items` takes), and the end."""
    return _head(model, tokens) + _OPENERS[0], fragment + b"}", END


END = b"]}"


def _head(model: str, tokens: int) -> bytes:
    return b'{"model":%b,"object":"list","usage":{"total_tokens":%d,"prompt_tokens":%d},"data":[' % (
        orjson.dumps(model), tokens, tokens)


def _openers(n: int) -> Sequence[bytes]:
    """At least `n` item openers, one per index (zip stops at the shorter sequence)."""
    return _OPENERS if n <= len(_OPENERS) else [_opener(i) for i in range(n)]


def _opener(i: int) -> bytes:
    return b'%b{"object":"embedding","index":%d,"embedding":' % (b"," if i else b"", i)


_OPENERS = [_opener(i) for i in range(4096)]  # one per index: cheaper than formatting one per item


def render_embeddings(model: str, vectors: list[np.ndarray], tokens: int, output: str) -> bytes:
    return render_body(model, tokens, [render_fragment(vec, output) for vec in vectors])

