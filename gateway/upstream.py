"""The upstream client: one `aiohttp.ClientSession` (keep-alive pool, proxies from the environment, optional CA
bundle and client certificate), retries with full-jitter backoff that honour `Retry-After` inside the caller's
deadline, and decoding of the answer into float32 arrays.

The gateway always asks for base64 (little-endian float32): lossless, and ~4x smaller than float JSON.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import logging
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

from . import config as cfg
from .errors import UpstreamFailed, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from .metrics import Metrics
from .pacing import Pacer
from .protocol import Item
from .tokens import estimate

log = logging.getLogger("gateway.upstream")


@dataclass(slots=True)
class UpstreamResult:
    vectors: list[np.ndarray]
    tokens: int
    # With `embed(defer_metrics=True)`: the call's figures (model, inputs, seconds of the answered attempt),
    # published by `UpstreamClient.record` once the callers have their answers.
    pending: tuple[str, int, float] | None = None


class BadAnswer(Exception):
    """The upstream answered 200 with something that is not a complete embeddings response."""


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class UpstreamClient:
    def __init__(
        self,
        config: cfg.Upstream,
        base_url: str,
        metrics: Metrics,
        *,
        pacer: Pacer | None = None,
    ) -> None:
        self.pacer = pacer
        self.config = config
        self.url = base_url.rstrip("/") + "/embeddings"
        self.metrics = metrics
        self.headers = {"Content-Type": "application/json"}
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._format_field = "embedding_type" if config.api == "jina" else "encoding_format"
        self._slots = asyncio.Semaphore(config.limits.max_concurrency)

    async def start(self) -> None:
        """Opens the session (in the app's cleanup context: it needs the running loop)."""
        self._session = open_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def embed(
        self, params: dict[str, Any], items: list[Item], deadline: float, *, defer_metrics: bool = False
    ) -> UpstreamResult:
        """One logical call (retried as needed) for `items` with the request's canonical params.

        `defer_metrics=True`: the metrics of the answered attempt are left for the caller to publish with
        `record(result)` after it has answered its callers (prometheus-client's lock and bucket search per
        series are ~20 µs that a waiting client need not wait for). Failed attempts are counted at once."""
        body = orjson.dumps({**params, "input": items, self._format_field: "base64"})
        model = str(params.get("model", ""))
        metrics = self.metrics
        tokens = sum(estimate(item) for item in items) if self.pacer is not None else 0
        try:
            result = await self._attempts(body, model, len(items), tokens, deadline)
        except BaseException:
            metrics.child(metrics.upstream_batch_inputs, model).observe(len(items))  # counted with or without an answer
            raise
        if not defer_metrics:
            self.record(result)
        return result

    async def _attempts(self, body: bytes, model: str, n: int, tokens: int, deadline: float) -> UpstreamResult:
        metrics = self.metrics
        attempt = 0
        while True:
            try:
                return await self._attempt(body, model, n, tokens, deadline)
            except _Retryable as exc:
                attempt += 1
                delay = self._backoff(attempt, exc.retry_after)
                if exc.status == 429 and self.pacer is not None:
                    # The key itself is limited: keep every replica off it, not only this call.
                    await self.pacer.hold(exc.retry_after or delay)
                if attempt > self.config.max_retries or time.monotonic() + delay >= deadline:
                    raise self._give_up(exc) from None
                metrics.child(metrics.upstream_retries, exc.reason).inc()
                log.info("upstream %s, retry %d in %.2fs", exc.reason, attempt, delay)
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempt - 1))
        jitter = random.uniform(0, cap)
        # The upstream said when: wait that long (a little jitter spreads the replicas' retries).
        return retry_after + jitter * 0.1 if retry_after is not None else jitter

    def _give_up(self, exc: _Retryable) -> Exception:
        if exc.status == 429:
            return UpstreamRateLimited("the upstream is rate limiting the gateway", int(exc.retry_after or 1))
        if exc.reason == "timeout":
            return UpstreamTimeout("the upstream did not answer in time")
        return UpstreamFailed(f"the upstream failed: {exc.reason}")

    async def _attempt(self, body: bytes, model: str, n: int, tokens: int, deadline: float) -> UpstreamResult:
        async with self._slots:
            if self.pacer is not None:
                # Inside the slot: a call must not sleep for its turn and then queue for a slot past it.
                await self.pacer.acquire(tokens, deadline)
            return await self._post(body, model, n, deadline)

    def record(self, result: UpstreamResult) -> None:
        """Publishes the metrics `embed(defer_metrics=True)` left in `result` (once)."""
        if result.pending is None:
            return
        model, n, seconds = result.pending
        result.pending = None
        metrics = self.metrics
        metrics.child(metrics.upstream_batch_inputs, model).observe(n)
        metrics.child(metrics.upstream_calls, model, "200").inc()
        metrics.child(metrics.upstream_seconds, model).observe(seconds)
        metrics.child(metrics.upstream_tokens, model).inc(result.tokens)

    async def _post(self, body: bytes, model: str, n: int, deadline: float) -> UpstreamResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable("timeout")
        assert self._session is not None, "UpstreamClient.start() was not called"
        started = time.perf_counter()
        status = "error"
        timeout = aiohttp.ClientTimeout(total=min(self.config.timeout_s, remaining))
        try:
            async with self._session.post(self.url, data=body, headers=self.headers, timeout=timeout) as resp:
                status = str(resp.status)
                raw = await resp.read()
            result = self._answer(resp.status, resp.headers, raw, n)
        except TimeoutError:
            self._count(model, "timeout", started)
            raise _Retryable("timeout") from None
        except aiohttp.ClientError as exc:
            # aiohttp's parser refused the answer (conflicting lengths, bad chunks, a truncated body) or the
            # connection failed: the connection is not reused, and nothing of the answer is.
            self._count(model, status, started)
            raise _Retryable(f"connection error ({type(exc).__name__})") from None
        except BaseException:
            self._count(model, status, started)
            raise
        result.pending = (model, n, time.perf_counter() - started)  # counted by record()
        return result

    def _count(self, model: str, status: str, started: float) -> None:
        metrics = self.metrics
        metrics.child(metrics.upstream_calls, model, status).inc()
        metrics.child(metrics.upstream_seconds, model).observe(time.perf_counter() - started)

    def _answer(self, status: int, headers: Mapping[str, str], raw: bytes, n: int) -> UpstreamResult:
        """`headers` case-insensitive (aiohttp's)."""
        if status == 200:
            try:
                return decode_answer(raw, n)
            except BadAnswer as exc:
                raise _Retryable(f"bad answer ({exc})") from None
        if status == 429:
            raise _Retryable("429", parse_retry_after(headers.get("retry-after")), status=429)
        if status in (401, 403):
            # The gateway's own upstream key was refused: the client's request is fine, the gateway is not.
            log.error("the upstream refused the gateway's API key (HTTP %d)", status)
            raise UpstreamFailed("the upstream refused the gateway's credentials", code="UPSTREAM_AUTH")
        if status >= 500 or status == 408:
            raise _Retryable(str(status), parse_retry_after(headers.get("retry-after")), status=status)
        raise UpstreamRejected(status, _error_body(raw, status))


def open_session(config: cfg.Upstream) -> aiohttp.ClientSession:
    """One pooled session for one upstream: `max_concurrency` keep-alive connections, proxies from the environment
    (`HTTPS_PROXY`, `NO_PROXY`), the upstream's TLS settings, gzip/deflate answers decoded."""
    connector = aiohttp.TCPConnector(
        limit=config.limits.max_concurrency, limit_per_host=0, keepalive_timeout=30, ssl=_ssl_context(config.tls)
    )
    return aiohttp.ClientSession(
        connector=connector, trust_env=True, auto_decompress=True, timeout=aiohttp.ClientTimeout(total=None),
    )


def _ssl_context(tls: cfg.UpstreamTLS) -> ssl.SSLContext | bool:
    """True (aiohttp's default verification) unless a CA bundle or a client certificate is set."""
    if tls.ca_file is None and tls.cert_file is None:
        return True
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


def _error_body(raw: bytes, status: int) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        return body
    text = raw[:500].decode("utf-8", "replace")
    return {"detail": text or f"upstream answered {status}", "code": "UPSTREAM_REJECTED"}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def decode_answer(raw: bytes, n: int) -> UpstreamResult:
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
        vectors[index] = _decode_embedding(obj.get("embedding"))
    return UpstreamResult(vectors=vectors, tokens=tokens)  # type: ignore[arg-type]


def _decode_embedding(value: Any) -> np.ndarray:
    try:
        # strict_mode: only the base64 alphabet, correct padding (what b64decode's validate=True checks with a regex)
        if isinstance(value, str):
            raw = binascii.a2b_base64(value, strict_mode=True)
            vec = np.frombuffer(raw, dtype="<f4")
            top = raw[3::4]  # each float's sign and 7 high exponent bits
            if vec.size and b"\x7f" not in top and b"\xff" not in top:
                # Only a top byte of 0x7f or 0xff can begin an infinity or a NaN: with neither, every value is
                # finite, known without numpy's isfinite (whose two ufunc calls are the slowest part of a
                # decode on a CPU that has just woken from an idle wait).
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
