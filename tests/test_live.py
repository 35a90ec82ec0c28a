"""Hot reload in one process: keys, prices and coalescing change live; a bad file is refused; restart-only settings
keep their running values and are named in the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.live import keep_restart_only
from gateway.sim import SimConfig, Simulator

from .conftest import TEAM_A_KEY, TEAM_B_KEY, auth, base_config, until

TEAM_C_KEY = "eg-test-team-c"
Started = Callable[[dict[str, Any]], Awaitable[tuple[TestClient, Path]]]


@pytest.fixture
def started(aiohttp_client: Any, tmp_path: Path) -> Started:
    """`await started(config_dict)` → (client, config file): a gateway that reloads from that file."""

    async def make(data: dict[str, Any]) -> tuple[TestClient, Path]:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        sim = Simulator(SimConfig(latency_base_ms=30))
        app = create_app(cfg.load_config(path), simulator=sim, config_path=path)
        client: TestClient = await aiohttp_client(app)
        return client, path

    return make


def rotated(data: dict[str, Any]) -> dict[str, Any]:
    """team-a's key removed, a new team-c with its own key, team-b unchanged."""
    return {**data, "teams": [{"name": "team-a", "keys": []}, data["teams"][1],
                              {"name": "team-c", "keys": [hash_key(TEAM_C_KEY)]}]}


async def embed(client: TestClient, key: str, text: str) -> int:
    resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": [text]},
                             headers=auth(key))
    await resp.read()
    return resp.status


async def test_reload_rotates_keys_while_requests_are_in_flight(started: Started) -> None:
    data = base_config()
    client, path = await started(data)
    active = client.app[K.METRICS].active
    tasks = [asyncio.create_task(embed(client, TEAM_B_KEY, f"during {i}")) for i in range(60)]
    await until(lambda: active.count == 60)
    path.write_text(yaml.safe_dump(rotated(data)))
    assert client.app[K.LIVE].reload()
    more = [asyncio.create_task(embed(client, TEAM_B_KEY, f"after {i}")) for i in range(20)]
    assert await asyncio.gather(*tasks, *more) == [200] * 80
    assert await embed(client, TEAM_A_KEY, "x") == 401
    assert await embed(client, TEAM_C_KEY, "x") == 200
    assert await embed(client, TEAM_B_KEY, "x") == 200


async def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(
    started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    data = base_config()
    client, path = await started(data)
    bad = rotated(data)
    bad["teams"][2]["keys"] = ["sha256:not-hex"]
    path.write_text(yaml.safe_dump(bad))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        assert not client.app[K.LIVE].reload()
    assert "config reload refused" in caplog.text
    assert "teams.2.keys.0: expected 'sha256:<64 hex digits>'" in caplog.text
    assert await embed(client, TEAM_A_KEY, "x") == 200
    assert await embed(client, TEAM_C_KEY, "x") == 401
    path.write_text("teams: [")
    assert not client.app[K.LIVE].reload()
    assert "invalid YAML" in caplog.text
    assert await embed(client, TEAM_A_KEY, "x") == 200


async def test_restart_only_settings_keep_their_running_values_and_are_logged(
    started: Started, caplog: pytest.LogCaptureFixture
) -> None:
    data = base_config()
    client, path = await started(data)
    changed = {**data, "cache": {"url": "redis://elsewhere:6379/0"}, "listen": {"port": 9999},
               "limits": {**data["limits"], "max_body_bytes": 1000, "max_inputs_per_request": 2}}
    path.write_text(yaml.safe_dump(changed))
    with caplog.at_level(logging.WARNING, logger="gateway"):
        assert client.app[K.LIVE].reload()
    assert "listen, cache, limits.max_body_bytes changed but need a restart" in caplog.text
    live = client.app[K.LIVE].config
    assert live.cache.url == "memory://" and live.listen.port == 8080
    assert live.limits.max_body_bytes == 16 * 1024 * 1024 and live.limits.max_inputs_per_request == 2
    resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": ["a", "b", "c"]},
                             headers=auth())
    assert resp.status == 422  # the new per-request input limit applies at once


async def test_reload_applies_prices_and_coalescing(started: Started) -> None:
    data = base_config(prices={"jina-embeddings-v3": 1.0})
    client, path = await started(data)
    path.write_text(yaml.safe_dump({**data, "prices": {"jina-embeddings-v3": 1000.0},
                                    "coalesce": {"max_batch_inputs": 3, "max_wait_ms": 5}}))
    assert client.app[K.LIVE].reload()
    coalescer = client.app[K.COALESCER]
    assert coalescer.config.max_batch_inputs == 3 and coalescer.config.max_wait_ms == 5
    resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": ["p", "q"]},
                             headers=auth())
    tokens = int(resp.headers["X-Upstream-Tokens"])
    text = await (await client.get("/metrics", headers=auth("metrics-token"))).text()
    billed = next(line for line in text.splitlines()
                  if line.startswith("eg_cost_usd_total") and 'kind="billed"' in line)
    assert float(billed.split()[-1]) == pytest.approx(tokens * 1000.0 / 1e6)


async def test_reload_changes_a_teams_quota_from_the_next_request(started: Started) -> None:
    data = base_config()
    client, path = await started(data)
    assert await embed(client, TEAM_A_KEY, "free") == 200
    teams = [{**data["teams"][0], "quota": {"requests_per_minute": 1}}, data["teams"][1]]
    path.write_text(yaml.safe_dump({**data, "teams": teams}))
    assert client.app[K.LIVE].reload()
    assert await embed(client, TEAM_A_KEY, "first") == 200
    resp = await client.post("/v1/embeddings", json={"model": "jina-embeddings-v3", "input": ["second"]},
                             headers=auth(TEAM_A_KEY))
    assert resp.status == 429 and (await resp.json())["code"] == "RATE_REQUEST_LIMIT_EXCEEDED"
    assert "RateLimit-Policy" in resp.headers
    assert await embed(client, TEAM_B_KEY, "other team") == 200
    path.write_text(yaml.safe_dump(data))
    assert client.app[K.LIVE].reload()
    assert await embed(client, TEAM_A_KEY, "unlimited again") == 200


def test_limits_bound_at_start_keep_their_running_values() -> None:
    old = cfg.from_data(base_config())
    new = cfg.from_data(base_config(limits={"header_timeout_s": 3, "keepalive_timeout_s": 5, "max_connections": 7,
                                            "max_json_depth": 9, "max_inputs_per_request": 2}))
    effective, pending = keep_restart_only(old, new)
    assert pending == ["limits.header_timeout_s", "limits.keepalive_timeout_s", "limits.max_connections"]
    assert (effective.limits.header_timeout_s, effective.limits.keepalive_timeout_s) == (10.0, 75.0)
    assert effective.limits.max_connections == 1024
    assert (effective.limits.max_json_depth, effective.limits.max_inputs_per_request) == (9, 2)
