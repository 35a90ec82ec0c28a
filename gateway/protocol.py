"""The wire format of requests: parsing and validating embedding requests (Jina and OpenAI field names, every
alias) into one `EmbeddingRequest`, with one `orjson.loads` per request. Answers are rendered in render.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .errors import BadRequest, ValidationFailed
from .lru import ByteLRU
from .render import OUTPUT_FORMATS

OutputFormat = Literal["float", "base64", "binary", "ubinary"]

# Fields that choose how the answer is rendered, not what is embedded: never part of a cache key.
# `encoding_type` is Jina's older name for `embedding_type` (what its LlamaIndex integration sends).
RENDER_FIELDS = frozenset({"input", "embedding_type", "encoding_type", "encoding_format", "user"})
_BOOL_FIELDS = ("normalized", "late_chunking", "return_multivector", "truncate")

# A list of ints is one input as tokenizer ids (OpenAI's `input: [[15339, 1917]]`), read only by an
# OpenAI-compatible upstream; LangChain's OpenAIEmbeddings sends these by default.
Item = str | dict[str, Any] | list[int]
TOKEN_IDS_REFUSED = (
    "a list of integers is tokenizer ids, which this gateway's upstream cannot read: send the text itself "
    "(LangChain's OpenAIEmbeddings sends ids unless it is given check_embedding_ctx_length=False)"
)


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    items: list[Item]
    # Every field but `input` and the render fields, forwarded upstream unchanged and hashed into the key.
    params: dict[str, Any]
    output: OutputFormat
    # late_chunking / return_multivector: every vector depends on the whole list, so the list is one unit.
    unit: bool
    # Derived once per parsed request and kept with it (a remembered request reuses them): key prefix → the
    # items' cache keys (cache.py fills it).
    keys: dict[bytes, list[bytes]] = field(default_factory=dict, compare=False)

    canonical_params: bytes = field(init=False, compare=False)  # `params` as sorted-key JSON, hashed into keys

    def __post_init__(self) -> None:
        # Copied to its own size: orjson's small outputs keep a 4 KB allocation, and a remembered request keeps this.
        canonical = bytes(memoryview(orjson.dumps(self.params, option=orjson.OPT_SORT_KEYS)))
        object.__setattr__(self, "canonical_params", canonical)


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


def parse_embedding_request(
    body: dict[str, Any], *, max_inputs: int, token_ids: bool | Callable[[str], bool] = False
) -> EmbeddingRequest:
    """`token_ids`: whether the upstreams serving the model read inputs given as tokenizer ids (OpenAI-compatible
    ones do, Jina's not), or a function of the model that says it (`Config.reads_token_ids`)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed("model", "required, a non-empty string")
    items = _parse_input(body.get("input"), max_inputs, token_ids, model)
    output = _parse_output(body)
    _check_types(body)
    params = {k: v for k, v in body.items() if k not in RENDER_FIELDS}
    unit = bool(body.get("late_chunking")) or bool(body.get("return_multivector"))
    return EmbeddingRequest(model=model, items=items, params=params, output=output, unit=unit)


def _parse_input(value: Any, max_inputs: int, token_ids: bool | Callable[[str], bool], model: str) -> list[Item]:
    if value is None:
        raise ValidationFailed("input", "required: a string, a list of strings, or a list of objects")
    one = isinstance(value, str | dict) or (isinstance(value, list) and value and type(value[0]) is int)
    items = [value] if one else value
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
        elif isinstance(item, list):
            _check_token_ids(f"input[{i}]", item, token_ids if isinstance(token_ids, bool) else token_ids(model))
        elif not isinstance(item, dict) or not item:
            raise ValidationFailed(f"input[{i}]", "must be a non-empty string or a non-empty object")
    return items


def _check_token_ids(field: str, ids: list[Any], token_ids: bool) -> None:
    if not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise ValidationFailed(field, "a token array must be a non-empty list of non-negative integers")
    if not token_ids:
        raise ValidationFailed(field, TOKEN_IDS_REFUSED)


def _parse_output(body: dict[str, Any]) -> OutputFormat:
    """Jina's field (`embedding_type`, or its alias `encoding_type`) wins over OpenAI's `encoding_format`; each one
    sent must be valid."""
    value, alias, openai = body.get("embedding_type"), body.get("encoding_type"), body.get("encoding_format")
    fallback = "float" if openai is None else _output_value("encoding_format", openai)
    if alias is not None:
        output = _output_value("encoding_type", alias)
        if value is not None and _output_value("embedding_type", value) != output:
            raise ValidationFailed(
                "encoding_type", "embedding_type and its alias encoding_type ask for different formats; give one"
            )
        return output
    return fallback if value is None else _output_value("embedding_type", value)


def _output_value(name: str, value: Any) -> OutputFormat:
    """One format, as a string or (Jina's form) a list of one."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    elif isinstance(value, list):
        raise ValidationFailed(name, f"one output format per request, as a string or a list of one; got {value!r}")
    if value not in OUTPUT_FORMATS:
        raise ValidationFailed(name, f"must be one of {', '.join(OUTPUT_FORMATS)}")
    return value  # type: ignore[no-any-return]


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
    """A byte string that identifies an input: text as UTF-8, token ids and objects as JSON (tagged apart)."""
    if isinstance(item, str):
        return b"s" + item.encode("utf-8", "surrogatepass")
    if isinstance(item, list):
        return b"t" + orjson.dumps(item)
    return b"o" + orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


# What a remembered request costs beyond twice its body's length (the body, and its parsed strings): the request
# and its containers, the LRU's node and key tuple; and per input, its key and string objects (tests/test_repeats.py
# checks both against tracemalloc).
REMEMBERED_OVERHEAD = 1060
REMEMBERED_PER_INPUT = 110


class ParseMemo:
    """Recently parsed bodies → their `EmbeddingRequest`: an exact repeat (the same query asked again, a retried
    call) skips decoding, validation and hashing. Everything else a request goes through runs as for any other.

    Keyed by the body and the input limit it was checked against; the other rules of parsing come from the
    config, so a reload empties it (`clear`). Bodies stay in process memory only. `max_bytes` 0 turns it off.
    """

    def __init__(self, max_bytes: int, max_body_bytes: int = 64 * 1024) -> None:
        self.lru: ByteLRU[tuple[bytes, int], EmbeddingRequest] = ByteLRU(max_bytes)
        self.max_body_bytes = max_body_bytes

    def parse(self, raw: bytes, *, max_inputs: int, max_depth: int = MAX_JSON_DEPTH,
              token_ids: bool | Callable[[str], bool] = False) -> EmbeddingRequest:
        key = (raw, max_inputs)
        request = self.lru.get(key)
        if request is None:
            body = parse_json_object(raw, max_depth=max_depth)
            request = parse_embedding_request(body, max_inputs=max_inputs, token_ids=token_ids)
            if len(raw) <= self.max_body_bytes:
                cost = 2 * len(raw) + REMEMBERED_OVERHEAD + REMEMBERED_PER_INPUT * len(request.items)
                self.lru.put(key, request, cost)
        return request

    def clear(self) -> None:
        self.lru.clear()
