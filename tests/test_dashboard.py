"""grafana/: the dashboard's queries are valid PromQL over series the gateway exports, proven on a real Prometheus."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import ClientSession

from gateway.auth import hash_key
from gateway.metrics import Metrics
from gateway.sim import Fault, SimConfig

from .conftest import TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, sim_of
from .promtext import METRICS_TOKEN, scrape
from .redis_server import free_port
from .workload import MODEL, run_workload

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = orjson.loads((GRAFANA / "dashboards" / "embedding-gateway.json").read_bytes())
# What Grafana puts in place of its variables when every team and model is selected.
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s", "$team": ".*", "$model": ".*"}


def panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def expressions() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with the variables substituted) for every target of every panel."""
    out = []
    for panel in panels():
        for target in panel["targets"]:
            out.append((f"{panel['title']} / {target['refId']}", substitute(target["expr"])))
    return out


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, expr
    return expr


def variable_queries() -> list[tuple[str, str, str]]:
    """(variable, label, series selector) of each `label_values(selector, label)` variable."""
    out = []
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
            assert m, var["definition"]
            out.append((var["name"], m.group(2), substitute(m.group(1))))
    return out


# ---- the dashboard file, without Prometheus -------------------------------------------------------------------


def test_dashboard_uses_its_datasource_variable_and_has_team_and_model_variables() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("team", "model"):
        assert variables[name]["includeAll"] and variables[name]["multi"] and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_the_panels_the_platform_team_needs() -> None:
    titles = {p["title"] for p in panels()}
    for wanted in ("Tokens billed vs saved by team", "Cost and cost saved by team (USD per hour)", "Cache hit ratio",
                   "Request latency", "Upstream latency", "429s by team and policy", "Upstream errors and retries",
                   "Inputs per upstream call", "Quota remaining", "Budget spent (share of the month's budget)"):
        assert wanted in titles
    latency = [p for p in panels() if p["title"] in ("Request latency", "Upstream latency")]
    for panel in latency:
        assert [t["legendFormat"] for t in panel["targets"]] == ["p50", "p95", "p99"]


def test_every_series_the_dashboard_reads_is_one_the_gateway_exports() -> None:
    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        exported.update(family.name + s for s in suffixes.get(family.type, ("",)))
    queries = [e for _, e in expressions()] + [s for _, _, s in variable_queries()]
    used = {name for q in queries for name in re.findall(r"\beg_[a-z_]+", q)}
    assert used and used <= exported, used - exported


def test_provisioning_files_point_at_the_dashboard_and_a_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/embedding-gateway.yaml").read_text())
    assert providers["providers"][0]["type"] == "file" and providers["providers"][0]["options"]["path"]
    example = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    job = example["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"


# ---- a real Prometheus -------------------------------------------------------------------------------------------


class Prometheus:
    """A `prometheus` process on a free port with its own storage, scraping one gateway every second."""

    def __init__(self, target: str, token: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="eg-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (self.dir / "token").write_text(token)
        config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())  # the shipped example, pointed here
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        job = config["scrape_configs"][0]
        job["static_configs"] = [{"targets": [target]}]
        job["authorization"]["credentials_file"] = str(self.dir / "token")
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary is not None
        self.log = (self.dir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        return self

    def logs(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus_binary() -> Iterator[None]:
    if shutil.which("prometheus") is None:
        if os.environ.get("EG_REQUIRE_PROMETHEUS"):
            pytest.fail("prometheus is not on PATH and EG_REQUIRE_PROMETHEUS is set (CI)")
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    yield


async def until(
    deadline: float, check: Callable[[], Awaitable[bool]], what: Callable[[], str], prom: Prometheus
) -> None:
    """Polls `check()` until it is true or the bounded deadline passes (Prometheus scrapes on its own clock)."""
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what()}\n--- prometheus log ---\n{prom.logs()}")
        await asyncio.sleep(0.25)


async def instant(session: ClientSession, prom: Prometheus, query: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{prom.url}/api/v1/query", params={"query": query}) as resp:
        return resp.status, await resp.json()


def has_finite_value(body: dict[str, Any]) -> bool:
    result = body["data"]["result"]
    values = [float(r["value"][1]) for r in result] if body["data"]["resultType"] == "vector" else []
    return any(math.isfinite(v) for v in values)


TEAM_C_KEY = "eg-test-team-c"
TEAMS = [
    {"name": "team-a", "keys": [hash_key(TEAM_A_KEY)],
     "quota": {"tokens_per_day": 10_000_000, "requests_per_minute": 100_000}, "budget": {"usd_per_month": 1000}},
    {"name": "team-b", "keys": [hash_key(TEAM_B_KEY)], "quota": {"tokens_per_minute": 5_000_000}},
    {"name": "team-c", "keys": [hash_key(TEAM_C_KEY)], "quota": {"requests_per_minute": 1}},
]


async def throttle_team_c(client: Any) -> int:
    """team-c's second request in a minute is refused by its quota; returns the first one's upstream tokens."""
    body = orjson.dumps({"model": MODEL, "input": ["team c"]})
    first = await client.post("/v1/embeddings", data=body, headers=auth(TEAM_C_KEY))
    second = await client.post("/v1/embeddings", data=body, headers=auth(TEAM_C_KEY))
    assert (first.status, second.status) == (200, 429)
    return int(first.headers["X-Upstream-Tokens"])


@pytest.mark.slow
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    gateway: Gateway, prometheus_binary: None
) -> None:
    client = await gateway(sim=SimConfig(latency_base_ms=20), teams=TEAMS, prices={MODEL: 0.05})
    sim = sim_of(client)
    sent = await run_workload(client, sim)
    team_c_tokens = await throttle_team_c(client)
    # The upstream rate limits the shared key past every retry: the caller gets a 429.
    sim.inject(*[Fault(kind="status", status=429, headers={"Retry-After": "0"}) for _ in range(4)])
    resp = await client.post("/v1/embeddings", data=orjson.dumps({"model": MODEL, "input": ["429"]}), headers=auth())
    assert resp.status == 429

    prom = Prometheus(f"127.0.0.1:{client.server.port}", METRICS_TOKEN).start()
    try:
        async with ClientSession() as session:
            await check_dashboard(client, sim, sent.total("upstream_tokens") + team_c_tokens, session, prom)
    finally:
        prom.stop()


async def check_dashboard(client: Any, sim: Any, billed_sent: int, session: ClientSession, prom: Prometheus) -> None:
    deadline = time.monotonic() + 45

    async def ready() -> bool:
        try:
            async with session.get(f"{prom.url}/-/ready") as resp:
                return resp.status == 200
        except OSError:
            return False

    await until(deadline, ready, lambda: "prometheus did not become ready", prom)
    queries = expressions()
    for name, query in queries:  # valid PromQL answers 200 at once, data or not
        status, body = await instant(session, prom, query)
        assert status == 200 and body["status"] == "success", f"{name}: {query}: {body}"

    missing = [name for name, _ in queries]
    rounds = 0

    async def all_have_data() -> bool:
        nonlocal rounds, missing, billed_sent
        rounds += 1  # keep traffic flowing so every rate() has something to see
        resp = await client.post("/v1/embeddings", headers=auth(TEAM_A_KEY if rounds % 2 else TEAM_B_KEY),
                                 data=orjson.dumps({"model": MODEL, "input": [f"tick {rounds}", "steady"]}))
        assert resp.status == 200
        billed_sent += int(resp.headers["X-Upstream-Tokens"])
        missing = [name for name, q in queries if not has_finite_value((await instant(session, prom, q))[1])]
        return not missing

    await until(deadline, all_have_data, lambda: f"no data from: {missing}", prom)
    for variable, label, selector in variable_queries():
        async with session.get(f"{prom.url}/api/v1/label/{label}/values", params={"match[]": selector}) as resp:
            assert (await resp.json())["data"], variable
    up = (await instant(session, prom, 'up{job="embedding-gateway"}'))[1]["data"]["result"]
    assert [r["value"][1] for r in up] == ["1"]  # scraped with the bearer token from the example's file

    billed = -1.0  # traffic has stopped: Prometheus's last scrape shows exactly the simulator's bill

    async def settled() -> bool:
        nonlocal billed
        result = (await instant(session, prom, 'sum(eg_tokens_total{source="upstream"})'))[1]["data"]["result"]
        billed = float(result[0]["value"][1])
        return billed == sim.tokens

    await until(deadline, settled, lambda: f"prometheus shows {billed} billed tokens, the simulator {sim.tokens}", prom)
    assert (await scrape(client)).total("eg_tokens_total", source="upstream") == sim.tokens == billed_sent
    rejected = 'eg_quota_rejections_total{team="team-c", policy="requests_per_minute"}'
    assert [r["value"][1] for r in (await instant(session, prom, rejected))[1]["data"]["result"]] == ["1"]
