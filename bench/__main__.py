"""`python -m bench [--smoke] [--client auto|wrk|python] [--only 1,3] [--readme]`: starts redis-server, the
simulator, the gateway and a bare aiohttp server, each in its own process, drives them, prints a table of
medians and ratios, and writes bench/results/bench-<time>.json (and latest.json)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

from . import load, report
from .procs import ROOT, Procs
from .scenarios import (
    Ctx,
    Settings,
    all_hits,
    all_misses,
    batch_interference,
    coalescing,
    hits_by_store,
    memory,
    overlap,
    routing_on_hits,
)

SCENARIOS = {"1": all_hits, "3": all_misses, "4": overlap, "5": coalescing, "6": memory, "7": batch_interference,
             "8": hits_by_store, "9": routing_on_hits}
SMOKE = Settings(duration_s=0.3, warmup_s=0.0, repeats=1, working_set=40, overlap_requests=40, redis_entries=64,
                 memory_entries=512, coalesce_concurrency=(1, 16), coalesce_latency_ms=5.0, high_concurrency=8,
                 batch_lines=300)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = SMOKE if args.smoke else Settings(duration_s=args.duration, repeats=args.repeats)
    gen = load.generator(args.client)
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    started = time.monotonic()
    when = time.strftime("%Y-%m-%d %H:%M")
    info = report.machine()
    print(report.header(info, gen, when), flush=True)
    with tempfile.TemporaryDirectory(prefix="eg-bench-") as tmp, Procs(Path(tmp)) as procs:
        redis = procs.redis()
        sim = procs.sim(0.0)
        gateway = procs.gateway("gateway", sim, f"redis://127.0.0.1:{redis.port}/0")
        ctx = Ctx(procs=procs, gen=gen, workdir=Path(tmp), settings=settings, redis=redis, sim=sim, gateway=gateway)
        for key, scenario in SCENARIOS.items():
            if key in only or (key == "1" and "2" in only):
                t0 = time.monotonic()
                scenario(ctx)
                print(f"  scenario {scenario.__name__}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    seconds = time.monotonic() - started
    text = report.table(ctx.rows)
    print(text)
    print(f"(bench took {seconds:.0f} s)")
    _save(args, info, gen, when, seconds, ctx, text)
    return 0


def _save(args: argparse.Namespace, info: dict[str, object], gen: str, when: str, seconds: float, ctx: Ctx,
          text: str) -> None:
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    result = {"when": when, "machine": info, "generator": gen, "smoke": args.smoke, "seconds": seconds,
              "settings": ctx.settings.__dict__, "rows": [r.__dict__ for r in ctx.rows], "raw": ctx.raw}
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
    (out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json").write_bytes(data)
    (out / "latest.json").write_bytes(data)
    if args.readme and not args.smoke:
        block = "```\n" + report.header(info, gen, when, seconds) + "\n\n" + text + "\n```"
        if not report.update_readme(ROOT / "docs/performance.md", block):
            print("bench: docs/performance.md has no bench markers; not updated", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="a tiny load: checks the bench runs, measures nothing")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto", help="load generator")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measured run")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per load (the median is reported)")
    p.add_argument("--only", help="comma-separated scenarios: 1 (and 2), 3, 4, 5, 6, 7, 8, 9")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the JSON results go")
    p.add_argument("--readme", action="store_true", help="write the table into docs/performance.md between the markers")
    return p


if __name__ == "__main__":
    raise SystemExit(main())
