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
def served() -> bytes:
    """The document clients get: only operations the gateway serves now."""
    doc = copy.deepcopy(source())
    for path in list(doc["paths"]):
        item = doc["paths"][path]
        for method in [m for m in item if m in METHODS and "x-pending" in item[m]]:
            del item[method]
        if not any(m in item for m in METHODS):
            del doc["paths"][path]
    return orjson.dumps(doc)
