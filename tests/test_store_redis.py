"""Redis URLs of every kind against real servers: TLS (rediss://), Sentinel, Cluster; pool and retry options."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import config as cfg
from gateway.auth import hash_key
from gateway.store import open_cache_store
from gateway.store.redis import connect, parse_url

from .certs import make_certificate
from .conftest import TEAM_A_KEY, Gateway, auth, base_config
from .redis_server import RedisServer, free_port, redis_binary


def test_parse_sentinel_and_cluster_urls() -> None:
    t = parse_url("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2?sentinel_password=sp")
    assert (t.kind, t.hosts, t.service, t.db, t.password, t.sentinel_password) == (
        "sentinel", (("s1", 26379), ("s2", 26380)), "mymaster", 2, "pw", "sp")
    t = parse_url("rediss+cluster://n1:7000,n2:7001")
    assert (t.kind, t.tls, t.hosts) == ("cluster", True, (("n1", 7000), ("n2", 7001)))
    assert parse_url("rediss://h:6380/0").tls


@pytest.mark.parametrize(("url", "error"), [
    ("redis+sentinel://s1:26379", "cache.url: 'redis+sentinel://s1:26379': expected redis+sentinel://host:port"),
    ("redis+cluster://n1:7000/3", "cache.url: 'redis+cluster://n1:7000/3': a cluster has only database 0"),
    ("mongodb://x", "cache.url: unsupported scheme in 'mongodb://x'"),
])
def test_config_refuses_bad_store_urls_naming_the_key(url: str, error: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.from_data(base_config(cache={"url": url}))
    assert str(info.value).startswith(error)


async def test_pool_and_retry_options_reach_the_client() -> None:
    options = cfg.RedisOptions(max_connections=7, retries=3, connect_timeout_s=2.5)
    client = connect("redis://127.0.0.1:1/0", socket_timeout_s=0.1, options=options)
    pool = client.connection_pool
    assert pool.max_connections == 7
    assert pool.connection_kwargs["socket_connect_timeout"] == 2.5
    assert client.get_retry().get_retries() == 3
    await client.aclose()


async def test_more_concurrent_commands_than_connections_wait_for_one(redis_url: str) -> None:
    observer = connect(redis_url, socket_timeout_s=2)
    before = (await observer.info("clients"))["connected_clients"]
    client = connect(redis_url, socket_timeout_s=2, options=cfg.RedisOptions(max_connections=2))
    await client.set(b"k", b"v")
    results = await asyncio.gather(*(client.mget([b"k"]) for _ in range(50)))
    assert results == [[b"v"]] * 50
    assert (await observer.info("clients"))["connected_clients"] - before == 2
    await observer.aclose()
    await client.aclose()


async def test_the_cache_store_shares_its_pool_between_concurrent_callers(redis_url: str) -> None:
    observer = connect(redis_url, socket_timeout_s=2)
    before = (await observer.info("clients"))["connected_clients"]
    store = open_cache_store(redis_url, max_bytes=0, socket_timeout_s=2, options=cfg.RedisOptions(max_connections=2))
    await store.set_many([(b"k", b"v"), (b"j", b"w")], ttl_s=60)
    results = await asyncio.gather(*(store.get_many([b"k", b"nope", b"j"]) for _ in range(50)))
    assert results == [[b"v", None, b"w"]] * 50
    assert (await observer.info("clients"))["connected_clients"] - before == 2
    await observer.aclose()
    await store.close()


# ---- TLS ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server with a TLS port and a certificate for 127.0.0.1 signed by a CA of the test's own."""
    ca, cert, key = make_certificate(tmp_path)
    tls_port = free_port()
    server = RedisServer(None, "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file",
                         str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no").start()
    yield server, tls_port, ca
    server.cleanup()


async def test_rediss_with_a_private_ca(tls_redis: tuple[RedisServer, int, Path]) -> None:
    _, port, ca = tls_redis
    store = open_cache_store(f"rediss://127.0.0.1:{port}/0", max_bytes=0, socket_timeout_s=2,
                             options=cfg.RedisOptions(tls_ca_file=str(ca)))
    await store.set_many([(b"k", b"over tls")], ttl_s=60)
    assert await store.get_many([b"k", b"x"]) == [b"over tls", None]
    await store.close()


async def test_rediss_refuses_an_unknown_ca_unless_told_not_to_verify(
    tls_redis: tuple[RedisServer, int, Path],
) -> None:
    _, port, _ = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    strict = open_cache_store(url, max_bytes=0, socket_timeout_s=2, options=cfg.RedisOptions(retries=0))
    with pytest.raises(Exception, match="certificate verify failed"):
        await strict.ping()
    await strict.close()
    lax = open_cache_store(url, max_bytes=0, socket_timeout_s=2, options=cfg.RedisOptions(tls_verify=False))
    assert await lax.ping()
    await lax.close()


# ---- Sentinel ----------------------------------------------------------------------------------------------


@pytest.fixture
def sentinel(own_redis: RedisServer, tmp_path: Path) -> Iterator[int]:
    """One sentinel (quorum 1) watching `own_redis` as master `eg-master`."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # sentinel rewrites its config file, so it must be writable
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor eg-master 127.0.0.1 {own_redis.port} 1\n")
    proc = subprocess.Popen([redis_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    probe = RedisServer(port)
    probe._wait_ready()
    yield port
    proc.kill()
    proc.wait()


async def test_sentinel_url_finds_the_master(sentinel: int, own_redis: RedisServer) -> None:
    store = open_cache_store(f"redis+sentinel://127.0.0.1:{sentinel}/eg-master/3", max_bytes=0,
                             socket_timeout_s=2)
    await store.set_many([(b"k", b"via sentinel")], ttl_s=60)
    assert await store.get_many([b"k"]) == [b"via sentinel"]
    await store.close()
    direct = connect(own_redis.url.replace("/0", "/3"), socket_timeout_s=2)
    assert await direct.exists(b"egc:1:k") == 1
    await direct.aclose()


async def test_gateway_state_and_cache_through_sentinel(sentinel: int, gateway: Gateway) -> None:
    url = f"redis+sentinel://127.0.0.1:{sentinel}/eg-master/0"
    client = await gateway(cache={"url": url}, state={"url": url})
    body = {"model": "jina-embeddings-v3", "input": ["a", "b"]}
    assert (await client.post("/v1/embeddings", json=body, headers=auth())).status == 200
    again = await client.post("/v1/embeddings", json=body, headers=auth())
    assert again.headers["X-Cache-Hits"] == "2"


async def test_the_whole_gateway_on_a_redis_cluster(gateway: Gateway, cluster_url: str) -> None:
    """Cache, quotas, usage and a batch job with both stores on a 3-node cluster (slots on every node)."""
    from gateway import appkeys as K

    teams = [{"name": "team-a", "keys": [hash_key(TEAM_A_KEY)], "quota": {"tokens_per_minute": 100_000}}]
    client = await gateway(cache={"url": cluster_url}, state={"url": cluster_url}, teams=teams,
                           usage={"flush_interval_s": 3600})
    body = {"model": "jina-embeddings-v3", "input": [f"doc {i}" for i in range(30)]}
    first = await client.post("/v1/embeddings", json=body, headers=auth())
    assert first.status == 200 and "RateLimit" in first.headers
    assert (await client.post("/v1/embeddings", json=body, headers=auth())).headers["X-Cache-Hits"] == "30"
    lines = [{"custom_id": f"c{i}", "body": {"input": f"doc {i}"}} for i in range(40)]
    resp = await client.post("/v1/batch/embeddings", json={"model": "jina-embeddings-v3", "input": lines},
                             headers=auth())
    assert resp.status == 202
    job = await asyncio.wait_for(client.app[K.BATCH_WORKER].settled("team-a", (await resp.json())["id"]), 30)
    assert job is not None and job.status == "completed" and job.completed == 40
    usage = await (await client.get("/v1/usage?group_by=team", headers=auth())).json()
    assert usage["total"]["requests"] >= 2 and usage["total"]["hits"] >= 30


def test_the_store_does_not_import_the_config() -> None:
    """config.py asks the store to check its URLs, so the store takes plain options: no import cycle."""
    code = "import sys, gateway.store.redis, gateway.store; print('gateway.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
