"""Redis backends. One connection pool per URL; hiredis parses replies when installed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from ..keys import CACHE_PREFIX


def connect(url: str, *, socket_timeout_s: float) -> Any:
    # Short timeouts: a dead Redis must cost a request milliseconds, never the client's whole deadline.
    return aioredis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=30,
        decode_responses=False,
    )


class RedisCacheStore:
    def __init__(self, client: Any, *, prefix: bytes = CACHE_PREFIX) -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, *, socket_timeout_s: float = 0.5) -> RedisCacheStore:
        return cls(connect(url, socket_timeout_s=socket_timeout_s))

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        p = self.prefix
        return list(await self.client.mget([p + k for k in keys]))

    async def set_many(self, items: Sequence[tuple[bytes, bytes]], ttl_s: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self.prefix + key, value, ex=ttl_s)
        await pipe.execute()

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
