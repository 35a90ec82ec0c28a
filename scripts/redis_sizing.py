"""Measures Redis memory per cached vector, by dimension, with a real redis-server and the gateway's own codec.

    python scripts/redis_sizing.py [--entries 20000] [--dims 256,1024,2048]

Starts its own redis-server (standalone, and a one-node cluster for the cluster-mode per-key overhead) on free
ports, writes `entries` cache entries per dimension exactly as the gateway does (16-byte xxh3 keys under the cache
prefix, the binary codec, a TTL), and reads INFO memory before and after. Prints a markdown table for
docs/deployment.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from gateway.cache import encode
from gateway.store.redis import RedisCacheStore

TTL_S = 30 * 24 * 3600
BATCH = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: str, *extra: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "redis-server"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
         *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


async def used_memory(client: Any) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def fill(client: Any, dim: int, entries: int, seed: int) -> tuple[float, float, int]:
    """(Redis bytes per entry, codec bytes per entry, MEMORY USAGE of one key)."""
    store = RedisCacheStore(client)
    rng = np.random.default_rng(seed)
    await client.flushall()
    before = await used_memory(client)
    payload = 0
    for start in range(0, entries, BATCH):
        vecs = rng.standard_normal((min(BATCH, entries - start), dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # embeddings are (mostly) unit vectors
        items = [(rng.bytes(16), encode(v, 12)) for v in vecs]
        payload += sum(len(v) for _, v in items)
        await store.set_many(items, TTL_S)
    after = await used_memory(client)
    sample = (await client.scan(count=1))[1][0]
    usage = int(await client.memory_usage(sample, samples=0))
    return (after - before) / entries, payload / entries, usage


async def measure(dims: list[int], entries: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as cluster_dir:
        plain_port, cluster_port = free_port(), free_port()
        while cluster_port + 10000 > 65535:
            cluster_port = free_port()
        procs = [start_redis(plain_port, plain_dir),
                 start_redis(cluster_port, cluster_dir, "--cluster-enabled", "yes")]
        plain = aioredis.Redis(port=plain_port)
        node = aioredis.Redis(port=cluster_port)
        await node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # one node owns every slot
        try:
            for dim in dims:
                per_entry, codec, usage = await fill(plain, dim, entries, dim)
                per_entry_cluster, _, _ = await fill(node, dim, entries, dim)
                rows.append({"dim": dim, "raw": dim * 4, "codec": codec, "memory_usage": usage,
                             "standalone": per_entry, "cluster": per_entry_cluster})
        finally:
            await plain.aclose()
            await node.aclose()
            for proc in procs:
                proc.kill()
                proc.wait()
    return rows


def table(rows: list[dict[str, Any]], entries: int) -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    version = out.split()[2].removeprefix("v=")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with {entries:,} entries per dimension, redis-server {version} "
        f"({platform.machine()}, {os.cpu_count()} cores), unit-norm random float32 vectors, 30-day TTL.",
        "",
        "| dims | float32 bytes | entry (codec) | MEMORY USAGE of a key | Redis bytes/entry | GiB per 1M vectors "
        "| cluster node bytes/entry | GiB per 1M (cluster) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dim']} | {r['raw']} | {r['codec']:.0f} | {r['memory_usage']} | {r['standalone']:.0f} "
            f"| {r['standalone'] * 1e6 / 2**30:.2f} | {r['cluster']:.0f} | {r['cluster'] * 1e6 / 2**30:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--dims", default="256,768,1024,2048")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    print(table(asyncio.run(measure(dims, args.entries)), args.entries))


if __name__ == "__main__":
    main()
