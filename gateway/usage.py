"""Durable usage for chargeback: per team, model and UTC day counters in the state store, and their report.

Requests are tallied in process and flushed in one round trip per interval (and on shutdown), so recording costs
a request no round trip at all; a failed flush is retried with the same id, which the store applies once.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, Protocol

import orjson
from redis.exceptions import NoScriptError

from .errors import ValidationFailed
from .keys import USAGE_TEAMS, usage_day_key, usage_writer_key

log = logging.getLogger("gateway.usage")

# (team, model, UTC day as YYYY-MM-DD)
UsageKey = tuple[str, str, str]
Clock = Callable[[], float]
GROUP_DIMENSIONS = ("team", "model", "day")


@dataclass(slots=True)
class Tally:
    """The counters of one team, model and day. Inputs as sent; hits/misses/joined are distinct inputs."""

    requests: int = 0
    inputs: int = 0
    hits: int = 0
    misses: int = 0
    joined: int = 0
    upstream_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    cost_saved_usd: float = 0.0
    # Of upstream_tokens, those the gateway estimated: the upstream (TEI) reported no usage and its /tokenize failed.
    estimated_tokens: int = 0

    def add(self, other: Tally) -> None:
        # Spelt out: this runs once per request, and a getattr/setattr loop costs three times as much.
        self.requests += other.requests
        self.inputs += other.inputs
        self.hits += other.hits
        self.misses += other.misses
        self.joined += other.joined
        self.upstream_tokens += other.upstream_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_usd += other.cost_usd
        self.cost_saved_usd += other.cost_saved_usd
        self.estimated_tokens += other.estimated_tokens

    def as_dict(self) -> dict[str, int | float]:
        out: dict[str, int | float] = dataclasses.asdict(self)
        out["cost_usd"] = round(self.cost_usd, 9)
        out["cost_saved_usd"] = round(self.cost_saved_usd, 9)
        return out


FIELDS = tuple(f.name for f in dataclasses.fields(Tally))
_FLOAT_FIELDS = frozenset({"cost_usd", "cost_saved_usd"})
_KNOWN = frozenset(FIELDS)


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


# ---- stores ------------------------------------------------------------------------------------------------


class UsageStore(Protocol):
    async def add(self, tallies: Mapping[UsageKey, Tally], *, writer: str, seq: int) -> None:
        """Adds tallies. Flush `seq` of `writer` is applied once: a retry with the same number is a no-op."""

    async def read(self, teams: Sequence[str] | None, days: Sequence[str]) -> dict[UsageKey, Tally]:
        """Tallies of `teams` (None: every team) on `days`."""


class MemoryUsageStore:
    """The `memory://` state store: per process, gone on restart."""

    def __init__(self) -> None:
        self._data: dict[UsageKey, Tally] = {}
        self._last: dict[str, int] = {}

    async def add(self, tallies: Mapping[UsageKey, Tally], *, writer: str, seq: int) -> None:
        if seq <= self._last.get(writer, 0):
            return
        self._last[writer] = seq
        for key, tally in tallies.items():
            self._data.setdefault(key, Tally()).add(tally)

    async def read(self, teams: Sequence[str] | None, days: Sequence[str]) -> dict[UsageKey, Tally]:
        wanted_days = set(days)
        wanted_teams = None if teams is None else set(teams)
        return {
            k: dataclasses.replace(v) for k, v in self._data.items()
            if k[2] in wanted_days and (wanted_teams is None or k[0] in wanted_teams)
        }


class RedisUsageStore:
    """One hash per team and day (`keys.usage_day_key`), fields `<model>:<counter>`; one script call per team.

    On one Redis a flush is one pipelined round trip. A cluster refuses scripts in pipelines, so there the
    per-team calls go concurrently, each to its team's node.
    """

    def __init__(self, client: Any, *, retention_s: int, writer_ttl_s: int = 7 * 86400) -> None:
        from redis.asyncio.cluster import RedisCluster

        from .store.redis import read_lua

        self.client = client
        self.retention_s = retention_s
        self.writer_ttl_s = writer_ttl_s
        self.cluster = isinstance(client, RedisCluster)
        self._script = client.register_script(read_lua("usage_add.lua"))

    async def add(self, tallies: Mapping[UsageKey, Tally], *, writer: str, seq: int) -> None:
        calls = self._calls(tallies, writer, seq)
        if self.cluster:
            await asyncio.gather(*(self._script(keys=k, args=a) for k, a in calls))
            await self.client.sadd(USAGE_TEAMS, *{t for t, _, _ in tallies})
            return
        try:
            await self._pipeline(calls, tallies).execute()
        except NoScriptError:
            # A restarted or new Redis: load the script and send it all again (applied teams are skipped by seq).
            await self.client.script_load(self._script.script)
            await self._pipeline(calls, tallies).execute()

    def _pipeline(self, calls: list[tuple[list[str], list[Any]]], tallies: Mapping[UsageKey, Tally]) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        pipe.sadd(USAGE_TEAMS, *{t for t, _, _ in tallies})
        return pipe

    def _calls(
        self, tallies: Mapping[UsageKey, Tally], writer: str, seq: int
    ) -> list[tuple[list[str], list[Any]]]:
        """(keys, args) of one script call per team."""
        by_team: dict[str, dict[str, list[str]]] = {}
        for (team, model, day), tally in tallies.items():
            fields = by_team.setdefault(team, {}).setdefault(usage_day_key(team, day), [])
            fields.extend(_field_args(model, tally))
        calls = []
        for team, days in by_team.items():
            args: list[Any] = [seq, self.writer_ttl_s, self.retention_s]
            for fields in days.values():
                args += [len(fields) // 2, *fields]
            calls.append(([usage_writer_key(team, writer), *days], args))
        return calls

    async def read(self, teams: Sequence[str] | None, days: Sequence[str]) -> dict[UsageKey, Tally]:
        if teams is None:
            teams = sorted(t.decode() for t in await self.client.smembers(USAGE_TEAMS))
        pipe = self.client.pipeline(transaction=False)
        cells = [(team, day) for team in teams for day in days]
        for team, day in cells:
            pipe.hgetall(usage_day_key(team, day))
        out: dict[UsageKey, Tally] = {}
        for (team, day), hash_ in zip(cells, await pipe.execute(), strict=True):
            for raw_field, raw_value in hash_.items():
                model, _, name = raw_field.decode().rpartition(":")
                if name not in _KNOWN:  # a counter a newer replica writes: left for the replicas that know it
                    continue
                tally = out.setdefault((team, model, day), Tally())
                setattr(tally, name, float(raw_value) if name in _FLOAT_FIELDS else int(raw_value))
        return out


def _field_args(model: str, tally: Tally) -> Iterable[str]:
    for name in FIELDS:
        value = getattr(tally, name)
        if value:
            # repr of a float always has '.' or an exponent: the script tells HINCRBYFLOAT from HINCRBY by it.
            yield f"{model}:{name}"
            yield repr(float(value)) if name in _FLOAT_FIELDS else str(int(value))


# ---- the recorder ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Flush:
    seq: int
    tallies: dict[UsageKey, Tally]


class UsageRecorder:
    """Tallies requests in process; `start` flushes them every interval, `close` flushes what is left."""

    def __init__(
        self,
        store: UsageStore,
        *,
        flush_interval_s: float = 1.0,
        clock: Clock = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.on_error = on_error
        self.writer = uuid.uuid4().hex  # this process's flushes are numbered under this id
        self._seq = 0
        self._pending: dict[UsageKey, Tally] = {}
        self._inflight: _Flush | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._day = ""
        self._day_start = -math.inf

    def record(self, team: str, model: str, tally: Tally) -> None:
        """Adds one request's counters (the recorder keeps `tally`; pass a fresh one)."""
        key = (team, model, self._today())
        current = self._pending.get(key)
        if current is None:
            self._pending[key] = tally
        else:
            current.add(tally)

    def count(
        self, team: str, model: str, inputs: int, hits: int, misses: int, joined: int, upstream_tokens: int,
        cached_tokens: int, cost_usd: float, cost_saved_usd: float, estimated_tokens: int = 0,
    ) -> None:
        """`record` of one request, added in place: no Tally per request once the day's key exists."""
        key = (team, model, self._today())
        t = self._pending.get(key)
        if t is None:
            self._pending[key] = Tally(1, inputs, hits, misses, joined, upstream_tokens, cached_tokens, cost_usd,
                                       cost_saved_usd, estimated_tokens)
            return
        t.requests += 1
        t.inputs += inputs
        t.hits += hits
        t.misses += misses
        t.joined += joined
        t.upstream_tokens += upstream_tokens
        t.cached_tokens += cached_tokens
        t.cost_usd += cost_usd
        t.cost_saved_usd += cost_saved_usd
        t.estimated_tokens += estimated_tokens

    def _today(self) -> str:
        now = self.clock()
        if not self._day_start <= now < self._day_start + 86400:
            self._day = utc_day(now)
            self._day_start = now - now % 86400  # UTC days are 86400 s long in Unix time
        return self._day

    @property
    def pending(self) -> bool:
        return bool(self._pending) or self._inflight is not None

    async def flush(self) -> bool:
        """Writes everything tallied so far; False (and kept for the next try) when the store fails."""
        async with self._lock:
            while self.pending:
                if self._inflight is None:
                    self._seq += 1
                    self._inflight = _Flush(self._seq, self._pending)
                    self._pending = {}
                try:
                    await self.store.add(self._inflight.tallies, writer=self.writer, seq=self._inflight.seq)
                except Exception:
                    log.warning("usage flush failed; kept for the next one", exc_info=True)
                    if self.on_error is not None:
                        self.on_error("usage_flush")
                    return False
                self._inflight = None
            return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def close(self) -> None:
        """Stops the periodic flush and writes the rest; what cannot be written is logged, not silently lost."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not await self.flush():
            lost = [_row_of(k, t) for k, t in self._unwritten()]
            log.error("usage not written at shutdown: %s", orjson.dumps(lost).decode())

    def _unwritten(self) -> list[tuple[UsageKey, Tally]]:
        items = list(self._inflight.tallies.items()) if self._inflight else []
        return items + list(self._pending.items())


# ---- the report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date
    group_by: tuple[str, ...] = GROUP_DIMENSIONS
    format: Literal["json", "csv"] = "json"
    teams: tuple[str, ...] | None = None  # None: every team the caller may see

    def days(self) -> list[str]:
        return [(self.start + timedelta(days=i)).isoformat() for i in range((self.end - self.start).days + 1)]


_PARAMS = frozenset({"start", "end", "group_by", "format", "team"})


def parse_query(params: Mapping[str, str], *, today: date, max_days: int) -> UsageQuery:
    """`GET /v1/usage` parameters; every error is a 422 naming the parameter."""
    for name in params:
        if name not in _PARAMS:
            raise ValidationFailed(name, f"unknown parameter (known: {', '.join(sorted(_PARAMS))})")
    end = _date(params, "end", today)
    start = _date(params, "start", end.replace(day=1))
    if start > end:
        raise ValidationFailed("start", f"must not be after end ({end.isoformat()})")
    if (end - start).days + 1 > max_days:
        raise ValidationFailed("end", f"the range may span at most {max_days} days")
    group_by = _names(params.get("group_by", ",".join(GROUP_DIMENSIONS)))
    for name in group_by:
        if name not in GROUP_DIMENSIONS:
            raise ValidationFailed("group_by", f"unknown dimension {name!r} (team, model, day)")
    fmt = params.get("format", "json")
    if fmt not in ("json", "csv"):
        raise ValidationFailed("format", "must be json or csv")
    teams = _names(params["team"]) if "team" in params else None
    if teams is not None and not teams:
        raise ValidationFailed("team", "must name at least one team")
    return UsageQuery(start, end, tuple(dict.fromkeys(group_by)), fmt, teams)  # type: ignore[arg-type]


def _date(params: Mapping[str, str], name: str, default: date) -> date:
    if name not in params:
        return default
    try:
        if _DAY.fullmatch(params[name]):
            return date.fromisoformat(params[name])
    except ValueError:
        pass
    raise ValidationFailed(name, "expected a date as YYYY-MM-DD")


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(slots=True)
class UsageReport:
    query: UsageQuery
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: Tally = field(default_factory=Tally)
    # Spend vs budget this UTC month per visible team with a budget (gateway/budget.py `budget_rows`).
    budgets: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> bytes:
        q = self.query
        return orjson.dumps({
            "object": "usage", "start": q.start.isoformat(), "end": q.end.isoformat(),
            "group_by": list(q.group_by), "data": self.rows, "total": self.total.as_dict(),
            "budgets": self.budgets,
        })

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        columns = [*self.query.group_by, *FIELDS]
        writer.writerow(columns)
        for row in self.rows:
            writer.writerow([row[c] for c in columns])
        return out.getvalue()


def build_report(query: UsageQuery, tallies: Mapping[UsageKey, Tally]) -> UsageReport:
    """Sums tallies over the dimensions not in `group_by`; rows sorted by the grouped dimensions."""
    index = [GROUP_DIMENSIONS.index(d) for d in query.group_by]
    groups: dict[tuple[str, ...], Tally] = {}
    report = UsageReport(query)
    for key, tally in tallies.items():
        groups.setdefault(tuple(key[i] for i in index), Tally()).add(tally)
        report.total.add(tally)
    for dims in sorted(groups):
        report.rows.append({**dict(zip(query.group_by, dims, strict=True)), **groups[dims].as_dict()})
    return report


def _row_of(key: UsageKey, tally: Tally) -> dict[str, Any]:
    return {**dict(zip(GROUP_DIMENSIONS, key, strict=True)), **tally.as_dict()}
