"""The coalescer: batching, single-flight, token attribution, failure isolation, cancellation, backpressure,
fair share across teams and priority, all counted on the simulated upstream.

Most tests hold the upstream with a `Gate` (the simulator's sleep waits for it), so "the upstream is busy"
and "every caller has queued" are events the test waits for, never durations.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway import config as cfg
from gateway.app import create_app
from gateway.auth import hash_key
from gateway.cache import item_keys, key_prefix
from gateway.coalescer import Coalescer, _blamed_input
from gateway.errors import UpstreamTimeout
from gateway.protocol import parse_embedding_request
from gateway.sim import Fault, SimConfig, Simulator

from .conftest import TEAM_A_KEY, TEAM_B_KEY, Gateway, auth, base_config, sim_of, until

MODEL = "jina-embeddings-v3"
TEAM_C_KEY = "eg-test-team-c"
GUARD_S = 10  # a hung test fails after this instead of hanging CI; never an assertion on speed


class Count:
    """A counter a test can wait on: `await count.reach(n)`."""

    def __init__(self) -> None:
        self.n = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []

    def add(self, k: int = 1) -> None:
        self.n += k
        for target, event in self._waiters:
            if self.n >= target:
                event.set()

    async def reach(self, target: int) -> None:
        if self.n >= target:
            return
        event = asyncio.Event()
        self._waiters.append((target, event))
        await asyncio.wait_for(event.wait(), GUARD_S)


class Gate:
    """The simulator's sleep: every upstream answer waits for a permit (`release`) or for `open`."""

    def __init__(self) -> None:
        self.parked = Count()  # upstream calls that reached the gate
        self._permits = asyncio.Semaphore(0)
        self._open = False

    async def sleep(self, _delay: float) -> None:
        self.parked.add()
        if not self._open:
            await self._permits.acquire()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def open(self) -> None:
        self._open = True
        self.release(self.parked.n)


class Probe:
    """Counts, on the app's coalescer, the submits that have queued or joined and the callers cancelled."""

    def __init__(self, coalescer: Coalescer) -> None:
        self.coalescer = coalescer
        self.registered = Count()
        self.units = Count()
        self.cancelled = Count()
        register, submit, submit_unit = coalescer._register, coalescer.submit, coalescer.submit_unit

        def counted_register(*args: Any, **kwargs: Any) -> Any:
            out = register(*args, **kwargs)
            self.registered.add()
            return out

        async def watched_submit(*args: Any, **kwargs: Any) -> Any:
            try:
                return await submit(*args, **kwargs)
            except asyncio.CancelledError:
                self.cancelled.add()
                raise

        async def counted_unit(*args: Any, **kwargs: Any) -> Any:
            self.units.add()  # the unit's lookup runs in this same step, before the test resumes
            return await submit_unit(*args, **kwargs)

        coalescer._register = counted_register  # type: ignore[method-assign]
        coalescer.submit = watched_submit  # type: ignore[method-assign]
        coalescer.submit_unit = counted_unit  # type: ignore[method-assign]


@dataclass
class Rig:
    client: TestClient
    sim: Simulator
    gate: Gate
    probe: Probe

    @property
    def coalescer(self) -> Coalescer:
        return self.client.app[K.COALESCER]


Make = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(aiohttp_client: Any) -> AsyncIterator[Make]:
    """`await rig(sim=SimConfig(...), simulator_cls=..., **config_overrides)` → a gateway on a gated sim."""
    gates: list[Gate] = []

    async def make(sim: SimConfig | None = None, simulator_cls: type[Simulator] = Simulator, **overrides: Any) -> Rig:
        gate = Gate()
        gates.append(gate)
        simulator = simulator_cls(sim or SimConfig(latency_base_ms=1), sleep=gate.sleep)
        config = cfg.build(cfg.Config, base_config(**overrides), "")
        client: TestClient = await aiohttp_client(create_app(config, simulator=simulator))
        return Rig(client, simulator, gate, Probe(client.app[K.COALESCER]))

    yield make
    for gate in gates:  # before the apps close: their coalescers wait for calls in flight
        gate.open()


@dataclass
class Reply:
    status: int
    headers: Any
    body: Any

    def header(self, name: str) -> int:
        return int(self.headers[name])


async def post(client: TestClient, body: dict[str, Any], key: str = TEAM_A_KEY) -> Reply:
    resp = await client.post("/v1/embeddings", data=orjson.dumps(body), headers=auth(key))
    return Reply(resp.status, resp.headers, orjson.loads(await resp.read()))


def ask(client: TestClient, inputs: Sequence[Any], key: str = TEAM_A_KEY, **extra: Any) -> asyncio.Task[Reply]:
    body = {"model": MODEL, "input": list(inputs), "embedding_type": "base64", **extra}
    return asyncio.ensure_future(post(client, body, key))


def text(tag: str, i: int) -> str:
    return f"{tag} {i:05d}: a sentence about coalescing"  # equal lengths, so equal token estimates


def vectors(reply: Reply) -> list[np.ndarray]:
    assert [d["index"] for d in reply.body["data"]] == list(range(len(reply.body["data"])))
    return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in reply.body["data"]]


def alone(sim: Simulator, item: Any, **params: Any) -> np.ndarray:
    """What the upstream answers for this input sent by itself."""
    vecs, _ = sim.embed({"model": MODEL, "input": [item], **params})
    return vecs[0]


def call_tokens(sim: Simulator, call: int) -> int:
    return sum(sim.token_count(x) for x in sim.requests[call]["input"])


def count_cache_writes(client: TestClient) -> list[int]:
    """Keys written to the cache, one number per write."""
    cache = client.app[K.CACHE]
    writes: list[int] = []
    put_many = cache.put_many

    async def counted(items: Sequence[tuple[bytes, Any]], *, promote: bool = True, kept: bool = False) -> None:
        writes.append(len(items))
        await put_many(items, promote=promote, kept=kept)

    cache.put_many = counted  # type: ignore[method-assign]
    return writes


# ---- batching ------------------------------------------------------------------------------------------


async def test_200_concurrent_single_inputs_take_a_handful_of_calls(gateway: Gateway) -> None:
    """The default config, a 50 ms upstream: 200 callers at once cost at most 10 upstream calls."""
    client = await gateway(sim=SimConfig(latency_base_ms=50))
    sim = sim_of(client)
    inputs = [text("query", i) for i in range(200)]
    replies = await asyncio.gather(*(ask(client, [x]) for x in inputs))
    assert [r.status for r in replies] == [200] * 200
    assert sim.calls <= 10, [len(r["input"]) for r in sim.requests]
    assert sorted(x for r in sim.requests for x in r["input"]) == sorted(inputs)
    for x, reply in zip(inputs, replies, strict=True):
        (vec,) = vectors(reply)
        assert np.array_equal(vec, alone(sim, x))
    assert sum(r.header("X-Upstream-Tokens") for r in replies) == sim.tokens
    assert client.app[K.COALESCER].idle


async def test_idle_group_sends_at_once_and_a_busy_one_batches(rig: Make) -> None:
    r = await rig(upstream={"limits": {"max_concurrency": 1}})
    first = ask(r.client, ["first"])
    await r.gate.parked.reach(1)  # sent with nothing else: an idle group does not wait
    rest = [ask(r.client, [text("next", i)]) for i in range(5)]
    await r.probe.registered.reach(6)
    r.gate.open()
    await asyncio.gather(first, *rest)
    assert [len(q["input"]) for q in r.sim.requests] == [1, 5]


async def test_lone_inputs_take_free_call_slots_at_once_then_wait_for_one(rig: Make) -> None:
    """3 call slots, a held upstream: 3 inputs arriving one by one leave as 3 calls without waiting for one to
    return; what comes while every slot is busy waits, and leaves merged in the first slot that frees."""
    # quiet_ms 0: no input counts as part of a burst; max_wait_ms beyond the test: no input leaves by waiting.
    r = await rig(upstream={"limits": {"max_concurrency": 3}}, coalesce={"quiet_ms": 0, "max_wait_ms": 60_000})
    lone = []
    for i in range(3):
        lone.append(ask(r.client, [text("lone", i)]))
        await r.gate.parked.reach(i + 1)
    queued = [ask(r.client, [text("queued", i)]) for i in range(5)]
    await r.probe.registered.reach(8)
    assert r.coalescer.queued_inputs == 5
    r.gate.release()  # one call returns: its slot takes the whole queue
    await r.gate.parked.reach(4)
    r.gate.open()
    await asyncio.gather(*lone, *queued)
    assert [len(q["input"]) for q in r.sim.requests] == [1, 1, 1, 5]


async def test_a_burst_batches_while_its_group_has_a_call_in_flight(rig: Make) -> None:
    """Free call slots do not split a burst: inputs arriving together while a call of their group is in flight
    wait together (here until that call returns: the pause and max_wait_ms are set beyond the test)."""
    r = await rig(coalesce={"quiet_ms": 60_000, "max_wait_ms": 60_000})  # the default 8 slots
    first = ask(r.client, ["first"])
    await r.gate.parked.reach(1)
    burst = [ask(r.client, [text("burst", i)]) for i in range(5)]
    await r.probe.registered.reach(6)
    assert r.coalescer.queued_inputs == 5
    r.gate.open()
    await asyncio.gather(first, *burst)
    assert [len(q["input"]) for q in r.sim.requests] == [1, 5]


async def test_a_burst_leaves_once_it_pauses_without_waiting_for_the_call_in_flight(rig: Make) -> None:
    r = await rig(coalesce={"quiet_ms": 1, "max_wait_ms": 60_000})
    first = ask(r.client, ["first"])
    await r.gate.parked.reach(1)
    burst = [ask(r.client, [text("burst", i)]) for i in range(5)]
    while sum(len(q["input"]) for q in r.sim.requests) < 6:  # every call so far is held at the gate
        await r.gate.parked.reach(len(r.sim.requests) + 1)
    assert r.sim.ok_calls == 0 and 2 <= r.sim.calls <= 6  # the first call has not returned
    r.gate.open()
    assert [x.status for x in await asyncio.gather(first, *burst)] == [200] * 6


async def test_same_input_from_50_callers_goes_upstream_once(rig: Make) -> None:
    r = await rig()
    writes = count_cache_writes(r.client)
    tasks = [ask(r.client, ["the same question"]) for _ in range(50)]
    await r.probe.registered.reach(50)
    r.gate.open()
    replies = await asyncio.gather(*tasks)
    assert [x.status for x in replies] == [200] * 50
    assert r.sim.calls == 1 and r.sim.inputs == 1
    assert sorted(x.header("X-Cache-Joined") for x in replies) == [0] + [1] * 49
    assert sum(x.header("X-Cache-Misses") for x in replies) == 1
    assert sum(x.header("X-Upstream-Tokens") for x in replies) == r.sim.tokens
    assert writes == [1]
    want = alone(r.sim, "the same question")
    assert all(np.array_equal(vectors(x)[0], want) for x in replies)
    assert r.coalescer.joins == 49


@pytest.mark.parametrize("params", [{"late_chunking": True}, {"return_multivector": True}])
async def test_unit_requests_are_never_merged(rig: Make, params: dict[str, Any]) -> None:
    r = await rig()
    u1 = ask(r.client, ["alpha", "beta"], **params)
    await r.gate.parked.reach(1)
    u2 = ask(r.client, ["gamma"], **params)
    await r.gate.parked.reach(2)
    plain = ask(r.client, ["alpha"])
    await r.gate.parked.reach(3)
    again = ask(r.client, ["alpha", "beta"], **params)  # the same unit: joins the first one's flight
    await r.probe.units.reach(3)
    r.gate.open()
    replies = await asyncio.gather(u1, u2, plain, again)
    assert [x.status for x in replies] == [200] * 4
    assert sorted((q["input"], bool(q.get(next(iter(params))))) for q in r.sim.requests) == [
        (["alpha"], False), (["alpha", "beta"], True), (["gamma"], True)
    ]
    assert replies[3].header("X-Cache-Joined") == 2 and replies[3].body == replies[0].body


async def test_a_unit_call_holds_a_call_slot_so_batches_keep_growing(rig: Make) -> None:
    """One call slot, held by a unit (late chunking) in flight: inputs arriving meanwhile wait in the coalescer
    and leave as one batch when the unit returns, instead of one leaving at once to queue at the upstream client
    and the rest following in a second call."""
    r = await rig(upstream={"limits": {"max_concurrency": 1}})
    unit = ask(r.client, ["alpha", "beta"], late_chunking=True)
    await r.gate.parked.reach(1)
    plain = [ask(r.client, [text("plain", i)]) for i in range(3)]
    await r.probe.registered.reach(3)
    assert r.coalescer.queued_inputs == 3
    r.gate.open()
    replies = await asyncio.gather(unit, *plain)
    assert [x.status for x in replies] == [200] * 4
    assert [q["input"] for q in r.sim.requests] == [["alpha", "beta"], [text("plain", i) for i in range(3)]]
    assert r.coalescer.idle and r.coalescer._slots == 1


# ---- token attribution ---------------------------------------------------------------------------------


async def test_tokens_of_every_call_add_up_over_its_callers(rig: Make) -> None:
    """Waves of requests, one upstream call per wave (the gate lets calls finish one at a time): each call's
    tokens equal the sum of its wave's X-Upstream-Tokens; overlaps within a wave join, repeats of earlier
    waves join the call in flight or hit the cache, and every request's usage is its inputs' stored shares."""
    r = await rig(upstream={"limits": {"max_concurrency": 1}})
    rng = random.Random(7)
    pool = [f"{'word ' * rng.randint(1, 40)}#{i}" for i in range(60)]
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    waves: list[list[tuple[list[str], asyncio.Task[Reply]]]] = []
    registered = 1
    for w in range(4):
        # Wave 0 is disjoint (usage == X-Upstream-Tokens); later waves mix new, repeated and old inputs.
        fresh = pool[w * 15 : w * 15 + 15]
        wave = []
        for i in range(10):
            inputs = fresh[i : i + 1] if w == 0 else rng.sample(fresh, 2) + rng.sample(pool[: w * 15], 2)
            inputs += inputs[:1] if w and i % 3 == 0 else []  # a repeat inside the request
            wave.append((inputs, ask(r.client, inputs)))
        registered += 10
        waves.append(wave)
        await r.probe.registered.reach(registered)  # each request has a new input, so each one queues
        r.gate.release()  # the previous call finishes; this wave leaves as the next call
        await r.gate.parked.reach(w + 2)
    r.gate.open()
    await opener
    replies = [[await t for _, t in wave] for wave in waves]
    assert all(x.status == 200 for wave in replies for x in wave)
    assert r.sim.calls == 1 + len(waves)
    for call, wave in enumerate(replies, start=1):
        assert sum(x.header("X-Upstream-Tokens") for x in wave) == call_tokens(r.sim, call)
    assert all(x.body["usage"]["total_tokens"] == x.header("X-Upstream-Tokens") for x in replies[0])
    total = (await opener).header("X-Upstream-Tokens") + sum(x.header("X-Upstream-Tokens") for w in replies for x in w)
    assert total == r.sim.tokens
    await _usage_is_stored_shares(r, [(inputs, x) for wave, rs in zip(waves, replies, strict=True)
                                      for (inputs, _), x in zip(wave, rs, strict=True)])


async def _usage_is_stored_shares(r: Rig, served: list[tuple[list[str], Reply]]) -> None:
    cache = r.client.app[K.CACHE]
    for inputs, reply in served:
        request = parse_embedding_request({"model": MODEL, "input": inputs}, max_inputs=100)
        found = await cache.get_many(item_keys(key_prefix(request, None), request.items))
        assert reply.body["usage"]["total_tokens"] == sum(h.entry.tokens for h in found if h is not None)
        assert all(h is not None for h in found)


# ---- failure isolation ---------------------------------------------------------------------------------


async def test_an_invalid_input_fails_only_its_caller(rig: Make) -> None:
    r = await rig(sim=SimConfig(latency_base_ms=1, max_tokens_per_input=20),
                  upstream={"limits": {"max_concurrency": 1}})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    too_long = "far too long " * 20
    bad = ask(r.client, ["also asked by others", too_long, "the culprit's own"], key=TEAM_B_KEY)
    await r.probe.registered.reach(2)
    good = [ask(r.client, [text("good", i), "also asked by others"]) for i in range(4)]
    await r.probe.registered.reach(6)
    r.gate.open()
    replies = await asyncio.gather(opener, *good)
    rejected = await bad
    assert [x.status for x in replies] == [200] * 5
    for i, reply in enumerate(replies[1:]):
        assert np.array_equal(vectors(reply)[0], alone(r.sim, text("good", i)))
        assert np.array_equal(vectors(reply)[1], alone(r.sim, "also asked by others"))
    assert rejected.status == 422
    want = {"detail": "input[1]: 62 tokens exceed the limit of 20; set truncate to cut it", "code": "VALIDATION_ERROR"}
    openai = {"message": want["detail"], "type": "invalid_request_error", "code": "VALIDATION_ERROR", "param": None}
    assert rejected.body == {**want, "errors": [{"field": "input[1]", "message": want["detail"]}], "error": openai}
    # The merged call is refused; it goes again without the culprit's inputs, except the one others wait for.
    assert [len(q["input"]) for q in r.sim.requests] == [1, 7, 5] and r.sim.ok_calls == 2
    assert set(r.sim.requests[2]["input"]) == {text("good", i) for i in range(4)} | {"also asked by others"}
    # The culprit failed, so the first caller still waiting pays for the input they shared.
    assert sum(x.header("X-Upstream-Tokens") for x in replies) == r.sim.tokens


class VagueSim(Simulator):
    """An upstream whose 4xx does not say which input it refuses (as some OpenAI-compatible servers)."""

    async def _answer(self, request: web.Request, body: Any, *, short: bool = False) -> web.Response:
        resp = await super()._answer(request, body, short=short)
        if resp.status == 422:
            return web.json_response({"detail": "an input is too long", "code": "BAD_INPUT"}, status=400)
        return resp


async def test_a_vague_rejection_is_bisected_by_caller(rig: Make) -> None:
    r = await rig(sim=SimConfig(latency_base_ms=1, max_tokens_per_input=20), simulator_cls=VagueSim,
                  upstream={"limits": {"max_concurrency": 1}})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    callers = [ask(r.client, ["far too long " * 20 if i == 2 else text("good", i)]) for i in range(4)]
    await r.probe.registered.reach(5)
    r.gate.open()
    replies = await asyncio.gather(opener, *callers)
    assert [x.status for x in replies] == [200, 200, 200, 400, 200]
    assert replies[3].body == {"detail": "an input is too long", "code": "BAD_INPUT", "error": {
        "message": "an input is too long", "type": "invalid_request_error", "code": "BAD_INPUT", "param": None}}
    # merged (4 callers) → halves of 2 → the refused half as 2 single callers: 1 + 1 + 2 + 2 calls
    assert r.sim.calls == 6 and r.sim.ok_calls == 3


async def test_a_request_level_rejection_fails_the_batch_without_resending(rig: Make) -> None:
    r = await rig(upstream={"limits": {"max_concurrency": 1}})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    callers = [ask(r.client, [text("wide", i)], dimensions=5000) for i in range(3)]
    await r.probe.registered.reach(4)
    r.gate.open()
    replies = await asyncio.gather(*callers)
    assert (await opener).status == 200
    assert [x.status for x in replies] == [422] * 3
    assert all(x.body["errors"][0]["field"] == "dimensions" for x in replies)
    assert r.sim.calls == 2


def test_blamed_input_reads_jina_and_pydantic_bodies() -> None:
    assert _blamed_input({"errors": [{"field": "input[3]", "message": "x"}]}, 5) == 3
    assert _blamed_input({"detail": [{"loc": ["body", "input", 1], "msg": "x"}]}, 5) == 1
    assert _blamed_input({"errors": [{"field": "input[9]"}]}, 5) is None  # not an index of this call
    assert _blamed_input({"errors": [{"field": "dimensions"}]}, 5) == "all"
    assert _blamed_input({"errors": [{"field": "input"}]}, 5) is None
    assert _blamed_input({"errors": [{"field": "input_type"}]}, 5) == "all"
    assert _blamed_input({"detail": "too long"}, 5) is None


async def test_a_5xx_after_retries_fails_only_that_batch(rig: Make) -> None:
    r = await rig(upstream={"max_retries": 2, "limits": {"max_concurrency": 1}}, coalesce={"max_batch_inputs": 2})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    r.sim.inject(*[Fault(kind="status", status=503) for _ in range(3)])  # every attempt of the next call
    queued = []
    for i, name in enumerate(["b", "c", "d"]):  # one at a time, so the queue order is known
        queued.append(ask(r.client, [name]))
        await r.probe.registered.reach(2 + i)
    r.gate.open()
    replies = await asyncio.gather(opener, *queued)
    assert [x.status for x in replies] == [200, 502, 502, 200]
    assert replies[1].body["code"] == replies[2].body["code"] == "UPSTREAM_ERROR"
    assert r.sim.calls == 1 + 3 + 1
    assert [q["input"] for q in r.sim.requests] == [["opener"], ["b", "c"], ["b", "c"], ["b", "c"], ["d"]]
    # nothing of the failed batch was cached: asking again goes upstream
    again = await post(r.client, {"model": MODEL, "input": ["b"]})
    assert again.status == 200 and again.header("X-Cache-Misses") == 1


# ---- cancellation --------------------------------------------------------------------------------------


async def test_a_disconnecting_client_leaves_the_others_served_and_the_input_cached(rig: Make) -> None:
    r = await rig()
    leaver = ask(r.client, ["shared input", "leaver's own"])
    await r.gate.parked.reach(1)
    stayer = ask(r.client, ["shared input"])
    await r.probe.registered.reach(2)
    leaver.cancel()  # the client goes away: aiohttp cancels its handler on the server
    await r.probe.cancelled.reach(1)
    r.gate.open()
    reply = await stayer
    assert reply.status == 200 and np.array_equal(vectors(reply)[0], alone(r.sim, "shared input"))
    # It joined the leaver's flight; with the leaver gone, it is the caller that pays for that input.
    assert reply.header("X-Cache-Joined") == 0 and reply.header("X-Cache-Misses") == 1
    assert reply.header("X-Upstream-Tokens") == reply.body["usage"]["total_tokens"] > 0
    await r.coalescer.close()  # waits for the flight: its result is written to the cache
    assert r.coalescer.idle and r.coalescer.pending_inputs == 0
    calls = r.sim.calls
    after = await post(r.client, {"model": MODEL, "input": ["shared input", "leaver's own"]})
    assert after.status == 200 and after.header("X-Cache-Hits") == 2
    assert r.sim.calls == calls == 1
    with pytest.raises(asyncio.CancelledError):
        await leaver


async def test_a_caller_past_its_deadline_gets_504_and_the_flight_still_lands(rig: Make) -> None:
    r = await rig()
    patient = ask(r.client, ["slow one"])
    await r.gate.parked.reach(1)
    service = r.client.app[K.SERVICE]
    team = r.client.app[K.LIVE].config.teams[0]
    request = parse_embedding_request({"model": MODEL, "input": ["slow one"]}, max_inputs=10)
    with pytest.raises(UpstreamTimeout):
        await service.embed(team, request, deadline=time.monotonic())  # already past: no waiting
    r.gate.open()
    assert (await patient).status == 200
    await r.coalescer.close()
    assert r.coalescer.idle
    assert (await post(r.client, {"model": MODEL, "input": ["slow one"]})).header("X-Cache-Hits") == 1
    assert r.sim.calls == 1


async def test_queued_inputs_whose_callers_all_left_are_not_sent(rig: Make) -> None:
    r = await rig(upstream={"limits": {"max_concurrency": 1}})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    leaver = ask(r.client, ["nobody waits for this any more", "opener"])
    await r.probe.registered.reach(2)
    leaver.cancel()
    await r.probe.cancelled.reach(1)
    r.gate.open()
    assert (await opener).status == 200
    await r.coalescer.close()
    assert r.coalescer.idle
    assert [q["input"] for q in r.sim.requests] == [["opener"]]
    with pytest.raises(asyncio.CancelledError):
        await leaver


# ---- backpressure --------------------------------------------------------------------------------------


async def test_a_full_queue_answers_503_and_stays_bounded(rig: Make) -> None:
    r = await rig(coalesce={"max_queue_inputs": 20}, upstream={"limits": {"max_concurrency": 1}})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    # 30 callers of 3 new inputs each, while the upstream is busy: room for (20 - 1) // 3 = 6 of them.
    tasks = [ask(r.client, [text(f"c{i}", j) for j in range(3)]) for i in range(30)]
    in_order = list(asyncio.as_completed(tasks))
    overloaded = [await in_order[i] for i in range(24)]  # the refused ones answer while the gate is shut
    assert [x.status for x in overloaded] == [503] * 24
    assert all(x.headers["Retry-After"] == "1" for x in overloaded)
    assert all(set(x.body) == {"detail", "code", "error"} and x.body["code"] == "OVERLOADED" for x in overloaded)
    assert all(x.body["error"] == {"message": x.body["detail"], "type": "server_error", "code": "OVERLOADED",
                                   "param": None} for x in overloaded)
    assert r.coalescer.pending_inputs == 19 and r.coalescer.peak_inputs == 19
    joiner = ask(r.client, ["opener"])  # only joins an input in flight: admitted, takes no room
    await r.probe.registered.reach(8)
    r.gate.open()
    served = [await t for t in in_order[24:]]
    assert [x.status for x in served] == [200] * 6
    assert (await joiner).header("X-Cache-Joined") == 1
    assert r.sim.inputs == 1 + 18 and r.coalescer.peak_inputs <= 20
    await opener


# ---- fair share and priority ---------------------------------------------------------------------------


def _teams(**weights: float) -> dict[str, Any]:
    keys = {"team-a": TEAM_A_KEY, "team-b": TEAM_B_KEY, "team-c": TEAM_C_KEY}
    return {"teams": [{"name": n, "keys": [hash_key(k)], "weight": weights.get(n, 1.0)} for n, k in keys.items()]}


@pytest.mark.parametrize("scope", ["global", "team"])
async def test_a_flood_does_not_starve_another_teams_single_request(rig: Make, scope: str) -> None:
    """With `scope: team` the teams' inputs are in different groups: the call slot goes to B's group first."""
    r = await rig(upstream={"limits": {"max_concurrency": 1}}, cache={"scope": scope})
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    flood = ask(r.client, [text("flood", i) for i in range(2000)], key=TEAM_A_KEY)
    await r.probe.registered.reach(2)
    single = ask(r.client, ["team b's one question"], key=TEAM_B_KEY)
    await r.probe.registered.reach(3)
    assert r.coalescer.queued_inputs == 2001
    r.gate.open()
    replies = await asyncio.gather(opener, flood, single)
    assert [x.status for x in replies] == [200] * 3
    assert "team b's one question" in r.sim.requests[1]["input"]  # the very next batch, not the 9th
    sizes = [len(q["input"]) for q in r.sim.requests]
    assert sizes == ([1, *[256] * 7, 2001 - 7 * 256] if scope == "global" else [1, 1, *[256] * 7, 2000 - 7 * 256])


async def test_queued_work_is_shared_in_proportion_to_team_weight(rig: Make) -> None:
    r = await rig(upstream={"limits": {"max_concurrency": 1}}, coalesce={"max_batch_inputs": 100},
                  **_teams(**{"team-a": 3.0}))
    opener = ask(r.client, ["opener"], key=TEAM_C_KEY)
    await r.gate.parked.reach(1)
    heavy = ask(r.client, [text("a", i) for i in range(300)], key=TEAM_A_KEY)
    await r.probe.registered.reach(2)
    light = ask(r.client, [text("b", i) for i in range(300)], key=TEAM_B_KEY)
    await r.probe.registered.reach(3)
    r.gate.open()
    await asyncio.gather(opener, heavy, light)
    shares = [(sum(x.startswith("a ") for x in q["input"]), sum(x.startswith("b ") for x in q["input"]))
              for q in r.sim.requests[1:]]
    assert shares == [(75, 25)] * 4 + [(0, 100)] * 2


async def test_batch_priority_only_fills_what_interactive_work_leaves(rig: Make) -> None:
    r = await rig(upstream={"limits": {"max_concurrency": 1}}, coalesce={"max_batch_inputs": 100})
    service = r.client.app[K.SERVICE]
    team = r.client.app[K.LIVE].config.teams[0]
    opener = ask(r.client, ["opener"])
    await r.gate.parked.reach(1)
    job = parse_embedding_request({"model": MODEL, "input": [text("job", i) for i in range(300)]}, max_inputs=300)
    batch = asyncio.ensure_future(service.embed(team, job, deadline=time.monotonic() + GUARD_S, priority="batch"))
    await r.probe.registered.reach(2)
    interactive = ask(r.client, ["an interactive query", text("job", 299)])  # the job's last input, too
    await r.probe.registered.reach(3)
    r.gate.open()
    reply = await interactive
    outcome = await batch
    await opener
    assert reply.status == 200 and reply.header("X-Cache-Joined") == 1
    # The interactive input, and the job's input it waits for, leave in the very next call; the job fills the rest.
    first = r.sim.requests[1]["input"]
    assert first[:2] == ["an interactive query", text("job", 299)] and len(first) == 100
    assert [len(q["input"]) for q in r.sim.requests[1:]] == [100, 100, 100, 1]
    assert outcome.misses == 300 and len(outcome.vectors) == 300


# ---- a lookup that outlives the flight it missed ----------------------------------------------------------


async def test_a_lookup_that_missed_before_a_flights_write_landed_joins_its_answer(
    gateway: Gateway, redis_url: str
) -> None:
    """Request B's store read is sent while A's flight for the same input is out, and answered (a miss) only after
    that flight has written the entry and ended: B joins A's answer instead of sending the input upstream again."""
    client = await gateway(cache={"url": redis_url, "hot_max_bytes": 0}, sim=SimConfig(latency_base_ms=50))
    simulator, coalescer = client.app[K.SIMULATOR], client.app[K.COALESCER]
    store = client.app[K.CACHE].store
    assert store is not None
    read = store.get_many
    reads = 0
    flight_ended = asyncio.Event()

    async def late_second_read(keys: Sequence[bytes]) -> list[bytes | None]:
        nonlocal reads
        reads += 1
        raws = await read(keys)  # sent now, while the flight is out: a miss
        if reads == 2:
            await flight_ended.wait()  # its answer reaches the request only after the flight has ended
        return raws

    store.get_many = late_second_read  # type: ignore[method-assign]
    body = {"model": MODEL, "input": ["raced input"]}
    first = asyncio.ensure_future(client.post("/v1/embeddings", json=body, headers=auth()))
    await until(lambda: coalescer.pending_inputs == 1)  # A's input is in flight
    second = asyncio.ensure_future(client.post("/v1/embeddings", json=body, headers=auth()))
    await until(lambda: reads == 2)
    a = await first
    assert (a.status, a.headers["X-Cache-Misses"]) == (200, "1")
    await until(lambda: coalescer.pending_inputs == 0)  # written, and the flight is over
    flight_ended.set()
    b = await second
    assert (b.status, b.headers["X-Cache-Misses"], b.headers["X-Cache-Joined"]) == (200, "0", "1")
    assert b.headers["X-Upstream-Tokens"] == "0"
    assert await b.read() == await a.read()
    assert simulator.calls == 1


async def test_a_lookup_begun_after_a_flight_ended_does_not_get_its_answer(gateway: Gateway, redis_url: str) -> None:
    """The answers kept for racing lookups are not a cache tier: once the store loses the entry (flushed here), a
    later request is sent upstream again."""
    client = await gateway(cache={"url": redis_url, "hot_max_bytes": 0})
    simulator, coalescer = client.app[K.SIMULATOR], client.app[K.COALESCER]
    body = {"model": MODEL, "input": ["flushed input"]}
    assert (await client.post("/v1/embeddings", json=body, headers=auth())).status == 200
    await until(lambda: coalescer.pending_inputs == 0)
    observer = aioredis.Redis.from_url(redis_url)
    await observer.flushdb()
    await observer.aclose()
    again = await client.post("/v1/embeddings", json=body, headers=auth())
    assert (again.status, again.headers["X-Cache-Misses"], again.headers["X-Cache-Joined"]) == (200, "1", "0")
    assert simulator.calls == 2
