"""The `upstreams:` config: the old single `upstream:` block is one upstream named `default`; the list's errors
name their key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config as cfg

ROOT = Path(__file__).resolve().parent.parent

LIST = """
upstreams:
  - name: jina
    kind: jina
    url: https://api.jina.ai/v1
    keys: ["${K1}", "${K2}"]
    models: [jina-embeddings-v3, jina-clip-v2]
    limits: {requests_per_minute: 500, tokens_per_minute: 2000000, max_concurrency: 8}
  - name: v3-selfhosted
    kind: openai
    url: http://vllm:8000/v1
    models: {jina-embeddings-v3: jinaai/jina-embeddings-v3}
    priority: 2
    prices: {jina-embeddings-v3: 0}
  - name: tei
    kind: tei
    url: http://tei:80
    models: [bge-m3]
    tls: {ca_file: /etc/ssl/tei-ca.pem}
"""


def test_the_single_upstream_block_is_one_upstream_named_default() -> None:
    config = cfg.parse_config("upstream: {url: 'https://api.jina.ai/v1', api_key: k, api: openai}", env={})
    (default,) = config.routes
    assert (default.name, default.wire, default.pool, default.models) == ("default", "openai", ("k",), None)
    assert cfg.from_data({}).routes == (cfg.Upstream(),)


def test_a_list_of_upstreams_with_pools_model_maps_and_kinds() -> None:
    config = cfg.parse_config(LIST, env={"K1": "a", "K2": "b"})
    jina, vllm, tei = config.routes
    assert jina.pool == ("a", "b") and jina.models == {"jina-embeddings-v3": "jina-embeddings-v3",
                                                         "jina-clip-v2": "jina-clip-v2"}
    assert jina.limits.requests_per_minute == 500 and jina.priority == 1 and jina.weight == 1.0
    assert vllm.upstream_model("jina-embeddings-v3") == "jinaai/jina-embeddings-v3" and vllm.priority == 2
    assert vllm.prices == {"jina-embeddings-v3": 0.0} and vllm.wire == "openai"
    assert tei.wire == "tei" and tei.tls.ca_file == "/etc/ssl/tei-ca.pem" and tei.pool == ("",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upstreams: [{name: a}, {name: a}]", "upstreams.1.name: must be unique"),
        ("upstreams: [{name: a, url: ftp://x}]", "upstreams.0.url: must be http://, https:// or sim://"),
        ("upstreams: [{name: a, kind: grpc}]", "upstreams.0.kind: expected one of"),
        ("upstreams: [{name: a, keys: [x], api_key: y}]", "upstreams.0.keys: give either"),
        ("upstreams: [{name: a, models: {m: 3}}]", "upstreams.0.models.m: expected str"),
        ("upstreams: [{name: a, weight: 0}]", "upstreams.0.weight: must be > 0"),
        ("upstreams: [{name: a, limits: {requests_per_minute: 0}}]",
         "upstreams.0.limits.requests_per_minute: must be at least 1"),
        ("upstreams: [{name: a, tls: {key_file: k.pem}}]", "upstreams.0.tls.key_file: needs upstreams.0.tls.cert_file"),
        ("upstreams: [{name: a, tls: {ca: x}}]", "upstreams.0.tls.ca: unknown key"),
        ("upstream: {url: 'http://x'}\nupstreams: [{name: a}]", "upstream: give either `upstream:` or `upstreams:`"),
        ("upstreams: [{name: a, cache_namespace: 'a b'}]", "upstreams.0.cache_namespace: must be of letters"),
        ("upstreams: [{name: a, cache_namespace: 3}]", "upstreams.0.cache_namespace: expected str"),
        ("upstreams: [{name: a, models: [m]}, {name: b, models: [m], cache_namespace: b}]",
         "upstreams.1.cache_namespace: upstreams 'a', 'b' serve 'm' first (priority 1) with different cache "
         "namespaces; give them the same `cache_namespace` or different priorities"),
        ("upstreams: [{name: a, cache_namespace: x}, {name: b, cache_namespace: y}]",
         "upstreams.1.cache_namespace: upstreams 'a', 'b' serve any model they do not name first"),
    ],
)
def test_errors_name_the_key_path(text: str, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse_config(text, env={})
    assert message in str(err.value)


def test_the_demo_shows_a_pool_of_two_keys_and_a_failover_deployment() -> None:
    demo = cfg.load_config(ROOT / "config/demo.yaml")
    primary, backup, tei = demo.routes
    assert len(primary.pool) == 2 and primary.models is None  # serves every model the others do not name
    assert backup.priority > primary.priority and backup.models == {"jina-embeddings-v3": "jinaai/jina-embeddings-v3"}
    assert tei.wire == "tei" and tei.models == {"bge-m3": "bge-m3"}


def test_namespaces_may_differ_across_priorities_and_models() -> None:
    config = cfg.parse_config("""
upstreams:
  - {name: a, models: [m, n], cache_namespace: a}
  - {name: b, models: [m], priority: 2}
  - {name: c, models: [o], cache_namespace: c}
""", env={})
    assert [up.cache_namespace for up in config.routes] == ["a", None, "c"]


def test_a_hit_saves_what_the_first_choice_bills() -> None:
    config = cfg.parse_config("""
prices: {m: 0.05, n: 0.1}
upstreams:
  - {name: a, models: [m, n], prices: {m: 0.02}, weight: 3}
  - {name: b, models: [m, n], prices: {n: 0.3}}
  - {name: c, models: [m], prices: {m: 0}, priority: 2}
""", env={})
    # m: a bills 0.02, b the top-level 0.05, weighted 3:1; n: a the top-level 0.1, b its own 0.3
    assert config.hit_prices == {"m": (3 * 0.02 + 0.05) / 4, "n": (3 * 0.1 + 0.3) / 4}
    assert cfg.from_data({"prices": {"m": 0.05}}).hit_prices == {"m": 0.05}
