"""Soak: a mixed workload for N minutes against a gateway subprocess (Redis cache and state, the simulated
upstream in its own process), sampling the gateway's RSS, descriptors, connections, asyncio tasks and the
clients' p99 latency over time. Passes when RSS after warm-up grows less than --max-rss-growth.

    python bench/soak.py --minutes 10 --warmup-minutes 2 [--json soak.json]

Everything runs on 127.0.0.1 with processes this script starts and stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: this checkout's gateway, not another install

from gateway.auth import hash_key  # noqa: E402
from gateway.metrics import process_figures  # noqa: E402

TEAM_KEYS = {f"soak-{i}": f"eg-soak-team-{i}-key" for i in range(3)}
ADMIN_KEY = "eg-soak-admin-key"
METRICS_TOKEN = "soak-metrics-token"
MODELS = ("jina-embeddings-v3", "jina-embeddings-v5-text-nano")
FORMATS = ("float", "base64", "binary", "ubinary")
QUOTA = {"requests_per_minute": 1200, "tokens_per_day": 10**9}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process on a loopback port; stopped (SIGTERM, then SIGKILL) by this script only."""

    def __init__(self, name: str, args: list[str], port: int, workdir: Path) -> None:
        self.name, self.port = name, port
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.popen = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def wait_port(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {self.port}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_children(workdir: Path, sim_latency_ms: float, hot_mib: int) -> tuple[list[Child], Child, str]:
    redis_port, sim_port, gw_port = free_port(), free_port(), free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("soak: redis-server is not on PATH")
    redis = Child("redis", [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", str(workdir), "--maxmemory", "512mb",
                            "--maxmemory-policy", "allkeys-lru"], redis_port, workdir)
    py = sys.executable
    sim = Child("sim", [py, "-m", "gateway", "sim", "--port", str(sim_port), "--latency-ms", str(sim_latency_ms)],
                sim_port, workdir)
    config = {
        "listen": {"host": "127.0.0.1", "port": gw_port},
        "upstream": {"url": f"http://127.0.0.1:{sim_port}/v1", "api_key": "sk-soak-upstream"},
        # The in-process hot LRU is bounded; a small one fills during warm-up, so growth after it means a leak.
        "cache": {"url": f"redis://127.0.0.1:{redis_port}/0", "hot_max_bytes": hot_mib * 2**20},
        "state": {"url": f"redis://127.0.0.1:{redis_port}/1"},
        "limits": {"request_timeout_s": 10},
        "metrics": {"token": METRICS_TOKEN},
        # One team with a quota it runs into: 429s and the quota's Redis path are part of the mix.
        "teams": [{"name": name, "keys": [hash_key(key)], **({"quota": QUOTA} if name == "soak-2" else {})}
                  for name, key in TEAM_KEYS.items()],
        "admin_keys": [hash_key(ADMIN_KEY)],
        "log_level": "WARNING",
    }
    (workdir / "gateway.yaml").write_bytes(orjson.dumps(config))  # JSON is YAML
    gateway = Child("gateway", [py, "-m", "gateway", "serve", "--config", str(workdir / "gateway.yaml")],
                    gw_port, workdir)
    for child in (redis, sim, gateway):
        child.wait_port()
    return [gateway, sim, redis], gateway, f"http://127.0.0.1:{gw_port}"


# ---- the workload ----------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the clients saw in one sampling interval."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.statuses[what] = self.statuses.get(what, 0) + 1


class Workload:
    def __init__(self, base: str, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.window = Window()
        self.fresh = 0
        # A fixed pool, drawn from with a skew (popular texts repeat): hits, misses and joined inputs.
        words = [f"w{i}" for i in range(997)]
        self.pool = [f"soak {i}: " + " ".join(words[(i * 7 + j) % 997] for j in range(20)) for i in range(20000)]

    def _text(self) -> str:
        if self.rng.random() < 0.15:
            self.fresh += 1
            return f"never seen before {self.fresh} {self.rng.random()}"
        return self.pool[min(int(self.rng.paretovariate(1.2)) - 1, len(self.pool) - 1)]

    async def one(self, session: aiohttp.ClientSession) -> None:
        r = self.rng.random()
        key = self.rng.choice(list(TEAM_KEYS.values()))
        if r < 0.85:
            body = {"model": self.rng.choice(MODELS), "input": [self._text() for _ in range(self.rng.randint(1, 16))],
                    "embedding_type": self.rng.choice(FORMATS)}
            await self._call(session, "POST", "/v1/embeddings", key, data=orjson.dumps(body))
        elif r < 0.89:
            await self._call(session, "GET", "/v1/usage", key)
        elif r < 0.92:
            await self._call(session, "POST", "/v1/embeddings", key, data=b"{not json")
        elif r < 0.95:
            await self._call(session, "POST", "/v1/embeddings", "eg-wrong-key", data=b"{}")
        else:  # a client that gives up before the answer (its flight still completes and is cached)
            body = {"model": MODELS[0], "input": [self._text() for _ in range(8)]}
            try:
                await self._call(session, "POST", "/v1/embeddings", key, data=orjson.dumps(body), timeout_s=0.002)
            except TimeoutError:
                self.window.count("client gave up")

    async def _call(
        self, session: aiohttp.ClientSession, method: str, path: str, key: str, *, data: bytes | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with asyncio.timeout(timeout_s), session.request(method, self.base + path, data=data,
                                                               headers=headers) as resp:
            await resp.read()
        self.window.latencies.append(time.perf_counter() - started)
        self.window.count(str(resp.status))


async def worker(load: Workload, session: aiohttp.ClientSession, until: float) -> None:
    while time.monotonic() < until:
        try:
            await load.one(session)
        except (aiohttp.ClientError, TimeoutError) as exc:
            load.window.count(type(exc).__name__)


# ---- sampling --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float
    rss_mib: float
    fds: int
    sockets: int
    tasks: int
    requests: int
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]


async def scrape_tasks(session: aiohttp.ClientSession, base: str) -> int:
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with session.get(base + "/metrics", headers=headers) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("eg_process_asyncio_tasks "):
            return int(float(line.split()[1]))
    return -1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def sample(load: Workload, session: aiohttp.ClientSession, base: str, pid: int, t0: float) -> Sample:
    window, load.window = load.window, Window()
    rss, fds = process_figures(pid)
    return Sample(
        t_s=round(time.monotonic() - t0, 1), rss_mib=round((rss or 0) / 2**20, 1), fds=sum(fds.values()),
        sockets=fds.get("socket", 0), tasks=await scrape_tasks(session, base), requests=len(window.latencies),
        p50_ms=round(percentile(window.latencies, 0.50), 2), p99_ms=round(percentile(window.latencies, 0.99), 2),
        statuses=dict(sorted(window.statuses.items())),
    )


async def soak(base: str, pid: int, args: argparse.Namespace) -> list[Sample]:
    load = Workload(base, args.seed)
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.ensure_future(worker(load, session, until)) for _ in range(args.concurrency)]
        heads = ("t_s", 7), ("rss_mib", 8), ("fds", 5), ("socks", 5), ("tasks", 5), ("reqs", 6), ("p50_ms", 7)
        heads += (("p99_ms", 7),)
        print(" ".join(f"{h:>{w}}" for h, w in heads), " statuses", flush=True)
        while time.monotonic() < until:
            await asyncio.sleep(min(args.interval_s, max(0.0, until - time.monotonic())))
            s = await sample(load, session, base, pid, t0)
            samples.append(s)
            print(f"{s.t_s:>7} {s.rss_mib:>8} {s.fds:>5} {s.sockets:>5} {s.tasks:>5} {s.requests:>6} "
                  f"{s.p50_ms:>7} {s.p99_ms:>7}  {s.statuses}", flush=True)
        await asyncio.gather(*workers)
    return samples


def verdict(samples: list[Sample], warmup_s: float, max_growth: float) -> tuple[bool, dict[str, Any]]:
    after = [s for s in samples if s.t_s >= warmup_s] or samples[-1:]
    base, last = after[0], samples[-1]
    growth = (last.rss_mib - base.rss_mib) / base.rss_mib if base.rss_mib else 0.0
    summary = {
        "rss_mib_after_warmup": base.rss_mib, "rss_mib_end": last.rss_mib, "rss_mib_max": max(s.rss_mib for s in after),
        "rss_growth_after_warmup": round(growth, 4), "fds_after_warmup": base.fds, "fds_end": last.fds,
        "fds_max": max(s.fds for s in after), "tasks_after_warmup": base.tasks, "tasks_end": last.tasks,
        "tasks_max": max(s.tasks for s in after), "p99_ms_max": max(s.p99_ms for s in after),
        "p99_ms_median": sorted(s.p99_ms for s in after)[len(after) // 2],
        "requests": sum(s.requests for s in samples),
        "statuses": _totals(samples),
    }
    return growth < max_growth, summary


def _totals(samples: list[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        for what, n in s.statuses.items():
            out[what] = out.get(what, 0) + n
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--interval-s", type=float, default=30.0, help="sampling period")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--sim-latency-ms", type=float, default=5.0)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hot-mib", type=int, default=8, help="cache.hot_max_bytes of the gateway, in MiB")
    parser.add_argument("--json", type=Path, help="write the samples and the summary here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="eg-soak-"))
    children, gateway, base = start_children(workdir, args.sim_latency_ms, args.hot_mib)
    try:
        samples = asyncio.run(soak(base, gateway.popen.pid, args))
    finally:
        for child in children:
            child.stop()
    ok, summary = verdict(samples, args.warmup_minutes * 60, args.max_rss_growth)
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    print(f"soak: {'PASS' if ok else 'FAIL'}: RSS growth after warm-up {summary['rss_growth_after_warmup']:.1%} "
          f"(limit {args.max_rss_growth:.0%}); logs in {workdir}")
    if args.json:
        args.json.write_bytes(orjson.dumps({"summary": summary, "samples": [asdict(s) for s in samples]},
                                           option=orjson.OPT_INDENT_2))
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
