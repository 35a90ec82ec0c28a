"""The fallback load generator (when wrk is not installed), and the exact-count one: an aiohttp keep-alive
client in its own process. Same modes as wrk.lua (`cycle`, `unique`) plus `once`: every body exactly once.
Prints one JSON line: requests, duration_us, errors and latency percentiles in µs."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import orjson


def bodies_of(mode: str, file: str, run: str, worker: int) -> Iterator[bytes]:
    if mode == "unique":
        pre, post = Path(file).read_bytes().split(b"\n")[:2]
        tag = f"{run}-{worker}-".encode()
        return (pre + tag + str(n).encode() + post for n in itertools.count(1))
    lines = [line for line in Path(file).read_bytes().split(b"\n") if line]
    start = (worker * 7919) % len(lines)
    return itertools.cycle(lines[start:] + lines[:start])


async def drive(args: argparse.Namespace, lines: list[bytes]) -> dict[str, float]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(body: bytes) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            async with session.post(args.url, data=body) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        if args.mode == "once":
            shared = iter(lines)
            workers = [_worker(one, shared, lambda: True) for _ in range(args.concurrency)]
        else:
            end = started + args.duration
            workers = [
                _worker(one, bodies_of(args.mode, args.file, args.run, w), lambda: time.perf_counter() < end)
                for w in range(args.concurrency)
            ]
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - started
    lat = np.array(latencies or [0.0]) * 1e6
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        "errors": errors,
        "p50_us": float(np.percentile(lat, 50)),
        "p90_us": float(np.percentile(lat, 90)),
        "p99_us": float(np.percentile(lat, 99)),
    }


async def _worker(
    one: Callable[[bytes], Awaitable[None]], bodies: Iterator[bytes], go_on: Callable[[], bool]
) -> None:
    for body in bodies:
        if not go_on():
            return
        await one(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=("cycle", "unique", "once"), required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--run", default="0")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    lines = [line for line in Path(args.file).read_bytes().split(b"\n") if line] if args.mode == "once" else []
    print(orjson.dumps(asyncio.run(drive(args, lines))).decode(), flush=True)


if __name__ == "__main__":
    main()
