"""What a hostile client sends, on every route: header values that are not UTF-8, JSON nested past
`limits.max_json_depth`, query integers in other scripts. Each gets a documented answer (never a 500), the access
log has one line per request (probes excepted), and a refused request changes nothing."""

from __future__ import annotations

import asyncio
import io
import re
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient

from .conftest import TEAM_A_KEY, AccessRecords, Gateway, auth, sim_of

BAD = b"\xff\xfe"  # not UTF-8
PROBES = {"/healthz", "/readyz"}  # answer without a key, and are not logged (design: polled, no work)
MODEL = "jina-embeddings-v3"


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.decode().lower(): v.decode() for k, v in (x.split(b": ", 1) for x in lines)}

    def json(self) -> Any:
        assert self.headers.get("content-length"), "a JSON answer has a length"
        return orjson.loads(self.body)


async def raw(
    client: TestClient, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> Answer:
    """One request written byte for byte (aiohttp's client would refuse to send these headers)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway", b"Connection: close",
             b"Content-Length: %d" % len(body), *(name + b": " + value for name, value in headers)]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    try:
        return Answer(await reader.read())
    finally:
        writer.close()
        await writer.wait_closed()


def routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) the app registers, its variables filled in; the catch-all and HEAD twins left out."""
    found = []
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or ""
        if route.method in ("HEAD", "*"):
            continue
        found.append((route.method, re.sub(r"\{\w+\}", "x", path)))
    assert ("DELETE", "/v1/files/x") in found and ("GET", "/metrics") in found
    return found


def nested(depth: int) -> bytes:
    """JSON text of `depth` arrays, one in another (orjson itself refuses to write past 255)."""
    return b"[" * depth + b'"deep"' + b"]" * depth




async def file_of(client: TestClient, rows: bytes) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", io.BytesIO(rows), filename="lines.jsonl", content_type="application/jsonl")
    async with client.post("/v1/files", data=form, headers=auth()) as resp:
        assert resp.status == 200
        file_id: str = (await resp.json())["id"]
        return file_id


async def test_an_authorization_that_is_not_utf8_is_401_on_every_route_and_logged(
    gateway: Gateway, access: AccessRecords
) -> None:
    client = await gateway()
    file_id = await file_of(client, b'{"custom_id": "a", "body": {"input": "x"}}\n')
    sent = routes(client)
    for method, path in sent:
        answer = await raw(client, method, path.replace("/files/x", f"/files/{file_id}"),
                           [(b"Authorization", b"Bearer " + BAD), (b"X-Request-Id", BAD)])
        if path in PROBES:
            assert answer.status == 200, path
            continue
        assert answer.status == 401, (method, path)
        assert answer.json()["code"] == "AUTH_INVALID_API_KEY"
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])  # a new one, not the bytes sent
    logged = [x for x in access.lines if x["status"] == 401]
    assert len(logged) == len(access.lines) - 1 == len([r for r in sent if r[1] not in PROBES])  # 1: the upload
    assert all(x["request_id_replaced"] is True and x["team"] == "" for x in logged)
    # Refused, so nothing changed: the file is still there, and no upstream call was made.
    async with client.get(f"/v1/files/{file_id}", headers=auth()) as resp:
        assert resp.status == 200
    assert sim_of(client).calls == 0


async def test_a_request_id_that_is_not_utf8_is_replaced_on_every_route_and_the_delete_is_logged(
    gateway: Gateway, access: AccessRecords
) -> None:
    client = await gateway()
    file_id = await file_of(client, b'{"custom_id": "a", "body": {"input": "x"}}\n')
    key = auth()["Authorization"].encode()
    answers = []
    for method, path in routes(client):
        answer = await raw(client, method, path, [(b"Authorization", key), (b"X-Request-Id", BAD + b"abc")],
                           b'{"model": "%s", "input": ["x"]}' % MODEL.encode() if method == "POST" else b"")
        assert answer.status < 500, (method, path)
        answers.append(answer.headers["x-request-id"])
    deleted = await raw(client, "DELETE", f"/v1/files/{file_id}", [(b"Authorization", key), (b"X-Request-Id", BAD)])
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert all(re.fullmatch(r"[0-9a-f]{32}", x) for x in [*answers, deleted.headers["x-request-id"]])
    line = access.lines[-1]
    assert (line["method"], line["path"], line["status"], line["team"]) == ("DELETE", "/v1/files/{file_id}", 200,
                                                                           "team-a")
    assert line["request_id"] == deleted.headers["x-request-id"] and line["request_id_replaced"] is True
    assert len(access.lines) == 1 + len([a for a, (_, p) in zip(answers, routes(client), strict=True)
                                         if p not in PROBES]) + 1  # the upload, each route, the DELETE


async def test_a_wrong_key_with_a_bad_request_id_is_a_logged_401(gateway: Gateway, access: AccessRecords) -> None:
    client = await gateway()
    answer = await raw(client, "POST", "/v1/embeddings", [(b"Authorization", b"Bearer wrong"), (b"X-Request-Id", BAD)],
                       b'{"model": "%s", "input": "x"}' % MODEL.encode())
    assert answer.status == 401 and answer.json()["code"] == "AUTH_INVALID_API_KEY"
    assert [(x["status"], x["request_id_replaced"]) for x in access.lines] == [(401, True)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"model": "%s", "input": [{"text": "a", "extra": %s}]}' % (MODEL.encode(), nested(100)), "input[0].extra"),
        (b'{"model": "%s", "input": ["a"], "x_vendor_option": %s}' % (MODEL.encode(), nested(300)), "x_vendor_option"),
        (b'{"model": "%s", "input": %s}' % (MODEL.encode(), nested(65)), "input"),
    ],
)
async def test_json_nested_past_the_limit_is_a_422_naming_the_field(
    gateway: Gateway, access: AccessRecords, body: bytes, field: str
) -> None:
    client = await gateway()
    async with client.post("/v1/embeddings", data=body, headers=auth()) as resp:
        assert resp.status == 422
        error = await resp.json()
    assert error["code"] == "VALIDATION_ERROR"
    assert error["errors"][0]["field"].startswith(field)
    assert "nested deeper than 64" in error["errors"][0]["message"]
    assert sim_of(client).calls == 0
    assert [x["status"] for x in access.lines] == [422]


async def test_json_exactly_at_the_limit_is_embedded(gateway: Gateway) -> None:
    client = await gateway(limits={"max_json_depth": 8})
    body = b'{"model": "%s", "input": [{"text": "a", "extra": %s}]}'  # body, input, item: 3 levels before extra
    async with client.post("/v1/embeddings", data=body % (MODEL.encode(), nested(5)), headers=auth()) as resp:
        assert resp.status == 200
    async with client.post("/v1/embeddings", data=body % (MODEL.encode(), nested(6)), headers=auth()) as resp:
        assert resp.status == 422


async def test_batch_lines_nested_past_the_limit_are_refused(gateway: Gateway, access: AccessRecords) -> None:
    client = await gateway()
    deep = b'{"custom_id": "deep", "body": {"input": [{"text": "a", "x": %s}]}}' % nested(300)
    inline = b'{"model": "%s", "input": [%s]}' % (MODEL.encode(), deep)
    async with client.post("/v1/batch/embeddings", data=inline, headers=auth()) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"][0]["field"].startswith("input[0].body.input[0].x")
    async with client.get("/v1/batches", headers=auth()) as resp:
        assert (await resp.json())["data"] == []  # refused: no job
    rows = deep + b"\n" + orjson.dumps({"custom_id": "ok", "body": {"input": "fine"}}) + b"\n"
    file_id = await file_of(client, rows)
    async with client.post("/v1/batch/embeddings", json={"model": MODEL, "input_file_id": file_id},
                           headers=auth()) as resp:
        assert resp.status == 202
        job = await resp.json()
    assert job["request_counts"] == {"total": 2, "completed": 0, "failed": 1}  # the deep line is an error line
    for _ in range(500):
        async with client.get(f"/v1/batch/{job['id']}/errors", headers=auth()) as resp:
            errors = [orjson.loads(x) for x in (await resp.read()).splitlines()]
        if errors:
            break
        await asyncio.sleep(0.01)
    assert [(e["error"]["line"], e["error"]["code"]) for e in errors] == [(1, "VALIDATION_ERROR")]
    assert "nested deeper than 64" in errors[0]["error"]["message"]
    assert [x["status"] for x in access.lines][:2] == [422, 200]


@pytest.mark.parametrize("limit", ["%C2%B9", "%D9%A3", "1%00", "-1", "0", "101", "9" * 5000, ""])
async def test_query_integers_are_ascii_digits_in_range_or_422(
    gateway: Gateway, access: AccessRecords, limit: str
) -> None:
    client = await gateway()
    key = f"Bearer {TEAM_A_KEY}".encode()
    answer = await raw(client, "GET", f"/v1/batches?limit={limit}", [(b"Authorization", key)])
    assert answer.status == 422
    assert answer.json()["errors"] == [{"field": "limit", "message": "must be an integer from 1 to 100"}]
    assert [x["status"] for x in access.lines] == [422]


async def test_options_on_the_batch_route_allows_post_only(gateway: Gateway) -> None:
    client = await gateway()
    for method in ("OPTIONS", "GET", "DELETE", "PUT"):
        async with client.request(method, "/v1/batch/embeddings", headers=auth()) as resp:
            assert resp.status == 405, method
            assert resp.headers["Allow"] == "POST"
    async with client.get("/v1/batch/batch_0123", headers=auth()) as resp:
        assert resp.status == 404  # any other id is still a job id


async def test_dimensions_written_as_an_integral_float_are_that_integer(gateway: Gateway) -> None:
    """JSON Schema's `integer` takes 64.0: the gateway does too, sends 64 upstream and keys it as 64."""
    client = await gateway()
    async with client.post("/v1/embeddings", data=b'{"model": "%s", "input": "a", "dimensions": 64.0}' % MODEL.encode(),
                           headers=auth()) as resp:
        assert resp.status == 200
        assert len((await resp.json())["data"][0]["embedding"]) == 64
    async with client.post("/v1/embeddings", json={"model": MODEL, "input": "a", "dimensions": 64},
                           headers=auth()) as resp:
        assert resp.headers["X-Cache-Hits"] == "1"
    assert [type(r["dimensions"]) for r in sim_of(client).requests] == [int]
    for dims in (b"64.5", b"1e300"):  # not an integer, or not one that fits: refused, not a 500
        body = b'{"model": "%s", "input": "a", "dimensions": %s}' % (MODEL.encode(), dims)
        async with client.post("/v1/embeddings", data=body, headers=auth()) as resp:
            assert resp.status == 422


async def test_a_content_type_that_is_not_utf8_is_a_client_error(gateway: Gateway, access: AccessRecords) -> None:
    client = await gateway()
    key = auth()["Authorization"].encode()
    upload = await raw(client, "POST", "/v1/files", [(b"Authorization", key),
                                                      (b"Content-Type", b"multipart/form-data; boundary=" + BAD)],
                       b"--" + BAD + b"\r\n\r\n")
    assert upload.status == 400 and upload.json()["code"] == "INVALID_REQUEST"
    embed = await raw(client, "POST", "/v1/embeddings", [(b"Authorization", key), (b"Content-Type", BAD)],
                      b'{"model": "%s", "input": "a"}' % MODEL.encode())
    assert embed.status == 200  # the body is JSON whatever it is labelled
    assert [x["status"] for x in access.lines] == [400, 200]


async def test_an_upload_field_named_outside_the_documented_pattern_is_422(gateway: Gateway) -> None:
    client = await gateway()
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("expires_after[anchor]", "created_at")  # OpenAI's: a name the pattern allows, ignored
    form.add_field("file", io.BytesIO(b'{"custom_id": "a", "body": {"input": "x"}}\n'), filename="l.jsonl")
    async with client.post("/v1/files", data=form, headers=auth()) as resp:
        assert resp.status == 200
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("a name", "x")
    form.add_field("file", io.BytesIO(b'{"custom_id": "a", "body": {"input": "x"}}\n'), filename="l.jsonl")
    async with client.post("/v1/files", data=form, headers=auth()) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"][0]["field"] == "form"


async def test_each_output_format_field_sent_is_checked_and_unknown_query_parameters_refused(gateway: Gateway) -> None:
    client = await gateway()
    body = {"model": MODEL, "input": "a", "embedding_type": "base64", "encoding_format": "nonsense"}
    async with client.post("/v1/embeddings", json=body, headers=auth()) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"][0]["field"] == "encoding_format"
    async with client.post("/v1/embeddings", json={**body, "encoding_format": "float"}, headers=auth()) as resp:
        assert resp.status == 200
        assert isinstance((await resp.json())["data"][0]["embedding"], str)  # embedding_type wins
    async with client.get("/v1/batches?limit=5&colour=red", headers=auth()) as resp:
        assert resp.status == 422
        assert (await resp.json())["errors"][0]["field"] == "colour"
    assert sim_of(client).calls == 1
