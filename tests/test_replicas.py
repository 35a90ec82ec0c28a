"""Replicas: three gateway processes on one Redis share a team's quota exactly under 500 concurrent requests,
whether they are three `serve` processes on three ports or one `serve --workers 3` on one port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import requests

from gateway.auth import hash_key

from .conftest import TEAM_A_KEY, base_config
from .redis_server import free_port
from .reliability import Answer, assert_error_shape, record, send

ROOT = Path(__file__).resolve().parent.parent
REPLICAS = 3
REQUESTS = 500
# Each request is one new 4-character input: the gateway's estimate (bytes/4 + 2) and the simulator's count
# (words + 2) are both 3 tokens, so reservations need no reconciling and the admitted count is exact.
TOKENS_PER_REQUEST = 3
ADMITTED = 137


@pytest.fixture(params=["3 serve processes", "serve --workers 3"])
def replicas(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    """Three gateway processes sharing one Redis for cache and state; the URLs to send to (one per port)."""
    procs, urls = [], []
    team = {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)],
            "quota": {"tokens_per_month": ADMITTED * TOKENS_PER_REQUEST}}
    workers = request.param == "serve --workers 3"
    try:
        for i in range(1 if workers else REPLICAS):
            port = free_port()
            config = base_config(
                listen={"host": "127.0.0.1", "port": port}, cache={"url": redis_url}, state={"url": redis_url},
                teams=[team], log_level="WARNING",
            )
            path = tmp_path / f"replica-{i}.yaml"
            path.write_bytes(orjson.dumps(config))  # JSON is YAML
            with (tmp_path / f"replica-{i}.log").open("wb") as log:  # the child keeps its own descriptor
                args = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
                procs.append(subprocess.Popen([*args, "--workers", str(REPLICAS)] if workers else args,
                                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls, strict=True):
            _wait_ready(proc, url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    import time

    for _ in range(600):
        assert proc.poll() is None, f"replica {url} exited at start"
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)  # a process starting: nothing to wait on but its port
    raise AssertionError(f"replica {url} never answered")


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
