"""Helpers of the reliability suite: a bounded load runner, a resource snapshot (asyncio tasks, file
descriptors by kind and TCP peer) and the per-fault tally printed at the end of the session."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

# Every fault's tally, in the order the tests ran; conftest prints it in the terminal summary.
REPORT: list[Tally] = []


@dataclass
class Tally:
    """Requests sent during one fault, how many succeeded, and the failures by `status code`."""

    fault: str
    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        failures = ", ".join(f"{n}× {what}" for what, n in sorted(self.failed.items())) or "-"
        failed = sum(self.failed.values())
        return f"{self.fault:<48} sent {self.sent:>5}  ok {self.ok:>5}  failed {failed:>5}  {failures}"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes

    def json(self) -> Any:
        return orjson.loads(self.raw)

    @property
    def what(self) -> str:
        """`status code` of an error answer (the status alone for a success)."""
        if 200 <= self.status < 300:
            return str(self.status)
        try:
            code = self.json().get("code")
        except (orjson.JSONDecodeError, AttributeError):
            code = "<not JSON>"
        return f"{self.status} {code}"


def record(fault: str, answers: list[Answer]) -> Tally:
    """Adds the answers of one fault phase to the session report (several phases may share a name)."""
    tally = next((t for t in REPORT if t.fault == fault), None)
    if tally is None:
        tally = Tally(fault)
        REPORT.append(tally)
    for a in answers:
        tally.sent += 1
        if 200 <= a.status < 300:
            tally.ok += 1
        else:
            tally.failed[a.what] += 1
    return tally


def tally(fault: str, *, sent: int, ok: int, failed: dict[str, int]) -> None:
    """Adds requests that got no HTTP answer to count (a client that hung up) to the session report."""
    record(fault, [])
    row = next(t for t in REPORT if t.fault == fault)
    row.sent += sent
    row.ok += ok
    row.failed.update(failed)


class Hung(AssertionError):
    """A request outlived the generous outer bound: it hung past its deadline."""


async def send(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str, *, outer_timeout_s: float
) -> Answer:
    """One POST; the outer bound is generous (deadline + margin): it catches hangs, it does not time speed."""

    async def go() -> Answer:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.read())

    try:
        return await asyncio.wait_for(go(), outer_timeout_s)
    except TimeoutError:
        raise Hung(f"no answer within {outer_timeout_s}s for {body.get('input')!r:.80}") from None


async def fire(
    url: str,
    bodies: list[dict[str, Any]],
    key: str,
    *,
    outer_timeout_s: float,
    concurrency: int = 32,
    halfway: asyncio.Event | None = None,
) -> list[Answer]:
    """Sends every body (at most `concurrency` at once) over a fresh session that is closed afterwards,
    so the client's own connections never count as the gateway's. `halfway` is set when half are answered."""
    answered = 0
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: dict[str, Any]) -> Answer:
            nonlocal answered
            async with gate:
                answer = await send(session, url, body, key, outer_timeout_s=outer_timeout_s)
            answered += 1
            if halfway is not None and answered * 2 >= len(bodies):
                halfway.set()
            return answer

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def assert_error_shape(answer: Answer, allowed: dict[int, set[str]]) -> None:
    """An error is one of the documented statuses, with a JSON `{"detail": str, "code": str}` body."""
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer
    body = answer.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body
    assert answer.status in allowed, answer.what
    assert body.get("code") in allowed[answer.status], answer.what
    if answer.status in (429, 503):
        assert int(answer.headers["Retry-After"]) >= 1


def vectors_of(answer: Answer) -> list[np.ndarray]:
    return [np.asarray(d["embedding"], dtype=np.float32) for d in answer.json()["data"]]


# ---- resources -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What this process holds: asyncio tasks (aiohttp's per-connection handlers apart), non-socket fds,
    and TCP sockets by peer name."""

    tasks: int
    handlers: int
    files: int
    sockets: Counter[str]
    names: tuple[str, ...] = ()  # the tasks' coroutines, so a failed check says which task came or went

    def __str__(self) -> str:
        return (f"tasks={self.tasks} handlers={self.handlers} files={self.files} sockets={dict(self.sockets)} "
                f"task names={list(self.names)}")


def _tcp_by_inode() -> dict[str, tuple[int, int]]:
    """socket inode → (local port, remote port), from the kernel's tables of this network namespace."""
    out: dict[str, tuple[int, int]] = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return out


def resources(ports: dict[int, str]) -> Resources:
    """A snapshot; `ports` names the services by port (a socket is counted under the port it touches)."""
    tcp = _tcp_by_inode()
    files = 0
    sockets: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, already closed
            continue
        if not target.startswith("socket:["):
            files += 1
            continue
        local, remote = tcp.get(target[8:-1], (0, 0))
        name = ports.get(local) or ports.get(remote)
        if name is not None:
            # a listening socket has remote port 0: count it apart from connections
            sockets[name + (":listen" if remote == 0 else "")] += 1
        else:
            sockets["other"] += 1
    tasks = [t.get_coro() for t in asyncio.all_tasks()]
    handlers = sum(1 for c in tasks if getattr(c, "__qualname__", "") == "RequestHandler.start")
    names = tuple(sorted(getattr(c, "__qualname__", repr(c)) for c in tasks))
    return Resources(tasks=len(tasks) - handlers, handlers=handlers, files=files, sockets=sockets, names=names)
