"""The gateway's own OpenAPI document (gateway/openapi.yaml), served at GET /openapi.json without pending operations."""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import orjson
import yaml

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


@functools.cache
def source() -> dict[str, Any]:
    """The document as written, `x-pending` operations included."""
    text = resources.files("gateway").joinpath("openapi.yaml").read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) → operation."""
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


@functools.cache
def served(token_ids: bool = True) -> bytes:
    """The document clients get: only operations the gateway serves now, and token-array inputs (schemas marked
    `x-token-ids`) only when `token_ids`, i.e. some upstream reads them."""
    doc = copy.deepcopy(source())
    if not token_ids:
        _drop_token_ids(doc)
    for path in list(doc["paths"]):
        item = doc["paths"][path]
        for method in [m for m in item if m in METHODS and "x-pending" in item[m]]:
            del item[method]
        if not any(m in item for m in METHODS):
            del doc["paths"][path]
    return orjson.dumps(doc)


def _drop_token_ids(node: Any) -> None:
    """Removes every `oneOf` / `anyOf` alternative marked `x-token-ids`, wherever it is."""
    if isinstance(node, dict):
        for key in ("oneOf", "anyOf"):
            if isinstance(node.get(key), list):
                node[key] = [alt for alt in node[key] if not (isinstance(alt, dict) and alt.get("x-token-ids"))]
        for child in node.values():
            _drop_token_ids(child)
    elif isinstance(node, list):
        for child in node:
            _drop_token_ids(child)
