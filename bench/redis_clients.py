"""`python -m bench.redis_clients [--seconds S] [--rounds N] [--baseline-ref REF]`: the cache's hit path (one MGET of
1 and of 32 values of ~4 KB) through each Redis client, in one run against one redis-server: redis-py + hiredis (the
cache store, `store/redis.py`), the pipelined client the cache used before it (read from git history, never
installed), and coredis and valkey-glide when they are installed. Prints calls per second and the client process's
CPU per call (all its threads), medians over rounds, with ratios to redis-py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from gateway.keys import CACHE_PREFIX
from gateway.store import open_cache_store

from .procs import ROOT, Procs

VALUE_BYTES = 4096
KEYS = 32
CASES = (1, 32)  # keys per MGET
TIMEOUT_S = 5.0  # generous: this measures cost per call, and a busy shared machine must not fail a run
Mget = Callable[[Sequence[bytes]], Awaitable[Sequence[object]]]
Client = Callable[[int], contextlib.AbstractAsyncContextManager[Mget]]


@contextlib.asynccontextmanager
async def redis_py(port: int) -> AsyncIterator[Mget]:
    store = open_cache_store(f"redis://127.0.0.1:{port}/0", max_bytes=0, socket_timeout_s=TIMEOUT_S)
    try:
        yield store.get_many
    finally:
        await store.close()


def pipelined_client(ref: str) -> Client | None:
    """The removed `store/pipelined.py` at `ref`, as the cache called it (one MGET on one shared connection)."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:gateway/store/pipelined.py"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("pipelined_baseline")
    exec(compile(source, f"{ref}:gateway/store/pipelined.py", "exec"), module.__dict__)

    @contextlib.asynccontextmanager
    async def client(port: int) -> AsyncIterator[Mget]:
        conn = module.PipelinedRedis(port=port, timeout_s=TIMEOUT_S)

        async def mget(keys: Sequence[bytes]) -> Sequence[object]:
            (values,) = await conn.execute((b"MGET", *[CACHE_PREFIX + k for k in keys]))
            return list(values)

        try:
            yield mget
        finally:
            await conn.close()

    return client


@contextlib.asynccontextmanager
async def coredis_client(port: int) -> AsyncIterator[Mget]:
    import coredis

    client = coredis.Redis("127.0.0.1", port, decode_responses=False, stream_timeout=TIMEOUT_S, max_connections=512)
    async with client:
        yield lambda keys: client.mget([CACHE_PREFIX + k for k in keys])


@contextlib.asynccontextmanager
async def glide_client(port: int) -> AsyncIterator[Mget]:
    from glide import GlideClient, GlideClientConfiguration, NodeAddress

    config = GlideClientConfiguration([NodeAddress("127.0.0.1", port)], request_timeout=int(TIMEOUT_S * 1000))
    client = await GlideClient.create(config)
    try:
        yield lambda keys: client.mget([CACHE_PREFIX + k for k in keys])
    finally:
        await client.close()


def clients(baseline_ref: str) -> dict[str, Client]:
    found: dict[str, Client] = {"redis-py+hiredis": redis_py}
    pipelined = pipelined_client(baseline_ref)
    if pipelined is not None:
        found["pipelined (old)"] = pipelined
    for name, module, factory in (("coredis", "coredis", coredis_client), ("valkey-glide", "glide", glide_client)):
        with contextlib.suppress(ImportError):
            __import__(module)
            found[name] = factory
    return found


async def measure(client: Client, port: int, keys: int, concurrency: int, seconds: float) -> tuple[float, float]:
    """Calls per second and CPU microseconds per call, `concurrency` callers each awaiting one MGET at a time."""
    names = [b"k%d" % i for i in range(keys)]
    async with client(port) as mget:
        assert all(v is not None for v in await mget(names)), "the keys were not written"
        calls = 0
        deadline = 0.0

        async def caller() -> None:
            nonlocal calls
            while time.monotonic() < deadline:
                await mget(names)
                calls += 1

        for run_s in (0.2, seconds):  # a short warm-up (connections opened), then the measured run
            calls = 0
            deadline = time.monotonic() + run_s
            cpu, wall = time.process_time(), time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return calls / wall, cpu / calls * 1e6


async def fill(port: int) -> None:
    store = open_cache_store(f"redis://127.0.0.1:{port}/0", max_bytes=0, socket_timeout_s=2)
    await store.set_many([(b"k%d" % i, os.urandom(VALUE_BYTES)) for i in range(KEYS)], ttl_s=3600)
    await store.close()


async def run(port: int, args: argparse.Namespace) -> None:
    await fill(port)
    found = clients(args.baseline_ref)
    results: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        order = list(found.items())
        random.shuffle(order)  # no client always runs first or last in a round
        for name, client in order:
            for keys in CASES:
                for concurrency in args.concurrency:
                    figure = await measure(client, port, keys, concurrency, args.seconds)
                    results.setdefault((name, keys, concurrency), []).append(figure)
    report(found, results, args)


def report(found: dict[str, Client], results: dict[tuple[str, int, int], list[tuple[float, float]]],
           args: argparse.Namespace) -> None:
    print(f"MGET of ~{VALUE_BYTES} B values; medians of {args.rounds} rounds of {args.seconds:g} s; "
          f"ratios to redis-py+hiredis (calls/s: higher is faster; CPU/call: lower is cheaper)")
    print(f"{'client':<18} {'keys':>4} {'callers':>7} {'calls/s':>9} {'ratio':>6} {'CPU us/call':>11} {'ratio':>6}")
    for keys in CASES:
        for concurrency in args.concurrency:
            base = _medians(results[("redis-py+hiredis", keys, concurrency)])
            for name in found:
                rate, cpu = _medians(results[(name, keys, concurrency)])
                print(f"{name:<18} {keys:>4} {concurrency:>7} {rate:>9.0f} {rate / base[0]:>5.2f}x "
                      f"{cpu:>11.1f} {cpu / base[1]:>5.2f}x")


def _medians(figures: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(f[0] for f in figures), statistics.median(f[1] for f in figures)


def _default_ref() -> str:
    """The last commit that had `store/pipelined.py`: the parent of the one that removed it."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", str(ROOT), "log", "-n1", "--format=%H", "--diff-filter=D"]
        removed = subprocess.run([*git, "--", "gateway/store/pipelined.py"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        if removed:
            return f"{removed}^"
    return "HEAD"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_clients", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per client, case and concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 64],
                        help="callers in flight at once, comma-separated (default 1,64)")
    parser.add_argument("--baseline-ref", default=_default_ref(), help="git revision to read pipelined.py from")
    args = parser.parse_args(argv)
    try:
        import uvloop  # the served gateway runs on uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with tempfile.TemporaryDirectory(prefix="eg-redis-clients-") as workdir, Procs(Path(workdir)) as procs:
        redis = procs.redis()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(redis.port, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
