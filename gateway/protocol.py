"""The wire format of requests: parsing and validating embedding requests (Jina and OpenAI field names, every
alias) into one `EmbeddingRequest`, with one `orjson.loads` per request. Answers are rendered in render.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .errors import BadRequest, ValidationFailed
from .render import OUTPUT_FORMATS

OutputFormat = Literal["float", "base64", "binary", "ubinary"]

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


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="INVALID_JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="INVALID_JSON")
    return body


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
    for name in ("embedding_type", "encoding_format"):
        value = body.get(name)
        if value is None:
            continue
        if value not in OUTPUT_FORMATS:
            raise ValidationFailed(name, f"must be one of {', '.join(OUTPUT_FORMATS)}")
        return value  # type: ignore[no-any-return]
    return "float"


def _check_types(body: dict[str, Any]) -> None:
    for name in _BOOL_FIELDS:
        if name in body and not isinstance(body[name], bool):
            raise ValidationFailed(name, "must be a boolean")
    dims = body.get("dimensions")
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
