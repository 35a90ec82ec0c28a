"""The machine and versions line, the text table, the JSON result and the README section."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .scenarios import Row

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for pkg in ("aiohttp", "redis", "hiredis", "orjson", "numpy", "uvloop", "prometheus-client"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "-"
    versions["redis-server"] = _first_line(["redis-server", "--version"], r"v=(\S+)")
    versions["wrk"] = _first_line(["wrk", "--version"], r"wrk (\S+)")
    return {"cores": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "versions": versions}


def _first_line(args: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "-"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "-"


def header(info: dict[str, Any], gen: str, when: str, seconds: float | None = None) -> str:
    v = info["versions"]
    took = f", took {seconds:.0f} s" if seconds is not None else ""
    return (
        f"{when}: {info['cores']} cores ({info['cpu'] or 'unknown cpu'}), load generator "
        f"{'wrk ' + v['wrk'] if gen == 'wrk' else 'aiohttp client'}{took}\n"
        f"Python {v['python']}, aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, orjson {v['orjson']}, "
        f"numpy {v['numpy']}, redis-py {v['redis']} + hiredis {v['hiredis']}, redis-server {v['redis-server']}"
    )


def table(rows: list[Row]) -> str:
    cols = [
        ("scenario", [r.name for r in rows]),
        ("gateway", [r.gateway for r in rows]),
        ("reference", [r.reference for r in rows]),
        ("compared", [r.compare for r in rows]),
        ("target", [_target(r) for r in rows]),
        ("server CPU/request", [r.cpu for r in rows]),
    ]
    widths = [max(len(title), *(len(c) for c in cells)) for title, cells in cols]
    lines = ["  ".join(title.ljust(w) for (title, _), w in zip(cols, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for i in range(len(rows)):
        lines.append("  ".join(cells[i].ljust(w) for (_, cells), w in zip(cols, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _target(row: Row) -> str:
    if not row.target:
        return ""
    return f"{row.target} {'ok' if row.ok else 'MISSED'}"


def update_readme(path: Path, block: str) -> bool:
    """Replaces the text between the bench markers; False when the README has no markers."""
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(README_START)] + "\n" + block.rstrip() + "\n" + text[end:]
    path.write_text(new)
    return True
