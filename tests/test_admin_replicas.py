"""Three gateway processes on one state Redis: a team and key made through one replica are accepted by the others
within 2 s without a reload, and a key revoked through another is refused by all three within 2 s."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from .conftest import ADMIN_KEY, base_config
from .gateways import serve
from .redis_server import free_port

REPLICAS = 3
PROPAGATION_S = 2.0  # the promise


@contextlib.contextmanager
def serve_replicas(redis_url: str, tmp_path: Path, **overrides: Any) -> Iterator[list[str]]:
    """`REPLICAS` gateway processes (`serve`) sharing one Redis for cache and state; their base URLs."""
    configs = [base_config(listen={"host": "127.0.0.1", "port": free_port()}, cache={"url": redis_url},
                           state={"url": redis_url}, log_level="WARNING", **overrides) for _ in range(REPLICAS)]
    with serve(tmp_path, configs) as urls:
        yield urls


@pytest.fixture
def replicas(redis_url: str, tmp_path: Path) -> Iterator[list[str]]:
    with serve_replicas(redis_url, tmp_path) as urls:
        yield urls


def embed_status(url: str, key: str) -> int:
    resp = requests.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "jina-embeddings-v3", "input": ["replicated"]}, timeout=10)
    return resp.status_code


def until(condition: Callable[[], bool], within_s: float) -> bool:
    """Polls `condition` until it holds or `within_s` has passed since the change it waits for."""
    deadline = time.monotonic() + within_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def admin(url: str, method: str, path: str, body: object = None) -> requests.Response:
    return requests.request(method, url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                            data=None if body is None else orjson.dumps(body), timeout=10)


@pytest.mark.slow
def test_keys_made_and_revoked_on_one_replica_hold_on_all_within_2_s(replicas: list[str]) -> None:
    one, two, three = replicas
    assert admin(one, "POST", "/admin/teams", {"name": "search"}).status_code == 201
    made = admin(one, "POST", "/admin/teams/search/keys", {"label": "fleet"})
    created = time.monotonic()
    assert made.status_code == 201
    key = made.json()["key"]
    assert embed_status(one, key) == 200  # the replica that made it knows at once
    for url in (two, three):
        left = PROPAGATION_S - (time.monotonic() - created)
        assert until(lambda u=url: embed_status(u, key) == 200, left), f"{url} never accepted the new key"
    # Every replica lists the API team next to the config-file ones.
    assert [t["name"] for t in admin(two, "GET", "/admin/teams").json()["data"]] == ["team-a", "team-b", "search"]

    assert admin(three, "DELETE", f"/admin/keys/{made.json()['id']}").status_code == 200
    revoked = time.monotonic()
    assert embed_status(three, key) == 401
    for url in (one, two):
        left = PROPAGATION_S - (time.monotonic() - revoked)
        assert until(lambda u=url: embed_status(u, key) == 401, left), f"{url} still accepts a revoked key"
    # Once refused, refused on every later request too.
    assert [embed_status(url, key) for url in replicas] == [401, 401, 401]
    actions = [e["action"] for e in admin(two, "GET", "/admin/audit").json()["data"]]
    assert actions == ["team.create", "key.create", "key.revoke"]
