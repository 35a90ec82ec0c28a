"""One upstream deployment: its `aiohttp.ClientSession` (keep-alive pool, proxies from the environment, optional CA
bundle and client certificate), its key pool, its wire format (a provider module), and retries with full-jitter
backoff that honour `Retry-After` inside the caller's deadline.

The gateway always asks for base64 (little-endian float32) where the wire format has it: lossless, ~4x smaller.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from .. import config as cfg
from ..cache import namespace_part
from ..errors import UpstreamFailed, UpstreamRateLimited, UpstreamRejected, UpstreamTimeout
from ..metrics import Metrics
from ..pacing import Pacer
from ..protocol import Item
from ..tokens import estimate
from .breaker import CircuitBreaker
from .jina import JinaProvider
from .keypool import AllKeysCooling, ApiKey, KeyPool
from .openai import OpenAIProvider
from .provider import BadAnswer, Provider
from .tei import TEIProvider

log = logging.getLogger("gateway.upstream")

# Fields whose vectors depend on the whole input list: such a call is never split.
_UNIT_FIELDS = ("late_chunking", "return_multivector")


@dataclass(slots=True)
class UpstreamResult:
    vectors: list[np.ndarray]
    tokens: int
    # With `embed(defer_metrics=True)`: the call's metrics, published by `record` once the callers have answers.
    pending: list[Callable[[], None]] = field(default_factory=list)
    upstream: str = ""  # the upstream that answered
    price: float = 0.0  # USD per 1M tokens of the call's model, as that upstream bills it
    namespace: bytes = b""  # that upstream's cache namespace (cache.namespace_part)
    estimated: bool = False  # `tokens` is (partly) the gateway's estimate: the upstream reported no usage


class _Retryable(Exception):
    def __init__(
        self, reason: str, retry_after: float | None = None, status: int | None = None, key: ApiKey | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status
        self.key = key


class _KeyRefused(Exception):
    """A 401/403: the key is ejected and the call moves to another key of the pool."""


def make_provider(config: cfg.Upstream) -> Provider:
    kinds: dict[str, type[JinaProvider] | type[OpenAIProvider] | type[TEIProvider]] = {
        "jina": JinaProvider, "openai": OpenAIProvider, "tei": TEIProvider}
    return kinds[config.wire](config.name, drop_params=config.drop_params)


class UpstreamClient:
    def __init__(
        self,
        config: cfg.Upstream,
        base_url: str,
        metrics: Metrics,
        *,
        pacers: list[Pacer | None] | None = None,
        prices: Mapping[str, float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`pacers`: one per key of `config.pool` (None: unpaced); `prices` per model, USD per 1M tokens;
        `monotonic` times key cool-downs, ejections and the breaker (tests move it)."""
        self.config = config
        self.name = config.name
        self.metrics = metrics
        self.provider = make_provider(config)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + self.provider.path
        self.prices = {**(prices or {}), **config.prices}  # `reprice` replaces it on a reload
        self.namespace = namespace_part(config.cache_namespace)
        pool = config.pool
        pacers = pacers or [None] * len(pool)
        keys = [ApiKey(f"{config.name}#{i + 1}", secret, pacers[i], config.limits.max_concurrency)
                for i, secret in enumerate(pool)]
        self.pool = KeyPool(config.name, keys, metrics, eject_s=config.eject_s, monotonic=monotonic)
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_open_s, monotonic)
        self._session: aiohttp.ClientSession | None = None
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None

    @property
    def capacity(self) -> int:
        """Calls this upstream takes at once (every key's slots)."""
        return self.config.limits.max_concurrency * len(self.pool.keys)

    async def start(self) -> None:
        """Opens the session (in the app's cleanup context: it needs the running loop)."""
        self._session = open_session(self.config, connections=self.capacity)
        if self.config.trust_env:
            self._proxy, self._proxy_auth = env_proxy(self.base_url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def embed(
        self, params: dict[str, Any], items: list[Item], deadline: float, *, defer_metrics: bool = False
    ) -> UpstreamResult:
        """One logical call (retried as needed, split to this upstream's per-call input limit) for `items` with
        the request's canonical params (`model` is the public name).

        `defer_metrics=True`: the metrics of the answered attempts are left for the caller to publish with
        `record(result)` after it has answered its callers. Failed attempts are counted at once."""
        model = str(params.get("model", ""))
        limit = self.config.max_inputs_for(model)
        if len(items) <= limit or any(params.get(f) for f in _UNIT_FIELDS):
            result = await self._embed(params, items, deadline)
        else:
            parts = await asyncio.gather(*(self._embed(params, items[i : i + limit], deadline)
                                           for i in range(0, len(items), limit)))
            result = UpstreamResult(vectors=[v for p in parts for v in p.vectors], tokens=sum(p.tokens for p in parts),
                                    pending=[f for p in parts for f in p.pending], upstream=self.name,
                                    estimated=any(p.estimated for p in parts))
        result.price = self.prices.get(model, 0.0)
        result.namespace = self.namespace
        if not defer_metrics:
            self.record(result)
        return result

    async def _embed(self, params: dict[str, Any], items: list[Item], deadline: float) -> UpstreamResult:
        model = str(params.get("model", ""))
        body = self.provider.body(params, items, self.config.upstream_model(model))
        tokens = sum(estimate(item) for item in items) if any(k.pacer for k in self.pool.keys) else 0
        try:
            return await self._attempts(body, items, model, tokens, deadline)
        except BaseException:
            metrics = self.metrics
            metrics.child(metrics.upstream_batch_inputs, model).observe(len(items))  # counted with or without an answer
            raise

    def reprice(self, prices: Mapping[str, float]) -> None:
        """A reload's top-level `prices` (this upstream's own still come first)."""
        self.prices = {**prices, **self.config.prices}

    @staticmethod
    def record(result: UpstreamResult) -> None:
        """Publishes the metrics `embed(defer_metrics=True)` left in `result` (once)."""
        pending, result.pending = result.pending, []
        for publish in pending:
            publish()

    async def _attempts(
        self, body: bytes, items: list[Item], model: str, tokens: int, deadline: float
    ) -> UpstreamResult:
        metrics = self.metrics
        attempt = 0
        while True:
            try:
                return await self._attempt(body, items, model, tokens, deadline)
            except _KeyRefused:
                continue  # the next key, at once (all refused: the pool raises)
            except _Retryable as exc:
                if exc.key is not None:  # a 429: that key cools; another key may take the call at once
                    await self.pool.cool(exc.key, exc.retry_after or self._backoff(attempt + 1, None))
                    if len(self.pool.keys) > 1 and self.pool.warm():
                        metrics.child(metrics.upstream_retries, exc.reason).inc()
                        continue
                attempt += 1
                delay = self._backoff(attempt, exc.retry_after)
                if attempt > self.config.max_retries or time.monotonic() + delay >= deadline:
                    raise self._give_up(exc) from None
                metrics.child(metrics.upstream_retries, exc.reason).inc()
                log.info("upstream %s: %s, retry %d in %.2fs", self.name, exc.reason, attempt, delay)
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

    async def _attempt(
        self, body: bytes, items: list[Item], model: str, tokens: int, deadline: float
    ) -> UpstreamResult:
        try:
            # Pacing inside the key's slot: a call must not sleep for its turn and then queue for a slot past it.
            key = await self.pool.acquire(tokens, deadline)
        except AllKeysCooling as exc:
            raise _Retryable("429", exc.retry_after, status=429) from None
        try:
            return await self._post(body, items, model, key, deadline)
        finally:
            self.pool.release(key)

    async def _post(self, body: bytes, items: list[Item], model: str, key: ApiKey, deadline: float) -> UpstreamResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Retryable("timeout")
        started = time.perf_counter()
        status = "error"
        n = len(items)
        try:
            status_code, headers, raw = await self._request(self.url, body, key, remaining)
            status = str(status_code)
            result = await self._answer(status_code, headers, raw, items, key, remaining)
        except TimeoutError:
            self._count(model, key, "timeout", started)
            raise _Retryable("timeout") from None
        except aiohttp.ClientError as exc:
            # aiohttp's parser refused the answer (conflicting lengths, bad chunks, a truncated body) or the
            # connection failed: the connection is not reused, and nothing of the answer is.
            self._count(model, key, status, started)
            raise _Retryable(f"connection error ({type(exc).__name__})") from None
        except BaseException:
            self._count(model, key, status, started)
            raise
        seconds = time.perf_counter() - started
        result.pending.append(lambda: self._count_answer(model, key, n, seconds, result.tokens))
        return result

    async def _request(
        self, url: str, body: bytes, key: ApiKey, remaining: float
    ) -> tuple[int, Mapping[str, str], bytes]:
        assert self._session is not None, "UpstreamClient.start() was not called"
        timeout = aiohttp.ClientTimeout(total=min(self.config.timeout_s, remaining))
        async with self._session.post(url, data=body, headers=key.headers, timeout=timeout, proxy=self._proxy,
                                      proxy_auth=self._proxy_auth) as resp:
            return resp.status, resp.headers, await resp.read()

    def _count(self, model: str, key: ApiKey, status: str, started: float) -> None:
        metrics = self.metrics
        seconds = time.perf_counter() - started
        metrics.child(metrics.upstream_calls, model, status).inc()
        metrics.child(metrics.upstream_seconds, model).observe(seconds)
        metrics.child(metrics.upstream_key_calls, self.name, key.id, status).inc()
        metrics.child(metrics.upstream_call_seconds, self.name).observe(seconds)

    def _count_answer(self, model: str, key: ApiKey, n: int, seconds: float, tokens: int) -> None:
        metrics = self.metrics
        metrics.child(metrics.upstream_batch_inputs, model).observe(n)
        metrics.child(metrics.upstream_calls, model, "200").inc()
        metrics.child(metrics.upstream_seconds, model).observe(seconds)
        metrics.child(metrics.upstream_tokens, model).inc(tokens)
        metrics.child(metrics.upstream_key_calls, self.name, key.id, "200").inc()
        metrics.child(metrics.upstream_call_seconds, self.name).observe(seconds)
        metrics.child(metrics.upstream_key_tokens, self.name, key.id).inc(tokens)
        metrics.child(metrics.upstream_cost, self.name).inc(tokens * self.prices.get(model, 0.0) / 1e6)

    async def _answer(
        self, status: int, headers: Mapping[str, str], raw: bytes, items: list[Item], key: ApiKey, remaining: float
    ) -> UpstreamResult:
        """`headers` case-insensitive (aiohttp's)."""
        if status == 200:
            try:
                decoded = self.provider.decode(raw, len(items))
                tokens, estimated = decoded.tokens, False
                if tokens is None:
                    tokens, estimated = await self._tokens(items, key, remaining)
            except BadAnswer as exc:
                raise _Retryable(f"bad answer ({exc})") from None
            return UpstreamResult(vectors=decoded.vectors, tokens=tokens, upstream=self.name, estimated=estimated)
        if status == 429:
            raise _Retryable("429", parse_retry_after(headers.get("retry-after")), status=429, key=key)
        if status in (401, 403):
            # The key was refused: the client's request is fine, this key is not.
            self.pool.eject(key, status)
            raise _KeyRefused()
        if status >= 500 or status == 408:
            raise _Retryable(str(status), parse_retry_after(headers.get("retry-after")), status=status)
        raise UpstreamRejected(status, _error_body(raw, status))

    async def _tokens(self, items: list[Item], key: ApiKey, remaining: float) -> tuple[int, bool]:
        """Tokens of an answer without usage (TEI): its /tokenize, else the gateway's estimate; and whether they
        are the estimate."""
        if isinstance(self.provider, TEIProvider):
            try:
                status, _, raw = await self._request(self.base_url + self.provider.tokenize_path,
                                                     self.provider.tokenize_body(items), key, remaining)
                if status == 200:
                    return self.provider.count_tokens(raw, len(items)), False
                log.info("upstream %s: /tokenize answered %d; estimating the tokens", self.name, status)
            except (TimeoutError, aiohttp.ClientError, BadAnswer) as exc:
                log.info("upstream %s: no token count from /tokenize (%s); estimating", self.name, exc)
        return sum(estimate(item) for item in items), True


def open_session(config: cfg.Upstream, *, connections: int) -> aiohttp.ClientSession:
    """One pooled session for one upstream: `connections` keep-alive connections, the upstream's TLS settings,
    gzip/deflate answers decoded. The environment's proxy is `env_proxy`'s, passed with each call."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=0, keepalive_timeout=30,
                                     ssl=_ssl_context(config.tls))
    return aiohttp.ClientSession(connector=connector, auto_decompress=True, timeout=aiohttp.ClientTimeout(total=None))


def env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for `url` (`HTTP(S)_PROXY`, `NO_PROXY`, its credentials from `~/.netrc`),
    read once: a session's `trust_env` reads them again for every call, in a thread."""
    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def _ssl_context(tls: cfg.UpstreamTls) -> ssl.SSLContext | bool:
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
