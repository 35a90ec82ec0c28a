"""The processes a bench run owns: redis-server, simulators, gateways and the bare server.

Each runs in its own process on a free loopback port, logs to a file in the run's work directory, and is
killed by the `Procs` that started it (never anything else).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "eg-bench-team-key"
METRICS_TOKEN = "bench-metrics-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One child process listening on `port`, with its log file."""

    def __init__(self, name: str, args: list[str], port: int, log: Path) -> None:
        self.name = name
        self.port = port
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as out:
            self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def wait_ready(self, probe: str | None, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            if _answers(self.port, probe):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start within {timeout_s}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _answers(port: int, probe: str | None) -> bool:
    try:
        if probe is None:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        try:
            conn.request("GET", probe)
            return conn.getresponse().status < 500
        finally:
            conn.close()
    except OSError:
        return False


class Procs:
    """Starts the bench's servers and stops every one of them, last started first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.started.remove(proc)

    def _start(self, name: str, args: list[str], probe: str | None) -> Proc:
        port = int(args[args.index("--port") + 1])
        proc = Proc(name, args, port, self.workdir / f"{name}.log")
        self.started.append(proc)
        proc.wait_ready(probe)
        return proc

    def redis(self) -> Proc:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        port = free_port()
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--protected-mode", "no"]
        return self._start("redis", args, None)

    def sim(self, latency_ms: float = 0.0, per_token_ms: float = 0.0) -> Proc:
        args = [sys.executable, "-m", "gateway", "sim", "--port", str(free_port()), "--latency-ms", str(latency_ms),
                "--latency-per-token-ms", str(per_token_ms)]
        return self._start(f"sim-{latency_ms:g}ms-{per_token_ms:g}", args, "/")

    def gateway(
        self, name: str, sim: Proc, cache_url: str, *, workers: int = 1, upstreams: list[dict[str, Any]] | None = None,
        **cache: Any,
    ) -> Proc:
        """`upstreams`: an `upstreams:` list instead of the single `upstream:` block on `sim`."""
        port = free_port()
        config = gateway_config(port, f"http://127.0.0.1:{sim.port}/v1", cache_url, **cache)
        if upstreams is not None:
            del config["upstream"]
            config["upstreams"] = upstreams
        path = self.workdir / f"{name}.yaml"
        path.write_bytes(orjson.dumps(config))  # JSON is YAML
        args = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port),
                "--workers", str(workers)]
        return self._start(name, args, "/healthz")

    def bare(self, bodies: dict[str, bytes]) -> Proc:
        args = [sys.executable, "-m", "bench.bare", "--port", str(free_port())]
        for name, body in bodies.items():
            path = self.workdir / f"bare-{name}.json"
            path.write_bytes(body)
            args += ["--body", f"{name}={path}"]
        return self._start("bare", args, "/healthz")


def gateway_config(port: int, upstream_url: str, cache_url: str, **cache: Any) -> dict[str, Any]:
    from gateway.auth import hash_key

    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream_url, "max_retries": 2},
        "cache": {"url": cache_url, **cache},
        "state": {"url": "memory://"},
        "metrics": {"token": METRICS_TOKEN},
        "teams": [{"name": "bench", "keys": [hash_key(BENCH_KEY)]}],
        "log_level": "INFO",
    }
