"""The bench (`python -m bench`) starts its processes, drives every scenario on a tiny load and prints its
table. It measures nothing here: the figures of a smoke run mean nothing and are not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("scenario") and "gateway" in line and "reference" in line for line in lines)
    for number in "123456789":
        assert any(line.startswith(f"{number} ") for line in lines), f"no row for scenario {number}"
    assert "cores" in lines[0]
    result = orjson.loads((tmp_path / "latest.json").read_bytes())
    assert result["smoke"] is True and len(result["rows"]) >= 10
    # Scenario 4 counts exactly even on a tiny load: every unique input went upstream once.
    overlap = result["raw"]["overlap"]
    assert overlap["upstream_inputs"] == overlap["unique_inputs"]


@pytest.mark.slow
def test_redis_clients_bench_prints_a_row_per_client_and_case() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.redis_clients", "--seconds", "0.05", "--rounds", "1", "--concurrency", "1,4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("redis-py+hiredis")]
    assert [(row[1], row[2], row[4]) for row in rows] == [
        ("1", "1", "1.00x"), ("1", "4", "1.00x"), ("32", "1", "1.00x"), ("32", "4", "1.00x")]
