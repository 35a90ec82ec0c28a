"""The README's promises: its two commands, its curl and usage examples and its real-key recipe work as written."""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import redis

from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = next(b.strip() for b in bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert test_command == ci[-1]  # last, so pytest's status is the script's
    assert ci.index(".venv/bin/ruff check gateway tests bench") < ci.index(".venv/bin/mypy") < len(ci) - 1


def test_readme_run_command_serves_the_demo_config_and_the_curl_example_works() -> None:
    run = next(b.strip() for b in bash_blocks() if "serve" in b)
    assert run.endswith("embedding-gateway serve --config config/demo.yaml")
    curl = next(b for b in bash_blocks() if b.lstrip().startswith("curl"))
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "config/demo.yaml", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        _check_curl(proc, curl, port)
    assert proc.returncode == 0


def _check_curl(proc: subprocess.Popen[bytes], curl: str, port: int) -> None:
    try:
        assert proc.stdout is not None
        assert b"listening" in proc.stdout.readline()
        args = _curl_args(curl, port)
        for attempt in range(2):
            out = subprocess.run([*args, "-D", "-"], capture_output=True, check=True, timeout=30).stdout
            head, _, body = out.partition(b"\r\n\r\n")
            data = orjson.loads(body)
            assert len(data["data"]) == 2 and len(data["data"][0]["embedding"]) == 1024
            if attempt == 1:
                assert b"X-Cache-Hits: 2" in head and b"X-Upstream-Tokens: 0" in head
        _check_usage(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _curl_args(curl: str, port: int) -> list[str]:
    return shlex.split(curl.replace("\\\n", " ").replace("127.0.0.1:8080", f"127.0.0.1:{port}"))


def _check_usage(port: int) -> None:
    """The usage example, after the curl example twice: one row for the demo team (usage is written each second)."""
    usage = _curl_args(next(b for b in bash_blocks() if "/v1/usage" in b), port)
    for _ in range(100):
        text = subprocess.run(usage, capture_output=True, check=True, timeout=30, text=True).stdout
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows:
            break
        time.sleep(0.1)
    assert [(r["team"], r["model"], r["requests"], r["hits"], r["misses"]) for r in rows] == [
        ("demo", "jina-embeddings-v3", "2", "2", "2")
    ]


def test_the_real_key_recipe_serves_a_team_with_its_key_through_redis(redis_url: str) -> None:
    """The three lines, with the suite's Redis (flushed) for the local one and the simulator for Jina's API."""
    first, *lines = next(b for b in bash_blocks() if "config/local.yaml" in b).strip().splitlines()
    assert first == "redis-server --daemonize yes"
    key = next(w.split("=", 1)[1] for w in shlex.split(lines[0]) if w.startswith("GATEWAY_KEY="))
    script = "\n".join(lines).replace(".venv/bin/embedding-gateway", f"{sys.executable} -m gateway")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "UPSTREAM_URL": "sim://", "PORT": str(port),
           "REDIS_URL": redis_url.removesuffix("/0")}
    with subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, start_new_session=True) as proc:
        try:
            assert proc.stdout is not None
            assert b"listening" in proc.stdout.readline()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/embeddings", data=b'{"model": "jina-embeddings-v3", "input": ["recipe"]}',
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as resp:
                assert resp.headers["X-Cache-Misses"] == "1"
            cache = redis.Redis.from_url(redis_url)
            for _ in range(100):  # the cache write is behind the answer
                if cache.dbsize():
                    break
                time.sleep(0.05)
            assert cache.dbsize() == 1
            cache.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
