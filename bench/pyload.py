"""The fallback load generator (when wrk is not installed), and the exact-count one: an aiohttp keep-alive
client in its own process. Same modes as wrk.lua (`cycle`, `unique`, `mix`) plus `once`: every body exactly once.
Prints one JSON line: requests, duration_us, errors and latency percentiles in µs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson


def bodies_of(mode: str, file: str, run: str, worker: int) -> Iterator[bytes]:
    lines = [line for line in Path(file).read_bytes().split(b"\n") if line]
    every = int(lines.pop(0)) if mode == "mix" else 0
    if mode in ("cycle", "fresh"):
        start = (worker * 7919) % len(lines)
        cycle = itertools.cycle(lines[start:] + lines[:start])
        if mode == "cycle":
            return cycle
        # Same sequence as wrk.lua's fresh: the same inputs in a body whose bytes are new.
        return (b"{" + b" " * (n % 211) + next(cycle)[1:] for n in itertools.count(1))
    pre, post, hits = lines[0], lines[1], lines[2:]
    tag = f"{run}-{worker}-".encode()
    if mode == "unique":
        return (pre + tag + str(n).encode() + post for n in itertools.count(1))
    start = (worker * 7919) % len(hits)
    cycle = itertools.cycle(hits[start:] + hits[:start])
    # Same sequence as wrk.lua's mix: every `every`th request is new, the others cycle through the hits.
    return (pre + tag + str(n).encode() + post if n % every == 0 else next(cycle) for n in itertools.count(1))


async def drive(args: argparse.Namespace, lines: list[bytes]) -> dict[str, float]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    latencies: list[float] = []
    errors = 0

    async def timed(send: Callable[[bytes], Awaitable[int]], body: bytes) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        if await send(body) != 200:
            errors += 1
        latencies.append(time.perf_counter() - t0)

    async with contextlib.AsyncExitStack() as stack:
        if args.raw:  # one connection per worker
            senders = [await stack.enter_async_context(_raw(args.url, headers)) for _ in range(args.concurrency)]
        else:
            session = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency), headers=headers))
            senders = [functools.partial(_post, session, args.url)] * args.concurrency
        ones = [functools.partial(timed, send) for send in senders]
        started = time.perf_counter()
        if args.mode == "once":
            shared = iter(lines)
            workers = [_worker(one, shared, lambda: True) for one in ones]
        else:
            end = started + args.duration
            workers = [
                _worker(one, bodies_of(args.mode, args.file, args.run, w), lambda: time.perf_counter() < end)
                for w, one in enumerate(ones)
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


async def _post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with session.post(url, data=body) as resp:
        await resp.read()
        return resp.status


@contextlib.asynccontextmanager
async def _raw(url: str, headers: dict[str, str]) -> AsyncIterator[Callable[[bytes], Awaitable[int]]]:
    """A bare HTTP/1.1 keep-alive connection: a fraction of aiohttp's client CPU per request, so on a small
    machine the figures measure the server more than the client. Reads Content-Length bodies only."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items())

    async def send(body: bytes) -> int:
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line, _, fields = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
        length = next(int(v) for k, _, v in (f.partition(b":") for f in fields.split(b"\r\n"))
                      if k.strip().lower() == b"content-length")
        await reader.readexactly(length)
        return int(status_line.split()[1])

    try:
        yield send
    finally:
        writer.close()


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
    parser.add_argument("--mode", choices=("cycle", "fresh", "unique", "mix", "once"), required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--run", default="0")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--raw", action="store_true", help="bare HTTP/1.1 connections instead of aiohttp's client")
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
