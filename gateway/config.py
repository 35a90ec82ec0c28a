"""Configuration: YAML in, frozen dataclasses out, built once and validated with errors that name the key path.

The loader is deliberately small: it walks the dataclass fields and their type hints, so adding a setting is
adding a field with a default. `${VAR}` and `${VAR:-default}` are interpolated from the environment first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path."""


@dataclass(frozen=True, kw_only=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass(frozen=True, kw_only=True)
class UpstreamLimits:
    """Limits of the one shared upstream key, enforced across all replicas through the state store."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrency: int = 8
    # Added to the 60-s pacing window: network jitter between the replicas and the upstream must never put
    # one call too many into one of the upstream's own windows.
    margin_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """Settings of the built-in simulated upstream used when `upstream.url` is `sim://`."""

    latency_base_ms: float = 20.0
    latency_per_token_ms: float = 0.0
    rate_limit_requests: int | None = None
    rate_window_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class Upstream:
    url: str = "sim://"
    api_key: str = ""
    # "jina" asks for `embedding_type: base64`, "openai" for `encoding_format: base64`.
    api: Literal["jina", "openai"] = "jina"
    timeout_s: float = 30.0
    max_retries: int = 4
    backoff_base_s: float = 0.2
    backoff_max_s: float = 8.0
    # The upstream's per-request input limit; larger miss lists are split into several calls.
    max_inputs_per_call: dict[str, int] = field(
        default_factory=lambda: {"jina-embeddings-v4": 512, "jina-embeddings-v3": 2048}
    )
    default_max_inputs_per_call: int = 2048
    limits: UpstreamLimits = field(default_factory=UpstreamLimits)
    sim: SimSettings = field(default_factory=SimSettings)

    def max_inputs_for(self, model: str) -> int:
        return self.max_inputs_per_call.get(model, self.default_max_inputs_per_call)


@dataclass(frozen=True, kw_only=True)
class RedisOptions:
    """Pool, timeouts, retries and TLS of one Redis store (the URL says which kind: see gateway/store/redis.py)."""

    # Per process (per node in a cluster); a request holds one connection for its one round trip. Past it a command
    # waits for a free connection (up to connect_timeout_s) — but in a cluster redis-py cannot wait and fails it,
    # so there keep it above the requests one worker has in flight.
    max_connections: int = 512
    # Connecting may be slower than a command (TLS handshake); None = the store's socket_timeout_s.
    connect_timeout_s: float | None = None
    # Retries of a command after a connection error or timeout, with jittered exponential backoff.
    retries: int = 1
    retry_backoff_s: float = 0.05
    health_check_interval_s: int = 30
    # rediss:// only: CA bundle to trust, client certificate for mutual TLS, and whether to verify the server.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True


@dataclass(frozen=True, kw_only=True)
class Cache:
    url: str = "memory://"
    ttl_s: int = 30 * 24 * 3600
    scope: Literal["global", "team"] = "global"
    # Bound of the in-memory store (memory:// only), in bytes of stored entries.
    max_bytes: int = 512 * 1024 * 1024
    # Seconds the cache is bypassed after a store error, so an outage costs one timeout, not one per request.
    error_backoff_s: float = 1.0
    socket_timeout_s: float = 0.5
    redis: RedisOptions = field(default_factory=RedisOptions)
    # In-process LRU of hot entries (decoded, with their renderings) in front of a Redis cache; 0 = off.
    hot_max_bytes: int = 64 * 1024 * 1024
    # In-process LRU of request bodies answered whole from the hot tier → their keys, so an exact repeat skips
    # decoding, validation and hashing; 0 = off (it is off with the hot tier).
    hot_requests_max_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class State:
    url: str = "memory://"
    socket_timeout_s: float = 1.0
    redis: RedisOptions = field(default_factory=RedisOptions)


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    max_inputs_per_request: int = 2048
    request_timeout_s: float = 60.0
    # Deepest nesting of arrays and objects a JSON body (or batch line) may have; deeper is a 422 at parse time.
    max_json_depth: int = 64
    # A new connection that has not completed its first request's headers in this time is closed.
    header_timeout_s: float = 10.0
    # A keep-alive connection idle this long is closed (aiohttp's keepalive_timeout).
    keepalive_timeout_s: float = 75.0
    # Open client connections per process; one more is refused with a 503 and closed.
    max_connections: int = 1000


@dataclass(frozen=True, kw_only=True)
class Coalesce:
    max_batch_inputs: int = 256
    max_batch_tokens: int = 131_072
    max_wait_ms: float = 50.0
    # Inputs arriving less than this apart while the group has a call in flight are a burst: they batch until
    # the burst pauses this long (or max_wait_ms); an input arriving alone takes a free call slot at once.
    quiet_ms: float = 2.0
    max_queue_inputs: int = 100_000


@dataclass(frozen=True, kw_only=True)
class Quota:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None


@dataclass(frozen=True, kw_only=True)
class Team:
    name: str
    keys: tuple[str, ...] = ()
    quota: Quota = field(default_factory=Quota)
    models: tuple[str, ...] | None = None
    max_inputs_per_request: int | None = None
    weight: float = 1.0


@dataclass(frozen=True, kw_only=True)
class QuotaSettings:
    cached_token_weight: float = 0.0
    on_store_error: Literal["open", "closed"] = "open"
    # Seconds the state store is not asked again after an error (the local limiter or 503 answers meanwhile).
    error_backoff_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Metrics:
    token: str | None = None


@dataclass(frozen=True, kw_only=True)
class Usage:
    """Durable usage counters (per team, model and UTC day) in the state store."""

    # Requests are tallied in process and written to the state store in one round trip per interval.
    flush_interval_s: float = 1.0
    # Day hashes expire this long after their last write.
    retention_days: int = 400
    # Longest date range one `GET /v1/usage` may ask for.
    max_query_days: int = 366


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Batch jobs (files + jobs in the state store) and this process's worker that runs them."""

    max_file_bytes: int = 100 * 1024 * 1024
    max_lines_per_file: int = 50_000
    # Jobs of one team that are queued or running at once; more get 429.
    max_active_jobs_per_team: int = 4
    # Jobs this process runs at once (0: this replica accepts jobs but leaves running them to others).
    workers: int = 2
    # A running job's claim expires this long after its holder stops renewing it (crash → takeover).
    lease_s: float = 30.0
    # How often a running job renews its lease and looks for a cancel.
    heartbeat_s: float = 1.0
    # How often an idle worker looks for jobs another replica accepted.
    poll_s: float = 1.0
    # Lines per checkpoint: a crash re-runs at most this many lines (from the cache, so free).
    chunk_lines: int = 256
    # Chunks of one job in flight at once (committed in order) while no interactive request comes in: 2 doubles
    # an idle job's lines/s over a 20 ms upstream (`python -m bench --only 7`); raise it for a slower upstream.
    # While interactive requests come in, the job's steps take turns instead (`yield_*` below).
    chunks_in_flight: int = 2
    # Inputs merged into one call of the embedding service.
    max_inputs_per_call: int = 2048
    # While interactive requests are being served (one came in within `yield_quiet_s`), a job yields: its lines
    # go in steps of `yield_step_lines` (short stretches of event-loop work, small upstream calls), and it pauses
    # after each step so its CPU stays under `yield_cpu_share` of the event loop. Idle, it runs at full speed.
    yield_quiet_s: float = 1.0
    yield_step_lines: int = 32
    yield_cpu_share: float = 0.25
    # Deadline of one such call: batch work queues behind interactive work, so it is generous.
    call_timeout_s: float = 300.0
    # Attempts at lines whose upstream calls keep failing (5xx, timeouts) before they go to the errors stream.
    max_attempts: int = 5
    # Files, finished jobs, their output and errors are deleted this long after they were written or finished.
    retention_s: int = 24 * 3600


@dataclass(frozen=True, kw_only=True)
class Config:
    listen: Listen = field(default_factory=Listen)
    upstream: Upstream = field(default_factory=Upstream)
    cache: Cache = field(default_factory=Cache)
    state: State = field(default_factory=State)
    limits: Limits = field(default_factory=Limits)
    coalesce: Coalesce = field(default_factory=Coalesce)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    metrics: Metrics = field(default_factory=Metrics)
    usage: Usage = field(default_factory=Usage)
    batch: Batch = field(default_factory=Batch)
    teams: tuple[Team, ...] = ()
    admin_keys: tuple[str, ...] = ()
    # USD per 1M tokens, per model, for the cost metrics and the usage API.
    prices: dict[str, float] = field(default_factory=dict)
    shutdown_timeout_s: float = 30.0
    log_level: str = "INFO"


_COMMENT = re.compile(r"(?:^|\s)#")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replaces `${VAR}` / `${VAR:-default}`; a missing variable without a default is an error.

    Comments are left alone, so an example `${VAR}` in a comment does not need the variable.
    """
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        cut = _COMMENT.search(line)
        code, comment = (line[: cut.start()], line[cut.start() :]) if cut else (line, "")
        out.append(_VAR.sub(functools.partial(_lookup, env=env, line=number), code) + comment)
    return "\n".join(out)


def _lookup(m: re.Match[str], *, env: Mapping[str, str], line: int) -> str:
    name, default = m.group(1), m.group(2)
    if name in env:
        return env[name]
    if default is not None:
        return default
    raise ConfigError(f"line {line}: environment variable {name} is not set (or write ${{{name}:-default}})")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    text = Path(path).read_text(encoding="utf-8")
    return parse_config(text, env)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    text = interpolate(text, os.environ if env is None else env)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from exc
    return from_data({} if data is None else data)


def from_data(data: Any) -> Config:
    """Builds and checks a Config from plain data (parsed YAML, or a dict in tests)."""
    config: Config = build(Config, data, "")
    _check(config)
    return config


def _check(config: Config) -> None:
    names = [t.name for t in config.teams]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"teams.{i}.name: duplicate team name {name!r}")
    seen: dict[str, str] = {}
    for i, team in enumerate(config.teams):
        if not team.weight > 0:
            raise ConfigError(f"teams.{i}.weight: must be > 0 (its share of the upstream when work queues)")
        for j, key in enumerate(team.keys):
            where = f"teams.{i}.keys.{j}"
            _check_key_hash(key, where)
            if key in seen:
                raise ConfigError(f"{where}: key already belongs to team {seen[key]!r}")
            seen[key] = team.name
    for j, key in enumerate(config.admin_keys):
        _check_key_hash(key, f"admin_keys.{j}")
    _check_usage(config.usage)
    if not config.upstream.url.startswith(("sim://", "http://", "https://")):
        raise ConfigError("upstream.url: must be http://, https:// or sim://")
    for where, url in (("cache.url", config.cache.url), ("state.url", config.state.url)):
        _check_store_url(url, where)
    _check_limits(config)
    _check_batch(config.batch)


def _check_store_url(url: str, where: str) -> None:
    if url.startswith("memory://"):
        return
    from .store.redis import parse_url  # the store owns its URL grammar

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_usage(usage: Usage) -> None:
    if usage.flush_interval_s <= 0:
        raise ConfigError("usage.flush_interval_s: must be > 0")
    if usage.retention_days < 1:
        raise ConfigError("usage.retention_days: must be >= 1")
    if usage.max_query_days < 1:
        raise ConfigError("usage.max_query_days: must be >= 1")


def _check_limits(config: Config) -> None:
    positive = [(f"teams.{i}.quota.{f.name}", getattr(team.quota, f.name))
                for i, team in enumerate(config.teams) for f in dataclasses.fields(Quota)]
    positive += [(f"teams.{i}.max_inputs_per_request", t.max_inputs_per_request) for i, t in enumerate(config.teams)]
    limits = config.upstream.limits
    positive += [("upstream.limits.requests_per_minute", limits.requests_per_minute),
                 ("upstream.limits.tokens_per_minute", limits.tokens_per_minute),
                 ("upstream.limits.max_concurrency", limits.max_concurrency)]
    positive += [("limits.max_json_depth", config.limits.max_json_depth),
                 ("limits.max_connections", config.limits.max_connections)]
    for where, value in positive:
        if value is not None and value < 1:
            raise ConfigError(f"{where}: must be at least 1, got {value}")
    for where, number in [("quota.cached_token_weight", config.quota.cached_token_weight),
                          ("coalesce.max_wait_ms", config.coalesce.max_wait_ms),
                          ("coalesce.quiet_ms", config.coalesce.quiet_ms),
                          ("quota.error_backoff_s", config.quota.error_backoff_s),
                          ("upstream.limits.margin_s", limits.margin_s),
                          ("cache.hot_max_bytes", config.cache.hot_max_bytes),
                          ("cache.hot_requests_max_bytes", config.cache.hot_requests_max_bytes)]:
        if number < 0:
            raise ConfigError(f"{where}: must not be negative, got {number}")
    for where, seconds in [("limits.header_timeout_s", config.limits.header_timeout_s),
                           ("limits.keepalive_timeout_s", config.limits.keepalive_timeout_s)]:
        if seconds <= 0:
            raise ConfigError(f"{where}: must be positive, got {seconds}")


def _check_batch(batch: Batch) -> None:
    for name in ("max_file_bytes", "max_lines_per_file", "max_active_jobs_per_team", "chunk_lines",
                 "chunks_in_flight", "max_inputs_per_call", "max_attempts", "retention_s", "yield_step_lines"):
        if getattr(batch, name) < 1:
            raise ConfigError(f"batch.{name}: must be at least 1")
    if batch.workers < 0:
        raise ConfigError("batch.workers: must be 0 or more")
    for name in ("heartbeat_s", "poll_s", "call_timeout_s"):
        if getattr(batch, name) <= 0:
            raise ConfigError(f"batch.{name}: must be positive")
    if batch.yield_quiet_s < 0:
        raise ConfigError("batch.yield_quiet_s: must not be negative")
    if not 0 < batch.yield_cpu_share <= 1:
        raise ConfigError("batch.yield_cpu_share: must be above 0 and at most 1")
    if batch.lease_s < 2 * batch.heartbeat_s:
        raise ConfigError("batch.lease_s: must be at least twice batch.heartbeat_s, or a live worker loses its jobs")


def _check_key_hash(key: str, where: str) -> None:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
        raise ConfigError(f"{where}: expected 'sha256:<64 hex digits>' (see `embedding-gateway keys new`)")


def build(tp: Any, value: Any, path: str) -> Any:
    """Builds a value of type `tp` from plain YAML data, naming `path` in every error."""
    where = path or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build_dataclass(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return build(inner, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (inner, _) = typing.get_args(tp)
        return tuple(build(inner, v, f"{path}.{i}") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): build(vt, v, f"{path}.{k}") for k, v in value.items()}
    return _build_scalar(tp, value, where)


def _build_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_dataclass(tp: type, value: Any, path: str) -> Any:
    where = path or "<root>"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = sorted(set(map(str, value)) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = build(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key is missing")
    return tp(**kwargs)
