"""`embedding-gateway admin ...` against a running gateway: tables, `--json`, the key from EG_ADMIN_KEY only."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.cli import main

from .conftest import ADMIN_KEY, Gateway, auth


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs the CLI in a thread (it runs its own event loop) while the test's loop serves the gateway."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_teams_keys_and_audit_from_the_command_line(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await gateway()
    url = str(client.make_url("")).rstrip("/")
    monkeypatch.setenv("EG_ADMIN_KEY", ADMIN_KEY)
    code, out, _ = await cli(capsys, "admin", "--url", url, "teams", "create", "search", "--quota",
                             "tokens_per_day=1000", "--budget-usd", "200", "--alerts", "0.5,1")
    assert code == 0 and out.split("\n")[0].split() == ["NAME", "SOURCE", "KEYS", "MODELS", "QUOTA", "BUDGET"]
    code, out, _ = await cli(capsys, "admin", "--url", url, "teams", "list")
    assert code == 0
    rows = [line.split()[:3] for line in out.strip().split("\n")[1:]]
    assert rows == [["team-a", "config", "1"], ["team-b", "config", "1"], ["search", "api", "0"]]
    code, out, _ = await cli(capsys, "admin", "--url", url, "--json", "keys", "create", "search", "--label", "ci")
    made = orjson.loads(out)
    assert code == 0 and made["key"].startswith("eg-") and made["label"] == "ci"
    resp = await client.post("/v1/embeddings", headers=auth(made["key"]), json={"model": "jina-embeddings-v3",
                                                                              "input": ["from the cli"]})
    assert resp.status == 200
    code, out, _ = await cli(capsys, "admin", "--url", url, "keys", "list", "search")
    assert code == 0 and made["id"] in out and made["key"] not in out and made["key"][:6] in out
    code, out, _ = await cli(capsys, "admin", "--url", url, "keys", "revoke", made["id"])
    assert code == 0
    code, out, _ = await cli(capsys, "admin", "--url", url, "--json", "audit", "--limit", "10")
    assert [e["action"] for e in orjson.loads(out)["data"]] == ["team.create", "key.create", "key.revoke"]
    code, out, _ = await cli(capsys, "admin", "--url", url, "audit")
    assert code == 0 and out.split("\n")[0].split() == ["AT", "WHO", "ACTION", "TARGET"] and ADMIN_KEY not in out
    code, _, err = await cli(capsys, "admin", "--url", url, "teams", "delete", "team-a")
    assert code == 1 and "409 CONFLICT" in err


async def test_the_admin_key_comes_from_the_environment(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await gateway()
    url = str(client.make_url("")).rstrip("/")
    monkeypatch.delenv("EG_ADMIN_KEY", raising=False)
    code, _, err = await cli(capsys, "admin", "--url", url, "teams", "list")
    assert code == 2 and "EG_ADMIN_KEY" in err
    monkeypatch.setenv("EG_ADMIN_KEY", "eg-test-team-a")
    code, _, err = await cli(capsys, "admin", "--url", url, "teams", "list")
    assert code == 1 and "403 ADMIN_ONLY" in err
