"""The job store's contract, one test body over both backends (Redis and memory): leases, checkpoints that
write each chunk exactly once, cancel, finish and the team's active-job limit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from gateway.jobs import FileMeta, Job, JobStore, MemoryJobStore, RedisJobStore
from gateway.keys import BATCH_RUNNABLE, batch_key
from gateway.store.redis import connect


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Expire = Callable[[str, str], Awaitable[None]]


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[tuple[JobStore, Expire]]:
    """A store, and a way to make a job's lease run out (the clock for memory; the key's expiry for Redis)."""
    if request.param == "memory":
        clock = Clock()
        memory = MemoryJobStore(lease_s=30, retention_s=3600, clock=clock)

        async def tick(team: str, job_id: str) -> None:
            clock.now += 31

        yield memory, tick
        return
    if request.param == "cluster":  # a real 3-node Redis Cluster: every multi-key script stays in one {team} slot
        client = connect(request.getfixturevalue("cluster_url"), socket_timeout_s=2)
    else:
        client = aioredis.Redis.from_url(redis_url)

    async def expire(team: str, job_id: str) -> None:
        await client.delete(batch_key(team, "job", job_id, "lease"))  # what PX does after 30 s

    yield RedisJobStore(client, lease_s=30, retention_s=3600), expire
    await client.aclose()


def new_job(job_id: str = "batch_1", team: str = "team-a", chunks: int = 3) -> Job:
    return Job(id=job_id, team=team, model="m", endpoint="/v1/embeddings", completion_window="24h",
               input_file_id="", status="validating", created_at=100, total=chunks * 2, chunks=chunks)


async def test_a_lease_is_held_by_one_worker_until_it_runs_out(backend: tuple[JobStore, Expire]) -> None:
    store, expire = backend
    assert await store.create_job(new_job(), [b"c0", b"c1", b"c2"], b"", max_active=4)
    assert await store.runnable() == [("team-a", "batch_1")]
    job = await store.claim("team-a", "batch_1", "w1", now=200)
    assert job is not None and job.status == "in_progress" and job.in_progress_at == 200
    assert await store.claim("team-a", "batch_1", "w2", now=201) is None  # busy
    assert await store.renew("team-a", "batch_1", "w1") == "in_progress"
    assert await store.renew("team-a", "batch_1", "w2") is None
    await expire("team-a", "batch_1")
    assert await store.renew("team-a", "batch_1", "w1") is None  # w1 was too slow
    taken = await store.claim("team-a", "batch_1", "w2", now=300)
    assert taken is not None and taken.in_progress_at == 200  # first start kept
    assert await store.commit("team-a", "batch_1", "w1", 0, b"out", b"", 2, 0) is None


async def test_each_chunk_is_committed_once_and_in_order(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    await store.create_job(new_job(), [b"c0", b"c1", b"c2"], b"bad line 7\n", max_active=4)
    await store.claim("team-a", "batch_1", "w1", now=200)
    assert await store.chunk("team-a", "batch_1", 1) == b"c1"
    assert await store.commit("team-a", "batch_1", "w1", 1, b"o1", b"", 2, 0) is None  # not next
    assert await store.commit("team-a", "batch_1", "w1", 0, b"o0", b"e0\n", 1, 1) == "in_progress"
    assert await store.commit("team-a", "batch_1", "w1", 0, b"o0", b"e0\n", 1, 1) is None  # twice: refused
    assert await store.commit("team-a", "batch_1", "w1", 1, b"o1", b"", 2, 0) == "in_progress"
    job = await store.get_job("team-a", "batch_1")
    assert job is not None and (job.next_chunk, job.completed, job.failed) == (2, 3, 1)
    assert await store.read("team-a", "batch_1", "output", 0, 10) == [b"o0", b"o1"]
    assert await store.read("team-a", "batch_1", "errors", 0, 10) == [b"bad line 7\n", b"e0\n"]
    assert await store.read("team-a", "batch_1", "output", 1, 10) == [b"o1"]
    assert await store.read("team-b", "batch_1", "output", 0, 10) == []


async def test_finish_ends_the_job_frees_the_slot_and_drops_the_inputs(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    await store.create_job(new_job(chunks=1), [b"c0"], b"", max_active=1)
    assert not await store.create_job(new_job("batch_2"), [b"c0"], b"", max_active=1)  # the team's one slot
    assert await store.runnable() == [("team-a", "batch_1")]
    assert await store.create_job(new_job("batch_3", team="team-b"), [b"c0"], b"", max_active=1)
    await store.claim("team-a", "batch_1", "w1", now=200)
    assert not await store.finish("team-a", "batch_1", "w2", "completed", now=300)  # not the holder
    assert await store.finish("team-a", "batch_1", "w1", "completed", now=300)
    job = await store.get_job("team-a", "batch_1")
    assert job is not None and (job.status, job.completed_at, job.expires_at) == ("completed", 300, 3900)
    assert await store.chunk("team-a", "batch_1", 0) is None
    assert await store.claim("team-a", "batch_1", "w1", now=301) is None
    assert await store.runnable() == [("team-b", "batch_3")]
    assert await store.create_job(new_job("batch_2"), [b"c0"], b"", max_active=1)


async def test_cancel_stops_a_held_job_through_its_worker_and_a_free_one_at_once(
    backend: tuple[JobStore, Expire]
) -> None:
    store, _ = backend
    for job_id in ("held", "free"):
        await store.create_job(new_job(job_id), [b"c0", b"c1", b"c2"], b"", max_active=4)
    await store.claim("team-a", "held", "w1", now=200)
    assert await store.cancel("team-a", "held", now=250) == "cancelling"
    assert await store.renew("team-a", "held", "w1") == "cancelling"
    assert await store.commit("team-a", "held", "w1", 0, b"o0", b"", 2, 0) == "cancelling"
    assert await store.finish("team-a", "held", "w1", "cancelled", now=260)
    held = await store.get_job("team-a", "held")
    assert held is not None and (held.status, held.cancelling_at, held.cancelled_at) == ("cancelled", 250, 260)
    assert held.completed == 2
    assert await store.cancel("team-a", "free", now=270) == "cancelled"
    free = await store.get_job("team-a", "free")
    assert free is not None and (free.status, free.cancelled_at, free.expires_at) == ("cancelled", 270, 3870)
    assert await store.cancel("team-a", "free", now=280) == "cancelled"
    assert await store.cancel("team-a", "nope", now=280) is None
    assert await store.cancel("team-b", "held", now=280) is None
    assert await store.runnable() == []


async def test_release_hands_the_job_over_at_once(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    await store.create_job(new_job(), [b"c0"], b"", max_active=4)
    await store.claim("team-a", "batch_1", "w1", now=200)
    await store.release("team-a", "batch_1", "w2")  # not its lease: nothing happens
    assert await store.claim("team-a", "batch_1", "w2", now=201) is None
    await store.release("team-a", "batch_1", "w1")
    assert await store.claim("team-a", "batch_1", "w2", now=202) is not None


async def test_a_job_with_nothing_to_run_is_stored_finished(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    job = new_job(chunks=0)
    job.status, job.failed_at, job.failed, job.total = "failed", 100, 2, 2
    assert await store.create_job(job, [], b"e1\ne2\n", max_active=0)
    assert await store.runnable() == []
    stored = await store.get_job("team-a", "batch_1")
    assert stored is not None and stored.status == "failed"
    assert await store.read("team-a", "batch_1", "errors", 0, 5) == [b"e1\ne2\n"]
    jobs, more = await store.list_jobs("team-a", limit=5, after=None)
    assert [j.id for j in jobs] == ["batch_1"] and not more


async def test_files_belong_to_their_team(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    meta = FileMeta(id="file-1", team="team-a", bytes=3, lines=1, created_at=1, expires_at=2, filename="f.jsonl")
    await store.put_file(meta, b"{}\n", ttl_s=60)
    assert await store.get_file("team-a", "file-1") == meta
    assert await store.file_content("team-a", "file-1") == b"{}\n"
    assert await store.get_file("team-b", "file-1") is None
    assert not await store.delete_file("team-b", "file-1")
    assert await store.delete_file("team-a", "file-1")
    assert await store.file_content("team-a", "file-1") is None


async def test_a_job_indexed_but_not_yet_created_is_not_forgotten(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisJobStore(client, lease_s=30, retention_s=3600)
    await client.zadd(BATCH_RUNNABLE, {"batch_new team-a": time.time(), "batch_old team-a": time.time() - 61})
    assert await store.claim("team-a", "batch_new", "w1", now=1) is None
    assert await store.claim("team-a", "batch_old", "w1", now=1) is None
    assert await store.runnable() == [("team-a", "batch_new")]  # the creator's script may run any moment
    await client.aclose()


async def test_an_expired_job_ends_with_its_error_code(backend: tuple[JobStore, Expire]) -> None:
    store, _ = backend
    await store.create_job(new_job(chunks=1), [b"c0"], b"", max_active=4)
    await store.claim("team-a", "batch_1", "w1", now=200)
    assert await store.finish("team-a", "batch_1", "w1", "failed", now=300, error="too late", code="BATCH_EXPIRED")
    job = await store.get_job("team-a", "batch_1")
    assert job is not None and (job.status, job.failed_at, job.error_code) == ("failed", 300, "BATCH_EXPIRED")
    assert job.public()["errors"]["data"] == [{"code": "BATCH_EXPIRED", "message": "too late"}]


async def _finished_job_and_file(store: JobStore) -> None:
    """A file, and a job that ran (output and errors written) and ended: everything retention must delete."""
    meta = FileMeta(id="file-1", team="team-a", bytes=3, lines=1, created_at=1, expires_at=61, filename="f.jsonl")
    await store.put_file(meta, b"{}\n", ttl_s=60)
    await store.create_job(new_job(chunks=1), [b"c0"], b"bad line\n", max_active=4)
    await store.claim("team-a", "batch_1", "w1", now=200)
    await store.commit("team-a", "batch_1", "w1", 0, b"out", b"err\n", 1, 1)
    await store.finish("team-a", "batch_1", "w1", "completed", now=300)


async def test_memory_store_deletes_jobs_outputs_and_files_after_the_retention() -> None:
    clock = Clock()
    store = MemoryJobStore(lease_s=30, retention_s=3600, clock=clock)
    await _finished_job_and_file(store)
    clock.now += 3599
    assert await store.read("team-a", "batch_1", "output", 0, 5) == [b"out"]
    assert await store.get_file("team-a", "file-1") is None  # its own, shorter retention
    clock.now += 1
    assert await store.get_job("team-a", "batch_1") is None
    assert await store.read("team-a", "batch_1", "output", 0, 5) == []
    assert await store.read("team-a", "batch_1", "errors", 0, 5) == []
    assert await store.list_jobs("team-a", limit=5, after=None) == ([], False)


async def test_redis_store_gives_every_key_of_a_finished_job_and_of_a_file_the_retention(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await _finished_job_and_file(RedisJobStore(client, lease_s=30, retention_s=3600))
    job, file = batch_key("team-a", "job", "batch_1"), batch_key("team-a", "file", "file-1")
    ttls = {k.decode(): await client.ttl(k) for k in await client.keys(batch_key("team-a", "*"))}
    # Redis deletes each key when its TTL runs out; only the team's small index and counter have none.
    assert {k for k, ttl in ttls.items() if ttl == -1} == {batch_key("team-a", "jobs"), batch_key("team-a", "seq")}
    kept = {k: ttl for k, ttl in ttls.items() if ttl != -1}
    assert set(kept) == {job, job + ":output", job + ":errors", file, file + ":content"}
    assert all(3590 <= kept[k] <= 3600 for k in (job, job + ":output", job + ":errors"))
    assert all(50 <= kept[k] <= 60 for k in (file, file + ":content"))
    await client.aclose()
