"""gateway/openapi.yaml is true: every route the app registers is documented, every documented operation is served,
the document is valid OpenAPI 3.1, and real answers match its schemas and headers."""

from __future__ import annotations

import re
import time
from typing import Any

import jsonschema
import orjson
from aiohttp import web
from openapi_spec_validator import validate

from gateway import appkeys as K
from gateway import openapi
from gateway.app import create_app
from gateway.config import from_data

from .conftest import ADMIN_KEY, Gateway, auth, base_config

DOC_FILE = "gateway/openapi.yaml"


def _shape(path: str) -> str:
    """`/v1/batch/{batch_id}` and `/v1/batch/{id}` are the same route: parameter names do not matter."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def served_routes() -> set[tuple[str, str]]:
    app = create_app(from_data(base_config()))
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or ""
        if route.method not in ("HEAD", "*"):  # aiohttp adds HEAD to every GET
            routes.add((route.method, _shape(path)))
    return routes


def documented() -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, _shape(p)): op for (m, p), op in openapi.operations(openapi.source()).items()}


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(openapi.source())
    validate(orjson.loads(openapi.served()))


def test_every_route_the_app_registers_is_documented() -> None:
    ops = documented()
    missing = sorted(r for r in served_routes() if r not in ops)
    assert not missing, "\n".join(
        f"{m} {p} is served but not documented: add it under `paths:` in {DOC_FILE}" for m, p in missing
    )
    pending = sorted(r for r in served_routes() if "x-pending" in ops[r])
    assert not pending, "\n".join(
        f"{m} {p} is served now: delete its `x-pending` line in {DOC_FILE}" for m, p in pending
    )


def test_every_documented_operation_is_served() -> None:
    routes = served_routes()
    unserved = sorted(r for r, op in documented().items() if "x-pending" not in op and r not in routes)
    assert not unserved, "\n".join(
        f"{m} {p} is documented in {DOC_FILE} but the app does not serve it" for m, p in unserved
    )


async def test_openapi_json_needs_a_key_and_leaves_out_pending_operations(gateway: Gateway) -> None:
    client = await gateway()
    assert (await client.get("/openapi.json")).status == 401
    for key in ("eg-test-team-a", ADMIN_KEY):
        resp = await client.get("/openapi.json", headers=auth(key))
        assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    served_ops = {(m, _shape(p)) for m, p in openapi.operations(doc)}
    assert served_ops == {r for r, op in documented().items() if "x-pending" not in op}
    assert all("x-pending" not in op for op in openapi.operations(doc).values())


def check(instance: Any, schema_name: str) -> None:
    doc = openapi.source()
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]},
                        cls=jsonschema.Draft202012Validator)


async def test_real_answers_match_the_documented_schemas_and_headers(gateway: Gateway) -> None:
    client = await gateway()
    op = openapi.operations(openapi.source())[("POST", "/v1/embeddings")]
    for fmt in ("float", "base64", "binary"):
        resp = await client.post("/v1/embeddings", headers=auth(),
                                 json={"model": "jina-embeddings-v3", "input": ["a", "b"], "embedding_type": fmt})
        assert resp.status == 200
        check(await resp.json(), "EmbeddingResponse")
        always = {"X-Cache-Hits", "X-Cache-Misses", "X-Cache-Joined", "X-Upstream-Tokens", "X-Request-Id"}
        assert always <= set(op["responses"]["200"]["headers"])
        assert {h.lower() for h in always} <= {h.lower() for h in resp.headers}
    resp = await client.post("/v1/embeddings", headers=auth("wrong"), json={})
    assert resp.status == 401 and "401" in op["responses"]
    check(await resp.json(), "Error")
    resp = await client.post("/v1/embeddings", headers=auth(), json={"model": "jina-embeddings-v3"})
    assert resp.status == 422
    check(await resp.json(), "ValidationError")
    resp = await client.get("/v1/usage", headers=auth())
    check(await resp.json(), "UsageReport")
    check(await (await client.get("/readyz")).json(), "Readiness")
    health = openapi.source()["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]
    jsonschema.validate(await (await client.get("/healthz")).json(), health["schema"])


async def test_batch_answers_match_the_documented_schemas(gateway: Gateway) -> None:
    from .test_batch import MODEL, jsonl, line, settled, submit, upload

    client = await gateway()
    status, file = await upload(client, jsonl([line("a", "x"), line("b", "y")]))
    assert status == 200
    check(file, "File")
    status, created = await submit(client, {"model": MODEL, "input_file_id": file["id"]})
    assert status == 202
    check(created, "BatchJob")
    await settled(client, created["id"])
    client.app[K.BATCH_WORKER].clock = lambda: time.time() + 3600  # the next job is claimed past its window
    _, late = await submit(client, {"model": MODEL, "input": [line("c", "z")], "completion_window": "1h"})
    await settled(client, late["id"])
    assert (await (await client.get(f"/v1/batch/{late['id']}", headers=auth())).json())["status"] == "failed"
    listed = await (await client.get("/v1/batches", headers=auth())).json()
    assert [j["status"] for j in listed["data"]] == ["expired", "completed"]  # OpenAI's name for the same end
    for job in listed["data"]:
        check(job, "OpenAIBatch")
        check(await (await client.get(f"/v1/batches/{job['id']}", headers=auth())).json(), "OpenAIBatch")
        check(await (await client.get(f"/v1/batch/{job['id']}", headers=auth())).json(), "BatchJob")


def test_served_routes_helper_sees_variable_routes() -> None:
    # The route check must understand parameterised paths, or a documented {id} route would never match.
    app = web.Application()
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/things/{thing_id}", handler)
    info = next(iter(app.router.routes())).resource.get_info()  # type: ignore[union-attr]
    assert _shape(info["formatter"]) == "/v1/things/{}"
