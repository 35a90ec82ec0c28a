"""Gateway processes for the tests that need several: `serve` started from config dicts, stopped at the end."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import requests

from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve(tmp_path: Path, configs: list[dict[str, Any]], *args: str) -> Iterator[list[str]]:
    """One `serve` process per config (each with `args`), all answering `/healthz`: their base URLs. Each config
    names its port in `listen.port`; each process logs to `replica-<i>.log` in `tmp_path`."""
    procs: list[subprocess.Popen[bytes]] = []
    urls = [f"http://127.0.0.1:{config['listen']['port']}" for config in configs]
    try:
        for i, config in enumerate(configs):
            path = tmp_path / f"replica-{i}.yaml"
            path.write_bytes(orjson.dumps(config))  # JSON is YAML
            with (tmp_path / f"replica-{i}.log").open("wb") as log:  # the child keeps its own descriptor
                procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path), *args],
                                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        for proc, url in zip(procs, urls, strict=True):
            wait_ready(proc, url + "/healthz", f"replica {url}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def wait_ready(proc: subprocess.Popen[bytes], probe: str, name: str) -> None:
    """Returns once `probe` answers 200; fails when `proc` exits first or it never answers."""
    for _ in range(600):
        assert proc.poll() is None, f"{name} exited at start"
        try:
            if requests.get(probe, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)  # a process starting: nothing to wait on but its port
    raise AssertionError(f"{name} never answered")


class SimProcess:
    """`embedding-gateway sim` on a fixed port: started, killed (SIGKILL: no goodbye), started again. `args` are
    the sim's own (`--kind tei`, `--no-tokenize`)."""

    def __init__(self, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--port", str(self.port), *self.args],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.url + "/", "the simulator")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        """Killed, if it runs (a test's end)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def stats(self) -> dict[str, int]:
        return requests.get(self.url + "/_sim/stats", timeout=5).json()  # type: ignore[no-any-return]
