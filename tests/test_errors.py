"""Auth and every error class: status, body shape, and no upstream key anywhere in what clients see."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.sim import Fault, SimConfig

from .conftest import ADMIN_KEY, TEAM_A_KEY, UPSTREAM_KEY, Gateway, auth, sim_of

MODEL = "jina-embeddings-v3"


def assert_error_shape(raw: bytes, code: str) -> dict[str, Any]:
    body = orjson.loads(raw)
    assert isinstance(body, dict)
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["code"] == code
    # OpenAI's shape beside Jina's, with the same reason (its SDK puts error.message in the exception text).
    error = body["error"]
    assert error["message"] == body["detail"] and error["code"] == code and error["param"] == (
        body["errors"][0]["field"] if "errors" in body else None)
    assert error["type"] in ("invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                             "rate_limit_error", "timeout_error", "server_error")
    return body


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "AUTH_MISSING_API_KEY"),
        ({"Authorization": "Basic abc"}, "AUTH_MISSING_API_KEY"),
        ({"Authorization": "Bearer "}, "AUTH_MISSING_API_KEY"),
        ({"Authorization": "Bearer wrong-key"}, "AUTH_INVALID_API_KEY"),
        ({"Authorization": f"Bearer {UPSTREAM_KEY}"}, "AUTH_INVALID_API_KEY"),
    ],
)
async def test_missing_or_wrong_key_is_401(gateway: Gateway, headers: dict[str, str], code: str) -> None:
    client = await gateway()
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=headers)
    assert resp.status == 401
    assert assert_error_shape(await resp.read(), code)["error"]["type"] == "authentication_error"
    assert sim_of(client).calls == 0


async def test_team_key_is_not_forwarded_and_upstream_key_is(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(api_key=UPSTREAM_KEY))
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=auth())
    assert resp.status == 200  # the sim refuses anything but the upstream key


async def test_upstream_refusing_the_gateway_key_is_502_not_401(gateway: Gateway) -> None:
    client = await gateway(sim=SimConfig(api_key="another-key"))
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=auth())
    assert resp.status == 502
    assert_error_shape(await resp.read(), "UPSTREAM_AUTH_FAILED")
    assert sim_of(client).calls == 1  # not retried: retrying cannot fix a wrong key


async def test_health_needs_no_key_and_everything_else_does(gateway: Gateway) -> None:
    client = await gateway()
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"cache": True}
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=auth(TEAM_A_KEY))).status == 403
    assert (await client.get("/metrics", headers=auth(ADMIN_KEY))).status == 200
    assert (await client.get("/metrics", headers=auth("metrics-token"))).status == 200
    assert (await client.get("/v1/nothing-here")).status == 401
    resp = await client.get("/v1/nothing-here", headers=auth())
    assert resp.status == 404
    assert_error_shape(await resp.read(), "NOT_FOUND")


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 400, "INVALID_JSON", None),
        (b"[1, 2]", 400, "INVALID_JSON", None),
        (b'{"input": ["x"]}', 422, "VALIDATION_ERROR", "model"),
        (b'{"model": "m"}', 422, "VALIDATION_ERROR", "input"),
        (b'{"model": "m", "input": []}', 422, "VALIDATION_ERROR", "input"),
        (b'{"model": "m", "input": ["ok", 3]}', 422, "VALIDATION_ERROR", "input[1]"),
        (b'{"model": "m", "input": [""]}', 422, "VALIDATION_ERROR", "input[0]"),
        (b'{"model": "m", "input": "x", "embedding_type": "int4"}', 422, "VALIDATION_ERROR", "embedding_type"),
        (b'{"model": "m", "input": "x", "encoding_format": "hex"}', 422, "VALIDATION_ERROR", "encoding_format"),
        (b'{"model": "m", "input": "x", "dimensions": "64"}', 422, "VALIDATION_ERROR", "dimensions"),
        (b'{"model": "m", "input": "x", "dimensions": true}', 422, "VALIDATION_ERROR", "dimensions"),
        (b'{"model": "m", "input": "x", "late_chunking": "yes"}', 422, "VALIDATION_ERROR", "late_chunking"),
        (b'{"model": "m", "input": "x", "normalized": 1}', 422, "VALIDATION_ERROR", "normalized"),
    ],
)
async def test_bad_requests(gateway: Gateway, body: bytes, status: int, code: str, field: str | None) -> None:
    client = await gateway()
    resp = await client.post("/v1/embeddings", data=body, headers=auth())
    assert resp.status == status
    err = assert_error_shape(await resp.read(), code)
    if field is not None:
        assert err["errors"][0]["field"] == field
    assert sim_of(client).calls == 0


async def test_too_many_inputs_is_422(gateway: Gateway) -> None:
    client = await gateway(limits={"max_inputs_per_request": 3})
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b", "c", "d"]}, headers=auth())
    assert resp.status == 422
    assert assert_error_shape(await resp.read(), "VALIDATION_ERROR")["errors"][0]["field"] == "input"


async def test_oversized_body_is_413(gateway: Gateway) -> None:
    client = await gateway(limits={"max_body_bytes": 1000})
    resp = await client.post("/v1/embeddings", data=b'{"model": "m", "input": ["' + b"x" * 2000 + b'"]}',
                             headers=auth())
    assert resp.status == 413
    assert_error_shape(await resp.read(), "PAYLOAD_TOO_LARGE")


async def test_oversized_chunked_body_is_413(gateway: Gateway) -> None:
    client = await gateway(limits={"max_body_bytes": 1000})

    async def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 500

    resp = await client.post("/v1/embeddings", data=chunks(), headers=auth())
    assert resp.status == 413
    assert_error_shape(await resp.read(), "PAYLOAD_TOO_LARGE")


async def test_a_whole_oversized_chunked_body_is_413(gateway: Gateway) -> None:
    """A chunked body (no Content-Length) that arrived whole with the headers is taken from the buffer as it is:
    its size is checked there."""
    client = await gateway(limits={"max_body_bytes": 1000})
    body = b'{"model": "m", "input": ["' + b"x" * 2000 + b'"]}'
    host, port = client.server.host, client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TEAM_A_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert_error_shape(payload, "PAYLOAD_TOO_LARGE")


async def test_wrong_method_is_405_json(gateway: Gateway) -> None:
    client = await gateway()
    resp = await client.get("/v1/embeddings", headers=auth())
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"
    assert_error_shape(await resp.read(), "METHOD_NOT_ALLOWED")
    resp = await client.post("/healthz")  # a probe path needs no key, whatever the method
    assert resp.status == 405 and set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
    # A route with a path parameter: its methods, from the catch-all route.
    resp = await client.put("/v1/files/file-1", headers=auth())
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"DELETE", "GET", "HEAD"}
    assert_error_shape(await resp.read(), "METHOD_NOT_ALLOWED")


async def test_upstream_timeout_is_504(gateway: Gateway) -> None:
    client = await gateway(upstream={"timeout_s": 0.2, "max_retries": 1})
    sim = sim_of(client)
    sim.inject(Fault(kind="delay", delay_s=1.0), Fault(kind="delay", delay_s=1.0))
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["slow"]}, headers=auth())
    assert resp.status == 504
    assert_error_shape(await resp.read(), "UPSTREAM_TIMEOUT")


async def test_no_response_or_metric_contains_the_upstream_key(gateway: Gateway) -> None:
    client = await gateway(upstream={"max_retries": 0})
    sim = sim_of(client)
    seen: list[bytes] = []

    async def collect(resp: Any) -> None:
        seen.append(await resp.read())
        seen.append(str(dict(resp.headers)).encode())

    await collect(await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=auth()))
    await collect(await client.post("/v1/embeddings", json={"model": "bad", "input": ["x"]}, headers=auth()))
    sim.inject(Fault(kind="status", status=500))
    await collect(await client.post("/v1/embeddings", json={"model": MODEL, "input": ["y"]}, headers=auth()))
    sim.inject(Fault(kind="status", status=401, body={"detail": "bad key", "code": "AUTH_INVALID_API_KEY"}))
    await collect(await client.post("/v1/embeddings", json={"model": MODEL, "input": ["z"]}, headers=auth()))
    await collect(await client.post("/v1/embeddings", data=b"{", headers=auth()))
    await collect(await client.get("/metrics", headers=auth("metrics-token")))
    await collect(await client.get("/readyz"))
    assert len(seen) == 14
    for blob in seen:
        assert UPSTREAM_KEY.encode() not in blob
        assert TEAM_A_KEY.encode() not in blob


@pytest.mark.parametrize(
    ("upstream_body", "detail"),
    [
        ({"detail": "input too odd", "code": "BAD_INPUT"}, "input too odd"),
        ({"error": {"message": "input too odd", "type": "invalid_request_error", "code": None, "param": "input"}},
         "input too odd"),
    ],
)
async def test_an_upstream_refusal_reads_in_both_shapes(
    gateway: Gateway, upstream_body: dict[str, Any], detail: str
) -> None:
    client = await gateway()
    sim_of(client).inject(Fault(kind="status", status=400, body=upstream_body))
    resp = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["x"]}, headers=auth())
    assert resp.status == 400
    body = await resp.json()
    assert body["detail"] == detail and body["error"]["message"] == detail
    for name, value in upstream_body.items():  # the upstream's own fields, as it sent them
        assert body[name] == value
