"""Redis backends. One connection pool per URL; hiredis parses replies when installed.

URLs (cache and state alike):
  redis://[:password@]host:port/db, rediss://… (TLS), unix:///path/to.sock?db=N
  redis+sentinel://[:password@]host:port[,host:port…]/service_name[/db]   (rediss+sentinel:// for TLS)
  redis+cluster://[:password@]host:port[,host:port…]                      (rediss+cluster:// for TLS)
The sentinel password, when the sentinels have one, goes in the query: `?sentinel_password=…`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..keys import CACHE_PREFIX

try:  # redis-py >= 8 reads its package metadata for every new connection unless given this once
    from redis.driver_info import DriverInfo

    _DRIVER: dict[str, Any] = {"driver_info": DriverInfo()}
except ImportError:  # pragma: no cover - older redis-py
    _DRIVER = {}

log = logging.getLogger("gateway.store")
# The longest a command waits for a pooled connection. redis-py's default pool raises MaxConnectionsError once
# `max_connections` commands are in flight, which one burst of requests reaches: the cache would be bypassed
# and quotas would fail over exactly when the load is highest. Waiting for a connection is queueing inside this
# process, not a sick Redis (the socket timeout catches that), so the wait may be longer than a command.
POOL_WAIT_S = 5.0
# Bytes asked of the socket per read: the cache's largest replies (32 entries of ~4 KB) in one read, not three.
READ_SIZE = 256 * 1024
# The most entries one cache-write script sets (1 MB of 1024-dim entries: Redis runs it in well under a ms).
SET_SCRIPT_KEYS = 256

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://", "redis+cluster://",
           "rediss+cluster://")


class ClientOptions(Protocol):
    """Pool, timeouts, retries and TLS of one client, as `config.RedisOptions` holds them (read, never kept)."""

    @property
    def max_connections(self) -> int: ...
    @property
    def connect_timeout_s(self) -> float | None: ...
    @property
    def retries(self) -> int: ...
    @property
    def retry_backoff_s(self) -> float: ...
    @property
    def health_check_interval_s(self) -> float: ...
    @property
    def tls_ca_file(self) -> str | None: ...
    @property
    def tls_cert_file(self) -> str | None: ...
    @property
    def tls_key_file(self) -> str | None: ...
    @property
    def tls_verify(self) -> bool: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class DefaultOptions:
    """The options of a client made without any (tests, tools): `config.RedisOptions`'s defaults."""

    max_connections: int = 512
    connect_timeout_s: float | None = None
    retries: int = 1
    retry_backoff_s: float = 0.05
    health_check_interval_s: float = 30
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True


@dataclass(frozen=True, slots=True)
class Target:
    """What a URL names: `kind` is plain, sentinel or cluster; hosts are the sentinels / startup nodes."""

    kind: str
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def parse_url(url: str) -> Target:
    """Parses a sentinel or cluster URL (plain ones go to redis-py as they are); ValueError names the problem."""
    scheme, sep, _ = url.partition("://")
    if not sep or f"{scheme}://" not in SCHEMES:
        raise ValueError(f"unsupported scheme in {url!r} (one of: {', '.join(SCHEMES)}, memory://)")
    if "+" not in scheme:
        return Target(kind="plain", tls=scheme == "rediss", hosts=())
    kind = scheme.split("+")[1]
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    hosts = tuple(_host_port(h, url) for h in hostlist.split(",") if h)
    if not hosts:
        raise ValueError(f"{url!r}: name at least one host:port")
    segments = [s for s in parts.path.split("/") if s]
    query = parse_qs(parts.query)
    common = {"kind": kind, "tls": scheme.startswith("rediss"), "hosts": hosts,
              "username": unquote(username) or None, "password": unquote(password) or None}
    if kind == "cluster":
        if segments and segments != ["0"]:
            raise ValueError(f"{url!r}: a cluster has only database 0")
        return Target(**common)  # type: ignore[arg-type]
    if not segments or len(segments) > 2:
        raise ValueError(f"{url!r}: expected redis+sentinel://host:port[,host:port]/service_name[/db]")
    db = _int(segments[1], url) if len(segments) == 2 else 0
    sentinel_password = query.get("sentinel_password", [None])[0]
    return Target(service=segments[0], db=db, sentinel_password=sentinel_password, **common)  # type: ignore[arg-type]


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 26379 if "sentinel" in url else 6379
    return host.strip("[]"), _int(port, url)


def _int(text: str, url: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{url!r}: {text!r} is not a number") from None


def connect(url: str, *, socket_timeout_s: float, options: ClientOptions | None = None) -> Any:
    """A client for any supported URL: `Redis` (plain or sentinel-managed master) or `RedisCluster`."""
    opts = options or DefaultOptions()
    target = parse_url(url)
    # Short timeouts and few retries: a dead Redis must cost a request milliseconds, not its whole deadline.
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": opts.connect_timeout_s or socket_timeout_s,
        "health_check_interval": opts.health_check_interval_s,
        # Retries connection errors and timeouts only (redis-py's default set), never a command's own error.
        "retry": Retry(ExponentialWithJitterBackoff(base=opts.retry_backoff_s, cap=opts.retry_backoff_s * 8),
                       opts.retries),
        "decode_responses": False,
        "max_connections": opts.max_connections,
        "socket_read_size": READ_SIZE,
        **_DRIVER,
    }
    if target.tls:
        kwargs.update(_tls(opts, target.kind))
    if target.kind == "plain":
        pool = aioredis.BlockingConnectionPool.from_url(url, timeout=max(POOL_WAIT_S, socket_timeout_s), **kwargs)
        return aioredis.Redis.from_pool(pool)
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, username=target.username, password=target.password, **kwargs)
    return _sentinel_master(target, kwargs)


def _tls(opts: ClientOptions, kind: str) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "ssl_ca_certs": opts.tls_ca_file,
        "ssl_certfile": opts.tls_cert_file,
        "ssl_keyfile": opts.tls_key_file,
        "ssl_cert_reqs": "required" if opts.tls_verify else "none",
        "ssl_check_hostname": opts.tls_verify,
    }
    if kind != "plain":  # from_url sets ssl itself for rediss://; the other constructors need it said
        tls["ssl"] = True
    return tls


def _sentinel_master(target: Target, kwargs: dict[str, Any]) -> Any:
    # The sentinels get the same timeouts and TLS, their own password; the pool follows failovers.
    pool_size = kwargs.pop("max_connections")
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl"))}
    sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs, **kwargs)
    return sentinel.master_for(
        target.service, redis_class=_SentinelManaged, db=target.db, username=target.username,
        password=target.password, max_connections=pool_size,
    )


class _SentinelManaged(aioredis.Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
            await client.aclose()


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class RedisCacheStore:
    """The cache on Redis, through redis-py's pooled client (hiredis parses replies): one MGET per read, one
    script call per write of up to SET_SCRIPT_KEYS entries (a pipeline of SETs in a cluster). A command that gets
    no answer within the socket timeout raises the builtin `TimeoutError` and fails only its own callers; every
    other failure raises `RedisError` or `OSError`."""

    def __init__(self, client: Any, *, prefix: bytes = CACHE_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        # A cluster spreads keys over slots: MGET per slot, pipelined, so still one round trip per node; a script
        # may touch one slot only, so a cluster's writes stay a pipeline of SETs.
        self._mget = client.mget_nonatomic if is_cluster(client) else client.mget
        self._set_script = None if is_cluster(client) else client.register_script(read_lua("cache_set.lua"))

    @classmethod
    def from_url(
        cls, url: str, *, socket_timeout_s: float = 0.5, options: ClientOptions | None = None
    ) -> RedisCacheStore:
        return cls(connect(url, socket_timeout_s=socket_timeout_s, options=options))

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        p = self.prefix
        try:
            return list(await self._mget([p + k for k in keys]))
        except RedisTimeoutError as exc:
            raise TimeoutError(str(exc)) from exc

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> None:
        try:
            if self._set_script is None:
                # Not a transaction: in a cluster the pipeline is split per node and sent to each in one write.
                pipe = self.client.pipeline(transaction=False)
                for key, value in items:
                    pipe.set(self.prefix + key, value, ex=ttl_s)
                await pipe.execute()
                return
            p = self.prefix
            for start in range(0, len(items), SET_SCRIPT_KEYS):  # a script holds Redis while it runs: kept short
                chunk = items[start:start + SET_SCRIPT_KEYS]
                await self._set_script(keys=[p + key for key, _ in chunk], args=[ttl_s, *(v for _, v in chunk)])
        except RedisTimeoutError as exc:
            raise TimeoutError(str(exc)) from exc

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


def read_lua(name: str) -> str:
    """The text of `gateway/store/lua/<name>`, for `register_script`."""
    return resources.files("gateway.store").joinpath("lua", name).read_text(encoding="utf-8")


async def preload_scripts(client: Any) -> None:
    """SCRIPT LOAD every script once at start-up, so the first burst is not a storm of NOSCRIPT retries.

    A store that is down now is not an error: `register_script` loads them on first use anyway.
    """
    lua = resources.files("gateway.store").joinpath("lua")
    try:
        for name in sorted(p.name for p in lua.iterdir() if p.name.endswith(".lua")):
            await client.script_load(read_lua(name))
    except (RedisError, OSError) as exc:
        log.warning("could not preload Lua scripts into the state store (%s); they load on first use", exc)
