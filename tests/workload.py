"""A small scripted workload over two teams and two models: misses, hits, joined inputs and an upstream retry.

What it sent and what the gateway answered (summed from response headers) come back for exact comparisons.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.sim import Fault, Simulator

from .conftest import TEAM_A_KEY, TEAM_B_KEY, auth

MODEL = "jina-embeddings-v3"
NANO = "jina-embeddings-v5-text-nano"


@dataclass
class Sent:
    """Totals per team as the responses told them (inputs are distinct within each request)."""

    requests: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    joined: dict[str, int] = field(default_factory=dict)
    upstream_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, team: str, inputs: int, headers: Any) -> None:
        for name, value in (
            ("requests", 1), ("inputs", inputs), ("hits", int(headers["X-Cache-Hits"])),
            ("misses", int(headers["X-Cache-Misses"])), ("joined", int(headers["X-Cache-Joined"])),
            ("upstream_tokens", int(headers["X-Upstream-Tokens"])),
        ):
            counter = getattr(self, name)
            counter[team] = counter.get(team, 0) + value

    def total(self, name: str) -> int:
        return sum(getattr(self, name).values())


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag} {i}: pack my box with five dozen liquor jugs" for i in range(n)]


async def embed(client: Any, sent: Sent, key: str, model: str, items: list[str]) -> None:
    body = orjson.dumps({"model": model, "input": items})
    resp = await client.post("/v1/embeddings", data=body, headers=auth(key))
    assert resp.status == 200, await resp.text()
    await resp.read()
    sent.add("team-a" if key == TEAM_A_KEY else "team-b", len(items), resp.headers)


async def run_workload(client: Any, sim: Simulator, sent: Sent | None = None, tag: str = "w") -> Sent:
    """Needs a simulated upstream latency of some ms, so the concurrent pair really overlaps."""
    sent = sent or Sent()
    old, new = texts(8, f"{tag}-old"), texts(8, f"{tag}-new")
    await embed(client, sent, TEAM_A_KEY, MODEL, old)  # 8 misses
    await embed(client, sent, TEAM_A_KEY, MODEL, old[:4] + new[:4])  # 4 hits, 4 misses
    shared = texts(6, f"{tag}-shared")
    await asyncio.gather(  # the second caller joins the first one's in-flight inputs
        embed(client, sent, TEAM_B_KEY, MODEL, shared), embed(client, sent, TEAM_A_KEY, MODEL, shared)
    )
    sim.inject(Fault(kind="status", status=503))  # one failed attempt, retried
    await embed(client, sent, TEAM_B_KEY, NANO, texts(5, f"{tag}-nano"))
    await embed(client, sent, TEAM_B_KEY, NANO, texts(7, f"{tag}-nano"))  # 5 hits, 2 misses
    return sent
