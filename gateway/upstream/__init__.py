"""Upstreams: the router (model → upstreams, failover), one client per upstream (session, key pool, retries),
the breaker, and one module per wire format (`jina`, `openai`, `tei`)."""

from __future__ import annotations

from .client import UpstreamClient, UpstreamResult, parse_retry_after
from .jina import decode_answer
from .provider import BadAnswer, Decoded
from .router import Router

__all__ = ["BadAnswer", "Decoded", "Router", "UpstreamClient", "UpstreamResult", "decode_answer",
           "parse_retry_after"]
