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
            _wait_ready(proc, url)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> None:
    for _ in range(600):
        assert proc.poll() is None, f"replica {url} exited at start"
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)  # a process starting: nothing to wait on but its port
    raise AssertionError(f"replica {url} never answered")
