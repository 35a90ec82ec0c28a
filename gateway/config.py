"""Configuration: YAML in, frozen dataclasses out, built once and validated by pydantic; every error names the key path.

Every section is a frozen pydantic dataclass with keyword-only fields and no unknown keys, so callers read plain
attributes and adding a setting is adding a field with a default (and its range in the type). `${VAR}` and
`${VAR:-default}` are interpolated from the environment first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path."""


def _key_hash(key: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
        raise ValueError("expected 'sha256:<64 hex digits>' (see `embedding-gateway keys new`)")
    if len(set(key.removeprefix("sha256:"))) == 1:
        raise ValueError(f"{key[:15]}… is a placeholder, not a valid key hash: create a key with "
                         "`embedding-gateway keys new` and paste its sha256 line here")
    return key


# Scalars are strict (YAML `'80'` is not a port, `true` is not a count); an int is accepted where a float is asked.
Str = Annotated[str, Strict()]
Name = Annotated[str, Strict(), Field(min_length=1)]  # a model or team name: never empty
Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]  # sizes, limits and counts: at least 1
Zeroable = Annotated[int, Strict(), Field(ge=0)]  # 0 means "off" or "none"
Seconds = Annotated[float, Strict(), Field(gt=0)]  # timeouts and intervals: above 0
Delay = Annotated[float, Strict(), Field(ge=0)]  # waits, backoffs and weights that may be 0
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
KeyHash = Annotated[str, Strict(), AfterValidator(_key_hash)]
Weight = Annotated[float, Strict(), Field(gt=0)]


def _model_list(value: Any) -> Any:
    """A list of models names each by its public name."""
    return {v: v for v in value} if isinstance(value, list) and all(isinstance(v, str) for v in value) else value


# An upstream's models: public name → the name this upstream knows (YAML may give a list of public names).
ModelMap = Annotated[dict[Str, Annotated[str, Strict(), Field(min_length=1)]], BeforeValidator(_model_list)]
_SECTION = ConfigDict(extra="forbid")


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Listen:
    host: Str = "127.0.0.1"
    port: Port = 8080


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class UpstreamLimits:
    """Limits of the one shared upstream key, enforced across all replicas through the state store."""

    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    max_concurrency: Count = 8
    # Added to the 60-s pacing window: network jitter between the replicas and the upstream must never put
    # one call too many into one of the upstream's own windows.
    margin_s: Delay = 1.0


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class SimSettings:
    """Settings of the built-in simulated upstream used when `upstream.url` is `sim://`."""

    latency_base_ms: Delay = 20.0
    latency_per_token_ms: Delay = 0.0
    rate_limit_requests: Count | None = None
    rate_window_s: Seconds = 60.0


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class UpstreamTls:
    """TLS towards the upstream; unset fields keep the system's trust store and no client certificate."""

    ca_file: Str | None = None  # PEM bundle of the CAs to trust instead of the system's
    cert_file: Str | None = None  # client certificate (PEM) for mutual TLS
    key_file: Str | None = None  # its private key, when not in cert_file


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Upstream:
    """One upstream deployment (in `upstreams:`; the single `upstream:` block is one named `default`)."""

    name: Str = "default"
    # The wire format: "jina" (`embedding_type`), "openai" (`encoding_format`), "tei" (TEI's `POST /embed`).
    kind: Literal["jina", "openai", "tei"] | None = None
    url: Str = "sim://"
    api_key: Str = ""
    keys: tuple[Str, ...] = ()  # a pool of keys; `api_key` is a pool of one
    # The old name of `kind` (jina | openai), read when `kind` is not set.
    api: Literal["jina", "openai"] = "jina"
    # Public model → this upstream's name for it; None: every model no other upstream names.
    models: ModelMap | None = None
    priority: Int = 1  # lower is tried first; equal priorities share the load by weight
    weight: Weight = 1.0
    drop_params: Bool = False  # drop request fields this kind cannot take instead of refusing them (422)
    # USD per 1M tokens per model billed here (0 for a self-hosted one); a model not listed uses `prices`.
    prices: dict[Str, Delay] = field(default_factory=dict)
    # Vectors this upstream returns are cached apart from every other upstream's (None: shared by public model).
    cache_namespace: Str | None = None
    # A key the upstream refused (401/403) is left out for this long, then tried again.
    eject_s: Seconds = 300.0
    # Consecutive failed calls (5xx, timeouts, connection errors past the retries) that open the breaker, and
    # the time it stays open before one probe call may go.
    breaker_failures: Count = 5
    breaker_open_s: Seconds = 10.0
    timeout_s: Seconds = 30.0
    max_retries: Zeroable = 4
    backoff_base_s: Delay = 0.2
    backoff_max_s: Delay = 8.0
    # The upstream's per-request input limit; larger miss lists are split into several calls.
    max_inputs_per_call: dict[Str, Count] = field(
        default_factory=lambda: {"jina-embeddings-v4": 512, "jina-embeddings-v3": 2048}
    )
    default_max_inputs_per_call: Count = 2048
    limits: UpstreamLimits = field(default_factory=UpstreamLimits)
    sim: SimSettings = field(default_factory=SimSettings)
    tls: UpstreamTls = field(default_factory=UpstreamTls)
    # Call through the proxy the environment names (HTTP(S)_PROXY, NO_PROXY, its ~/.netrc credentials), read at start.
    trust_env: Bool = True

    def max_inputs_for(self, model: str) -> int:
        return self.max_inputs_per_call.get(model, self.default_max_inputs_per_call)

    @property
    def wire(self) -> Literal["jina", "openai", "tei"]:
        return self.kind or self.api

    @property
    def pool(self) -> tuple[str, ...]:
        """The keys calls may use ('' alone: no Authorization header)."""
        return self.keys or (self.api_key,)

    def upstream_model(self, public: str) -> str:
        return public if self.models is None else self.models[public]


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class RedisOptions:
    """Pool, timeouts, retries and TLS of one Redis store (the URL says which kind: see gateway/store/redis.py)."""

    # Per process (per node in a cluster); a request holds one connection for its one round trip. Past it a command
    # waits for a free connection (up to connect_timeout_s) — but in a cluster redis-py cannot wait and fails it,
    # so there keep it above the requests one worker has in flight.
    max_connections: Count = 512
    # Connecting may be slower than a command (TLS handshake); None = the store's socket_timeout_s.
    connect_timeout_s: Seconds | None = None
    # Retries of a command after a connection error or timeout, with jittered exponential backoff.
    retries: Zeroable = 1
    retry_backoff_s: Delay = 0.05
    health_check_interval_s: Zeroable = 30
    # rediss:// only: CA bundle to trust, client certificate for mutual TLS, and whether to verify the server.
    tls_ca_file: Str | None = None
    tls_cert_file: Str | None = None
    tls_key_file: Str | None = None
    tls_verify: Bool = True


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Cache:
    url: Str = "memory://"
    ttl_s: Count = 30 * 24 * 3600
    scope: Literal["global", "team"] = "global"
    # Bound of the in-memory store (memory:// only), in bytes of stored entries.
    max_bytes: Count = 512 * 1024 * 1024
    # Seconds the cache is bypassed after a refused connection, or after the store answered nothing for this
    # long: an outage costs one failed call per period, not one per request; one slow command fails only its callers.
    error_backoff_s: Delay = 1.0
    socket_timeout_s: Seconds = 0.5
    redis: RedisOptions = field(default_factory=RedisOptions)
    # In-process LRU of hot entries (decoded, with their renderings) in front of a Redis cache; 0 = off.
    hot_max_bytes: Zeroable = 64 * 1024 * 1024
    # In-process memo of recently parsed request bodies → the parsed request and its keys, so an exact repeat
    # skips decoding, validation and hashing; 0 = off.
    hot_requests_max_bytes: Zeroable = 16 * 1024 * 1024


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class State:
    url: Str = "memory://"
    socket_timeout_s: Seconds = 1.0
    redis: RedisOptions = field(default_factory=RedisOptions)


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Limits:
    """What one client connection and one request may take of this process."""

    max_body_bytes: Count = 16 * 1024 * 1024
    max_inputs_per_request: Count = 2048
    request_timeout_s: Seconds = 60.0
    # A connection that has not sent a request's whole head this long after it opened (or after its last answer) is
    # closed: slow-header clients cannot hold sockets.
    header_timeout_s: Seconds = 10.0
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: Seconds = 75.0
    # Client connections this process holds open at once; one more is refused with a 503 and closed.
    max_connections: Count = 1024
    # Deepest nesting of arrays and objects a JSON body may have; deeper is a 422 at parse time, naming the field.
    max_json_depth: Count = 64


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Coalesce:
    max_batch_inputs: Count = 256
    max_batch_tokens: Count = 131_072
    max_wait_ms: Delay = 50.0
    # Inputs arriving less than this apart while the group has a call in flight are a burst: they batch until
    # the burst pauses this long (or max_wait_ms); an input arriving alone takes a free call slot at once.
    quiet_ms: Delay = 2.0
    max_queue_inputs: Count = 100_000


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Quota:
    requests_per_minute: Count | None = None
    tokens_per_minute: Count | None = None
    tokens_per_day: Count | None = None
    tokens_per_month: Count | None = None


def _webhook_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError("must be http:// or https://")
    return url


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Budget:
    """A team's money budget per UTC calendar month, priced with `prices` (see gateway/budget.py)."""

    usd_per_month: Annotated[float, Strict(), Field(gt=0)]
    # Fractions of the budget at which an alert fires, once per month each (0.8 = 80%).
    alerts: tuple[Annotated[float, Strict(), Field(gt=0, le=10)], ...] = (0.5, 0.8, 1.0)
    # POSTed {team, month, spent, budget, threshold} on each alert, retried with backoff.
    webhook_url: Annotated[str, Strict(), AfterValidator(_webhook_url)] | None = None


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Team:
    name: Str
    keys: tuple[KeyHash, ...] = ()
    quota: Quota = field(default_factory=Quota)
    # The models this team may use (others: 403); None = every model.
    models: Annotated[tuple[Name, ...], Field(min_length=1)] | None = None
    max_inputs_per_request: Count | None = None
    # Its share of the upstream when work queues.
    weight: Annotated[float, Strict(), Field(gt=0)] = 1.0
    budget: Budget | None = None


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class QuotaSettings:
    cached_token_weight: Delay = 0.0
    on_store_error: Literal["open", "closed"] = "open"
    # Seconds the state store is not asked again after an error (the local limiter or 503 answers meanwhile).
    error_backoff_s: Delay = 1.0


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Metrics:
    token: Str | None = None


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Usage:
    """Durable usage counters (per team, model and UTC day) in the state store."""

    # Requests are tallied in process and written to the state store in one round trip per interval.
    flush_interval_s: Seconds = 1.0
    # Day hashes expire this long after their last write.
    retention_days: Count = 400
    # Longest date range one `GET /v1/usage` may ask for.
    max_query_days: Count = 366


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Batch:
    """Batch jobs (files + jobs in the state store) and this process's worker that runs them."""

    max_file_bytes: Count = 100 * 1024 * 1024
    max_lines_per_file: Count = 50_000
    # Jobs of one team that are queued or running at once; more get 429.
    max_active_jobs_per_team: Count = 4
    # Jobs this process runs at once (0: this replica accepts jobs but leaves running them to others).
    workers: Zeroable = 2
    # A running job's claim expires this long after its holder stops renewing it (crash → takeover).
    lease_s: Seconds = 30.0
    # How often a running job renews its lease and looks for a cancel.
    heartbeat_s: Seconds = 1.0
    # How often an idle worker looks for jobs another replica accepted.
    poll_s: Seconds = 1.0
    # Lines per checkpoint: a crash re-runs at most this many lines (from the cache, so free).
    chunk_lines: Count = 256
    # Chunks of one job in flight at once (committed in order) while no interactive request comes in: 2 doubles
    # an idle job's lines/s over a 20 ms upstream (`python -m bench --only 7`); raise it for a slower upstream.
    # While interactive requests come in, the job's steps take turns instead (`yield_*` below).
    chunks_in_flight: Count = 2
    # Inputs merged into one call of the embedding service.
    max_inputs_per_call: Count = 2048
    # While interactive requests are being served (one came in within `yield_quiet_s`), a job yields: its lines
    # go in steps of `yield_step_lines` (short stretches of event-loop work, small upstream calls), and it pauses
    # after each step so its CPU stays under `yield_cpu_share` of the event loop. Idle, it runs at full speed.
    yield_quiet_s: Delay = 1.0
    yield_step_lines: Count = 32
    yield_cpu_share: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.25
    # Deadline of one such call: batch work queues behind interactive work, so it is generous.
    call_timeout_s: Seconds = 300.0
    # Attempts at lines whose upstream calls keep failing (5xx, timeouts) before they go to the errors stream.
    max_attempts: Count = 5
    # Files, finished jobs, their output and errors are deleted this long after they were written or finished.
    retention_s: Count = 24 * 3600


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class Config:
    listen: Listen = field(default_factory=Listen)
    upstream: Upstream = field(default_factory=Upstream)
    # Several upstreams (instead of `upstream:`); a request's model picks those that serve it.
    upstreams: tuple[Upstream, ...] = ()
    cache: Cache = field(default_factory=Cache)
    state: State = field(default_factory=State)
    limits: Limits = field(default_factory=Limits)
    coalesce: Coalesce = field(default_factory=Coalesce)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    metrics: Metrics = field(default_factory=Metrics)
    usage: Usage = field(default_factory=Usage)
    batch: Batch = field(default_factory=Batch)
    teams: tuple[Team, ...] = ()
    admin_keys: tuple[KeyHash, ...] = ()
    # USD per 1M tokens, per model, for the cost metrics and the usage API.
    prices: dict[Str, Delay] = field(default_factory=dict)
    shutdown_timeout_s: Delay = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @property
    def routes(self) -> tuple[Upstream, ...]:
        """Every upstream: the `upstreams:` list, or the single `upstream:` block."""
        return self.upstreams or (self.upstream,)

    def named_models(self) -> set[str]:
        """Every model a price or an upstream's `models` names (any other model is priced 0 everywhere)."""
        return set(self.prices) | {m for up in self.routes for m in (*up.prices, *(up.models or ()))}

    def price(self, upstream: Upstream, model: str) -> float:
        """USD per 1M tokens of `model` billed by `upstream`: its own `prices`, else the top-level ones."""
        return upstream.prices.get(model, self.prices.get(model, 0.0))

    @functools.cached_property
    def hit_prices(self) -> dict[str, float]:
        """USD per 1M tokens per model as the model's first-choice upstream bills it (the weighted mean when several
        share the lowest priority): what a cache hit saves. Made once per config; a model not in it costs 0."""
        routes = self.routes
        prices = {}
        for model in self.named_models():
            first = first_choices(routes, model)
            total = sum(up.weight for up in first)
            prices[model] = sum(self.price(up, model) * up.weight for up in first) / total if first else 0.0
        return prices

    def reads_token_ids(self, model: str) -> bool:
        """Whether every upstream that may serve `model` reads inputs given as tokenizer ids (Jina's do not)."""
        serving = [u for u in self.routes if u.models is not None and model in u.models]
        serving = serving or [u for u in self.routes if u.models is None]
        return bool(serving) and all(u.wire != "jina" for u in serving)


def serving(routes: Sequence[Upstream], model: str | None) -> list[Upstream]:
    """The upstreams that may serve `model` (None: a model no upstream names): those naming it, then those
    without `models`, which serve every model."""
    named = [up for up in routes if up.models is not None and model in up.models] if model is not None else []
    return named + [up for up in routes if up.models is None]


def first_choices(routes: Sequence[Upstream], model: str | None) -> list[Upstream]:
    """The upstreams a call for `model` tries first: those of the lowest `priority` serving it."""
    candidates = serving(routes, model)
    top = min((up.priority for up in candidates), default=0)
    return [up for up in candidates if up.priority == top]


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
    raise ConfigError(f"line {line}: environment variable {name} is not set: set {name} in the environment, "
                      f"or write ${{{name}:-default}} in the file")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    text = Path(path).read_text(encoding="utf-8")
    return parse_config(text, env)


def parse_config(text: str, env: Mapping[str, str] | None = None) -> Config:
    text = interpolate(text, os.environ if env is None else env)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from exc
    if data is None:
        raise ConfigError("<root>: the file is empty; start from config/demo.yaml (embedded demo) or "
                          "config/gateway.yaml (production example)")
    return from_data(data)


def from_data(data: Any) -> Config:
    """Builds and checks a Config from plain data (parsed YAML, or a dict in tests)."""
    config: Config = build(Config, data, "")
    _check(config)
    return config


@functools.cache
def _adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def build(tp: Any, value: Any, path: str) -> Any:
    """Validates plain YAML data as type `tp` (ranges and types, not cross-key rules); errors name the key path."""
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as exc:
        prefix = tuple(path.split(".")) if path else ()
        raise ConfigError("\n".join(_describe(e, tp, prefix) for e in exc.errors())) from None


def _check(config: Config) -> None:
    """The rules that span several keys."""
    names = [t.name for t in config.teams]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"teams.{i}.name: duplicate team name {name!r}")
    seen: dict[str, str] = {}
    for i, team in enumerate(config.teams):
        for j, key in enumerate(team.keys):
            if key in seen:
                raise ConfigError(f"teams.{i}.keys.{j}: key already belongs to team {seen[key]!r}")
            seen[key] = team.name
    _check_upstreams(config)
    for where, url in (("cache.url", config.cache.url), ("state.url", config.state.url)):
        _check_store_url(url, where)
    if config.batch.lease_s < 2 * config.batch.heartbeat_s:
        raise ConfigError("batch.lease_s: must be at least twice batch.heartbeat_s, or a live worker loses its jobs")


def _check_upstreams(config: Config) -> None:
    if config.upstreams and config.upstream != Upstream():
        raise ConfigError("upstream: give either `upstream:` or `upstreams:`, not both")
    paths = ([(f"upstreams.{i}", up) for i, up in enumerate(config.upstreams)] if config.upstreams
             else [("upstream", config.upstream)])
    names: set[str] = set()
    for where, up in paths:
        if up.name in names or not re.fullmatch(r"[A-Za-z0-9_.-]+", up.name):
            raise ConfigError(f"{where}.name: must be unique and of letters, digits, '_', '.', '-'; got {up.name!r}")
        names.add(up.name)
        if not up.url.startswith(("sim://", "http://", "https://")):
            raise ConfigError(f"{where}.url: must be http://, https:// or sim://")
        if up.keys and up.api_key:
            raise ConfigError(f"{where}.keys: give either `api_key` or `keys`, not both")
        if up.tls.key_file is not None and up.tls.cert_file is None:
            raise ConfigError(f"{where}.tls.key_file: needs {where}.tls.cert_file (the certificate it belongs to)")
        if up.cache_namespace is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", up.cache_namespace):
            raise ConfigError(f"{where}.cache_namespace: must be of letters, digits, '_', '.', '-'; "
                              f"got {up.cache_namespace!r}")
    _check_namespaces(config, dict(paths))


def _check_namespaces(config: Config, paths: dict[str, Upstream]) -> None:
    """A request is looked up in its model's first-choice namespace: upstreams sharing the lowest priority for a
    model must share one, or half the answers would be stored where no lookup goes."""
    where = {id(up): path for path, up in paths.items()}
    routes = config.routes
    for model in [*sorted({m for up in routes for m in up.models or ()}), None]:
        first = first_choices(routes, model)
        if len({up.cache_namespace for up in first}) > 1:
            names = ", ".join(repr(up.name) for up in first)
            served = "any model they do not name" if model is None else repr(model)
            raise ConfigError(
                f"{where[id(first[-1])]}.cache_namespace: upstreams {names} serve {served} first (priority "
                f"{first[0].priority}) with different cache namespaces; give them the same `cache_namespace` or "
                "different priorities")


def _check_store_url(url: str, where: str) -> None:
    if url.startswith("memory://"):
        return
    from .store.redis import parse_url  # the store owns its URL grammar; it imports nothing from here

    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
               "int_from_float": "int"}


def _describe(error: ErrorDetails, root: Any, prefix: tuple[str, ...]) -> str:
    """One pydantic error as `key.path: what is wrong`, in the words users of this file know."""
    loc = error["loc"]
    where = ".".join(map(str, prefix + loc)) or "<root>"
    kind, ctx, value = error["type"], error.get("ctx", {}), error["input"]
    got = f"got {type(value).__name__} {value!r}" if kind in _TYPE_NAMES else f"got {value!r}"
    if kind in _TYPE_NAMES:
        return f"{where}: expected {_TYPE_NAMES[kind]}, {got}"
    if kind in ("dataclass_type", "dict_type", "model_type"):
        return f"{where}: expected a mapping, got {type(value).__name__}"
    if kind in ("tuple_type", "list_type"):
        return f"{where}: expected a list, got {type(value).__name__}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "unexpected_keyword_argument":
        known = _fields_at(root, loc[:-1])
        return f"{where}: unknown key (known: {', '.join(known)})"
    if kind == "literal_error":
        return f"{where}: expected one of {list(typing.get_args(_type_at(root, loc)))}, {got}"
    if kind == "value_error":
        return f"{where}: {ctx['error']}"
    return f"{where}: {_range(kind, ctx) or error['msg']}, {got}"


def _range(kind: str, ctx: dict[str, Any]) -> str | None:
    if kind == "greater_than_equal":
        return "must not be negative" if ctx["ge"] == 0 else f"must be at least {ctx['ge']:g}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']:g}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']:g}"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} item"
    return None


def _type_at(tp: Any, loc: tuple[int | str, ...]) -> Any:
    """The type the config expects at `loc` (Annotated and Optional unwrapped), or None past a known key."""
    for part in loc:
        tp = _unwrap(tp)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            tp = typing.get_type_hints(tp).get(str(part))
        elif typing.get_origin(tp) in (tuple, dict):
            tp = typing.get_args(tp)[-1] if typing.get_origin(tp) is dict else typing.get_args(tp)[0]
        else:
            return None
    return _unwrap(tp)


def _fields_at(tp: Any, loc: tuple[int | str, ...]) -> list[str]:
    section = _type_at(tp, loc)
    return sorted(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else []


def _unwrap(tp: Any) -> Any:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp
