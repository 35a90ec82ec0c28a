"""gateway/metrics.py and /metrics: the bill in the metrics equals the upstream's, scrape hooks, the access log."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Gauge

from gateway import appkeys as K
from gateway.auth import hash_key
from gateway.metrics import Metrics, replace
from gateway.sim import Fault, SimConfig

from .conftest import TEAM_A_KEY, TEAM_B_KEY, UPSTREAM_KEY, Gateway, auth, sim_of
from .promtext import scrape
from .redis_server import free_port
from .workload import MODEL, NANO, run_workload

PRICES = {MODEL: 0.05, NANO: 0.02}
ROOT = Path(__file__).resolve().parent.parent


async def test_upstream_billed_tokens_in_metrics_equal_the_simulators_count(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=30), prices=PRICES)
    sim = sim_of(client)
    sent = await run_workload(client, sim)
    m = await scrape(client)

    assert m.total("eg_tokens_total", source="upstream") == sim.tokens == sent.total("upstream_tokens")
    assert m.total("eg_upstream_tokens_total") == sim.tokens
    hits, misses, joined = (m.total("eg_inputs_total", outcome=o) for o in ("hit", "miss", "joined"))
    assert hits + misses + joined == sent.total("inputs") == 40
    assert (hits, misses, joined) == (sent.total("hits"), sent.total("misses"), sent.total("joined")) == (9, 25, 6)
    assert misses == sim.inputs  # every miss was billed exactly once
    for team in ("team-a", "team-b"):
        assert m.total("eg_tokens_total", team=team, source="upstream") == sent.upstream_tokens[team]
    billed = sum(m.total("eg_tokens_total", model=x, source="upstream") * p / 1e6 for x, p in PRICES.items())
    assert m.total("eg_cost_usd_total", kind="billed") == pytest.approx(billed, rel=1e-12)
    assert m.total("eg_upstream_calls_total", status="503") == 1
    assert m.total("eg_upstream_retries_total", reason="503") == 1
    assert m.total("eg_upstream_batch_inputs_count") == m.total("eg_upstream_calls_total", status="200")
    assert m.total("eg_upstream_batch_inputs_sum") == sim.inputs
    assert m.total("eg_requests_total", route="/v1/embeddings", status="200") == sent.total("requests") == 6


async def test_metrics_never_carry_keys_or_inputs(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=5))
    await run_workload(client, sim_of(client))
    text = (await scrape(client)).text
    for secret in (TEAM_A_KEY, TEAM_B_KEY, UPSTREAM_KEY, "metrics-token", "pack my box"):
        assert secret not in text


async def test_series_known_from_the_config_start_at_zero(gateway: Gateway) -> None:
    teams = [
        {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "quota": {"tokens_per_day": 1000, "requests_per_minute": 5}},
        {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)]},
    ]
    client = await gateway(teams=teams)
    m = await scrape(client)
    assert sorted(s["policy"] for s in m.labelsets("eg_quota_rejections_total")) == [
        "requests_per_minute", "tokens_per_day"
    ]
    assert m.total("eg_quota_rejections_total") == 0
    assert m.total("eg_quota_limit", team="team-a", policy="tokens_per_day") == 1000
    assert {s["store"] for s in m.labelsets("eg_store_errors_total")} == {"cache", "state"}


async def test_scrape_hooks_set_gauges_at_scrape_time_and_a_failing_hook_does_not_break_the_scrape(
    gateway: Gateway,
) -> None:
    client = await gateway()
    metrics = client.app[K.METRICS]
    scrapes = 0

    async def quota_snapshot() -> None:
        nonlocal scrapes
        scrapes += 1
        # The label set of the first scrape is gone from the second: `replace` drops what is not given.
        policy = "tokens_per_day" if scrapes == 1 else "tokens_per_minute"
        replace(metrics.quota_remaining, {("team-a", policy): 100.0 - scrapes})

    async def broken() -> None:
        raise ConnectionError("state store down")

    metrics.on_scrape(quota_snapshot)
    metrics.on_scrape(broken)
    first = await scrape(client)
    assert first.labelsets("eg_quota_remaining") == [{"team": "team-a", "policy": "tokens_per_day"}]
    assert first.total("eg_quota_remaining") == 99
    second = await scrape(client)
    assert second.labelsets("eg_quota_remaining") == [{"team": "team-a", "policy": "tokens_per_minute"}]
    assert second.total("eg_quota_remaining") == 98
    assert second.total("eg_scrape_hook_errors_total", hook="broken") == 2


async def test_a_hook_that_hangs_is_cut_off_by_the_timeout() -> None:
    metrics = Metrics()
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    metrics.on_scrape(stuck)
    await metrics.refresh(timeout_s=0.01)
    assert b'eg_scrape_hook_errors_total{hook="stuck"} 1.0' in metrics.render()


async def test_access_log_is_one_json_line_per_request_without_keys_or_text(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    client = await gateway(sim=SimConfig(latency_base_ms=0))
    body = orjson.dumps({"model": MODEL, "input": ["secret text one", "secret text two"]})
    for _ in range(2):
        resp = await client.post("/v1/embeddings", data=body, headers={**auth(), "X-Request-Id": "rid-1"})
        assert resp.status == 200
    sim_of(client).inject(*[Fault(kind="status", status=500) for _ in range(4)])  # 1 try + 3 retries
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["x"]}), headers=auth())
    assert resp.status == 502
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 3
    first, second, failed = (orjson.loads(line) for line in lines)
    assert first["request_id"] == "rid-1" and first["team"] == "team-a" and first["model"] == MODEL
    assert first["status"] == 200 and first["inputs"] == 2 and first["hits"] == 0 and first["misses"] == 2
    assert first["upstream_tokens"] > 0 and first["latency_ms"] >= 0
    assert second["hits"] == 2 and second["upstream_tokens"] == 0
    assert failed["status"] == 502 and failed["model"] == MODEL and failed["inputs"] == 1
    for line in lines:
        assert TEAM_A_KEY not in line and UPSTREAM_KEY not in line and "secret text" not in line


def test_priming_again_makes_the_limits_follow_the_new_config() -> None:
    metrics = Metrics()
    metrics.prime([("a", {"tokens_per_day": 10, "tokens_per_minute": 5}), ("b", {"tokens_per_day": None})])
    metrics.prime([("a", {"tokens_per_day": 20, "tokens_per_minute": None})])
    limits = {tuple(s.labels.values()): s.value for f in metrics.quota_limit.collect() for s in f.samples}
    assert limits == {("a", "tokens_per_day"): 20}


def test_published_request_figures_expose_exactly_what_observe_per_request_would() -> None:
    """The per-request series are summed in plain dicts and published in bulk: the exposition must be the one
    prometheus-client gives when every request is observed on its own."""
    from prometheus_client import generate_latest

    bulk, direct = Metrics(), Metrics()
    latencies = [0.0001, 0.0005, 0.0005001, 0.003, 0.003, 0.7, 31.0, 0.025]  # on a bound, past the last one
    for i, seconds in enumerate(latencies):
        status = 200 if i % 3 else 429
        bulk.count_request("/v1/embeddings", status, "team-a", seconds)
        direct.child(direct.requests, "/v1/embeddings", str(status), "team-a").inc()
        direct.child(direct.request_seconds, "/v1/embeddings").observe(seconds)
        figures = (i, 1, 0, 10 * i, 3, 0.25 * i, 0.0)
        bulk.count_embed("team-a", MODEL, figures)
        for (name, label), value in zip(
            (("inputs", "hit"), ("inputs", "miss"), ("inputs", "joined"), ("tokens", "upstream"),
             ("tokens", "cache"), ("cost", "billed"), ("cost", "saved")), figures, strict=True):
            if value:
                direct.child(getattr(direct, name), "team-a", MODEL, label).inc(value)
    bulk.active.enter()
    direct.in_flight.set(1)
    def samples(text: bytes) -> list[bytes]:  # `_created` lines are times; series order is creation order
        return sorted(line for line in text.splitlines() if b"_created" not in line)

    assert samples(bulk.render()) == samples(generate_latest(direct.registry))
    bulk.active.leave()
    assert b"eg_requests_in_flight 0.0" in bulk.render()
    assert b'eg_requests_total{route="/v1/embeddings",status="429",team="team-a"} 3.0' in bulk.render()


def test_replace_in_multiprocess_mode_zeroes_a_vanished_label_set_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """prometheus-client warns on `clear` in multiprocess mode (filterwarnings=error turns that into a failure)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    gauge = Gauge("eg_test_policy", "a labelled gauge", ["team", "policy"], registry=CollectorRegistry())
    replace(gauge, {("a", "rpm"): 1.0, ("b", "rpm"): 2.0})
    replace(gauge, {("a", "rpm"): 3.0})
    assert {tuple(s.labels.values()): s.value for s in gauge.collect()[0].samples} == {
        ("a", "rpm"): 3.0, ("b", "rpm"): 0.0,
    }


def test_serve_with_two_workers_starts_scrapes_and_stops_without_a_warning() -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "config/demo.yaml", "--workers", "2",
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        try:
            assert proc.stdout is not None
            assert b"2 workers" in proc.stdout.readline()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer demo-metrics-token"}
            )
            with urllib.request.urlopen(request, timeout=30) as resp:  # runs every scrape hook (replace)
                assert b"eg_workers 2.0" in resp.read()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert b"Warning" not in stderr, stderr.decode()
