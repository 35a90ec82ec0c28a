"""Teams and keys managed at run time, and the audit log of every change made to them.

Records live in the state store (Redis, or in process for `memory://`); keys are stored as their sha256 digest
(`auth.hash_key`), exactly like config keys. Every replica polls one version counter (`keys.ADMIN_VERSION`) every
`poll_s` and reloads the tables when it moved. A counter rather than pub/sub: a counter cannot lose a message (a
replica that was disconnected, or just started, reads the current version on its next poll), it needs no
dedicated connection per replica, and one GET per replica per half second keeps well inside the 2 s promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from redis.exceptions import WatchError

from . import config as cfg
from .auth import Principal, RuntimeKey, RuntimeKeys, config_key_id, hash_key, new_key
from .errors import GatewayError, NotFound, ValidationFailed
from .keys import ADMIN_AUDIT, ADMIN_KEYS, ADMIN_TEAMS, ADMIN_USED, ADMIN_VERSION

log = logging.getLogger("gateway.admin")

Record = dict[str, Any]
TEAM_FIELDS = ("models", "max_inputs_per_request", "quota", "budget")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no `{}`: team names are Redis hash tags
MAX_AUDIT_PAGE = 1000
ATTEMPTS = 20  # of one admin action racing other changes (optimistic concurrency on the version counter)


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"


class Stale(Exception):
    """Another change was written since the tables a change was decided on (the store's version moved)."""


@dataclass(slots=True)
class Change:
    """One admin action: what it writes, and its audit entry; a store applies it atomically, and only while the
    store is still at `version` (optimistic concurrency: two replicas never both create one team)."""

    version: int
    audit: Record
    teams_put: dict[str, Record] = field(default_factory=dict)
    teams_del: list[str] = field(default_factory=list)
    keys_put: dict[str, Record] = field(default_factory=dict)
    keys_del: list[str] = field(default_factory=list)


class AdminStore(Protocol):
    async def version(self) -> int: ...

    async def load(self) -> tuple[int, dict[str, Record], dict[str, Record]]:
        """(version, team records by name, key records by id), read together."""
        ...

    async def write(self, change: Change) -> None:
        """Applies `change` atomically; raises Stale when the version is no longer `change.version`."""
        ...

    async def audit(self, since_ms: int, limit: int) -> list[Record]: ...

    async def touch(self, used: Mapping[str, int]) -> None:
        """Records when keys were last used (a later time wins)."""
        ...

    async def last_used(self) -> dict[str, int]: ...


class MemoryAdminStore:
    """The store of `state.url: memory://`: one process, nothing survives a restart."""

    def __init__(self) -> None:
        self.teams: dict[str, Record] = {}
        self.keys: dict[str, Record] = {}
        self.entries: list[Record] = []
        self.used: dict[str, int] = {}
        self.counter = 0

    async def version(self) -> int:
        return self.counter

    async def load(self) -> tuple[int, dict[str, Record], dict[str, Record]]:
        return self.counter, dict(self.teams), dict(self.keys)

    async def write(self, change: Change) -> None:
        if change.version != self.counter:
            raise Stale
        self.teams.update(change.teams_put)
        for name in change.teams_del:
            self.teams.pop(name, None)
        self.keys.update(change.keys_put)
        for key_id in change.keys_del:
            self.keys.pop(key_id, None)
        self.entries.append(change.audit)
        self.counter += 1

    async def audit(self, since_ms: int, limit: int) -> list[Record]:
        return [e for e in self.entries if e["at_ms"] >= since_ms][:limit]

    async def touch(self, used: Mapping[str, int]) -> None:
        for key_id, at in used.items():
            self.used[key_id] = max(at, self.used.get(key_id, 0))

    async def last_used(self) -> dict[str, int]:
        return dict(self.used)


class RedisAdminStore:
    """Hashes of JSON records, a version counter and an audit zset under one `{admin}` hash tag, so each change
    is one MULTI (also in a cluster)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def version(self) -> int:
        return int(await self.client.get(ADMIN_VERSION) or 0)

    async def load(self) -> tuple[int, dict[str, Record], dict[str, Record]]:
        pipe = self.client.pipeline(transaction=True)
        pipe.get(ADMIN_VERSION)
        pipe.hgetall(ADMIN_TEAMS)
        pipe.hgetall(ADMIN_KEYS)
        version, teams, keys = await pipe.execute()
        return (int(version or 0), {k.decode(): orjson.loads(v) for k, v in teams.items()},
                {k.decode(): orjson.loads(v) for k, v in keys.items()})

    async def write(self, change: Change) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(ADMIN_VERSION)
            if int(await pipe.get(ADMIN_VERSION) or 0) != change.version:
                raise Stale
            pipe.multi()
            self._queue(pipe, change)
            try:
                await pipe.execute()
            except WatchError:
                raise Stale from None

    @staticmethod
    def _queue(pipe: Any, change: Change) -> None:
        if change.teams_put:
            pipe.hset(ADMIN_TEAMS, mapping={k: orjson.dumps(v) for k, v in change.teams_put.items()})
        if change.teams_del:
            pipe.hdel(ADMIN_TEAMS, *change.teams_del)
        if change.keys_put:
            pipe.hset(ADMIN_KEYS, mapping={k: orjson.dumps(v) for k, v in change.keys_put.items()})
        if change.keys_del:
            pipe.hdel(ADMIN_KEYS, *change.keys_del)
            pipe.zrem(ADMIN_USED, *change.keys_del)
        pipe.zadd(ADMIN_AUDIT, {orjson.dumps(change.audit): change.audit["at_ms"]})
        pipe.incr(ADMIN_VERSION)

    async def audit(self, since_ms: int, limit: int) -> list[Record]:
        raw = await self.client.zrangebyscore(ADMIN_AUDIT, since_ms, "+inf", start=0, num=limit)
        return [orjson.loads(entry) for entry in raw]

    async def touch(self, used: Mapping[str, int]) -> None:
        if used:
            await self.client.zadd(ADMIN_USED, dict(used), gt=True)

    async def last_used(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in await self.client.zrange(ADMIN_USED, 0, -1, withscores=True)}


def open_admin_store(state_redis: Any) -> AdminStore:
    return MemoryAdminStore() if state_redis is None else RedisAdminStore(state_redis)


class Admin:
    """The admin API's logic over a store, and the poller that keeps this replica's `RuntimeKeys` current."""

    def __init__(
        self, store: AdminStore, runtime: RuntimeKeys, config: Callable[[], cfg.Config], *,
        clock: Callable[[], float] = time.time, poll_s: float = 0.5, touch_s: float = 5.0,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.config = config  # the live config's current value (config-file teams are read-only here)
        self.clock = clock
        self.poll_s = poll_s
        self.touch_s = touch_s
        self.version = -1
        self.team_records: dict[str, Record] = {}
        self.key_records: dict[str, Record] = {}
        self.teams: dict[str, cfg.Team] = {}  # API teams, rebuilt only when their record changed
        self._built_for: cfg.Config | None = None  # the config the tables were built against
        self._task: asyncio.Task[None] | None = None

    # ---- keeping the replica current -------------------------------------------------------------------

    async def refresh(self) -> None:
        version, teams, keys = await self.store.load()
        config = self.config()
        taken = {t.name for t in config.teams}  # a config-file team of the same name wins
        built = {name: self._team_of(record) for name, record in teams.items() if name not in taken}
        table: dict[bytes, RuntimeKey] = {}
        for key_id, record in keys.items():
            team = built.get(record["team"])
            if team is None:
                continue
            digest = bytes.fromhex(record["hash"].removeprefix("sha256:"))
            expires = record.get("expires_at")
            table[digest] = RuntimeKey(digest, Principal(team, key_id=key_id),
                                       None if expires is None else _seconds(expires))
        self.version, self.team_records, self.key_records, self.teams = version, teams, keys, built
        self._built_for = config
        self.runtime.replace(table, built)

    def _team_of(self, record: Record) -> cfg.Team:
        old = self.teams.get(record["name"])
        if old is not None and self.team_records.get(record["name"]) == record:
            return old  # the same object: the quota gate memoises its limits by identity
        return build_team(record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="admin-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._touch()

    async def _run(self) -> None:
        touched, failing = time.monotonic(), False
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                # A reload may have given a config-file team an API team's name: the config file's wins.
                if await self.store.version() != self.version or self.config() is not self._built_for:
                    await self.refresh()
                if time.monotonic() - touched >= self.touch_s:
                    touched = time.monotonic()
                    await self._touch()
            except Exception as exc:  # a state store outage: keep serving the tables we have
                if not failing:
                    log.warning("admin: cannot read teams and keys from the state store (%s); serving the ones "
                                "this replica has until it answers", exc)
                failing = True
            else:
                if failing:
                    log.warning("admin: the state store answers again; teams and keys are current")
                failing = False

    async def _touch(self) -> None:
        used, self.runtime.used = self.runtime.used, {}
        try:
            await self.store.touch({k: round(v * 1000) for k, v in used.items()})
        except Exception as exc:
            log.warning("admin: could not record when keys were last used: %s", exc)

    # ---- teams --------------------------------------------------------------------------------------------

    def list_teams(self) -> list[Record]:
        own = [_config_team_view(t) for t in self.config().teams]
        return own + [self._api_team_view(self.team_records[name]) for name in sorted(self.teams)]

    def get_team(self, name: str) -> Record:
        for team in self.config().teams:
            if team.name == name:
                return _config_team_view(team)
        return self._api_team_view(self._record(name))

    async def create_team(self, who: Principal, body: Record) -> Record:
        return await self._retry(lambda: self._create_team(who, body))

    async def _create_team(self, who: Principal, body: Record) -> Record:
        _only(body, ("name", *TEAM_FIELDS))
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValidationFailed("name", "required: 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                                   "or digit")
        await self.refresh()
        if name in self.team_records or any(t.name == name for t in self.config().teams):
            raise Conflict(f"team {name!r} exists already")
        record = {"name": name, **{f: body[f] for f in TEAM_FIELDS if body.get(f) is not None},
                  "created_at": self._iso()}
        build_team(record)
        await self._write(Change(self.version, self._entry(who, "team.create", name, None, _public(record)),
                                 teams_put={name: record}))
        return self._api_team_view(record)

    async def update_team(self, who: Principal, name: str, body: Record) -> Record:
        return await self._retry(lambda: self._update_team(who, name, body))

    async def _update_team(self, who: Principal, name: str, body: Record) -> Record:
        _only(body, TEAM_FIELDS)
        self._writable(name)
        await self.refresh()
        old = self._record(name)
        new = {**old, **body}
        new = {k: v for k, v in new.items() if v is not None}
        build_team(new)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        before, after = {k: old.get(k) for k in changed}, {k: new.get(k) for k in changed}
        entry = self._entry(who, "team.update", name, before, after)
        await self._write(Change(self.version, entry, teams_put={name: new}))
        return self._api_team_view(new)

    async def delete_team(self, who: Principal, name: str) -> Record:
        return await self._retry(lambda: self._delete_team(who, name))

    async def _delete_team(self, who: Principal, name: str) -> Record:
        self._writable(name)
        await self.refresh()
        record = self._record(name)
        revoked = sorted(k for k, r in self.key_records.items() if r["team"] == name)
        before = {**_public(record), "keys": revoked}
        await self._write(Change(self.version, self._entry(who, "team.delete", name, before, None), teams_del=[name],
                                 keys_del=revoked))
        return {"name": name, "deleted": True, "keys_revoked": revoked}

    def _writable(self, name: str) -> None:
        if any(t.name == name for t in self.config().teams):
            raise Conflict(f"team {name!r} comes from the config file: change it there (read-only over the API)")

    def _record(self, name: str) -> Record:
        record = self.team_records.get(name)
        if record is None:
            raise NotFound(f"no team {name!r}", code="TEAM_NOT_FOUND")
        return record

    def _api_team_view(self, record: Record) -> Record:
        keys = sum(1 for r in self.key_records.values() if r["team"] == record["name"])
        return {**_public(record), "source": "api", "keys": keys}

    # ---- keys ---------------------------------------------------------------------------------------------

    async def create_key(self, who: Principal, team: str, body: Record) -> Record:
        """A new key for an API team: the answer is the only place the key itself ever appears."""
        return await self._retry(lambda: self._create_key(who, team, body))

    async def _create_key(self, who: Principal, team: str, body: Record) -> Record:
        _only(body, ("label", "expires_at"))
        self._writable(team)
        await self.refresh()
        self._record(team)
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise ValidationFailed("label", "a string of at most 200 characters")
        expires_at = _expiry(body.get("expires_at"))
        key, key_id = new_key(), "key_" + secrets.token_hex(8)
        record = {"id": key_id, "team": team, "hash": hash_key(key), "prefix": key[:6], "label": label,
                  "created_at": self._iso(), "expires_at": expires_at}
        await self._write(Change(self.version, self._entry(who, "key.create", key_id, None, _key_view(record)),
                                 keys_put={key_id: record}))
        return {**_key_view(record), "key": key}

    async def list_keys(self, team: str) -> list[Record]:
        if any(t.name == team for t in self.config().teams):
            return []  # config-file keys are hashes in the config file; there is nothing to list about them
        self._record(team)
        used = await self.store.last_used()
        for key_id, at in self.runtime.used.items():
            used[key_id] = max(used.get(key_id, 0), round(at * 1000))
        rows = [r for r in self.key_records.values() if r["team"] == team]
        return [{**_key_view(r), "prefix": r["prefix"], "last_used_at": _iso_ms(used.get(r["id"]))}
                for r in sorted(rows, key=lambda r: r["created_at"])]

    async def revoke_key(self, who: Principal, key_id: str) -> Record:
        return await self._retry(lambda: self._revoke_key(who, key_id))

    async def _revoke_key(self, who: Principal, key_id: str) -> Record:
        await self.refresh()
        record = self.key_records.get(key_id)
        if record is None:
            if key_id.startswith("cfg:"):
                raise Conflict("config-file keys are revoked by removing them from the config file")
            raise NotFound(f"no key {key_id!r}", code="KEY_NOT_FOUND")
        await self._write(Change(self.version, self._entry(who, "key.revoke", key_id, _key_view(record), None),
                                 keys_del=[key_id]))
        return {**_key_view(record), "revoked": True}

    # ---- the audit log ------------------------------------------------------------------------------------

    async def audit(self, since_ms: int, limit: int) -> list[Record]:
        return await self.store.audit(since_ms, limit)

    def _entry(self, who: Principal, action: str, target: str, before: Any, after: Any) -> Record:
        now = self.clock()
        return {"id": secrets.token_hex(8), "at": _iso_ms(round(now * 1000)), "at_ms": round(now * 1000),
                "who": who.key_id, "action": action, "target": target, "before": before, "after": after}

    async def _retry(self, action: Callable[[], Awaitable[Record]]) -> Record:
        """Runs an admin action, again on fresh tables when another change got in first (each run re-reads and
        re-checks everything it decided on)."""
        for attempt in range(ATTEMPTS):
            with contextlib.suppress(Stale):
                return await action()
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # racers spread out
        raise Conflict("the teams and keys kept changing under this request; retry it")

    async def _write(self, change: Change) -> None:
        await self.store.write(change)
        await self.refresh()  # this replica sees its own change at once; the others on their next poll
        log.info("admin: %s %s by %s", change.audit["action"], change.audit["target"], change.audit["who"])

    def _iso(self) -> str:
        return _iso_ms(round(self.clock() * 1000)) or ""


def build_team(record: Record) -> cfg.Team:
    """The `cfg.Team` of an API record, validated like a config-file team (ValidationFailed names the field)."""
    data = {k: _whole_numbers(record[k]) for k in ("name", *TEAM_FIELDS) if record.get(k) is not None}
    try:
        team: cfg.Team = cfg.build(cfg.Team, data, "")
    except cfg.ConfigError as exc:
        where, _, message = str(exc).split("\n")[0].partition(": ")
        raise ValidationFailed(where, message) from None
    return team


def _whole_numbers(value: Any) -> Any:
    """JSON does not tell 3 from 3.0: a whole float sent over the API is taken as the integer it is (the config
    file's own values stay strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _config_team_view(team: cfg.Team) -> Record:
    quota = {k: v for k, v in vars(team.quota).items() if v is not None}
    budget = None if team.budget is None else {"usd_per_month": team.budget.usd_per_month,
                                               "alerts": list(team.budget.alerts),
                                               "webhook_url": team.budget.webhook_url}
    view = {"name": team.name, "models": None if team.models is None else list(team.models),
            "max_inputs_per_request": team.max_inputs_per_request, "quota": quota, "budget": budget}
    return {**view, "source": "config", "keys": len(team.keys), "key_ids": [config_key_id(k) for k in team.keys]}


def _public(record: Record) -> Record:
    return {k: record.get(k) for k in ("name", *TEAM_FIELDS, "created_at")}


def _key_view(record: Record) -> Record:
    """A key record as the API and the audit log show it: never the hash, never the key."""
    return {k: record.get(k) for k in ("id", "team", "label", "created_at", "expires_at")}


def _only(body: Record, allowed: tuple[str, ...]) -> None:
    for name in body:
        if name not in allowed:
            raise ValidationFailed(name, f"unknown field (known: {', '.join(allowed)})")


def _expiry(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationFailed("expires_at", "an ISO 8601 date and time, e.g. 2026-12-31T23:59:59Z")
    return _iso_ms(round(_seconds(value, field="expires_at") * 1000))


def _seconds(text: str, *, field: str = "expires_at") -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationFailed(field, "an ISO 8601 date and time, e.g. 2026-12-31T23:59:59Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_since(text: str | None) -> int:
    """`since` of the audit query: an ISO 8601 time or Unix seconds; ms since the epoch."""
    if not text:
        return 0
    if text.isascii() and text.isdigit():
        return int(text) * 1000
    return round(_seconds(text, field="since") * 1000)


def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
