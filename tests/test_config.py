"""Config loading: every error names the key path; the shipped files load."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config as cfg

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load() -> None:
    demo = cfg.load_config(ROOT / "config/demo.yaml")
    assert demo.upstream.url == "sim://" and demo.cache.url == "memory://" and demo.state.url == "memory://"
    env = {"JINA_API_KEY": "jina_x", "METRICS_TOKEN": "t"}
    prod = cfg.load_config(ROOT / "config/gateway.yaml", env=env)
    assert prod.upstream.api_key == "jina_x"
    assert prod.cache.url.startswith("redis://")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: {port: '80'}", "listen.port: expected int"),
        ("listen: {prot: 80}", "listen.prot: unknown key"),
        ("cache: {scope: everyone}", "cache.scope: expected one of ['global', 'team']"),
        ("teams: [{keys: []}]", "teams.0.name: required key is missing"),
        ("teams: [{name: a, keys: [abc]}]", "teams.0.keys.0: expected 'sha256:<64 hex digits>'"),
        ("teams: [{name: a}, {name: a}]", "teams.1.name: duplicate team name"),
        ("upstream: {url: ftp://x}", "upstream.url: must be"),
        ("upstream: {limits: {max_concurrency: true}}", "upstream.limits.max_concurrency: expected int, got bool"),
        ("upstream: {api_key: ${NOPE}}", "environment variable NOPE is not set"),
        ("coalesce: [1]", "coalesce: expected a mapping"),
        ("coalesce: {quiet_ms: -1}", "coalesce.quiet_ms: must not be negative, got -1"),
    ],
)
def test_errors_name_the_key_path(text: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse_config(text, env={})
    assert message in str(err.value)


def test_interpolation_with_defaults_and_comments() -> None:
    text = "upstream:\n  api_key: ${KEY}  # from ${NOT_NEEDED}\ncache: {url: '${URL:-memory://}'}\n"
    config = cfg.parse_config(text, env={"KEY": "k"})
    assert config.upstream.api_key == "k" and config.cache.url == "memory://"


def test_ints_are_accepted_for_floats() -> None:
    assert cfg.parse_config("coalesce: {max_wait_ms: 5}", env={}).coalesce.max_wait_ms == 5.0
