"""Real `redis-server` processes owned by the test suite, on free ports, that tests may flush and kill."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) exists and is free too."""
    for _ in range(1000):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


INSTALL_REDIS = (
    "redis-server is not on PATH: the test suite starts its own. Install it first "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
)


def redis_binary() -> str:
    """The `redis-server` on PATH; without one the whole run stops with one line saying what to install."""
    found = shutil.which("redis-server")
    if found is None:
        pytest.exit(INSTALL_REDIS, returncode=4)
    return found


class RedisServer:
    """One redis-server process; `stop()` kills it (SIGKILL) and `start()` brings it back on the same port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="eg-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(Path(self.dir), ignore_errors=True)


class RedisClusterServers:
    """A real 3-master Redis Cluster (no replicas) on free ports, built with `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")
        self.nodes = [RedisServer(free_cluster_port(), *args) for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is not on PATH (Debian's redis-tools)")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        for node in self.nodes:
            self._wait_ok(cli, node.port)
        return self

    @staticmethod
    def _wait_ok(cli: str, port: int) -> None:
        # Every node must have learnt the whole slot map before a client may rely on any of them.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout
            if "cluster_state:ok" in out and "cluster_slots_assigned:16384" in out:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster node on port {port} did not reach cluster_state:ok")

    def flushall(self) -> None:
        for node in self.nodes:
            with socket.create_connection(("127.0.0.1", node.port), timeout=2) as s:
                s.sendall(b"FLUSHALL\r\n")
                s.recv(16)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
