"""Config loading: every error names the key path; the shipped files load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import cli
from gateway import config as cfg
from gateway.auth import hash_key

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"sha256:(\d)\1{63}")


def test_shipped_configs_load() -> None:
    demo = cfg.load_config(ROOT / "config/demo.yaml")
    assert demo.upstream.url == "sim://" and demo.cache.url == "memory://" and demo.state.url == "memory://"
    env = {"JINA_API_KEY": "jina_x", "METRICS_TOKEN": "t"}
    # The production example with its placeholder key hashes replaced, as its comment asks.
    text = PLACEHOLDER.sub(lambda m: hash_key(f"key-{m.group(1)}"), (ROOT / "config/gateway.yaml").read_text())
    prod = cfg.parse_config(text, env=env)
    assert prod.upstream.api_key == "jina_x"
    assert prod.cache.url.startswith("redis://")
    assert [len(t.keys) for t in prod.teams] == [1, 1]


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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listen: {port: 99999}", "listen.port: must be at most 65535, got 99999"),
        ("listen: {port: 0}", "listen.port: must be at least 1, got 0"),
        ("cache: {ttl_s: -5}", "cache.ttl_s: must be at least 1, got -5"),
        ("cache: {max_bytes: -1}", "cache.max_bytes: must be at least 1, got -1"),
        ("limits: {max_inputs_per_request: -1}", "limits.max_inputs_per_request: must be at least 1, got -1"),
        ("limits: {request_timeout_s: 0}", "limits.request_timeout_s: must be > 0, got 0"),
        ("", "<root>: the file is empty"),
        ("# nothing but a comment\n", "<root>: the file is empty"),
        ("- listen", "<root>: expected a mapping, got list"),
    ],
)
def test_check_config_refuses_out_of_range_values_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check-config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embedding-gateway: {path}: {message}") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("teams: [{name: a}, {name: b}, {name: c, quota: {tokens_per_minute: 0}}]",
         "teams.2.quota.tokens_per_minute: must be at least 1, got 0"),
        ("teams: [{name: a, models: []}]", "teams.0.models: must have at least 1 item"),
        ("teams: [{name: a, weight: 0}]", "teams.0.weight: must be > 0, got 0"),
        ("upstream: {max_inputs_per_call: {jina-embeddings-v3: 0}}",
         "upstream.max_inputs_per_call.jina-embeddings-v3: must be at least 1, got 0"),
        ("upstream: {timeout_s: -1}", "upstream.timeout_s: must be > 0, got -1"),
        ("upstream: {tls: {key_file: k.pem}}", "upstream.tls.key_file: needs upstream.tls.cert_file"),
        ("upstream: {tls: {ca: x}}", "upstream.tls.ca: unknown key (known: ca_file, cert_file, key_file)"),
        ("upstream: {trust_env: 'no'}", "upstream.trust_env: expected bool, got str 'no'"),
        ("limits: {header_timeout_s: 0}", "limits.header_timeout_s: must be > 0, got 0"),
        ("limits: {keepalive_timeout_s: -1}", "limits.keepalive_timeout_s: must be > 0, got -1"),
        ("limits: {max_connections: 0}", "limits.max_connections: must be at least 1, got 0"),
        ("limits: {max_json_depth: 0}", "limits.max_json_depth: must be at least 1, got 0"),
        ("batch: {yield_cpu_share: 1.5}", "batch.yield_cpu_share: must be at most 1, got 1.5"),
        ("batch: {lease_s: 1, heartbeat_s: 1}", "batch.lease_s: must be at least twice batch.heartbeat_s"),
        ("prices: {jina-embeddings-v3: -0.05}", "prices.jina-embeddings-v3: must not be negative, got -0.05"),
        ("log_level: info", "log_level: expected one of ['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL']"),
        ("admin_keys: ['sha256:" + "0" * 64 + "']", "admin_keys.0: sha256:00000000… is a placeholder"),
    ],
)
def test_ranges_and_new_keys_name_the_key_path(text: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse_config(text, env={})
    assert message in str(err.value)


def test_every_error_is_reported_each_on_its_own_line() -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse_config("listen: {port: 99999}\ncache: {ttl_s: 0, url: 3}", env={})
    assert str(err.value).splitlines() == [
        "listen.port: must be at most 65535, got 99999",
        "cache.url: expected str, got int 3",
        "cache.ttl_s: must be at least 1, got 0",
    ]


def test_defaults_of_the_keys_other_parts_read() -> None:
    config = cfg.parse_config("upstream: {tls: {ca_file: /etc/ca.pem}}", env={})
    assert (config.limits.header_timeout_s, config.limits.keepalive_timeout_s) == (10.0, 75.0)
    assert (config.limits.max_connections, config.limits.max_json_depth) == (1024, 64)
    assert config.upstream.tls == cfg.UpstreamTls(ca_file="/etc/ca.pem")
    assert config.upstream.trust_env is True


def test_sections_are_frozen() -> None:
    config = cfg.parse_config("listen: {port: 8081}", env={})
    with pytest.raises(AttributeError):
        config.listen.port = 1  # type: ignore[misc]


def test_the_production_example_refuses_its_placeholders(capsys: pytest.CaptureFixture[str]) -> None:
    env = {"JINA_API_KEY": "jina_x", "METRICS_TOKEN": "t"}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(ROOT / "config/gateway.yaml", env=env)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["teams.0.keys.0", "teams.1.keys.0"]
    assert all("is a placeholder, not a valid key hash" in line and "embedding-gateway keys new" in line
               for line in lines)


def test_an_unset_variable_says_which_to_set() -> None:
    env = {"JINA_API_KEY": "jina_x"}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(ROOT / "config/gateway.yaml", env=env)
    assert "environment variable METRICS_TOKEN is not set: set METRICS_TOKEN in the environment" in str(err.value)


def test_serve_help_shows_the_default_config_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "(default: config/demo.yaml in the working directory)" in " ".join(capsys.readouterr().out.split())


def test_serve_without_a_config_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("embedding-gateway: no --config given and no config/demo.yaml")
    assert "pass --config PATH" in err
