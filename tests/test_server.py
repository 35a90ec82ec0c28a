"""The gateway as a real process: drain on SIGTERM, reload on SIGHUP, and `serve --workers 2` on one port."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from gateway.auth import hash_key
from gateway.jobs import RedisJobStore
from gateway.keys import CACHE_PREFIX

from .conftest import TEAM_A_KEY, TEAM_B_KEY, auth, base_config
from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
TEAM_C_KEY = "eg-test-team-c"
pytestmark = pytest.mark.slow


class Proc:
    """`embedding-gateway serve` in a subprocess; stderr lines are collected so a test can wait for one."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.listening = ""
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def started(self) -> Proc:
        assert self.proc.stdout is not None
        self.listening = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
        assert "listening" in self.listening, self.listening
        self._reader = asyncio.create_task(self._read_stderr())
        return self

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._new_line:
                self.lines.append(raw.decode())
                self._new_line.notify_all()

    async def line_with(self, text: str, after: int = 0, count: int = 1) -> str:
        """Waits (an event, not a sleep) for `count` stderr lines containing `text` among lines[after:]."""
        def seen() -> int:
            return sum(text in line for line in self.lines[after:])

        async with self._new_line:
            await asyncio.wait_for(self._new_line.wait_for(lambda: seen() >= count), 30)
        return next(line for line in self.lines[after:] if text in line)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, within: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), within)
        if self._reader is not None:
            await self._reader
        return code


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Proc]]]:
    procs: list[Proc] = []

    async def start(data: dict[str, Any], *args: str) -> Proc:
        port = free_port()
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(data))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port), *args,
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        procs.append(Proc(proc, port))
        return await procs[-1].started()

    yield start
    for p in procs:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.exit_code(30)


def file_config(**overrides: Any) -> dict[str, Any]:
    return base_config(**{"shutdown_timeout_s": 20, **overrides})


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    text = await (await session.get(f"{url}/metrics", headers=auth("metrics-token"))).text()
    total = 0.0
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


async def metric_reaches(session: aiohttp.ClientSession, url: str, name: str, value: float, **labels: str) -> None:
    """Polls /metrics (the gateway is another process) until `name` is at least `value`, for up to ~10 s; the
    caller asserts what it expects afterwards."""
    for _ in range(1000):
        if await metric(session, url, name, **labels) >= value:
            return
        await asyncio.sleep(0.01)


async def test_sigterm_finishes_100_in_flight_requests_and_their_cache_writes(
    serve: Callable[..., Awaitable[Proc]], redis_url: str
) -> None:
    gw = await serve(file_config(cache={"url": redis_url},
                                 upstream={"sim": {"latency_base_ms": 1500}}))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            body = {"model": "jina-embeddings-v3", "input": [f"drain me {i}"]}
            async with session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth()) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(one(i)) for i in range(100)]
        await metric_reaches(session, gw.url, "eg_requests_in_flight", 100)  # until the gateway holds all 100
        assert await metric(session, gw.url, "eg_requests_in_flight") == 100
        gw.signal(signal.SIGTERM)
        await gw.line_with("draining: 100 requests in flight")
        async with aiohttp.ClientSession() as fresh:  # a new connection: refused, no longer accepting
            with pytest.raises(aiohttp.ClientConnectionError):
                await fresh.get(f"{gw.url}/healthz")
        assert await asyncio.gather(*tasks) == [200] * 100
    assert await gw.exit_code(within=25) == 0
    r = aioredis.Redis.from_url(redis_url)
    assert len(await r.keys(CACHE_PREFIX + b"*")) == 100  # every write-behind landed before exit
    await r.aclose()


async def test_sigterm_releases_batch_leases_first_while_requests_still_finish(
    serve: Callable[..., Awaitable[Proc]], redis_url: str
) -> None:
    gw = await serve(file_config(state={"url": redis_url}, cache={"url": redis_url},
                                 upstream={"sim": {"latency_base_ms": 3000}}))
    async with aiohttp.ClientSession() as session:
        lines = [{"custom_id": f"c{i}", "body": {"input": f"batch line {i}"}} for i in range(50)]
        async with session.post(f"{gw.url}/v1/batch/embeddings", headers=auth(),
                                json={"model": "jina-embeddings-v3", "input": lines}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]
        for _ in range(1000):  # until this process's worker has claimed it
            async with session.get(f"{gw.url}/v1/batch/{job_id}", headers=auth()) as resp:
                if (await resp.json())["status"] == "in_progress":
                    break
            await asyncio.sleep(0.01)
        body = {"model": "jina-embeddings-v3", "input": ["interactive"]}
        interactive = asyncio.create_task(session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth()))
        await metric_reaches(session, gw.url, "eg_requests_in_flight", 1)
        gw.signal(signal.SIGTERM)
        await gw.line_with("leases released")
        assert not interactive.done()  # the lease went back while a request was still being answered
        r = aioredis.Redis.from_url(redis_url)
        taken = await RedisJobStore(r, lease_s=30, retention_s=3600).claim("team-a", job_id, "another-replica", 0)
        assert taken is not None and taken.status == "in_progress"
        await r.aclose()
        assert (await interactive).status == 200
    assert await gw.exit_code(within=25) == 0


async def test_a_request_longer_than_the_shutdown_timeout_is_cut_and_the_exit_code_says_so(
    serve: Callable[..., Awaitable[Proc]],
) -> None:
    gw = await serve(file_config(shutdown_timeout_s=0.5, upstream={"sim": {"latency_base_ms": 20000}}))
    async with aiohttp.ClientSession() as session:
        body = {"model": "jina-embeddings-v3", "input": ["too slow"]}
        request = asyncio.create_task(session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth()))
        await metric_reaches(session, gw.url, "eg_requests_in_flight", 1)
        gw.signal(signal.SIGTERM)
        assert "drain: 1 requests still running after 0s; cancelling them" in await gw.line_with("still running")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await request
    assert await gw.exit_code(within=25) == 1


async def test_sighup_rotates_keys_without_a_failed_request_and_refuses_a_bad_file(
    serve: Callable[..., Awaitable[Proc]], tmp_path: Path
) -> None:
    data = file_config(upstream={"sim": {"latency_base_ms": 5}})
    gw = await serve(data)
    path = tmp_path / "gateway.yaml"
    statuses: list[int] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def status(key: str, text: str) -> int:
            body = {"model": "jina-embeddings-v3", "input": [text]}
            async with session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth(key)) as resp:
                await resp.read()
                return resp.status

        async def steady_traffic() -> None:
            i = 0
            while not stop.is_set() or i < 20:
                statuses.extend(await asyncio.gather(*(status(TEAM_B_KEY, f"t{i}-{j}") for j in range(4))))
                i += 1

        traffic = asyncio.create_task(steady_traffic())
        assert await status(TEAM_A_KEY, "a") == 200 and await status(TEAM_C_KEY, "c") == 401
        path.write_text(yaml.safe_dump({**data, "teams": [data["teams"][1],
                                                          {"name": "team-c", "keys": [hash_key(TEAM_C_KEY)]}]}))
        gw.signal(signal.SIGHUP)
        await gw.line_with("config reloaded")
        assert await status(TEAM_A_KEY, "a") == 401
        assert await status(TEAM_C_KEY, "c") == 200
        mark = len(gw.lines)
        path.write_text(yaml.safe_dump({**data, "teams": [{"name": "team-c", "keys": ["sha256:nope"]}]}))
        gw.signal(signal.SIGHUP)
        refused = await gw.line_with("config reload refused", after=mark)
        assert "teams.0.keys.0: expected 'sha256:<64 hex digits>'" in refused
        assert await status(TEAM_C_KEY, "c2") == 200 and await status(TEAM_A_KEY, "a2") == 401
        stop.set()
        await traffic
    assert len(statuses) >= 80 and set(statuses) == {200}
    gw.signal(signal.SIGTERM)
    assert await gw.exit_code(within=25) == 0


async def test_sighup_that_takes_a_model_away_refuses_the_very_next_repeat(
    serve: Callable[..., Awaitable[Proc]], tmp_path: Path, redis_url: str
) -> None:
    """One request path: an exact repeat just answered from the cache is held to the reloaded team rules."""
    data = file_config(cache={"url": redis_url})
    gw = await serve(data)
    body = {"model": "jina-embeddings-v3", "input": ["asked twice"]}
    async with aiohttp.ClientSession() as session:

        async def post() -> tuple[int, Any, Any]:
            async with session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth(TEAM_A_KEY)) as resp:
                return resp.status, resp.headers, await resp.json()

        assert (await post())[0] == 200
        status, headers, _ = await post()
        assert status == 200 and headers["X-Cache-Hits"] == "1"
        teams = [{**data["teams"][0], "models": ["jina-embeddings-v4"]}, data["teams"][1]]
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({**data, "teams": teams}))
        gw.signal(signal.SIGHUP)
        await gw.line_with("config reloaded")
        status, _, answer = await post()
        assert status == 403 and answer["code"] == "MODEL_NOT_ALLOWED"
    gw.signal(signal.SIGTERM)
    assert await gw.exit_code(within=25) == 0


async def test_two_workers_share_the_port_and_metrics_add_up(
    serve: Callable[..., Awaitable[Proc]], tmp_path: Path
) -> None:
    data = file_config(upstream={"sim": {"latency_base_ms": 1}})
    gw = await serve(data, "--workers", "2")
    pids = {int(p) for p in re.findall(r"\d+", gw.listening.split("pids")[1])}
    assert len(pids) == 2
    # A new connection per request, so the kernel spreads them over both listening sockets.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        seen: set[int] = set()
        for _ in range(200):
            seen.add((await (await session.get(f"{gw.url}/healthz")).json())["pid"])
            if seen == pids:
                break
        assert seen == pids

        async def one(i: int) -> None:
            body = {"model": "jina-embeddings-v3", "input": [f"w{i}-a", f"w{i}-b", f"w{i}-c"]}
            async with session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth()) as resp:
                assert resp.status == 200

        for start in range(0, 40, 8):
            await asyncio.gather(*(one(i) for i in range(start, start + 8)))
        # Each worker publishes its per-request series once a second: the one not scraped may lag by that.
        await metric_reaches(session, gw.url, "eg_requests_total", 40, route="/v1/embeddings", status="200")
        assert await metric(session, gw.url, "eg_requests_total", route="/v1/embeddings", status="200") == 40
        assert await metric(session, gw.url, "eg_inputs_total", outcome="miss") == 120
        assert await metric(session, gw.url, "eg_workers") == 2

        # SIGHUP to the supervisor reaches every worker: each one reloads, whichever answers.
        teams = [data["teams"][1], {"name": "team-c", "keys": [hash_key(TEAM_C_KEY)]}]
        (tmp_path / "gateway.yaml").write_text(yaml.safe_dump({**data, "teams": teams}))
        gw.signal(signal.SIGHUP)
        await gw.line_with("config reloaded", count=2)
        body = {"model": "jina-embeddings-v3", "input": ["after reload"]}
        for key, expected in ((TEAM_A_KEY, 401), (TEAM_C_KEY, 200)):
            for _ in range(10):
                async with session.post(f"{gw.url}/v1/embeddings", json=body, headers=auth(key)) as resp:
                    assert resp.status == expected

        # A worker killed with -9 is replaced; the dead one's published counters stay in the totals, its gauges
        # go. (What it had not yet published, at most its last second, dies with it, as usage counters do.)
        await metric_reaches(session, gw.url, "eg_requests_total", 50, route="/v1/embeddings", status="200")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        await gw.line_with(f"(pid {victim}) exited with -9")
        await metric_reaches(session, gw.url, "eg_workers", 2)
        assert await metric(session, gw.url, "eg_workers") == 2
        assert await metric(session, gw.url, "eg_requests_total", route="/v1/embeddings", status="200") == 50
    gw.signal(signal.SIGTERM)
    assert await gw.exit_code(within=25) == 0


async def test_workers_drain_and_leave_when_the_supervisor_is_killed(serve: Callable[..., Awaitable[Proc]]) -> None:
    gw = await serve(file_config(), "--workers", "2")
    gw.signal(signal.SIGKILL)
    assert await gw.exit_code(within=25) == -signal.SIGKILL
    for _ in range(1000):  # the workers got SIGTERM from the kernel (PR_SET_PDEATHSIG) and closed the port
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
                await session.get(f"{gw.url}/healthz")
        except aiohttp.ClientConnectionError:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the workers still serve after their supervisor died")
