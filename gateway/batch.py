"""The batch worker: runs jobs from the job store through the embedding service (cache, quota, coalescer) at
batch priority, on whichever replica claims them, and the codec of their output.

A job runs chunk by chunk; each chunk's output and error lines are committed with the progress in one atomic
step while the worker holds the job's lease. A crash loses only uncommitted chunks, which the next holder
re-runs from the cache (their inputs were cached when the upstream answered): only the calls in flight at the
crash are paid twice, at most `chunks_in_flight × chunk_lines` lines' inputs (docs/batch.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import struct
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from . import config as cfg
from .codec import decode, encode
from .errors import (
    GatewayError,
    Overloaded,
    QuotaExceeded,
    UpstreamFailed,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from .files import Line, LineError, decode_chunk
from .jobs import Job, JobStore, Stream
from .live import LiveConfig
from .metrics import Metrics
from .protocol import EmbeddingRequest, parse_embedding_request
from .render import render_embeddings
from .service import EmbeddingService, Outcome
from .usage import Tally, UsageRecorder

log = logging.getLogger("gateway.batch")

# Errors that say "not now" rather than "not this input": the call is tried again.
TRANSIENT = (UpstreamFailed, UpstreamTimeout, UpstreamRateLimited)
_LEN = struct.Struct("<I")
_RECANCEL_S = 0.1


# ---- output codec: a chunk's results as compact binary (vectors as cache entries), rendered on read ------


@dataclass(frozen=True, slots=True)
class LineOutput:
    custom_id: str
    model: str
    output: str  # the line's own output format
    tokens: int
    vectors: list[np.ndarray]


def pack_outputs(results: Sequence[LineOutput]) -> bytes:
    """[len][header JSON][vector entries]; a 1024-dim vector takes ~4.1 KB instead of ~13 KB of JSON.

    The floats stay raw: deflating their top byte would save ~15% of the bytes held for `retention_s`, at a
    cost per vector paid on the event loop that serves interactive requests (or, in a thread, holding the GIL)."""
    entries = [encode(vec, 0, compact=False) for r in results for vec in r.vectors]
    sizes = iter(len(e) for e in entries)
    header = orjson.dumps(
        [[r.custom_id, r.model, r.output, r.tokens, [next(sizes) for _ in r.vectors]] for r in results]
    )
    return _LEN.pack(len(header)) + header + b"".join(entries)


def unpack_outputs(blob: bytes) -> list[LineOutput]:
    (size,) = _LEN.unpack_from(blob)
    pos = _LEN.size + size
    out = []
    for custom_id, model, output, tokens, sizes in orjson.loads(blob[_LEN.size : pos]):
        vectors = []
        for n in sizes:
            entry = decode(blob[pos : pos + n])
            assert isinstance(entry.vectors, np.ndarray)
            vectors.append(entry.vectors)
            pos += n
        out.append(LineOutput(custom_id, model, output, tokens, vectors))
    return out


def render_outputs(blob: bytes, line: Callable[[str, bytes], bytes] | None = None) -> bytes:
    """JSONL output lines; each body is byte for byte what `/v1/embeddings` answers for the line's request.
    `line(custom_id, body)` renders one line (the contract's shape unless given)."""
    render = line or _contract_line
    return b"".join(
        render(r.custom_id, render_embeddings(r.model, r.vectors, r.tokens, r.output)) for r in unpack_outputs(blob)
    )


_READ_BLOBS = 8  # chunk blobs fetched per store read while streaming


async def stream_lines(
    request: web.Request, store: JobStore, job: Job, stream: Stream, render: Callable[[bytes], bytes] | None
) -> web.StreamResponse:
    """A job's committed lines of `stream` as a JSONL answer, a few chunks per store read; `render` turns a chunk
    into lines (None: the chunk is its lines already). Rendering takes milliseconds per chunk: off the loop."""
    response = web.StreamResponse(headers={"Content-Type": "application/jsonl"})
    await response.prepare(request)
    start = 0
    while True:
        blobs = await store.read(job.team, job.id, stream, start, _READ_BLOBS)
        for blob in blobs:
            await response.write(blob if render is None else await asyncio.to_thread(render, blob))
        if len(blobs) < _READ_BLOBS:
            break
        start += _READ_BLOBS
    await response.write_eof()
    return response


def _contract_line(custom_id: str, body: bytes) -> bytes:
    return b'{"custom_id":' + orjson.dumps(custom_id) + b',"response":{"status_code":200,"body":' + body + b"}}\n"


def new_job(
    team: str, model: str, endpoint: str, window: str, file_id: str, lines: list[Line], errors: list[LineError],
    batch: cfg.Batch, *, metadata: str = "",
) -> Job:
    """A job over checked lines, as either Batch API creates it; with no valid line it has already failed."""
    now = int(time.time())
    job = Job(
        id="batch_" + secrets.token_hex(12), team=team, model=model, endpoint=endpoint,
        completion_window=window, input_file_id=file_id, status="validating", created_at=now,
        total=len(lines) + len(errors), failed=len(errors), chunks=-(-len(lines) // batch.chunk_lines),
        metadata=metadata,
    )
    if not lines:  # nothing to run: the job ends at once, its reasons in the errors stream
        job.status, job.failed_at, job.expires_at = "failed", now, now + batch.retention_s
        job.error = "no line is valid; see the errors stream"
    return job


@dataclass(frozen=True, slots=True)
class _Chunk:
    index: int
    output: bytes
    errors: bytes
    completed: int
    failed: int


class LeaseLost(Exception):
    """Another worker took the job over (this one was too slow to renew): stop without writing anything."""


class JobBroken(Exception):
    """The job cannot run (its inputs are gone, its team was removed): it ends as failed."""


# ---- the worker ------------------------------------------------------------------------------------------


class BatchWorker:
    """Claims runnable jobs (up to `batch.workers` at once) and runs them; `stop()` gives their leases back."""

    def __init__(
        self,
        store: JobStore,
        service: EmbeddingService,
        live: LiveConfig,
        metrics: Metrics,
        usage: UsageRecorder | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.service = service
        self.live = live  # teams and prices are read from it as they are now (a reload changes them)
        self.batch = live.config.batch  # bound at start-up, like every section a reload does not apply
        self.metrics = metrics
        self.usage = usage
        self.clock = clock
        self.sleep = sleep
        self.token = uuid.uuid4().hex  # this process's lease value
        self._running: dict[str, asyncio.Task[None]] = {}  # job id → its holder (`_hold`)
        self._runners: dict[str, asyncio.Task[str]] = {}  # job id → its chunks' runner (`_execute`)
        self._wake = asyncio.Event()
        self._settle = asyncio.Event()  # set (and replaced) whenever a job held here ends
        self._loop: asyncio.Task[None] | None = None
        # While interactive requests are being served, this worker's jobs take turns at short steps (a step's
        # event-loop work is short, its upstream call small), and pause after each so that their CPU stays
        # under `yield_cpu_share`; then interactive requests wait for at most one short stretch of job work.
        self._polite = asyncio.Semaphore(1)

    def now(self) -> int:
        return int(self.clock())

    def start(self) -> None:
        if self.batch.workers > 0 and self._loop is None:
            self._loop = asyncio.get_running_loop().create_task(self._poll())

    def wake(self) -> None:
        """A job was just accepted here: look for work now rather than at the next poll."""
        self._wake.set()

    async def submit(self, job: Job, chunks: Sequence[bytes], errors: Sequence[LineError]) -> None:
        """Stores a new job (429 when its team has `max_active_jobs_per_team` queued or running) and wakes."""
        limit = self.batch.max_active_jobs_per_team
        if not await self.store.create_job(job, chunks, b"".join(e.render() for e in errors), limit):
            raise GatewayError(
                f"team {job.team!r} already has {limit} batch jobs queued or running; wait for one to end or "
                "cancel one",
                code="TOO_MANY_BATCH_JOBS", status=429,
            )
        self.wake()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stops taking jobs, stops the running ones and releases their leases (another replica resumes them
        from their last checkpoint at once); idempotent. For graceful shutdown.

        The jobs' holders are not cancelled: their runners are, and each holder then releases its lease on its
        own path, so a second signal cannot cut a release short.
        """
        if self._loop is not None:
            await _cancel(self._loop)
            self._loop = None
        await asyncio.gather(*(_cancel(runner) for runner in list(self._runners.values())))
        holders = list(self._running.values())
        if holders:
            await asyncio.wait(holders, timeout=timeout_s)

    async def settled(self, team: str, job_id: str) -> Job | None:
        """Waits until the job has ended (on this replica's watch) and returns it; for tests and tools."""
        while True:
            ended = self._settle  # taken before the read: an end between the two still wakes us
            job = await self.store.get_job(team, job_id)
            if job is None or job.status not in ("validating", "in_progress", "cancelling"):
                return job
            await ended.wait()

    # ---- claiming --------------------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._fill()
            except Exception as exc:  # the state store is down: try again at the next poll
                log.warning("batch worker could not look for jobs: %r", exc)
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the wait in a task of its own, which a
            # snapshot of the process's tasks (the leak checks in tests/test_faults.py) sees come and go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.batch.poll_s):
                    await self._wake.wait()

    async def _fill(self) -> None:
        if len(self._running) >= self.batch.workers:
            return
        for team, job_id in await self.store.runnable():
            if len(self._running) >= self.batch.workers:
                return
            if job_id in self._running:
                continue
            job = await self.store.claim(team, job_id, self.token, self.now())
            if job is not None:
                task = asyncio.get_running_loop().create_task(self._hold(job))
                self._running[job_id] = task
                task.add_done_callback(functools.partial(self._ended, job_id))

    def _ended(self, job_id: str, _: object) -> None:
        self._running.pop(job_id, None)
        self._wake.set()
        self._settle.set()
        self._settle = asyncio.Event()

    # ---- holding a job: heartbeat, cancel, finish --------------------------------------------------------

    async def _hold(self, job: Job) -> None:
        log.info("batch job %s of team %s: running from chunk %d of %d", job.id, job.team, job.next_chunk,
                 job.chunks)
        runner = self._runners[job.id] = asyncio.get_running_loop().create_task(self._execute(job))
        try:
            status, error = await self._watch(job, runner)
        finally:
            del self._runners[job.id]
        code = "BATCH_FAILED"
        if status == "expired":
            status, error = await self._expire(job)
            code = "BATCH_EXPIRED"
        if status is None:
            log.warning("batch job %s: lost its lease; another worker resumes it", job.id)
            return
        if status == "":  # stopped, or store trouble: it is resumed from its last checkpoint
            with contextlib.suppress(Exception):
                await self.store.release(job.team, job.id, self.token)
            return
        try:
            await self.store.finish(job.team, job.id, self.token, status, self.now(), error, code)
        except Exception as exc:  # the next holder finds every chunk committed and finishes it at once
            log.warning("batch job %s: could not record its end (%r); it is retried", job.id, exc)
            return
        log.info("batch job %s of team %s: %s", job.id, job.team, status)

    async def _watch(self, job: Job, runner: asyncio.Task[str]) -> tuple[str | None, str]:
        """(final status, error) of the job; status None when the lease was lost, '' to release it."""
        while True:
            done, _ = await asyncio.wait({runner}, timeout=self.batch.heartbeat_s)
            if done:
                return _result(job, runner)
            try:
                status = await self.store.renew(job.team, job.id, self.token)
            except Exception as exc:
                log.warning("batch job %s: lease renewal failed: %r", job.id, exc)
                continue
            if status is None or status == "cancelling":
                await _cancel(runner)
                return (None if status is None else "cancelled"), ""
            if self.now() >= job.deadline:  # e.g. waiting for the quota window: stop now, not after the wait
                await _cancel(runner)
                return "expired", ""

    async def _execute(self, job: Job) -> str:
        """Runs the chunks not yet committed, a few at once, committing them in order; the final status."""
        team = self.live.team(job.team)
        if team is None:
            raise JobBroken(f"team {job.team!r} is no longer configured")
        pending: deque[asyncio.Task[_Chunk]] = deque()
        following = job.next_chunk
        loop = asyncio.get_running_loop()
        try:
            while True:
                expired = self.now() >= job.deadline
                while following < job.chunks and len(pending) < self.batch.chunks_in_flight and not expired:
                    pending.append(loop.create_task(self._run_chunk(team, job, following)))
                    following += 1
                if not pending:
                    return "expired" if following < job.chunks else "completed"
                chunk = await pending.popleft()
                status = await self.store.commit(
                    job.team, job.id, self.token, chunk.index, chunk.output, chunk.errors, chunk.completed,
                    chunk.failed,
                )
                if status is None:
                    raise LeaseLost(job.id)
                if status == "cancelling":
                    return "cancelled"
        finally:
            if pending:
                # Shielded: a second cancel of this runner ends it at once, while the chunks still get stopped.
                await asyncio.shield(asyncio.gather(*(_cancel(task) for task in pending)))

    async def _expire(self, job: Job) -> tuple[str | None, str]:
        """The job's completion window has ended: its lines not run go to the errors stream (BATCH_EXPIRED),
        chunk by chunk as checkpoints, so every custom_id still ends up once in output or errors; then it ends
        as failed, keeping the lines done. (None, '') when the lease was lost; ('', '') on store trouble."""
        why = f"not run: the job's {job.completion_window} completion_window ended"
        try:
            current = await self.store.get_job(job.team, job.id)
            for index in range(current.next_chunk if current is not None else job.chunks, job.chunks):
                blob = await self.store.chunk(job.team, job.id, index)
                lines = decode_chunk(blob) if blob is not None else []
                errors = b"".join(LineError(x.number, x.custom_id, "BATCH_EXPIRED", why).render() for x in lines)
                status = await self.store.commit(job.team, job.id, self.token, index, b"", errors, 0, len(lines))
                if status is None:
                    return None, ""
                if status == "cancelling":
                    return "cancelled", ""
        except Exception as exc:
            log.warning("batch job %s: could not expire it (%r); it is retried", job.id, exc)
            return "", ""
        return "failed", f"the {job.completion_window} completion_window ended before every line ran; see /errors"

    # ---- one chunk -------------------------------------------------------------------------------------

    async def _run_chunk(self, team: cfg.Team, job: Job, index: int) -> _Chunk:
        blob = await self.store.chunk(job.team, job.id, index)
        if blob is None:
            raise JobBroken(f"the inputs of chunk {index} are gone")
        results = await self._embed_lines(team, decode_chunk(blob))
        outputs = [r for r in results if isinstance(r, LineOutput)]
        errors = [r for r in results if isinstance(r, LineError)]
        packed = pack_outputs(outputs) if outputs else b""
        return _Chunk(
            index=index,
            output=packed,
            errors=b"".join(e.render() for e in errors),
            completed=len(outputs),
            failed=len(errors),
        )

    async def _embed_lines(self, team: cfg.Team, lines: list[Line]) -> list[LineOutput | LineError]:
        """All lines at once while the gateway has no interactive work; else in steps that yield to it."""
        results: list[LineOutput | LineError] = []
        while len(results) < len(lines):
            if not self._yielding():
                return results + await self._embed_step(team, lines[len(results) :])
            async with self._polite:
                step = lines[len(results) : len(results) + self.batch.yield_step_lines]
                started, cpu = time.monotonic(), time.thread_time()
                results += await self._embed_step(team, step)
                # thread_time also counts the interactive requests served meanwhile: the busier the gateway,
                # the longer the pause.
                pause = (time.thread_time() - cpu) / self.batch.yield_cpu_share - (time.monotonic() - started)
                if pause > 0:
                    await asyncio.sleep(pause)
        return results

    def _yielding(self) -> bool:
        return time.monotonic() - self.service.interactive_at < self.batch.yield_quiet_s

    async def _embed_step(self, team: cfg.Team, lines: list[Line]) -> list[LineOutput | LineError]:
        """Lines with the same parameters share calls (one cache lookup, one quota reservation per call);
        late-chunking / multivector lines are units and go alone. Results come back in line order."""
        # Checked when the job was created (token ids only if the upstream reads them).
        requests = [parse_embedding_request(x.body, max_inputs=1 << 30, token_ids=True) for x in lines]
        calls = self._plan(requests)
        answers = await asyncio.gather(
            *(self._call(team, [lines[i] for i in c], [requests[i] for i in c]) for c in calls)
        )
        results: dict[int, LineOutput | LineError] = {}
        for call, answer in zip(calls, answers, strict=True):
            results.update(zip(call, answer, strict=True))
        return [results[i] for i in range(len(lines))]

    def _plan(self, requests: list[EmbeddingRequest]) -> list[list[int]]:
        """Indexes of the requests each call serves: same parameters, at most `max_inputs_per_call` inputs."""
        calls: list[list[int]] = []
        open_calls: dict[bytes, tuple[list[int], int]] = {}
        for i, req in enumerate(requests):
            if req.unit:
                calls.append([i])
                continue
            call, size = open_calls.get(req.canonical_params, ([], 0))
            if call and size + len(req.items) > self.batch.max_inputs_per_call:
                call, size = [], 0
            if not call:
                calls.append(call)
            call.append(i)
            open_calls[req.canonical_params] = (call, size + len(req.items))
        return calls

    async def _call(
        self, team: cfg.Team, lines: list[Line], requests: list[EmbeddingRequest]
    ) -> list[LineOutput | LineError]:
        first = requests[0]
        merged = first if len(requests) == 1 else EmbeddingRequest(
            model=first.model, items=[item for r in requests for item in r.items], params=first.params,
            output="float", unit=False,
        )
        try:
            outcome = await self._embed(team, merged)
        except GatewayError as exc:
            if len(lines) > 1 and not isinstance(exc, TRANSIENT):
                # Some line's input was refused: halve the call until the refused lines stand alone, so only
                # they fail, at a cost of a few calls rather than one per line.
                half = len(lines) // 2
                first_half, second_half = await asyncio.gather(
                    self._call(team, lines[:half], requests[:half]), self._call(team, lines[half:], requests[half:])
                )
                return first_half + second_half
            return [LineError(x.number, x.custom_id, exc.code, exc.detail) for x in lines]
        self._account(team.name, first.model, len(lines), len(merged.items), outcome)
        if first.unit:
            return [LineOutput(lines[0].custom_id, first.model, first.output, outcome.tokens, outcome.vectors)]
        out: list[LineOutput | LineError] = []
        pos = 0
        for line, req in zip(lines, requests, strict=True):
            end = pos + len(req.items)
            tokens = sum(outcome.item_tokens[pos:end])
            out.append(LineOutput(line.custom_id, req.model, req.output, tokens, outcome.vectors[pos:end]))
            pos = end
        return out

    async def _embed(self, team: cfg.Team, request: EmbeddingRequest) -> Outcome:
        """One service call at batch priority: over quota it waits for the window; transient upstream
        failures are retried with backoff up to `batch.max_attempts`."""
        attempt = 0
        while True:
            deadline = time.monotonic() + self.batch.call_timeout_s
            try:
                return await self.service.embed(team, request, deadline=deadline, priority="batch")
            except (QuotaExceeded, Overloaded) as exc:
                await self.sleep(max(1, int(exc.headers.get("Retry-After", "1"))))
            except TRANSIENT:
                attempt += 1
                if attempt >= self.batch.max_attempts:
                    raise
                await self.sleep(random.uniform(0, min(30.0, 0.5 * 2**attempt)))

    def _account(self, team: str, model: str, lines: int, inputs: int, outcome: Outcome) -> None:
        """The same metrics and durable usage as `/v1/embeddings` records; each line counts as a request."""
        cost, saved = outcome.cost_usd, outcome.cached_tokens * self.live.config.hit_prices.get(model, 0.0) / 1e6
        m = self.metrics
        m.inputs.labels(team, model, "hit").inc(outcome.hits)
        m.inputs.labels(team, model, "miss").inc(outcome.misses)
        m.inputs.labels(team, model, "joined").inc(outcome.joined)
        m.tokens.labels(team, model, "upstream").inc(outcome.upstream_tokens)
        m.tokens.labels(team, model, "cache").inc(outcome.cached_tokens)
        m.cost.labels(team, model, "billed").inc(cost)
        m.cost.labels(team, model, "saved").inc(saved)
        if self.usage is not None:
            self.usage.record(team, model, Tally(
                requests=lines, inputs=inputs, hits=outcome.hits, misses=outcome.misses, joined=outcome.joined,
                upstream_tokens=outcome.upstream_tokens, cached_tokens=outcome.cached_tokens, cost_usd=cost,
                cost_saved_usd=saved, estimated_tokens=outcome.estimated_tokens,
            ))


def _result(job: Job, runner: asyncio.Task[str]) -> tuple[str | None, str]:
    if runner.cancelled():  # stop(): give the job back
        return "", ""
    try:
        return runner.result(), ""
    except LeaseLost:
        return None, ""
    except JobBroken as exc:
        return "failed", str(exc)
    except Exception as exc:
        log.warning("batch job %s: stopped by %r; it resumes from its last checkpoint", job.id, exc)
        return "", ""


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancels `task` and waits until it has ended, cancelling again while it runs on: redis-py (8.1) can
    swallow a cancellation that lands while it opens a connection, and a job must still stop."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECANCEL_S)
    if not task.cancelled():
        task.exception()  # retrieved, so an error on the way out is not reported as lost
