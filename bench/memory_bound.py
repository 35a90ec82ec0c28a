"""`python -m bench.memory_bound [--minutes 3] [--dims 32,1024]`: how well `cache.max_bytes` bounds a `memory://`
gateway. For each vector size it starts the simulator and a gateway with a 64 MiB cache (and the parse memo off: it
has its own bound, `cache.hot_requests_max_bytes`), sends unique inputs (every one a new entry) for the given time,
and prints the gateway's RSS growth over its baseline against 64 MiB + 10%."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import orjson

from . import load
from .procs import Procs

MAX_BYTES = 64 * 1024 * 1024


def run(dims: int, minutes: float, workdir: Path) -> tuple[float, float]:
    """The baseline RSS and the peak growth over it of one vector size, in bytes."""
    with Procs(workdir) as procs:
        sim = procs.sim(0.0)
        gw = procs.gateway(f"gateway-{dims}", sim, "memory://", max_bytes=MAX_BYTES, hot_requests_max_bytes=0)
        template = workdir / f"unique-{dims}.tpl"
        head = orjson.dumps({"model": "jina-embeddings-v3", "dimensions": dims, "input": ["bound "]})
        template.write_bytes(head[: head.index(b'bound ') + 6] + b"\n" + b' text"]}\n')
        load.run("python", load.Load(f"http://127.0.0.1:{gw.port}/v1/embeddings", "unique", template, 4, 2.0))
        baseline = gw.rss_bytes()
        peak, deadline = 0.0, time.monotonic() + 60 * minutes
        while time.monotonic() < deadline:
            load.run(load.generator("auto"),
                     load.Load(f"http://127.0.0.1:{gw.port}/v1/embeddings", "unique", template, 32, 10.0))
            peak = max(peak, gw.rss_bytes() - baseline)
            print(f"  {dims} dims: RSS +{peak / 2**20:.1f} MiB over {baseline / 2**20:.1f} MiB", flush=True)
        return baseline, peak


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_bound", description=__doc__)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--dims", default="32,1024")
    args = p.parse_args()
    bound = MAX_BYTES * 1.1
    ok = True
    with tempfile.TemporaryDirectory(prefix="eg-bound-") as tmp:
        for dims in (int(d) for d in args.dims.split(",")):
            baseline, peak = run(dims, args.minutes, Path(tmp))
            within = peak <= bound
            ok &= within
            print(f"{dims}-dim vectors, cache.max_bytes 64 MiB: RSS growth {peak / 2**20:.1f} MiB over a "
                  f"{baseline / 2**20:.1f} MiB baseline ({'within' if within else 'OVER'} 64 MiB + 10%)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
