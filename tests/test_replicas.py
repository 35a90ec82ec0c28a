"""Replicas: three gateway processes on one Redis share a team's quota exactly under 500 concurrent requests,
whether they are three `serve` processes on three ports or one `serve --workers 3` on one port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests

from gateway.auth import hash_key

from .conftest import TEAM_A_KEY, base_config
from .gateways import serve
from .redis_server import free_port
from .reliability import Answer, assert_error_shape, record, send

REPLICAS = 3
REQUESTS = 500
# Each request is one new 4-character input: the gateway's estimate (bytes/4 + 2) and the simulator's count
# (words + 2) are both 3 tokens, so reservations need no reconciling and the admitted count is exact.
TOKENS_PER_REQUEST = 3
ADMITTED = 137


@pytest.fixture(params=["3 serve processes", "serve --workers 3"])
def replicas(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Three gateway processes sharing one Redis for cache and state; the URLs to send to (one per port)."""
    team = {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)],
            "quota": {"tokens_per_month": ADMITTED * TOKENS_PER_REQUEST}}
    workers = request.param == "serve --workers 3"
    configs = [base_config(listen={"host": "127.0.0.1", "port": free_port()}, cache={"url": redis_url},
                           state={"url": redis_url}, teams=[team], log_level="WARNING")
               for _ in range(1 if workers else REPLICAS)]
    with serve(tmp_path, configs, *(["--workers", str(REPLICAS)] if workers else [])) as urls:
        yield urls


def _billed_tokens(url: str) -> float:
    text = requests.get(url + "/metrics", headers={"Authorization": "Bearer metrics-token"}, timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("eg_upstream_tokens_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.mark.slow
async def test_quota_is_exact_across_three_replicas_under_500_concurrent_requests(replicas: list[str]) -> None:
    bodies = [{"model": "jina-embeddings-v3", "input": [f"{i:04d}"]} for i in range(REQUESTS)]
    connector = aiohttp.TCPConnector(limit=REQUESTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers: list[Answer] = await asyncio.gather(*(
            send(session, f"{replicas[i % len(replicas)]}/v1/embeddings", body, TEAM_A_KEY, outer_timeout_s=60)
            for i, body in enumerate(bodies)
        ))
    record(f"{len(replicas)} port(s), 3 processes, 500 concurrent, quota of 137", answers)
    ok = [a for a in answers if a.status == 200]
    assert len(ok) == ADMITTED
    for answer in answers:
        if answer.status != 200:
            assert_error_shape(answer, {429: {"RATE_TOKEN_LIMIT_EXCEEDED"}})
            assert "RateLimit" in answer.headers
    # That the limit was shared is what the exact total proves (three separate limits would admit 3 × 137); how
    # the admissions fall across replicas depends on which connections the scheduler served first, so no check.
    # What the upstream billed is exactly the quota: refused requests never went upstream (with --workers,
    # /metrics adds up every worker's series).
    assert sum(int(a.headers["X-Upstream-Tokens"]) for a in ok) == ADMITTED * TOKENS_PER_REQUEST
    assert sum(_billed_tokens(url) for url in replicas) == ADMITTED * TOKENS_PER_REQUEST
