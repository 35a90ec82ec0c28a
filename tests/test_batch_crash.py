"""A real gateway process killed with -9 half way through a batch job, then started again: the job completes
from its last checkpoint, every custom_id exactly once, and the upstream bills each unique input once, plus at
most what was in flight at the kill: `chunks_in_flight × chunk_lines` inputs (docs/batch.md).

The upstream is the simulator in its own process (`embedding-gateway sim --bill-gone`), so its counters outlive
the kill, and it bills the calls whose caller died as a real upstream does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.auth import hash_key
from gateway.keys import CACHE_PREFIX, batch_key

from .conftest import TEAM_A_KEY, auth
from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
MODEL = "jina-embeddings-v3"
LINES = 3000
UNIQUE = 2500  # line i embeds text(i % UNIQUE): 500 lines repeat an input of another line
CHUNK_LINES, CHUNKS_IN_FLIGHT = 100, 2
IN_FLIGHT_BOUND = CHUNKS_IN_FLIGHT * CHUNK_LINES  # one input per line here


def text(i: int) -> str:
    return f"passage {i}: pack my box with five dozen liquor jugs"


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def until(check: Callable[[], Any], what: str, limit_s: float = 30) -> Any:
    """Polls an outside process until `check()` returns a truthy value (bounded)."""
    for _ in range(int(limit_s / 0.02)):
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
async def test_kill_9_half_way_then_restart_completes_each_line_once_and_rebills_at_most_what_was_in_flight(
    redis_url: str, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    sim_port, ports = free_port(), [free_port(), free_port()]
    sim_args = ["sim", "--port", str(sim_port), "--latency-ms", "100", "--bill-gone"]
    processes.append(spawn(sim_args, tmp_path / "sim.log"))
    config = tmp_path / "gateway.yaml"
    config.write_text(orjson.dumps({
        "upstream": {"url": f"http://127.0.0.1:{sim_port}/v1", "api_key": "sk-test", "backoff_base_s": 0.01},
        "cache": {"url": redis_url},
        "state": {"url": redis_url},
        "teams": [{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)]}],
        "batch": {"chunk_lines": CHUNK_LINES, "chunks_in_flight": CHUNKS_IN_FLIGHT, "lease_s": 2, "heartbeat_s": 0.5,
                  "poll_s": 0.2},
    }).decode())  # JSON is YAML
    redis = aioredis.Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as http:
        sim_url = f"http://127.0.0.1:{sim_port}"

        async def sim_stats() -> dict[str, int]:
            async with http.get(sim_url + "/_sim/stats") as resp:
                stats: dict[str, int] = await resp.json()
                return stats

        async def up(url: str) -> bool:
            try:
                async with http.get(url) as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        async def start_gateway(port: int) -> str:
            log = tmp_path / f"gateway-{port}.log"
            processes.append(spawn(["serve", "--config", str(config), "--port", str(port)], log))
            url = f"http://127.0.0.1:{port}"
            await until(lambda: up(url + "/healthz"), "the gateway to listen")
            return url

        await until(lambda: up(sim_url + "/"), "the sim to listen")
        gw = await start_gateway(ports[0])
        # 30% of the unique inputs were embedded before the job.
        async with http.post(gw + "/v1/embeddings", headers=auth(),
                             json={"model": MODEL, "input": [text(i) for i in range(0, UNIQUE, 10)]
                                   + [text(i) for i in range(1, UNIQUE, 10)] + [text(i) for i in range(2, UNIQUE, 10)]}
                             ) as resp:
            assert resp.status == 200

        rows = b"".join(orjson.dumps({"custom_id": f"id-{i}", "body": {"input": text(i % UNIQUE)}}) + b"\n"
                        for i in range(LINES))
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", rows, filename="corpus.jsonl")
        async with http.post(gw + "/v1/files", data=form, headers=auth()) as resp:
            file_id = (await resp.json())["id"]
        async with http.post(gw + "/v1/batch/embeddings", headers=auth(),
                             json={"model": MODEL, "input_file_id": file_id}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]

        async def job() -> dict[str, Any]:
            async with http.get(f"{gw}/v1/batch/{job_id}", headers=auth()) as resp:
                body: dict[str, Any] = await resp.json()
                return body

        await until(lambda: _at_least(job, LINES // 2), "half of the job")
        # Stop the upstream answering, so the kill lands with calls in flight: the upstream bills them (it has
        # done the work) and the restarted gateway, which never saw their answers, sends their inputs again.
        await http.post(sim_url + "/_sim/pause")

        async def held() -> bool:
            # Waiting for a held call closes a race: the pause could land while the gateway had nothing in
            # flight, and the kill then proved nothing about in-flight calls.
            return bool((await sim_stats())["held"] >= 1)

        await until(held, "a held call")
        processes[-1].kill()
        processes[-1].wait()

        job_key = batch_key("team-a", "job", job_id)
        at_kill = {k.decode(): v.decode() for k, v in (await redis.hgetall(job_key)).items()}
        assert at_kill["status"] == "in_progress" and 0 < int(at_kill["completed"]) < LINES
        assert await redis.exists(job_key + ":lease")  # the dead process's claim, until it expires
        await until(lambda: _held_gone(sim_stats), "the held calls to lose their caller")
        await http.post(sim_url + "/_sim/resume")

        gw = await start_gateway(ports[1])
        done = await until(lambda: _finished(job), "the job to complete", limit_s=60)
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        log = (tmp_path / f"gateway-{ports[1]}.log").read_text()
        assert f"running from chunk {at_kill['next_chunk']} of {LINES // 100}" in log

        async with http.get(f"{gw}/v1/batch/{job_id}/output", headers=auth()) as resp:
            out = [orjson.loads(x) for x in (await resp.read()).splitlines()]
        async with http.get(f"{gw}/v1/batch/{job_id}/errors", headers=auth()) as resp:
            assert await resp.read() == b""
        stats = await sim_stats()
    cached = await redis.keys(CACHE_PREFIX + b"*")
    await redis.aclose()
    print(f"\nbilled {stats['inputs']} inputs for {UNIQUE} distinct: {stats['inputs'] - UNIQUE} re-billed "
          f"(bound {IN_FLIGHT_BOUND}), {stats['dropped']} calls dropped")

    assert sorted(o["custom_id"] for o in out) == sorted(f"id-{i}" for i in range(LINES))
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert stats["dropped"] >= 1  # calls were in flight at the kill: their answers had no caller left
    # The 30% before the job, then each new unique input once, but for what was in flight at the kill.
    assert UNIQUE <= stats["inputs"] <= UNIQUE + IN_FLIGHT_BOUND
    assert len(cached) == UNIQUE  # every distinct input is cached once the job is done


async def _at_least(job: Callable[[], Any], lines: int) -> bool:
    return bool((await job())["request_counts"]["completed"] >= lines)


async def _held_gone(stats: Callable[[], Any]) -> bool:
    s = await stats()
    return bool(s["held"] == s["held_gone"])


async def _finished(job: Callable[[], Any]) -> Any:
    body = await job()
    return body if body["status"] in ("completed", "failed", "cancelled") else None
