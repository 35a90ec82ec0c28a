"""The admin API in one process (memory:// and Redis state): teams and keys at run time, expiry, the audit log,
config-file teams read-only, and a created key that appears nowhere after the answer that created it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway import appkeys as K
from gateway.admin import AdminStore, Change, MemoryAdminStore, RedisAdminStore, Stale

from .clock import FakeClock, utc
from .conftest import ADMIN_KEY, TEAM_A_KEY, Gateway, auth, state_client
from .redis_server import RedisServer

MODEL = "jina-embeddings-v3"


async def call(client: TestClient, method: str, path: str, key: str | None = ADMIN_KEY, body: Any = None,
               **kw: Any) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    resp = await client.request(method, path, headers=auth(key) if key else {}, data=data, **kw)
    raw = await resp.read()
    return resp.status, orjson.loads(raw) if raw else None


async def embed(client: TestClient, key: str, text: str = "hello") -> int:
    resp = await client.post("/v1/embeddings", headers=auth(key), json={"model": MODEL, "input": [text]})
    await resp.read()
    return resp.status


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "memory":
        return {"url": "memory://"}
    return {"url": request.getfixturevalue("redis_url")}


async def test_team_and_key_lifecycle(gateway: Gateway, state: dict[str, str]) -> None:
    clock = FakeClock(utc(2026, 3, 10, 12, 0, 0))
    client = await gateway(state=state, clock=clock)
    status, team = await call(client, "POST", "/admin/teams", body={"name": "search", "quota": {"tokens_per_day": 5}})
    assert status == 201 and team["source"] == "api" and team["quota"] == {"tokens_per_day": 5}
    status, made = await call(client, "POST", "/admin/teams/search/keys",
                              body={"label": "ci", "expires_at": "2026-03-10T13:00:00Z"})
    assert status == 201 and made["key"].startswith("eg-") and made["expires_at"] == "2026-03-10T13:00:00.000Z"
    key = made["key"]
    assert await embed(client, key) == 200
    status, keys = await call(client, "GET", "/admin/teams/search/keys")
    assert status == 200
    (row,) = keys["data"]
    assert row["id"] == made["id"] and row["prefix"] == key[:6] and row["label"] == "ci"
    assert row["last_used_at"] == "2026-03-10T12:00:00.000Z"
    assert "key" not in row and "hash" not in row
    # The quota of an API team is enforced like a config team's.
    assert await embed(client, key, "world") == 429
    # Expired: refused on the very next request.
    clock.advance(3600)
    assert await embed(client, key, "hello") == 401
    status, second = await call(client, "POST", "/admin/teams/search/keys", body={})
    assert status == 201 and await embed(client, second["key"]) == 200
    status, _ = await call(client, "DELETE", f"/admin/keys/{second['id']}")
    assert status == 200 and await embed(client, second["key"]) == 401
    assert (await call(client, "DELETE", f"/admin/keys/{second['id']}"))[0] == 404
    status, third = await call(client, "POST", "/admin/teams/search/keys")
    assert status == 201 and await embed(client, third["key"]) == 200
    status, gone = await call(client, "DELETE", "/admin/teams/search")
    assert status == 200 and gone["keys_revoked"] == sorted([made["id"], third["id"]])
    assert await embed(client, third["key"]) == 401
    assert (await call(client, "GET", "/admin/teams/search"))[0] == 404


async def test_patch_changes_what_the_team_may_do(gateway: Gateway, state: dict[str, str]) -> None:
    client = await gateway(state=state)
    await call(client, "POST", "/admin/teams", body={"name": "ops"})
    _, made = await call(client, "POST", "/admin/teams/ops/keys")
    assert await embed(client, made["key"]) == 200
    status, team = await call(client, "PATCH", "/admin/teams/ops", body={"models": ["jina-clip-v2"]})
    assert status == 200 and team["models"] == ["jina-clip-v2"]
    assert await embed(client, made["key"]) == 403
    status, body = await call(client, "PATCH", "/admin/teams/ops", body={"quota": {"tokens_per_day": 0}})
    assert status == 422 and body["errors"][0]["field"] == "quota.tokens_per_day"
    status, body = await call(client, "PATCH", "/admin/teams/ops", body={"keys": ["sha256:00"]})
    assert status == 422 and body["errors"][0]["field"] == "keys"


async def test_config_teams_are_listed_read_only(gateway: Gateway, state: dict[str, str]) -> None:
    client = await gateway(state=state)
    status, teams = await call(client, "GET", "/admin/teams")
    assert status == 200 and [(t["name"], t["source"]) for t in teams["data"]] == [
        ("team-a", "config"), ("team-b", "config")]
    assert "hash" not in str(teams) and "sha256:" not in str(teams)
    for method, path, body in [("POST", "/admin/teams", {"name": "team-a"}),
                               ("PATCH", "/admin/teams/team-a", {"models": [MODEL]}),
                               ("DELETE", "/admin/teams/team-a", None),
                               ("POST", "/admin/teams/team-a/keys", {})]:
        status, answer = await call(client, method, path, body=body)
        assert (status, answer["code"]) == (409, "CONFLICT"), (method, path)
    assert await embed(client, TEAM_A_KEY) == 200
    assert (await call(client, "GET", "/admin/audit"))[1]["data"] == []


async def test_bad_input_gets_a_clear_4xx(gateway: Gateway) -> None:
    client = await gateway()
    for body, field in [({"name": "has space"}, "name"), ({"name": "{tag}"}, "name"), ({}, "name"),
                        ({"name": "x", "budget": {"usd_per_month": -1}}, "budget.usd_per_month"),
                        ({"name": "x", "models": "not-a-list"}, "models"), ({"name": "x", "nope": 1}, "nope")]:
        status, answer = await call(client, "POST", "/admin/teams", body=body)
        assert status == 422 and answer["errors"][0]["field"] == field, body
    resp = await client.post("/admin/teams", headers=auth(ADMIN_KEY), data=b"{not json")
    assert resp.status == 400
    await call(client, "POST", "/admin/teams", body={"name": "x"})
    status, answer = await call(client, "POST", "/admin/teams/x/keys", body={"expires_at": "soon"})
    assert status == 422 and answer["errors"][0]["field"] == "expires_at"
    assert (await call(client, "GET", "/admin/audit", params={"limit": "0"}))[0] == 422
    assert (await call(client, "POST", "/admin/teams/nobody/keys"))[0] == 404


async def test_every_admin_action_appears_once_in_the_audit_log(gateway: Gateway, state: dict[str, str]) -> None:
    clock = FakeClock(utc(2026, 5, 1, 8, 0, 0))
    client = await gateway(state=state, clock=clock)
    await call(client, "POST", "/admin/teams", body={"name": "t1", "quota": {"tokens_per_day": 100}})
    clock.advance(1)
    _, made = await call(client, "POST", "/admin/teams/t1/keys", body={"label": "a"})
    clock.advance(1)
    await call(client, "PATCH", "/admin/teams/t1", body={"quota": {"tokens_per_day": 200}})
    clock.advance(1)
    await call(client, "DELETE", f"/admin/keys/{made['id']}")
    clock.advance(1)
    await call(client, "DELETE", "/admin/teams/t1")
    status, log = await call(client, "GET", "/admin/audit")
    assert status == 200
    entries = log["data"]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("team.create", "t1"), ("key.create", made["id"]), ("team.update", "t1"), ("key.revoke", made["id"]),
        ("team.delete", "t1")]
    from gateway.auth import config_key_id, hash_key

    assert {e["who"] for e in entries} == {config_key_id(hash_key(ADMIN_KEY))}
    assert entries[2]["before"] == {"quota": {"tokens_per_day": 100}}
    assert entries[2]["after"] == {"quota": {"tokens_per_day": 200}}
    assert entries[0]["at"] == "2026-05-01T08:00:00.000Z"
    text = orjson.dumps(entries).decode()
    assert made["key"] not in text and "sha256" not in text and ADMIN_KEY not in text
    since = (await call(client, "GET", "/admin/audit", params={"since": "2026-05-01T08:00:02Z", "limit": "2"}))[1]
    assert [e["action"] for e in since["data"]] == ["team.update", "key.revoke"]


async def test_an_api_key_appears_only_in_the_answer_that_created_it(
    gateway: Gateway, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await gateway(state={"url": redis_url}, cache={"url": redis_url})
    await call(client, "POST", "/admin/teams", body={"name": "secretive"})
    _, made = await call(client, "POST", "/admin/teams/secretive/keys", body={"label": "x"})
    key = made["key"]
    seen: list[str] = []
    for _ in range(2):
        assert await embed(client, key) == 200
    for method, path in [("GET", "/admin/teams"), ("GET", "/admin/teams/secretive"),
                         ("GET", "/admin/teams/secretive/keys"), ("GET", "/admin/audit"), ("GET", "/v1/usage"),
                         ("GET", "/metrics"), ("DELETE", f"/admin/keys/{made['id']}")]:
        resp = await client.request(method, path, headers=auth(ADMIN_KEY))
        seen.append(str(dict(resp.headers)) + await resp.text())
    resp = await client.post("/v1/embeddings", headers=auth(key), json={"model": MODEL, "input": ["x"]})
    seen.append(str(dict(resp.headers)) + await resp.text())
    assert resp.status == 401
    for text in seen:
        assert key not in text
    log_text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert key not in log_text and len(caplog.records) > 5
    # The state store holds the key's hash, never the key.
    raw = aioredis.Redis.from_url(redis_url)
    try:
        dump = b""
        async for name in raw.scan_iter():
            kind = await raw.type(name)
            if kind == b"hash":
                dump += b"".join(k + v for k, v in (await raw.hgetall(name)).items())
            elif kind == b"zset":
                dump += b"".join(await raw.zrange(name, 0, -1))
            elif kind == b"string":
                dump += await raw.get(name) or b""
            dump += name
    finally:
        await raw.aclose()
    assert b"secretive" in dump and key.encode() not in dump


async def test_team_keys_cannot_use_the_admin_api(gateway: Gateway) -> None:
    client = await gateway()
    await call(client, "POST", "/admin/teams", body={"name": "t"})
    _, made = await call(client, "POST", "/admin/teams/t/keys")
    for key in (TEAM_A_KEY, made["key"]):
        status, body = await call(client, "POST", "/admin/teams", key=key, body={"name": "mine"})
        assert (status, body["code"]) == (403, "ADMIN_ONLY")
    assert (await call(client, "GET", "/admin/teams", key=None))[0] == 401
    assert client.app[K.ADMIN].team_records.keys() == {"t"}


async def test_admin_answers_match_the_documented_schemas(gateway: Gateway) -> None:
    from .test_openapi import check

    client = await gateway()
    status, team = await call(client, "POST", "/admin/teams", body={"name": "doc", "budget": {"usd_per_month": 5}})
    assert status == 201
    check(team, "Team")
    for listed in (await call(client, "GET", "/admin/teams"))[1]["data"]:
        check(listed, "Team")
    status, made = await call(client, "POST", "/admin/teams/doc/keys", body={"label": "x"})
    check(made, "NewKey")
    check((await call(client, "GET", "/admin/teams/doc/keys"))[1]["data"][0], "Key")
    check((await call(client, "DELETE", f"/admin/keys/{made['id']}"))[1], "Key")
    for entry in (await call(client, "GET", "/admin/audit"))[1]["data"]:
        check(entry, "AuditEntry")
    status, error = await call(client, "DELETE", "/admin/teams/team-a")
    assert status == 409
    check(error, "Error")


async def test_a_team_made_over_the_api_runs_batch_jobs(gateway: Gateway) -> None:
    from .test_batch import jsonl, line, settled, submit, upload

    client = await gateway()
    await call(client, "POST", "/admin/teams", body={"name": "batcher"})
    key = (await call(client, "POST", "/admin/teams/batcher/keys"))[1]["key"]
    status, file = await upload(client, jsonl([line("a", "x"), line("b", "y")]), key=key)
    assert status == 200
    status, job = await submit(client, {"model": MODEL, "input_file_id": file["id"]}, key=key)
    assert status == 202, job
    assert (await settled(client, job["id"], team="batcher")).status == "completed"


async def test_a_config_team_taking_an_api_teams_name_wins_after_a_reload(gateway: Gateway) -> None:
    import asyncio
    import dataclasses

    from gateway import config as cfg

    client = await gateway()
    await call(client, "POST", "/admin/teams", body={"name": "late"})
    key = (await call(client, "POST", "/admin/teams/late/keys"))[1]["key"]
    assert await embed(client, key) == 200
    live = client.app[K.LIVE]
    live.swap(dataclasses.replace(live.config, teams=(*live.config.teams, cfg.Team(name="late"))))
    for _ in range(200):  # the poller notices the new config within a poll interval
        if await embed(client, key) == 401:
            break
        await asyncio.sleep(0.02)
    assert await embed(client, key) == 401
    assert [t["source"] for t in (await call(client, "GET", "/admin/teams"))[1]["data"] if t["name"] == "late"] == [
        "config"]


async def test_racing_replicas_create_a_team_once(gateway: Gateway, redis_url: str) -> None:
    import asyncio

    replicas = [await gateway(state={"url": redis_url}) for _ in range(2)]
    answers = await asyncio.gather(*(
        call(replicas[i % 2], "POST", "/admin/teams", body={"name": "contested", "quota": {"tokens_per_day": i + 1}})
        for i in range(10)))
    assert sorted(status for status, _ in answers) == [201] + [409] * 9
    log = (await call(replicas[1], "GET", "/admin/audit"))[1]["data"]
    assert [e["action"] for e in log] == ["team.create"]
    winner = next(body for status, body in answers if status == 201)
    assert (await call(replicas[0], "GET", "/admin/teams/contested"))[1]["quota"] == winner["quota"]
    # Keys made at once on both replicas are all kept: each action retries on the tables the other one wrote.
    made = await asyncio.gather(*(call(replicas[i % 2], "POST", "/admin/teams/contested/keys") for i in range(6)))
    assert [status for status, _ in made] == [201] * 6
    listed = (await call(replicas[0], "GET", "/admin/teams/contested/keys"))[1]["data"]
    assert sorted(k["id"] for k in listed) == sorted(body["id"] for _, body in made)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def admin_store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[AdminStore]:
    """The same contract for every backend (a plain Redis and a real 3-node cluster)."""
    if request.param == "memory":
        yield MemoryAdminStore()
        return
    async with state_client(request, redis_server) as client:
        yield RedisAdminStore(client)


async def test_the_store_contract(admin_store: AdminStore) -> None:
    store = admin_store
    entry = {"id": "1", "at_ms": 1000, "action": "team.create"}
    await store.write(Change(0, entry, teams_put={"t": {"name": "t"}}, keys_put={"k": {"id": "k", "team": "t"}}))
    with pytest.raises(Stale):
        await store.write(Change(0, {**entry, "id": "2"}, teams_del=["t"]))
    assert await store.load() == (1, {"t": {"name": "t"}}, {"k": {"id": "k", "team": "t"}})
    await store.write(Change(1, {**entry, "id": "3", "at_ms": 2000}, keys_del=["k"]))
    assert await store.version() == 2 and (await store.load())[2] == {}
    assert [e["id"] for e in await store.audit(1500, 10)] == ["3"]
    await store.touch({"k2": 5000})
    await store.touch({"k2": 4000})
    assert await store.last_used() == {"k2": 5000}
