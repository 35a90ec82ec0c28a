"""HTTP handlers of the Batch API: files (`/v1/files`) and batch jobs (`/v1/batch/...`); OpenAI's view of the
same jobs (`/v1/batches`) is openai_batches.py.

Every id is looked up under the caller's team, so another team's file or job answers 404.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from . import appkeys as K
from . import config as cfg
from .batch import new_job, render_outputs, stream_lines
from .errors import BadRequest, Forbidden, GatewayError, NotFound, PayloadTooLarge, ValidationFailed
from .files import ENDPOINTS, Rules, check_window, count_lines, prepare
from .incoming import principal_of, read_body
from .jobs import FileMeta, Job, Stream
from .middleware import Routes
from .protocol import parse_json_object

_FORM_FIELD = re.compile(r"[A-Za-z0-9_.\[\]-]+")  # what a form field's name may be (openapi.yaml says so too)


def add_routes(router: Routes) -> None:
    router.add_post("/v1/files", upload_file)
    router.add_get("/v1/files/{file_id}", get_file)
    router.add_get("/v1/files/{file_id}/content", file_content)
    router.add_delete("/v1/files/{file_id}", delete_file)
    router.add_post("/v1/batch/embeddings", create_batch)
    # Never `embeddings`: other methods on POST /v1/batch/embeddings get 405 with `Allow: POST`, not this route.
    job = "/v1/batch/{batch_id:(?!embeddings$)[^/]+}"
    router.add_get(job, get_batch)
    router.add_delete(job, cancel_batch)
    router.add_get("/v1/batch/{batch_id}/output", batch_output)
    router.add_get("/v1/batch/{batch_id}/errors", batch_errors)


def _team(request: web.Request) -> cfg.Team:
    team = principal_of(request).team
    if team is None:
        raise Forbidden("admin keys have no batch jobs; use a team key")
    return team


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _now() -> int:
    return int(time.time())


# ---- files -----------------------------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.Response:
    team = _team(request)
    limits = request.app[K.LIVE].config.batch
    if request.content_length is not None and request.content_length > limits.max_file_bytes + 65536:
        raise PayloadTooLarge(f"files are limited to {limits.max_file_bytes} bytes")
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send the file as multipart/form-data with fields `file` and `purpose`")
    try:
        purpose, filename, content = await _read_form(request, limits.max_file_bytes)
    except GatewayError:
        raise
    except Exception as exc:  # aiohttp's multipart parser refuses a malformed body in several ways
        raise BadRequest(f"not a valid multipart/form-data body ({type(exc).__name__})") from None
    if purpose != "batch":
        raise ValidationFailed("purpose", "must be 'batch'")
    if content is None:
        raise ValidationFailed("file", "required: a JSONL file")
    lines = await asyncio.to_thread(count_lines, content)  # 100 MB take a while: not on the event loop
    if not 1 <= lines <= limits.max_lines_per_file:
        raise ValidationFailed("file", f"{lines} lines; a file has 1 to {limits.max_lines_per_file} lines")
    now = _now()
    meta = FileMeta(
        id="file-" + secrets.token_hex(12), team=team.name, bytes=len(content), lines=lines, created_at=now,
        expires_at=now + limits.retention_s, filename=filename,
    )
    await request.app[K.JOB_STORE].put_file(meta, content, limits.retention_s)
    return _json(meta.public())


async def _read_form(request: web.Request, max_bytes: int) -> tuple[str | None, str, bytes | None]:
    """(purpose, filename, content) of a multipart upload; other fields are skipped."""
    purpose, filename, content = None, "", None
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            continue
        if part.name is None or not _FORM_FIELD.fullmatch(part.name):
            raise ValidationFailed("form", f"field name {part.name!r}: letters, digits and _.-[] only")
        if part.name == "purpose":
            purpose = (await _read_part(part, 256)).decode("utf-8", "replace").strip()
        elif part.name == "file":
            filename = part.filename or ""
            content = await _read_part(part, max_bytes)
    return purpose, filename, content


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(1 << 20):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(f"`{part.name}` exceeds the {limit}-byte limit")
    return bytes(data)


async def get_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    meta = await request.app[K.JOB_STORE].get_file(_team(request).name, file_id)
    if meta is None:
        raise NotFound(f"no file {file_id!r}")
    return _json(meta.public())


async def file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    content = await request.app[K.JOB_STORE].file_content(_team(request).name, file_id)
    if content is None:
        raise NotFound(f"no file {file_id!r}")
    return web.Response(body=content, content_type="application/jsonl")


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    if not await request.app[K.JOB_STORE].delete_file(_team(request).name, file_id):
        raise NotFound(f"no file {file_id!r}")
    return _json({"id": file_id, "object": "file", "deleted": True})


# ---- jobs ------------------------------------------------------------------------------------------------


async def create_batch(request: web.Request) -> web.Response:
    team = _team(request)
    config = request.app[K.LIVE].config
    body = parse_json_object(await read_body(request), max_depth=config.limits.max_json_depth)
    model, endpoint, window = _job_fields(body)
    max_inputs = min(config.limits.max_inputs_per_request, team.max_inputs_per_request or 1 << 30)
    rules = Rules(model=model, max_inputs=max_inputs, models=team.models, max_depth=config.limits.max_json_depth,
                  token_ids=config.reads_token_ids)
    file_id, source, field = await _source(request, team, body)
    # Checking 50,000 lines takes a few hundred milliseconds that interactive requests must not wait for.
    lines, errors, chunks = await asyncio.to_thread(prepare, source, rules, field, config.batch.chunk_lines)
    job = new_job(team.name, model, endpoint, window, file_id, lines, errors, config.batch)
    await request.app[K.BATCH_WORKER].submit(job, chunks, errors)
    return _json(job.public(), status=202)


def _job_fields(body: dict[str, Any]) -> tuple[str, str, str]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValidationFailed("model", "required, a non-empty string")
    endpoint = body.get("endpoint", ENDPOINTS[0])
    if endpoint not in ENDPOINTS:
        raise ValidationFailed("endpoint", f"must be {ENDPOINTS[0]}")
    return model, ENDPOINTS[0], check_window(body.get("completion_window", "24h"))


async def _source(
    request: web.Request, team: cfg.Team, body: dict[str, Any]
) -> tuple[str, bytes | list[Any], str]:
    """(file id or '', the lines: a file's bytes or Jina's inline `input` list, the field to blame)."""
    file_id, inline = body.get("input_file_id"), body.get("input")
    if (file_id is None) == (inline is None):
        raise ValidationFailed("input_file_id", "give either input_file_id (an uploaded file) or input (lines)")
    if file_id is not None:
        if not isinstance(file_id, str):
            raise ValidationFailed("input_file_id", "must be a string")
        content = await request.app[K.JOB_STORE].file_content(team.name, file_id)
        if content is None:
            raise NotFound(f"no file {file_id!r}")
        return file_id, content, "input_file_id"
    max_lines = request.app[K.LIVE].config.batch.max_lines_per_file
    if not isinstance(inline, list) or not 1 <= len(inline) <= max_lines:
        raise ValidationFailed("input", f"must be a list of 1 to {max_lines} line objects")
    return "", inline, "input"


async def _job(request: web.Request) -> Job:
    job_id = request.match_info["batch_id"]
    job = await request.app[K.JOB_STORE].get_job(_team(request).name, job_id)
    if job is None:
        raise NotFound(f"no batch job {job_id!r}")
    return job


async def get_batch(request: web.Request) -> web.Response:
    return _json((await _job(request)).public())


async def cancel_batch(request: web.Request) -> web.Response:
    team, job_id = _team(request).name, request.match_info["batch_id"]
    store = request.app[K.JOB_STORE]
    if await store.cancel(team, job_id, _now()) is None:
        raise NotFound(f"no batch job {job_id!r}")
    return _json((await _job(request)).public())


async def batch_output(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "output")


async def batch_errors(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "errors")


async def _stream(request: web.Request, stream: Stream) -> web.StreamResponse:
    """The lines committed so far (all of them once the job has ended), as JSONL, a few chunks at a time."""
    job = await _job(request)
    return await stream_lines(request, request.app[K.JOB_STORE], job, stream,
                              render_outputs if stream == "output" else None)
