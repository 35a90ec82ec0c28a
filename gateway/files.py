"""Batch input lines: JSONL `{"custom_id", "body", "method"?, "url"?}` checked one by one, so a malformed line
becomes an error line (with its number and the reason) while the others run; and the chunk codec for them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import GatewayError, ValidationFailed
from .protocol import MAX_JSON_DEPTH, check_depth, parse_embedding_request

ENDPOINTS = ("/v1/embeddings", "/embeddings")
_WINDOW = re.compile(r"[1-9][0-9]{0,2}h")
_MAX_WINDOW_H = 720  # 30 days: a job still not done by then is stuck, not slow


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based line of the file (or position in an inline `input` list)
    custom_id: str
    body: dict[str, Any]  # a valid embeddings request body, `model` filled in


@dataclass(frozen=True, slots=True)
class LineError:
    number: int
    custom_id: str | None
    code: str
    message: str

    def render(self) -> bytes:
        error = {"code": self.code, "message": self.message, "line": self.number}
        return orjson.dumps({"custom_id": self.custom_id, "error": error}) + b"\n"


@dataclass(frozen=True, slots=True)
class Rules:
    """What a line must satisfy: the job's default model, the team's input limit and allowed models."""

    model: str
    max_inputs: int
    models: tuple[str, ...] | None = None
    # Whether the upstreams serving a model read inputs given as tokenizer ids (`Config.reads_token_ids`).
    token_ids: bool | Callable[[str], bool] = False
    max_depth: int = MAX_JSON_DEPTH


def numbered_lines(content: bytes) -> Iterable[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers (blank lines, a trailing newline included, are skipped)."""
    for number, raw in enumerate(content.split(b"\n"), 1):
        if raw.strip():
            yield number, raw


def count_lines(content: bytes) -> int:
    return sum(1 for _ in numbered_lines(content))


def parse_file(content: bytes, rules: Rules) -> tuple[list[Line], list[LineError]]:
    lines: list[Line] = []
    errors: list[LineError] = []
    for number, raw in numbered_lines(content):
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            errors.append(LineError(number, None, "INVALID_JSON", f"not valid JSON: {exc}"))
            continue
        try:
            if raw.count(b"[") + raw.count(b"{") > rules.max_depth:  # fewer brackets cannot nest that deep
                check_depth(value, rules.max_depth)
        except ValidationFailed as exc:
            errors.append(LineError(number, None, exc.code, exc.detail))
            continue
        _sort(check_line(number, value, rules), lines, errors)
    return lines, errors


def parse_inline(values: Sequence[Any], rules: Rules) -> tuple[list[Line], list[LineError]]:
    lines: list[Line] = []
    errors: list[LineError] = []
    for number, value in enumerate(values, 1):
        _sort(check_line(number, value, rules), lines, errors)
    return lines, errors


def _sort(result: Line | LineError, lines: list[Line], errors: list[LineError]) -> None:
    if isinstance(result, Line):
        lines.append(result)
    else:
        errors.append(result)


def check_line(number: int, value: Any, rules: Rules) -> Line | LineError:
    def bad(message: str, code: str = "INVALID_LINE") -> LineError:
        return LineError(number, custom_id, code, message)

    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        custom_id = None
        return bad("custom_id: required, a non-empty string" if isinstance(value, dict) else "must be an object")
    if value.get("method", "POST") != "POST":
        return bad("method: must be POST")
    if value.get("url", ENDPOINTS[0]) not in ENDPOINTS:
        return bad(f"url: must be {ENDPOINTS[0]}")
    body = value.get("body")
    if not isinstance(body, dict):
        return bad("body: required, an embeddings request object")
    if body.get("model") is None:
        body = {**body, "model": rules.model}
    try:
        request = parse_embedding_request(body, max_inputs=rules.max_inputs, token_ids=rules.token_ids)
    except GatewayError as exc:
        return bad(exc.detail, exc.code)
    if rules.models is not None and request.model not in rules.models:
        return bad(f"this team may not use model {request.model!r}", "MODEL_NOT_ALLOWED")
    return Line(number, custom_id, body)


def check_unique(lines: Sequence[Line], errors: Sequence[LineError], field: str) -> None:
    """Refuses the whole job when two lines share a custom_id: their results could not be told apart."""
    seen: dict[str, int] = {}
    numbered = [(x.number, x.custom_id) for x in lines] + [(e.number, e.custom_id) for e in errors]
    for number, custom_id in sorted((n, c) for n, c in numbered if c is not None):
        first = seen.setdefault(custom_id, number)
        if first != number:
            raise ValidationFailed(field, f"duplicate custom_id {custom_id!r} on lines {first} and {number}")


def encode_chunk(lines: Sequence[Line]) -> bytes:
    return orjson.dumps([[x.number, x.custom_id, x.body] for x in lines])


def decode_chunk(blob: bytes) -> list[Line]:
    return [Line(number, custom_id, body) for number, custom_id, body in orjson.loads(blob)]


def check_window(window: Any) -> str:
    """A job's `completion_window`: whole hours, like '24h'."""
    if not isinstance(window, str) or not _WINDOW.fullmatch(window) or int(window[:-1]) > _MAX_WINDOW_H:
        raise ValidationFailed("completion_window", f"must be hours from 1h to {_MAX_WINDOW_H}h, like '24h'")
    return window


def prepare(
    source: bytes | list[Any], rules: Rules, field: str, chunk_lines: int
) -> tuple[list[Line], list[LineError], list[bytes]]:
    """Checks every line, refuses duplicate custom_ids, and packs the valid lines into chunks."""
    lines, errors = parse_file(source, rules) if isinstance(source, bytes) else parse_inline(source, rules)
    check_unique(lines, errors, field)
    chunks = [encode_chunk(lines[i : i + chunk_lines]) for i in range(0, len(lines), chunk_lines)]
    return lines, errors, chunks
