"""The bench's scenarios (issue 8's list, plus coalescing from issue 3 and routing from issue 16). Each returns
rows for the table and its raw figures for the JSON result."""

from __future__ import annotations

import http.client
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis
from prometheus_client.parser import text_string_to_metric_families

from . import load
from .procs import BENCH_KEY, METRICS_TOKEN, Proc, Procs

MODEL = "jina-embeddings-v3"
PATH = "/v1/embeddings"


@dataclass
class Settings:
    duration_s: float = 3.0
    warmup_s: float = 1.0
    repeats: int = 3
    working_set: int = 1000  # distinct inputs the all-hit scenarios cycle through
    overlap_requests: int = 1000
    redis_entries: int = 2000  # per dimension, for Redis bytes per vector
    memory_entries: int = 50_000  # filled into the memory store for RSS (scaled to 100k)
    coalesce_concurrency: tuple[int, ...] = (1, 16, 256)
    coalesce_latency_ms: float = 20.0
    high_concurrency: int = 64
    batch_lines: int = 10_000  # the batch job that interactive traffic shares the gateway with
    batch_cached: float = 0.3  # share of the job's inputs embedded before it starts
    batch_concurrency: int = 4  # interactive connections
    batch_miss_every: int = 3  # every 3rd interactive request is a new input (a miss), the others hits


@dataclass
class Row:
    """One line of the table: what, the gateway's figure, the reference's, the comparison, the target."""

    name: str
    gateway: str
    reference: str
    compare: str
    target: str = ""
    ok: bool | None = None
    cpu: str = ""  # server CPU per request, gateway vs reference


@dataclass
class Ctx:
    procs: Procs
    gen: str
    workdir: Path
    settings: Settings
    redis: Proc
    sim: Proc
    gateway: Proc
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str, lines: Iterable[bytes]) -> Path:
        path = self.workdir / name
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    def url(self, proc: Proc, path: str = PATH) -> str:
        return f"http://127.0.0.1:{proc.port}{path}"

    def load(self, proc: Proc, mode: str, file: Path, concurrency: int, seconds: float, path: str = PATH,
             ) -> load.Load:
        return load.Load(self.url(proc, path), mode, file, concurrency, seconds, pid=proc.pid)


# ---- helpers ---------------------------------------------------------------------------------------------


def text(tag: str, i: int) -> str:
    return f"bench {tag} {i}: the quick brown fox jumps over the lazy dog"


def body(inputs: str | list[str], **extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "input": inputs, **extra})


def hit_bodies(tag: str, working_set: int) -> tuple[list[bytes], list[bytes]]:
    """Bodies of 1 input (float) each over `working_set` inputs, and of 32 of those inputs (base64) each."""
    singles = [body(text(tag, i)) for i in range(working_set)]
    multi = [body([text(tag, (k * 37 + j) % working_set) for j in range(32)], encoding_format="base64")
             for k in range(working_set)]
    return singles, multi


def post(port: int, payload: bytes) -> bytes:
    return call(port, "POST", PATH, payload)


def call(port: int, method: str, path: str, payload: bytes | None = None) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status not in (200, 202):
            raise RuntimeError(f"{method} {path} on port {port}: {resp.status} {data[:300]!r}")
        return data
    finally:
        conn.close()


def scrape(proc: Proc) -> dict[str, float]:
    """The gateway's counters that the bench reads, summed over labels."""
    conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        text_ = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {"calls": 0.0, "upstream_inputs": 0.0, "requests": 0.0}
    for family in text_string_to_metric_families(text_):
        for s in family.samples:
            if s.name == "eg_upstream_calls_total" and s.labels.get("status") == "200":
                out["calls"] += s.value
            elif s.name == "eg_upstream_batch_inputs_sum":
                out["upstream_inputs"] += s.value
            elif s.name == "eg_requests_total" and s.labels.get("route") == PATH:
                out["requests"] += s.value
    return out


def fill(ctx: Ctx, target: Proc, name: str, bodies: list[bytes], concurrency: int = 8) -> load.Result:
    """Sends every body exactly once (warming a cache, or counting exactly)."""
    result = load.run("python", load.Load(ctx.url(target), "once", ctx.file(name, bodies), concurrency, 0))
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} requests failed")
    return result


def measure(ctx: Ctx, loads: dict[str, load.Load]) -> dict[str, load.Result]:
    """Warms each load up, then runs them interleaved `repeats` times; the median run of each (by req/s)."""
    s = ctx.settings
    for ld in loads.values() if s.warmup_s > 0 else ():
        load.run(ctx.gen, ld.lasting(s.warmup_s))
    runs: dict[str, list[load.Result]] = {name: [] for name in loads}
    for _ in range(s.repeats):
        for name, ld in loads.items():
            runs[name].append(load.run(ctx.gen, ld))
    ctx.raw.setdefault("runs", {}).update({n: [r.as_dict() for r in rs] for n, rs in runs.items()})
    return {name: median_run(rs) for name, rs in runs.items()}


def median_run(runs: list[load.Result]) -> load.Result:
    """Median of each figure across runs (req/s and each percentile separately)."""
    rps = statistics.median(r.rps for r in runs)
    return load.Result(
        requests=round(rps * 1000),
        seconds=1000.0,
        errors=sum(r.errors for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p90_ms=statistics.median(r.p90_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        cpu_us=statistics.median(r.cpu_us for r in runs),
    )


def ms(x: float) -> str:
    return f"{x:.2f} ms"


def rate(r: load.Result) -> str:
    errors = f" ({r.errors} errors)" if r.errors else ""
    return f"{r.rps:,.0f} req/s{errors}"


def cpu(g: load.Result, ref: load.Result) -> str:
    return f"{g.cpu_us:,.0f} / {ref.cpu_us:,.0f} us"


def latency(r: load.Result) -> str:
    return f"p50 {r.p50_ms:.2f} / p99 {r.p99_ms:.2f} ms"


# ---- scenarios -------------------------------------------------------------------------------------------


def all_hits(ctx: Ctx) -> None:
    """1: all hits, 1 input, float. 2: all hits, 32 inputs, base64. Bare serves the gateway's own bytes."""
    s = ctx.settings
    singles, multi = hit_bodies("hit", s.working_set)
    fill(ctx, ctx.gateway, "warm.jsonl", singles)
    bare = ctx.procs.bare({"one": post(ctx.gateway.port, singles[0]), "multi": post(ctx.gateway.port, multi[0])})
    one, many = ctx.file("hits-1.jsonl", singles), ctx.file("hits-32.jsonl", multi)
    c, d = s.high_concurrency, s.duration_s
    r = measure(ctx, {
        "hit1_c1_gateway": ctx.load(ctx.gateway, "cycle", one, 1, d),
        "hit1_c1_bare": ctx.load(bare, "cycle", one, 1, d, "/bare/one"),
        "hit1_gateway": ctx.load(ctx.gateway, "cycle", one, c, d),
        "hit1_bare": ctx.load(bare, "cycle", one, c, d, "/bare/one"),
        "hit32_gateway": ctx.load(ctx.gateway, "cycle", many, c, d),
        "hit32_bare": ctx.load(bare, "cycle", many, c, d, "/bare/multi"),
    })
    ctx.procs.stop(bare)
    g1, b1 = r["hit1_gateway"], r["hit1_bare"]
    ratio = g1.rps / b1.rps
    ctx.rows.append(Row(f"1 all-hit, 1 input, float, c={c}", rate(g1), "bare " + rate(b1),
                        f"{ratio:.2f}x", ">= 0.60x", ratio >= 0.6, cpu(g1, b1)))
    ctx.rows.append(Row(f"  latency at c={c}", latency(g1), "bare " + latency(b1), f"+{g1.p50_ms - b1.p50_ms:.2f} ms"))
    g, b = r["hit1_c1_gateway"], r["hit1_c1_bare"]
    delta = g.p50_ms - b.p50_ms
    ctx.rows.append(Row("  latency at c=1", latency(g), "bare " + latency(b), f"{delta:+.2f} ms p50",
                        "<= +0.30 ms", delta <= 0.3, cpu(g, b)))
    g32, b32 = r["hit32_gateway"], r["hit32_bare"]
    ratio = g32.rps / b32.rps
    ctx.rows.append(Row(f"2 all-hit, 32 inputs, base64, c={c}", rate(g32), "bare " + rate(b32),
                        f"{ratio:.2f}x", ">= 0.60x", ratio >= 0.6, cpu(g32, b32)))
    ctx.raw["all_hits"] = {k: v.as_dict() for k, v in r.items()}


def hits_by_store(ctx: Ctx) -> None:
    """8: hits through each store (the Redis cache, memory://, the Redis cache with --workers 2): an exact repeat
    of 1 input, and new bodies (the same cached inputs in bytes never sent before) of 1 and of 32 base64 inputs."""
    s = ctx.settings
    singles, multi = hit_bodies("store", s.working_set)
    gateways = {
        "redis": ctx.gateway,
        "memory": ctx.procs.gateway("gateway-memory", ctx.sim, "memory://"),
        "redis-w2": ctx.procs.gateway("gateway-w2", ctx.sim, f"redis://127.0.0.1:{ctx.redis.port}/0", workers=2),
    }
    for name, gw in gateways.items():
        fill(ctx, gw, f"warm-{name}.jsonl", singles)
    bare = ctx.procs.bare({"one": post(ctx.gateway.port, singles[0]), "multi": post(ctx.gateway.port, multi[0])})
    one, many = ctx.file("store-1.jsonl", singles), ctx.file("store-32.jsonl", multi)
    c, d = s.high_concurrency, s.duration_s
    loads = {"bare_1": ctx.load(bare, "cycle", one, c, d, "/bare/one"),
             "bare_32": ctx.load(bare, "cycle", many, c, d, "/bare/multi")}
    for name, gw in gateways.items():
        loads[f"{name}_repeat1"] = ctx.load(gw, "cycle", one, c, d)
        loads[f"{name}_new1"] = ctx.load(gw, "fresh", one, c, d)
        loads[f"{name}_new32"] = ctx.load(gw, "fresh", many, c, d)
    r = measure(ctx, loads)
    ctx.procs.stop(bare)
    for name in gateways:
        for case, ref, label, target in (("repeat1", "bare_1", "exact repeat, 1 input", 0.55),
                                         ("new1", "bare_1", "new body, 1 input", 0.5),
                                         ("new32", "bare_32", "new body, 32 base64", 0.45)):
            g, b = r[f"{name}_{case}"], r[ref]
            ratio = g.rps / b.rps
            ctx.rows.append(Row(f"8 {name}: {label}, c={c}", rate(g), "bare " + rate(b), f"{ratio:.2f}x",
                                f">= {target:.2f}x", ratio >= target, cpu(g, b)))
    ctx.raw["hits_by_store"] = {k: v.as_dict() for k, v in r.items()}


def routing_on_hits(ctx: Ctx) -> None:
    """9: new-body hits (1 input, and 32 base64) through a gateway with the single `upstream:` block and through one
    routing the model over three upstreams (jina, openai and tei kinds, key pools of 2, priorities 1-3), both on a
    fresh Redis cache: a hit must not pay for routing."""
    s = ctx.settings
    singles, multi = hit_bodies("route", s.working_set)
    url = f"http://127.0.0.1:{ctx.sim.port}"
    pool = {"keys": ["bench-key-1", "bench-key-2"], "models": [MODEL], "max_retries": 2}
    upstreams = [{"name": "jina", "kind": "jina", "url": url + "/v1", "priority": 1, **pool},
                 {"name": "openai", "kind": "openai", "url": url + "/v1", "priority": 2, **pool},
                 {"name": "tei", "kind": "tei", "url": url, "priority": 3, **pool}]
    cache_url = f"redis://127.0.0.1:{ctx.redis.port}/2"
    gateways = {"single": ctx.procs.gateway("gateway-single", ctx.sim, cache_url),
                "routed": ctx.procs.gateway("gateway-routed", ctx.sim, cache_url, upstreams=upstreams)}
    for name, gw in gateways.items():
        fill(ctx, gw, f"warm-route-{name}.jsonl", singles)
    one, many = ctx.file("route-1.jsonl", singles), ctx.file("route-32.jsonl", multi)
    c, d = s.high_concurrency, s.duration_s
    loads = {f"{name}_{case}": ctx.load(gw, "fresh", file, c, d)  # each case's two runs back to back
             for case, file in (("new1", one), ("new32", many)) for name, gw in gateways.items()}
    r = measure(ctx, loads)
    for gw in gateways.values():
        ctx.procs.stop(gw)
    for case, label in (("new1", "new body, 1 input"), ("new32", "new body, 32 base64")):
        g, ref = r[f"routed_{case}"], r[f"single_{case}"]
        ratio = g.rps / ref.rps
        ctx.rows.append(Row(f"9 3 upstreams vs 1: {label}, c={c}", rate(g), "1 upstream " + rate(ref),
                            f"{ratio:.2f}x", ">= 0.95x", ratio >= 0.95, cpu(g, ref)))
    ctx.raw["routing_on_hits"] = {k: v.as_dict() for k, v in r.items()}


def all_misses(ctx: Ctx) -> None:
    """3: every request a new input, through the gateway vs the simulator called directly."""
    s = ctx.settings
    template = ctx.file("miss.tpl", [body("bench miss ")[:-2], b' the quick brown fox"}'])
    c, d = s.high_concurrency, s.duration_s
    r = measure(ctx, {
        "miss_gateway": ctx.load(ctx.gateway, "unique", template, c, d),
        "miss_sim": ctx.load(ctx.sim, "unique", template, c, d),
    })
    g, sim = r["miss_gateway"], r["miss_sim"]
    ratio = g.rps / sim.rps
    ctx.rows.append(Row(f"3 all-miss, 1 input, float, c={c}", rate(g), "sim " + rate(sim),
                        f"{ratio:.2f}x", ">= 0.50x", ratio >= 0.5, cpu(g, sim)))
    ctx.rows.append(Row("  latency", latency(g), "sim " + latency(sim), f"+{g.p50_ms - sim.p50_ms:.2f} ms"))
    ctx.raw["all_misses"] = {k: v.as_dict() for k, v in r.items()}


def overlap(ctx: Ctx) -> None:
    """4: request k asks inputs 4k..4k+7, so half of each request overlaps the next (often in flight)."""
    n = ctx.settings.overlap_requests
    tag = f"overlap{time.time_ns()}"
    bodies = [body([text(tag, 4 * k + j) for j in range(8)]) for k in range(n)]
    before = scrape(ctx.gateway)
    fill(ctx, ctx.gateway, "overlap.jsonl", bodies, concurrency=32)
    after = scrape(ctx.gateway)
    sent = after["upstream_inputs"] - before["upstream_inputs"]
    unique = 4 * n + 4
    ratio = sent / unique
    ctx.rows.append(Row(f"4 50% overlap, {n} requests x 8 inputs, c=32", f"{sent:.0f} inputs upstream",
                        f"{unique} unique", f"{ratio:.2f}", "1.00", abs(ratio - 1) < 1e-9))
    ctx.raw["overlap"] = {"requests": n, "upstream_inputs": sent, "unique_inputs": unique,
                          "upstream_calls": after["calls"] - before["calls"]}


def coalescing(ctx: Ctx) -> None:
    """5: single-input misses at several concurrencies, simulator latency 20 ms: calls per request and the
    latency added over calling the simulator directly."""
    s = ctx.settings
    sim = ctx.procs.sim(s.coalesce_latency_ms)
    gw = ctx.procs.gateway("gateway-coalesce", sim, f"redis://127.0.0.1:{ctx.redis.port}/1")
    template = ctx.file("coalesce.tpl", [body("bench coalesce ")[:-2], b' the quick brown fox"}'])
    raw: dict[str, Any] = {}
    for c in s.coalesce_concurrency:
        # c=1 needs time for enough samples at ~20 ms per request.
        d = max(s.duration_s, 3.0) if c == 1 and s.duration_s >= 1 else s.duration_s
        loads = {"gateway": ctx.load(gw, "unique", template, c, d),
                 "sim": ctx.load(sim, "unique", template, c, d)}
        for ld in loads.values() if s.warmup_s > 0 else ():
            load.run(ctx.gen, ld.lasting(s.warmup_s))
        runs: dict[str, list[load.Result]] = {"gateway": [], "sim": []}
        counts: list[float] = []
        for _ in range(s.repeats):
            before = scrape(gw)
            runs["gateway"].append(load.run(ctx.gen, loads["gateway"]))
            after = scrape(gw)
            counts.append((after["calls"] - before["calls"]) / max(1.0, after["requests"] - before["requests"]))
            runs["sim"].append(load.run(ctx.gen, loads["sim"]))
        g, direct = median_run(runs["gateway"]), median_run(runs["sim"])
        per_request = statistics.median(counts)
        added50, added99 = g.p50_ms - direct.p50_ms, g.p99_ms - direct.p99_ms
        ok = added50 <= 1.0 if c == 1 else None
        ctx.rows.append(Row(f"5 coalescing, sim {s.coalesce_latency_ms:g} ms, c={c}",
                            f"{per_request:.3f} calls/request", "sim " + latency(direct),
                            f"added p50 {added50:+.2f} / p99 {added99:+.2f} ms",
                            "p50 <= +1.00 ms" if c == 1 else "", ok, cpu(g, direct)))
        raw[str(c)] = {"calls_per_request": per_request, "gateway": g.as_dict(), "sim": direct.as_dict(),
                       "added_p50_ms": added50, "added_p99_ms": added99}
    ctx.procs.stop(gw)
    ctx.procs.stop(sim)
    ctx.raw["coalescing"] = raw


def memory(ctx: Ctx) -> None:
    """6: Redis bytes per cached vector (256/1024/2048 dims); gateway RSS per 100k entries in memory://."""
    s = ctx.settings
    client = redis.Redis(port=ctx.redis.port)
    raw: dict[str, Any] = {}
    for model, dims in (("jina-embeddings-v3", 256), ("jina-embeddings-v3", 1024), ("jina-embeddings-v4", 2048)):
        client.flushall()
        used0 = int(client.info("memory")["used_memory"])
        tag = f"mem{dims}-{time.time_ns()}"
        extra = {"dimensions": dims} if dims != 1024 else {}
        bodies = [orjson.dumps({"model": model, "input": [text(tag, k * 64 + j) for j in range(64)],
                                "encoding_format": "base64", **extra})
                  for k in range(max(1, s.redis_entries // 64))]
        fill(ctx, ctx.gateway, f"mem{dims}.jsonl", bodies, concurrency=4)
        n = int(client.dbsize())
        used = (int(client.info("memory")["used_memory"]) - used0) / n
        keys = [k for _, k in zip(range(50), client.scan_iter(count=100), strict=False)]
        usage = statistics.median(int(client.memory_usage(k) or 0) for k in keys)
        value = statistics.median(int(client.strlen(k)) for k in keys)
        limit = 1.05 * 4 * dims + 100
        target = dims == 1024  # the target is for 1024 dims; the others are for the record
        ctx.rows.append(Row(f"6 Redis bytes per {dims}-dim vector", f"{used:,.0f} B (MEMORY USAGE {usage:,.0f})",
                            f"raw float32 {4 * dims:,} B", f"{used / (4 * dims):.2f}x, value {value:,.0f} B",
                            f"<= {limit:,.0f} B" if target else "", used <= limit if target else None))
        raw[str(dims)] = {"entries": n, "used_memory_per_entry": used, "memory_usage": usage, "value_bytes": value}
    client.flushall()
    client.close()
    raw["rss"] = _rss_per_100k(ctx)
    ctx.raw["memory"] = raw


def _rss_per_100k(ctx: Ctx) -> dict[str, float]:
    n = ctx.settings.memory_entries
    gw = ctx.procs.gateway("gateway-memory", ctx.sim, "memory://", max_bytes=4 * 1024**3)
    fill(ctx, gw, "rss-warm.jsonl", [body("rss warm-up", encoding_format="base64")], concurrency=1)
    rss0 = gw.rss_bytes()
    tag = f"rss-{time.time_ns()}"
    per = 256
    bodies = [body([text(tag, k * per + j) for j in range(per)], encoding_format="base64")
              for k in range(max(1, n // per))]
    fill(ctx, gw, "rss.jsonl", bodies, concurrency=2)
    entries = len(bodies) * per
    per_100k = (gw.rss_bytes() - rss0) * 100_000 / entries
    ctx.procs.stop(gw)
    ctx.rows.append(Row("6 gateway RSS per 100k 1024-dim entries", f"{per_100k / 2**20:,.0f} MiB",
                        f"memory:// store, {entries:,} filled", f"{per_100k / 100_000:,.0f} B/entry"))
    return {"entries": entries, "rss_per_100k_bytes": per_100k}


# ---- 7: interactive latency while a batch job runs -------------------------------------------------------


@dataclass
class _JobRun:
    """What one measured window saw of the job running beside it."""

    lines: int  # lines the job completed during the window
    seconds: float
    covered: bool  # the job was still running when the window ended

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0


def batch_interference(ctx: Ctx) -> None:
    """7: interactive p50/p99 with and without a batch job running in the same gateway, and the job's lines/s
    idle and under that load. Upstream: the simulator at the demo's latency (20 ms + 0.01 ms per token).
    Interactive traffic: `batch_concurrency` connections of single-input requests, every `batch_miss_every`th a
    new input (a miss, ~20 ms upstream), the others hits; so p50 is a hit's latency and p99 a miss's. The job:
    `batch_lines` single-input lines, `batch_cached` of them embedded before; a new job for each window.

    The Python generator on bare connections measures here whatever `--client` says: wrk's figures for this
    bimodal load do not add up (its mean latency times its requests came out above connections times seconds,
    against the gateway's access log of ~0.2 ms hits), and aiohttp's client adds milliseconds of its own."""
    s = ctx.settings
    sim = ctx.procs.sim(20.0, 0.01)
    gw = ctx.procs.gateway("gateway-batch", sim, f"redis://127.0.0.1:{ctx.redis.port}/2")
    hits = [body(text("batch-hit", i)) for i in range(s.working_set)]
    fill(ctx, gw, "batch-warm.jsonl", _grouped(hits))
    template = [body("bench batch miss ")[:-2], b' the quick brown fox"}']
    mix = ctx.file("batch-mix.jsonl", [str(s.batch_miss_every).encode(), *template, *hits])
    ld = ctx.load(gw, "mix", mix, s.batch_concurrency, s.duration_s)
    if s.warmup_s > 0:
        load.run("raw", ld.lasting(s.warmup_s))
    without: list[load.Result] = []
    with_job: list[load.Result] = []
    jobs: list[_JobRun] = []
    idle: list[_JobRun] = []
    for k in range(s.repeats):  # interleaved, so the machine's other load falls on each figure alike
        without.append(load.run("raw", ld))
        result, job = _beside_a_job(ctx, gw, ld, f"w{k}")
        with_job.append(result)
        jobs.append(job)
        idle.append(_job_alone(ctx, gw, f"i{k}"))
    ctx.procs.stop(gw)
    ctx.procs.stop(sim)
    ctx.raw["runs"] = {"batch_without_job": [r.as_dict() for r in without],
                       "batch_with_job": [r.as_dict() for r in with_job]}
    _interference_rows(ctx, median_run(without), median_run(with_job), idle, jobs)


def _grouped(singles: list[bytes], per: int = 100) -> list[bytes]:
    """Single-input bodies merged `per` to a request (the same cache keys), to warm a cache quickly."""
    inputs = [orjson.loads(b)["input"] for b in singles]
    return [body(inputs[i : i + per]) for i in range(0, len(inputs), per)]


def _new_job(ctx: Ctx, gw: Proc, tag: str, settle_s: float = 0.0) -> str:
    """Submits a job of `batch_lines` new single-input lines, `batch_cached` of them cached first (through
    `/v1/embeddings`, so wait `settle_s` for the job to find the gateway idle)."""
    s = ctx.settings
    texts = [text(f"job-{tag}-{time.time_ns()}", i) for i in range(s.batch_lines)]
    cached = texts[: int(len(texts) * s.batch_cached)]
    for i in range(0, len(cached), 256):
        post(gw.port, body(cached[i : i + 256]))
    time.sleep(settle_s)
    lines = [{"custom_id": f"l{i}", "body": {"input": t}} for i, t in enumerate(texts)]
    created = orjson.loads(call(gw.port, "POST", "/v1/batch/embeddings", orjson.dumps(
        {"model": MODEL, "input": lines, "endpoint": PATH, "completion_window": "24h"})))
    return str(created["id"])


def _job(gw: Proc, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = orjson.loads(call(gw.port, "GET", f"/v1/batch/{job_id}"))
    return job


def _wait_job(gw: Proc, job_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 600) -> float:
    deadline = time.monotonic() + timeout_s
    while not until(job := _job(gw, job_id)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch job {job_id} stuck: {job}")
        time.sleep(0.02)
    return time.monotonic()


def _ended(job: dict[str, Any]) -> bool:
    return job["status"] in ("completed", "failed", "cancelled")


def _job_alone(ctx: Ctx, gw: Proc, tag: str) -> _JobRun:
    """The job's throughput with nothing else to do: submit to completed. (After the gateway's
    `batch.yield_quiet_s` without interactive requests: the job runs at full speed from the start.)"""
    job_id = _new_job(ctx, gw, tag, settle_s=1.1)
    t0 = time.monotonic()
    t1 = _wait_job(gw, job_id, _ended)
    job = _job(gw, job_id)
    if job["status"] != "completed" or job["request_counts"]["completed"] != ctx.settings.batch_lines:
        raise RuntimeError(f"batch job did not complete every line: {job}")
    return _JobRun(ctx.settings.batch_lines, t1 - t0, covered=True)


def _beside_a_job(ctx: Ctx, gw: Proc, ld: load.Load, tag: str) -> tuple[load.Result, _JobRun]:
    """One window of interactive load while a fresh job runs (started first, so it is under way); the job is
    cancelled afterwards to keep the bench short."""
    job_id = _new_job(ctx, gw, tag)
    _wait_job(gw, job_id, lambda j: j["request_counts"]["completed"] > 0 or _ended(j))
    before, t0 = _job(gw, job_id), time.monotonic()
    result = load.run("raw", ld)
    after, t1 = _job(gw, job_id), time.monotonic()
    done = after["request_counts"]["completed"] - before["request_counts"]["completed"]
    call(gw.port, "DELETE", f"/v1/batch/{job_id}")
    _wait_job(gw, job_id, _ended)
    return result, _JobRun(done, t1 - t0, covered=not _ended(after))


def _interference_rows(
    ctx: Ctx, alone: load.Result, beside: load.Result, idle: list[_JobRun], jobs: list[_JobRun]
) -> None:
    s = ctx.settings
    ratio50, ratio99 = beside.p50_ms / alone.p50_ms, beside.p99_ms / alone.p99_ms
    covered = all(j.covered for j in jobs)
    rate_under = statistics.median(j.lines_per_s for j in jobs)
    rate_idle = statistics.median(j.lines_per_s for j in idle)
    note = "" if covered else " (the job ended inside a window)"
    ctx.rows.append(Row(f"7 interactive while a {s.batch_lines:,}-line job runs, c={s.batch_concurrency}",
                        latency(beside), "no job " + latency(alone),
                        f"p50 x{ratio50:.2f} / p99 x{ratio99:.2f}{note}", "p50 <= 1.50x",
                        ratio50 <= 1.5 and covered, cpu(beside, alone)))
    ctx.rows.append(Row("  job throughput", f"{rate_under:,.0f} lines/s under that load",
                        f"{rate_idle:,.0f} lines/s idle", f"{rate_under / rate_idle:.2f}x"))
    ctx.raw["batch_interference"] = {
        "without_job": alone.as_dict(), "with_job": beside.as_dict(), "p50_ratio": ratio50, "p99_ratio": ratio99,
        "idle_lines_per_s": rate_idle, "idle_seconds": [j.seconds for j in idle],
        "windows": [{"lines": j.lines, "seconds": j.seconds, "covered": j.covered} for j in jobs],
    }
