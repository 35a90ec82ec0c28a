"""Batch jobs and files as records, and the store that keeps them: Redis (the state store, shared by replicas)
or in-process memory when `state.url` is memory:// — one interface, the same semantics.

A job's valid lines are stored as chunks; a worker holds a job through an expiring lease and checkpoints
each chunk (its output and error lines, and the progress) in one atomic step, so a crash re-runs at most the
chunks not yet committed and no line is written twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

from .keys import BATCH_RUNNABLE, batch_key
from .store.redis import read_lua

Stream = Literal["output", "errors"]
ACTIVE = frozenset({"validating", "in_progress", "cancelling"})
_CREATE_GRACE_S = 60.0


@dataclass(slots=True, kw_only=True)
class FileMeta:
    id: str
    team: str
    bytes: int
    lines: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str = "batch"

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        del out["team"]
        return {"object": "file", **out}


@dataclass(slots=True, kw_only=True)
class Job:
    """A job's hash in the state store: every field a string there, typed here."""

    id: str
    team: str
    model: str
    endpoint: str
    completion_window: str
    input_file_id: str  # '' when the lines came inline (Jina's `input` form)
    status: str
    created_at: int
    total: int
    completed: int = 0
    failed: int = 0
    chunks: int = 0
    next_chunk: int = 0
    in_progress_at: int = 0
    cancelling_at: int = 0
    cancelled_at: int = 0
    completed_at: int = 0
    failed_at: int = 0
    expires_at: int = 0
    error: str = ""
    error_code: str = ""
    metadata: str = ""  # OpenAI's `metadata` (JSON text, '' for none): the Batch API gives it back as it came

    @property
    def deadline(self) -> int:
        """When its `completion_window` ends (validated as hours, like '24h')."""
        return self.created_at + int(self.completion_window.removesuffix("h")) * 3600

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> Job:
        text = {_s(k): _s(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in text:
                kwargs[f.name] = int(text[f.name]) if f.type == "int" else text[f.name]
        return cls(**kwargs)

    def public(self) -> dict[str, Any]:
        """The contract's `BatchJob`, plus the fields OpenAI's batch clients read."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "input_file_id": self.input_file_id or None,
            "completion_window": self.completion_window,
            "status": self.status,
            "created_at": self.created_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
        }
        for name in ("in_progress_at", "cancelling_at", "cancelled_at", "completed_at", "failed_at", "expires_at"):
            out[name] = getattr(self, name) or None
        if self.error:
            code = self.error_code or "BATCH_FAILED"
            out["errors"] = {"object": "list", "data": [{"code": code, "message": self.error}]}
        return out


def _count(statuses: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(sorted(ACTIVE), 0)  # every status reported, 0 included
    for status in statuses:
        if status in counts:
            counts[status] += 1
    return counts


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobStore(Protocol):
    """Files and jobs of each team. Times are whole seconds of the wall clock, passed in by the caller."""

    async def put_file(self, meta: FileMeta, content: bytes, ttl_s: int) -> None: ...

    async def get_file(self, team: str, file_id: str) -> FileMeta | None: ...

    async def file_content(self, team: str, file_id: str) -> bytes | None: ...

    async def delete_file(self, team: str, file_id: str) -> bool: ...

    async def create_job(self, job: Job, chunks: Sequence[bytes], errors: bytes, max_active: int) -> bool:
        """False when the team already has `max_active` jobs queued or running."""

    async def get_job(self, team: str, job_id: str) -> Job | None: ...

    async def list_jobs(self, team: str, *, limit: int, after: str | None) -> tuple[list[Job], bool]:
        """The team's jobs, newest first, after the job `after`; and whether there are more."""

    async def cancel(self, team: str, job_id: str, now: int) -> str | None:
        """Status after the cancel request: cancelling (a worker holds it), cancelled, or already final."""

    async def runnable(self) -> list[tuple[str, str]]:
        """(team, job id) of jobs that may need a worker, oldest first."""

    async def active_counts(self) -> dict[str, int]:
        """How many jobs are validating, in_progress and cancelling, over every team (for the metrics)."""

    async def claim(self, team: str, job_id: str, token: str, now: int) -> Job | None: ...

    async def renew(self, team: str, job_id: str, token: str) -> str | None:
        """The job's status, or None when the lease is no longer `token`'s."""

    async def chunk(self, team: str, job_id: str, index: int) -> bytes | None: ...

    async def commit(
        self, team: str, job_id: str, token: str, index: int, output: bytes, errors: bytes, completed: int,
        failed: int,
    ) -> str | None:
        """Status after checkpointing chunk `index`; None when the lease is lost or the chunk is not next."""

    async def finish(
        self, team: str, job_id: str, token: str, status: str, now: int, error: str = "", code: str = "BATCH_FAILED"
    ) -> bool: ...

    async def release(self, team: str, job_id: str, token: str) -> None: ...

    async def read(self, team: str, job_id: str, stream: Stream, start: int, count: int) -> list[bytes]:
        """Blobs `start`..`start+count-1` of a job's output or errors (each blob: one chunk's lines)."""


def open_job_store(redis: Any, *, lease_s: float, retention_s: int) -> JobStore:
    if redis is None:
        return MemoryJobStore(lease_s=lease_s, retention_s=retention_s)
    return RedisJobStore(redis, lease_s=lease_s, retention_s=retention_s)


# ---- Redis -----------------------------------------------------------------------------------------------


class RedisJobStore:
    def __init__(self, redis: Any, *, lease_s: float, retention_s: int) -> None:
        self.redis = redis
        self.lease_ms = int(lease_s * 1000)
        self.retention_s = retention_s
        self._scripts = {
            name: redis.register_script(read_lua(f"batch_{name}.lua"))
            for name in ("create", "claim", "renew", "commit", "finish", "cancel", "release")
        }

    # files

    async def put_file(self, meta: FileMeta, content: bytes, ttl_s: int) -> None:
        key = batch_key(meta.team, "file", meta.id)
        # Content first, then the metadata that makes the file visible: no MULTI needed (redis-py's asyncio
        # cluster transactions run each command on a throwaway event loop), and both keys share the {team} slot,
        # so the pipeline goes to one node in this order.
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key + ":content", content, ex=ttl_s)
        pipe.hset(key, mapping={k: str(v) for k, v in asdict(meta).items()})
        pipe.expire(key, ttl_s)
        await pipe.execute()

    async def get_file(self, team: str, file_id: str) -> FileMeta | None:
        raw = await self.redis.hgetall(batch_key(team, "file", file_id))
        if not raw:
            return None
        text = {_s(k): _s(v) for k, v in raw.items()}
        ints = ("bytes", "lines", "created_at", "expires_at")
        kwargs: dict[str, Any] = {k: int(v) if k in ints else v for k, v in text.items()}
        return FileMeta(**kwargs)

    async def file_content(self, team: str, file_id: str) -> bytes | None:
        data: bytes | None = await self.redis.get(batch_key(team, "file", file_id, "content"))
        return data

    async def delete_file(self, team: str, file_id: str) -> bool:
        key = batch_key(team, "file", file_id)
        return bool(await self.redis.delete(key, key + ":content"))

    # jobs

    def _job_keys(self, team: str, job_id: str) -> list[str]:
        job = batch_key(team, "job", job_id)
        return [job, job + ":lease", job + ":chunks", job + ":output", job + ":errors", batch_key(team, "active")]

    async def create_job(self, job: Job, chunks: Sequence[bytes], errors: bytes, max_active: int) -> bool:
        runnable = job.status in ACTIVE
        if runnable:
            # Indexed first: a crash before the script leaves an entry the workers drop, never a lost job.
            await self.redis.zadd(BATCH_RUNNABLE, {f"{job.id} {job.team}": time.time()})
        keys = self._job_keys(job.team, job.id)
        pairs = [x for kv in job.to_fields().items() for x in kv]
        args = [job.id, max_active, "1" if runnable else "0", self.retention_s, errors,
                len(pairs) // 2, *pairs, *chunks]
        created = await self._scripts["create"](
            keys=[keys[0], keys[2], keys[4], keys[5], batch_key(job.team, "jobs"), batch_key(job.team, "seq")],
            args=args,
        )
        if not created and runnable:
            await self.redis.zrem(BATCH_RUNNABLE, f"{job.id} {job.team}")
        return bool(created)

    async def get_job(self, team: str, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(batch_key(team, "job", job_id))
        return Job.from_fields(raw) if raw else None

    async def list_jobs(self, team: str, *, limit: int, after: str | None) -> tuple[list[Job], bool]:
        index = batch_key(team, "jobs")
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [_s(i) for i in await self.redis.zrevrange(index, start, start + limit)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids[:limit]:
            pipe.hgetall(batch_key(team, "job", job_id))
        jobs, gone = [], []
        for job_id, raw in zip(ids, await pipe.execute(), strict=False):
            if raw:
                jobs.append(Job.from_fields(raw))
            else:
                gone.append(job_id)
        if gone:  # expired after their retention
            await self.redis.zrem(index, *gone)
        return jobs, len(ids) > limit

    async def cancel(self, team: str, job_id: str, now: int) -> str | None:
        status = await self._scripts["cancel"](
            keys=self._job_keys(team, job_id), args=[now, self.retention_s, job_id]
        )
        if status is None:
            return None
        if _s(status) == "cancelled":
            await self.redis.zrem(BATCH_RUNNABLE, f"{job_id} {team}")
        return _s(status)

    async def runnable(self) -> list[tuple[str, str]]:
        out = []
        for member in await self.redis.zrange(BATCH_RUNNABLE, 0, -1):
            job_id, _, team = _s(member).partition(" ")
            out.append((team, job_id))
        return out

    async def active_counts(self) -> dict[str, int]:
        refs = await self.runnable()
        pipe = self.redis.pipeline(transaction=False)
        for team, job_id in refs:
            pipe.hget(batch_key(team, "job", job_id), "status")
        return _count(_s(status) for status in await pipe.execute() if status is not None)

    async def claim(self, team: str, job_id: str, token: str, now: int) -> Job | None:
        keys = self._job_keys(team, job_id)
        raw = await self._scripts["claim"](keys=keys[:2], args=[token, self.lease_ms, now])
        if isinstance(raw, list):
            return Job.from_fields(dict(zip(raw[::2], raw[1::2], strict=True)))
        member = f"{job_id} {team}"
        if _s(raw) == "done":
            await self.redis.zrem(BATCH_RUNNABLE, member)
        elif _s(raw) == "gone":
            # Indexed before it is created: a job that is not there yet may be a moment away, so only an entry
            # older than a grace period (a creator that crashed in between) is dropped.
            indexed = await self.redis.zscore(BATCH_RUNNABLE, member)
            if indexed is not None and indexed < time.time() - _CREATE_GRACE_S:
                await self.redis.zrem(BATCH_RUNNABLE, member)
        return None

    async def renew(self, team: str, job_id: str, token: str) -> str | None:
        keys = self._job_keys(team, job_id)
        status = await self._scripts["renew"](keys=keys[:2], args=[token, self.lease_ms])
        return None if status is None else _s(status)

    async def chunk(self, team: str, job_id: str, index: int) -> bytes | None:
        data: bytes | None = await self.redis.lindex(batch_key(team, "job", job_id, "chunks"), index)
        return data

    async def commit(
        self, team: str, job_id: str, token: str, index: int, output: bytes, errors: bytes, completed: int,
        failed: int,
    ) -> str | None:
        keys = self._job_keys(team, job_id)
        status = await self._scripts["commit"](
            keys=[keys[0], keys[1], keys[3], keys[4]],
            args=[token, index, output, errors, completed, failed, self.lease_ms],
        )
        return None if status is None else _s(status)

    async def finish(
        self, team: str, job_id: str, token: str, status: str, now: int, error: str = "", code: str = "BATCH_FAILED"
    ) -> bool:
        done = await self._scripts["finish"](
            keys=self._job_keys(team, job_id), args=[token, status, now, self.retention_s, job_id, error, code]
        )
        if done:
            await self.redis.zrem(BATCH_RUNNABLE, f"{job_id} {team}")
        return bool(done)

    async def release(self, team: str, job_id: str, token: str) -> None:
        await self._scripts["release"](keys=[self._job_keys(team, job_id)[1]], args=[token])

    async def read(self, team: str, job_id: str, stream: Stream, start: int, count: int) -> list[bytes]:
        key = batch_key(team, "job", job_id, stream)
        return list(await self.redis.lrange(key, start, start + count - 1))


# ---- memory ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _MemJob:
    fields: dict[str, str]
    chunks: list[bytes]
    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)
    lease: tuple[str, float] | None = None  # token, expiry (monotonic)
    expires: float | None = None  # monotonic; set when the job ends
    created: float = 0.0


class MemoryJobStore:
    """One process's jobs and files (the embedded default); the Redis store's semantics, leases included."""

    def __init__(
        self, *, lease_s: float, retention_s: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.lease_s = lease_s
        self.retention_s = retention_s
        self.clock = clock
        self._files: dict[tuple[str, str], tuple[FileMeta, bytes, float]] = {}
        self._jobs: dict[tuple[str, str], _MemJob] = {}

    # files

    async def put_file(self, meta: FileMeta, content: bytes, ttl_s: int) -> None:
        self._files[meta.team, meta.id] = (meta, content, self.clock() + ttl_s)

    def _file(self, team: str, file_id: str) -> tuple[FileMeta, bytes, float] | None:
        entry = self._files.get((team, file_id))
        if entry is not None and entry[2] <= self.clock():
            del self._files[team, file_id]
            return None
        return entry

    async def get_file(self, team: str, file_id: str) -> FileMeta | None:
        entry = self._file(team, file_id)
        return None if entry is None else entry[0]

    async def file_content(self, team: str, file_id: str) -> bytes | None:
        entry = self._file(team, file_id)
        return None if entry is None else entry[1]

    async def delete_file(self, team: str, file_id: str) -> bool:
        return self._files.pop((team, file_id), None) is not None

    # jobs

    def _job(self, team: str, job_id: str) -> _MemJob | None:
        job = self._jobs.get((team, job_id))
        if job is not None and job.expires is not None and job.expires <= self.clock():
            del self._jobs[team, job_id]
            return None
        return job

    def _holder(self, job: _MemJob) -> str | None:
        if job.lease is None or job.lease[1] <= self.clock():
            job.lease = None
            return None
        return job.lease[0]

    async def create_job(self, job: Job, chunks: Sequence[bytes], errors: bytes, max_active: int) -> bool:
        runnable = job.status in ACTIVE
        if runnable:
            active = sum(
                1 for (team, _), j in self._jobs.items() if team == job.team and j.fields["status"] in ACTIVE
            )
            if active >= max_active:
                return False
        mem = _MemJob(job.to_fields(), list(chunks) if runnable else [], created=self.clock())
        if errors:
            mem.errors.append(errors)
        if not runnable:
            mem.expires = self.clock() + self.retention_s
        self._jobs[job.team, job.id] = mem
        return True

    async def get_job(self, team: str, job_id: str) -> Job | None:
        job = self._job(team, job_id)
        return None if job is None else Job.from_fields(job.fields)

    async def list_jobs(self, team: str, *, limit: int, after: str | None) -> tuple[list[Job], bool]:
        ids = [i for (t, i) in list(self._jobs) if t == team and self._job(t, i) is not None]
        ids.reverse()  # dicts keep insertion order: newest last
        if after is not None:
            if after not in ids:
                return [], False
            ids = ids[ids.index(after) + 1 :]
        return [Job.from_fields(self._jobs[team, i].fields) for i in ids[:limit]], len(ids) > limit

    async def cancel(self, team: str, job_id: str, now: int) -> str | None:
        job = self._job(team, job_id)
        if job is None:
            return None
        status = job.fields["status"]
        if status not in ("validating", "in_progress"):
            return status
        job.fields["cancelling_at"] = str(now)
        if self._holder(job) is not None:
            job.fields["status"] = "cancelling"
            return "cancelling"
        self._end(job, "cancelled", now)
        return "cancelled"

    def _end(self, job: _MemJob, status: str, now: int, error: str = "", code: str = "") -> None:
        job.fields.update({"status": status, f"{status}_at": str(now), "expires_at": str(now + self.retention_s)})
        if error:
            job.fields.update(error=error, error_code=code)
        job.lease = None
        job.chunks = []
        job.expires = self.clock() + self.retention_s

    async def runnable(self) -> list[tuple[str, str]]:
        jobs = [(j.created, key) for key, j in self._jobs.items() if j.fields["status"] in ACTIVE]
        return [key for _, key in sorted(jobs)]

    async def active_counts(self) -> dict[str, int]:
        return _count(self._jobs[key].fields["status"] for key in await self.runnable())

    async def claim(self, team: str, job_id: str, token: str, now: int) -> Job | None:
        job = self._job(team, job_id)
        if job is None or job.fields["status"] not in ACTIVE:
            return None
        holder = self._holder(job)
        if holder is not None and holder != token:
            return None
        job.lease = (token, self.clock() + self.lease_s)
        if job.fields["status"] == "validating":
            job.fields.update(status="in_progress", in_progress_at=str(now))
        return Job.from_fields(job.fields)

    def _held(self, team: str, job_id: str, token: str) -> _MemJob | None:
        job = self._job(team, job_id)
        if job is None or self._holder(job) != token:
            return None
        return job

    async def renew(self, team: str, job_id: str, token: str) -> str | None:
        job = self._held(team, job_id, token)
        if job is None:
            return None
        job.lease = (token, self.clock() + self.lease_s)
        return job.fields["status"]

    async def chunk(self, team: str, job_id: str, index: int) -> bytes | None:
        job = self._job(team, job_id)
        if job is None or not 0 <= index < len(job.chunks):
            return None
        return job.chunks[index]

    async def commit(
        self, team: str, job_id: str, token: str, index: int, output: bytes, errors: bytes, completed: int,
        failed: int,
    ) -> str | None:
        job = self._held(team, job_id, token)
        if job is None or int(job.fields["next_chunk"]) != index:
            return None
        if output:
            job.output.append(output)
        if errors:
            job.errors.append(errors)
        f = job.fields
        f["completed"] = str(int(f["completed"]) + completed)
        f["failed"] = str(int(f["failed"]) + failed)
        f["next_chunk"] = str(index + 1)
        job.lease = (token, self.clock() + self.lease_s)
        return f["status"]

    async def finish(
        self, team: str, job_id: str, token: str, status: str, now: int, error: str = "", code: str = "BATCH_FAILED"
    ) -> bool:
        job = self._job(team, job_id)
        if job is None or self._holder(job) != (token or None):
            return False
        self._end(job, status, now, error, code)
        return True

    async def release(self, team: str, job_id: str, token: str) -> None:
        job = self._job(team, job_id)
        if job is not None and self._holder(job) == token:
            job.lease = None

    async def read(self, team: str, job_id: str, stream: Stream, start: int, count: int) -> list[bytes]:
        job = self._job(team, job_id)
        if job is None:
            return []
        blobs = job.output if stream == "output" else job.errors
        return blobs[start : start + count]
