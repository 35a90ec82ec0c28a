"""The shared cache store's interface and its Redis backend (plain, TLS, sentinel, cluster URLs of
`store/redis.py`). `memory://` has no store: the cache's in-process tier is the whole cache (cache.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .redis import ClientOptions


class CacheStore(Protocol):
    """Binary values by binary key, with a TTL. `get_many` is one round trip for all keys.

    A command the store did not answer in time raises the builtin `TimeoutError` (its callers alone fail);
    any other exception means the store cannot be reached or refused the command."""

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def open_cache_store(
    url: str, *, max_bytes: int, socket_timeout_s: float = 0.5, options: ClientOptions | None = None
) -> CacheStore:
    from .redis import RedisCacheStore

    return RedisCacheStore.from_url(url, socket_timeout_s=socket_timeout_s, options=options)
