"""The README's promises: its two commands and its curl example are true."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import orjson

from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = next(b.strip() for b in bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci/run").read_text()
    assert test_command in ci.splitlines()


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
        args = shlex.split(curl.replace("\\\n", " ").replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
        for attempt in range(2):
            out = subprocess.run([*args, "-D", "-"], capture_output=True, check=True, timeout=30).stdout
            head, _, body = out.partition(b"\r\n\r\n")
            data = orjson.loads(body)
            assert len(data["data"]) == 2 and len(data["data"][0]["embedding"]) == 1024
            if attempt == 1:
                assert b"X-Cache-Hits: 2" in head and b"X-Upstream-Tokens: 0" in head
    finally:
        proc.terminate()
        proc.wait(timeout=10)
