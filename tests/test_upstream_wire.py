"""The upstream client on the wire, against a raw-socket upstream that writes exact bytes: malformed framings are
a 502 and never cached, encodings are decoded, connections are reused, TLS and proxies are configurable."""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.sim import SimConfig, Simulator

from .certs import make_certificate
from .conftest import Gateway, auth

MODEL = "jina-embeddings-v3"
REFERENCE = Simulator(SimConfig())

# (request body, its number on this server) -> bytes to write; None: hang up without answering
Reply = Callable[[dict[str, Any], int], bytes | None]


def embeddings(body: dict[str, Any]) -> bytes:
    """A correct upstream answer to `body` (base64 vectors, as the gateway asks)."""
    vectors, tokens = REFERENCE.embed({**body, "embedding_type": "float"})
    data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)]
    return orjson.dumps({"model": body["model"], "object": "list", "data": data, "usage": {"total_tokens": tokens}})


def head(*lines: str, status: str = "200 OK") -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", "Content-Type: application/json", *lines]) + "\r\n\r\n").encode()


def good(body: dict[str, Any], number: int) -> bytes:
    payload = embeddings(body)
    return head(f"Content-Length: {len(payload)}") + payload


@dataclass
class Wire:
    """An upstream on a free port that reads each request whole and writes what `reply` says."""

    reply: Reply
    port: int = 0
    connections: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)
    close_after: set[int] = field(default_factory=set)  # request numbers after whose answer the server hangs up
    server: asyncio.Server | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Wire:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in request_head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = orjson.loads(await reader.readexactly(length))
                self.heads.append(request_head)
                self.bodies.append(body)
                answer = self.reply(body, len(self.bodies))
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if len(self.bodies) in self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @property
    def inputs(self) -> int:
        return sum(len(b["input"]) for b in self.bodies)


@pytest.fixture
async def wire() -> AsyncIterator[Callable[..., Awaitable[Wire]]]:
    started: list[Wire] = []

    async def make(reply: Reply, ssl_context: ssl.SSLContext | None = None) -> Wire:
        started.append(await Wire(reply).start(ssl_context))
        return started[-1]

    yield make
    for w in started:
        assert w.server is not None
        w.server.close()
        await w.server.wait_closed()


async def embed(client: TestClient, *texts: str) -> tuple[int, Any]:
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": list(texts)}, headers=auth())
    return resp.status, await resp.json()


def bad_framings(body: dict[str, Any]) -> dict[str, bytes]:
    payload = embeddings(body)
    n = len(payload)
    return {
        "two different Content-Lengths": head(f"Content-Length: {n}", f"Content-Length: {n - 10}") + payload,
        "Content-Length and chunked": head(f"Content-Length: {n}", "Transfer-Encoding: chunked")
        + b"%x\r\n" % n + payload + b"\r\n0\r\n\r\n",
        "a bad chunk size": head("Transfer-Encoding: chunked") + b"zz\r\n" + payload + b"\r\n0\r\n\r\n",
        "a truncated body": head(f"Content-Length: {n}") + payload[: n // 2],
        "a truncated chunk": head("Transfer-Encoding: chunked") + b"%x\r\n" % n + payload[: n // 2],
        "gzip that is not gzip": head(f"Content-Length: {n}", "Content-Encoding: gzip") + payload,
    }


@pytest.mark.parametrize("framing", list(bad_framings({"model": MODEL, "input": ["x"]})))
async def test_a_malformed_answer_is_a_502_never_cached_and_the_next_call_succeeds(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]], framing: str
) -> None:
    def reply(body: dict[str, Any], number: int) -> bytes | None:
        return bad_framings(body)[framing] if number == 1 else good(body, number)

    w = await wire(reply)
    w.close_after = {1}  # the truncated answers end with the server hanging up
    client = await gateway(upstream={"url": f"http://127.0.0.1:{w.port}/v1", "max_retries": 0, "timeout_s": 2})
    status, answer = await embed(client, "framed badly", "and its neighbour")
    assert status == 502 and answer["code"] == "UPSTREAM_ERROR", answer
    status, answer = await embed(client, "framed badly", "and its neighbour")
    assert status == 200, answer
    assert w.inputs == 4, "the failed inputs were sent again: nothing of the bad answer was cached"
    expected, _ = REFERENCE.embed({"model": MODEL, "input": ["framed badly", "and its neighbour"]})
    got = [np.array(d["embedding"], dtype=np.float32) for d in answer["data"]]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


async def test_a_gzip_chunked_answer_is_decoded_and_connections_are_kept_alive(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]]
) -> None:
    def reply(body: dict[str, Any], number: int) -> bytes:
        packed = gzip.compress(embeddings(body))
        half = len(packed) // 2
        chunks = b"%x\r\n" % half + packed[:half] + b"\r\n" + b"%x\r\n" % (len(packed) - half) + packed[half:]
        return head("Transfer-Encoding: chunked", "Content-Encoding: gzip") + chunks + b"\r\n0\r\n\r\n"

    w = await wire(reply)
    client = await gateway(upstream={"url": f"http://127.0.0.1:{w.port}/v1"})
    for i in range(3):
        status, answer = await embed(client, f"gzipped {i}")
        assert status == 200, answer
        (expected,), _ = REFERENCE.embed({"model": MODEL, "input": [f"gzipped {i}"]})
        assert np.array_equal(np.array(answer["data"][0]["embedding"], dtype=np.float32), expected)
    assert w.connections == 1, "sequential calls share one keep-alive connection"
    first = w.heads[0].decode().lower()
    assert "accept-encoding: gzip" in first and "authorization: bearer sk-upstream-secret" in first


async def test_an_upstream_that_hangs_up_before_answering_is_retried_on_a_new_connection(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]]
) -> None:
    w = await wire(lambda body, number: None if number == 1 else good(body, number))
    client = await gateway(upstream={"url": f"http://127.0.0.1:{w.port}/v1", "max_retries": 1})
    status, _ = await embed(client, "hung up on")
    assert status == 200 and w.connections == 2 and len(w.bodies) == 2


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_certificate(tmp_path)


async def test_https_trusts_the_configured_ca_and_presents_the_client_certificate(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]], certificate: tuple[Path, Path, Path]
) -> None:
    ca, cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.load_verify_locations(ca)
    server_context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the test CA signed the gateway's certificate too
    w = await wire(good, server_context)
    url = f"https://127.0.0.1:{w.port}/v1"
    untrusting = await gateway(upstream={"url": url, "max_retries": 0})
    status, answer = await embed(untrusting, "over tls")
    assert status == 502 and answer["code"] == "UPSTREAM_ERROR" and not w.bodies
    no_client_cert = await gateway(upstream={"url": url, "max_retries": 0, "tls": {"ca_file": str(ca)}})
    status, answer = await embed(no_client_cert, "over tls")
    assert status == 502 and not w.bodies
    trusting = await gateway(upstream={"url": url, "tls": {"ca_file": str(ca), "cert_file": str(cert),
                                                           "key_file": str(key)}})
    status, answer = await embed(trusting, "over tls")
    assert status == 200 and len(w.bodies) == 1, answer


async def test_an_http_proxy_from_the_environment_carries_the_calls(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await wire(good)  # answers as the upstream would: a forward proxy passes the answer on
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = await gateway(upstream={"url": "http://upstream.invalid/v1"})
    status, answer = await embed(client, "through the proxy")
    assert status == 200, answer
    assert proxy.heads[0].startswith(b"POST http://upstream.invalid/v1/embeddings HTTP/1.1\r\n")


async def test_nobody_listening_is_a_502(gateway: Gateway) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = await gateway(upstream={"url": f"http://127.0.0.1:{port}/v1", "max_retries": 0})
    status, answer = await embed(client, "nobody home")
    assert status == 502 and answer["code"] == "UPSTREAM_ERROR"


async def test_an_upstream_named_in_no_proxy_is_called_directly(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, upstream = await wire(good), await wire(good)
    for name in ("no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = await gateway(upstream={"url": f"http://127.0.0.1:{upstream.port}/v1"})
    for text in ("direct one", "direct two"):
        status, answer = await embed(client, text)
        assert status == 200, answer
    assert len(upstream.bodies) == 2 and not proxy.heads


async def test_with_trust_env_off_the_environments_proxy_is_not_used(
    gateway: Gateway, wire: Callable[..., Awaitable[Wire]], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, upstream = await wire(good), await wire(good)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    client = await gateway(upstream={"url": f"http://127.0.0.1:{upstream.port}/v1", "trust_env": False})
    status, answer = await embed(client, "no proxy")
    assert status == 200, answer
    assert len(upstream.bodies) == 1 and not proxy.heads
