"""HTTP handlers of OpenAI's Batch API for embeddings (`/v1/batches`), a view of the same durable jobs as the
contract's `/v1/batch/...`: same job store, worker, cache and quotas, OpenAI's batch object and line shapes.

A job's output and errors are read as files, `GET /v1/files/{output_file_id}/content`, whose ids name the job.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
import xxhash
from aiohttp import web

from . import appkeys as K
from . import config as cfg
from .batch import new_job, render_outputs, stream_lines
from .errors import Forbidden, NotFound, ValidationFailed
from .files import ENDPOINTS, Rules, check_window, prepare
from .incoming import principal_of, read_body
from .jobs import Job, Stream
from .middleware import Routes, check_query, query_int
from .protocol import parse_json_object

_LIST_PARAMS = frozenset({"limit", "after"})
_FINAL = frozenset({"completed", "failed", "cancelled"})
# A job's output and errors as files: `file-<job id>-output`, `file-<job id>-errors`.
_JOB_FILE = "file-{job}-{stream}"
_JOB_FILE_ROUTE = r"/v1/files/{file_id:file-batch_[0-9a-f]+-(?:output|errors)}/content"
_JOB_FILE_ID = re.compile(r"file-(batch_[0-9a-f]+)-(output|errors)")
_METADATA_PAIRS = 16


def add_routes(router: Routes) -> None:
    """Before the files API's routes: a job's file ids are matched here first."""
    router.add_post("/v1/batches", create_batch)
    router.add_get("/v1/batches", list_batches)
    router.add_get("/v1/batches/{batch_id}", get_batch)
    router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    router.add_get(_JOB_FILE_ROUTE, job_file_content)


def openai_batch(job: Job) -> dict[str, Any]:
    """OpenAI's batch object of a job: an expired job is `expired`; output and error files once it has ended."""
    out = job.public()
    expired = job.status == "failed" and job.error_code == "BATCH_EXPIRED"
    ended = job.status in _FINAL
    out.update(
        status="expired" if expired else job.status,
        input_file_id=job.input_file_id or None,
        output_file_id=_JOB_FILE.format(job=job.id, stream="output") if ended and job.completed else None,
        error_file_id=_JOB_FILE.format(job=job.id, stream="errors") if ended and job.failed else None,
        expires_at=job.deadline,  # OpenAI's: when the completion window ends
        expired_at=job.failed_at if expired else None,
        failed_at=None if expired else job.failed_at or None,
        finalizing_at=None,
        metadata=orjson.loads(job.metadata) if job.metadata else None,
    )
    if expired:
        del out["errors"]  # OpenAI reports an expiry by its status; the lines not run are in the error file
    return out


def _team(request: web.Request) -> cfg.Team:
    team = principal_of(request).team
    if team is None:
        raise Forbidden("admin keys have no batch jobs; use a team key")
    return team


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def create_batch(request: web.Request) -> web.Response:
    team = _team(request)
    config = request.app[K.LIVE].config
    body = parse_json_object(await read_body(request))
    file_id, window, metadata = _batch_fields(body)
    content = await request.app[K.JOB_STORE].file_content(team.name, file_id)
    if content is None:
        raise NotFound(f"no file {file_id!r}")
    max_inputs = min(config.limits.max_inputs_per_request, team.max_inputs_per_request or 1 << 30)
    # Each line names its model, as OpenAI's lines do: a line without one is an error line.
    rules = Rules(model="", max_inputs=max_inputs, models=team.models, token_ids=config.reads_token_ids,
                  max_depth=config.limits.max_json_depth)
    lines, errors, chunks = await asyncio.to_thread(
        prepare, content, rules, "input_file_id", config.batch.chunk_lines
    )
    model = str(lines[0].body["model"]) if lines else ""
    job = new_job(team.name, model, ENDPOINTS[0], window, file_id, lines, errors, config.batch, metadata=metadata)
    await request.app[K.BATCH_WORKER].submit(job, chunks, errors)
    return _json(openai_batch(job))


def _batch_fields(body: dict[str, Any]) -> tuple[str, str, str]:
    """(input_file_id, completion_window, metadata as JSON text or '') of a create request."""
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise ValidationFailed("input_file_id", "required: the id of a file uploaded with purpose 'batch'")
    if body.get("endpoint") not in ENDPOINTS:
        raise ValidationFailed("endpoint", f"required; this gateway runs batches of {ENDPOINTS[0]} only")
    window = check_window(body.get("completion_window", "24h"))
    metadata = body.get("metadata")
    if metadata is None:
        return file_id, window, ""
    if not isinstance(metadata, dict) or len(metadata) > _METADATA_PAIRS or not all(
        isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
    ):
        raise ValidationFailed(
            "metadata", f"at most {_METADATA_PAIRS} pairs of strings (keys up to 64, values up to 512 characters)"
        )
    return file_id, window, orjson.dumps(metadata).decode() if metadata else ""


async def _job(request: web.Request, job_id: str) -> Job:
    job = await request.app[K.JOB_STORE].get_job(_team(request).name, job_id)
    if job is None:
        raise NotFound(f"no batch {job_id!r}")
    return job


async def get_batch(request: web.Request) -> web.Response:
    return _json(openai_batch(await _job(request, request.match_info["batch_id"])))


async def cancel_batch(request: web.Request) -> web.Response:
    job_id = request.match_info["batch_id"]
    if await request.app[K.JOB_STORE].cancel(_team(request).name, job_id, _now()) is None:
        raise NotFound(f"no batch {job_id!r}")
    return _json(openai_batch(await _job(request, job_id)))


def _now() -> int:
    return int(time.time())


async def list_batches(request: web.Request) -> web.Response:
    check_query(request, _LIST_PARAMS)
    limit = query_int(request, "limit", 20, low=1, high=100)
    jobs, more = await request.app[K.JOB_STORE].list_jobs(
        _team(request).name, limit=limit, after=request.query.get("after")
    )
    return _json({
        "object": "list",
        "data": [openai_batch(j) for j in jobs],
        "first_id": jobs[0].id if jobs else None,
        "last_id": jobs[-1].id if jobs else None,
        "has_more": more,
    })


# ---- a job's output and errors, as files ------------------------------------------------------------------


async def job_file_content(request: web.Request) -> web.StreamResponse:
    """OpenAI's lines: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`."""
    file_id = request.match_info["file_id"]
    match = _JOB_FILE_ID.fullmatch(file_id)
    assert match is not None  # the route's pattern
    job = await request.app[K.JOB_STORE].get_job(_team(request).name, match[1])
    if job is None or job.status not in _FINAL:
        raise NotFound(f"no file {file_id!r}")
    stream: Stream = "output" if match[2] == "output" else "errors"
    render = _output_renderer(job.id) if stream == "output" else _error_renderer(job.id)
    return await stream_lines(request, request.app[K.JOB_STORE], job, stream, render)


def _line_id(job_id: str, custom_id: str) -> str:
    """A line's id, the same on every read: a digest of the job and the custom_id (unique in a job)."""
    return xxhash.xxh3_128_hexdigest(orjson.dumps([job_id, custom_id]))


def _output_renderer(job_id: str) -> Callable[[bytes], bytes]:
    def line(custom_id: str, body: bytes) -> bytes:
        digest = _line_id(job_id, custom_id)
        head = orjson.dumps({"id": f"batch_req_{digest}", "custom_id": custom_id})[:-1]
        return head + b',"response":{"status_code":200,"request_id":"req_%b","body":%b},"error":null}\n' % (
            digest.encode(), body)

    return lambda blob: render_outputs(blob, line)


def _error_renderer(job_id: str) -> Callable[[bytes], bytes]:
    def render(blob: bytes) -> bytes:
        out = []
        for raw in blob.splitlines():
            line = orjson.loads(raw)
            custom_id = line.get("custom_id")
            digest = _line_id(job_id, custom_id if custom_id is not None else f"line {line['error'].get('line')}")
            out.append(orjson.dumps({"id": f"batch_req_{digest}", "custom_id": custom_id, "response": None,
                                     "error": line["error"]}) + b"\n")
        return b"".join(out)

    return render
