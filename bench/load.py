"""Load generation in its own process: wrk with bench/wrk.lua where installed, else bench/pyload.py."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson

from .procs import BENCH_KEY, ROOT

HERE = Path(__file__).resolve().parent
_runs = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Result:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # CPU time the server process spent per request (user + system)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "rps": self.rps}


@dataclass(frozen=True, slots=True)
class Load:
    """What to send: `cycle` the lines of `file`, `unique` inputs from a two-line template, or each line `once`."""

    url: str
    mode: str
    file: Path
    concurrency: int
    duration_s: float
    pid: int = 0  # the server's process, whose CPU time per request is measured

    def lasting(self, seconds: float) -> Load:
        return dataclasses.replace(self, duration_s=seconds)


def generator(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench: --client wrk but wrk is not installed (apt-get install wrk)")
    return choice


def run(gen: str, load: Load) -> Result:
    """`gen`: wrk, python (aiohttp's client) or raw (the Python generator on bare HTTP/1.1 connections)."""
    # `once` needs exact counts (every body sent exactly once), which only the Python client gives.
    run_id = f"r{next(_runs)}x{id(load) % 100000}"
    if gen == "wrk" and load.mode != "once":
        seconds = max(1, math.ceil(load.duration_s))  # wrk takes whole seconds
        args = ["wrk", "-t1", f"-c{load.concurrency}", f"-d{seconds}s", "--latency", "--timeout", "30s",
                "-s", str(HERE / "wrk.lua"), load.url, "--", load.mode, str(load.file), BENCH_KEY, run_id]
    else:
        args = [sys.executable, "-m", "bench.pyload", "--url", load.url, "--mode", load.mode, "--file",
                str(load.file), "--key", BENCH_KEY, "--run", run_id, "--concurrency", str(load.concurrency),
                "--duration", str(load.duration_s)] + (["--raw"] if gen == "raw" else [])
    cpu0 = cpu_seconds(load.pid)
    out = subprocess.run(args, cwd=ROOT, capture_output=True, check=False, timeout=load.duration_s + 120)
    cpu = cpu_seconds(load.pid) - cpu0
    lines = [line for line in out.stdout.splitlines() if line.startswith(b"{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"load generator failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    data = orjson.loads(lines[-1])
    return Result(
        requests=int(data["requests"]),
        seconds=float(data["duration_us"]) / 1e6,
        errors=int(data["errors"]),
        p50_ms=float(data["p50_us"]) / 1000,
        p90_ms=float(data["p90_us"]) / 1000,
        p99_ms=float(data["p99_us"]) / 1000,
        cpu_us=cpu * 1e6 / max(1, int(data["requests"])),
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its children (the workers of `serve --workers N`); 0 when
    no process is given."""
    if not pid:
        return 0.0
    return sum(_own_cpu_seconds(p) for p in (pid, *_children(pid)))


def _own_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # it ended in between
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
