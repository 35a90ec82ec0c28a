"""`embedding-gateway admin teams|keys|audit ...`: the admin API from a shell, tables for people, `--json` for scripts.

The gateway is `--url` (or `EG_URL`); the admin key is read from `EG_ADMIN_KEY` only, so it never lands in shell
history or a process list.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

DEFAULT_URL = "http://127.0.0.1:8080"


class AdminError(Exception):
    """The gateway refused (its error body), or could not be reached."""


def add_parser(sub: Any) -> None:
    """Adds `admin` and its commands to the `embedding-gateway` subparsers."""
    admin = sub.add_parser("admin", help="teams, keys and the audit log over the admin API (key in EG_ADMIN_KEY)")
    admin.add_argument("--url", default=os.environ.get("EG_URL", DEFAULT_URL), help=f"gateway (default {DEFAULT_URL})")
    admin.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    what = admin.add_subparsers(dest="admin_command")
    _teams(what.add_parser("teams", help="list, show, create, update, delete teams"))
    _keys(what.add_parser("keys", help="list, create, revoke a team's keys"))
    audit = what.add_parser("audit", help="the audit log, oldest first")
    audit.add_argument("--since", help="ISO 8601 time or Unix seconds")
    audit.add_argument("--limit", type=int, default=100)
    audit.set_defaults(func=run, call=_audit)


def _teams(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="teams_command")
    sub.add_parser("list").set_defaults(func=run, call=lambda a: ("GET", "/admin/teams", None))
    show = sub.add_parser("show")
    show.add_argument("name")
    show.set_defaults(func=run, call=lambda a: ("GET", f"/admin/teams/{a.name}", None))
    for name, method in (("create", "POST"), ("update", "PATCH")):
        cmd = sub.add_parser(name)
        cmd.add_argument("name")
        cmd.add_argument("--models", help="comma-separated models the team may use")
        cmd.add_argument("--max-inputs", type=int, help="max_inputs_per_request")
        cmd.add_argument("--quota", action="append", default=[], metavar="POLICY=N",
                         help="e.g. tokens_per_day=1000000 (repeatable)")
        cmd.add_argument("--budget-usd", type=float, help="budget.usd_per_month")
        cmd.add_argument("--alerts", help="budget.alerts, e.g. 0.5,0.8,1.0")
        cmd.add_argument("--webhook-url", help="budget.webhook_url")
        cmd.set_defaults(func=run, call=lambda a, m=method: _team_change(a, m))
    delete = sub.add_parser("delete", help="delete a team made over the API and revoke its keys")
    delete.add_argument("name")
    delete.set_defaults(func=run, call=lambda a: ("DELETE", f"/admin/teams/{a.name}", None))


def _keys(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command")
    listing = sub.add_parser("list")
    listing.add_argument("team")
    listing.set_defaults(func=run, call=lambda a: ("GET", f"/admin/teams/{a.team}/keys", None))
    create = sub.add_parser("create", help="print a new key (shown this once)")
    create.add_argument("team")
    create.add_argument("--label")
    create.add_argument("--expires-at", help="ISO 8601, e.g. 2026-12-31T23:59:59Z")
    create.set_defaults(func=run, call=lambda a: (
        "POST", f"/admin/teams/{a.team}/keys",
        {k: v for k, v in (("label", a.label), ("expires_at", a.expires_at)) if v is not None}))
    revoke = sub.add_parser("revoke")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=run, call=lambda a: ("DELETE", f"/admin/keys/{a.key_id}", None))


def _team_change(args: argparse.Namespace, method: str) -> tuple[str, str, dict[str, Any]]:
    body: dict[str, Any] = {}
    if args.models is not None:
        body["models"] = [m for m in args.models.split(",") if m]
    if args.max_inputs is not None:
        body["max_inputs_per_request"] = args.max_inputs
    if args.quota:
        body["quota"] = {k: int(v) for k, _, v in (q.partition("=") for q in args.quota)}
    if args.budget_usd is not None:
        budget: dict[str, Any] = {"usd_per_month": args.budget_usd}
        if args.alerts:
            budget["alerts"] = [float(x) for x in args.alerts.split(",")]
        if args.webhook_url:
            budget["webhook_url"] = args.webhook_url
        body["budget"] = budget
    if method == "POST":
        return method, "/admin/teams", {"name": args.name, **body}
    return method, f"/admin/teams/{args.name}", body


def _audit(args: argparse.Namespace) -> tuple[str, str, None]:
    query = f"?limit={args.limit}" + (f"&since={args.since}" if args.since else "")
    return "GET", f"/admin/audit{query}", None


def run(args: argparse.Namespace) -> int:
    key = os.environ.get("EG_ADMIN_KEY")
    if not key:
        print("embedding-gateway admin: set EG_ADMIN_KEY to an admin key", file=sys.stderr)
        return 2
    method, path, body = args.call(args)
    try:
        answer = asyncio.run(request(args.url, key, method, path, body))
    except AdminError as exc:
        print(f"embedding-gateway admin: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() if args.json else render(answer))
    return 0


async def request(url: str, key: str, method: str, path: str, body: dict[str, Any] | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    data = None if body is None else orjson.dumps(body)
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                session.request(method, url.rstrip("/") + path, data=data, headers=headers) as resp:
            raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AdminError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AdminError(f"{method} {path}: HTTP {resp.status}, not JSON") from None
    if resp.status >= 400:
        raise AdminError(f"{method} {path}: HTTP {resp.status} {answer.get('code')}: {answer.get('detail')}")
    return answer


# Columns per kind of answer, recognised by the fields its rows have.
_COLUMNS = (
    ("action", ("at", "who", "action", "target")),
    ("source", ("name", "source", "keys", "models", "quota", "budget")),
    ("key", ("id", "team", "key", "label", "expires_at")),
    ("prefix", ("id", "prefix", "label", "created_at", "expires_at", "last_used_at")),
    ("id", ("id", "team", "label", "created_at", "expires_at")),
)


def render(answer: Any) -> str:
    """A table of the answer's rows (`data`), or of the one object it is."""
    rows: Sequence[dict[str, Any]] = answer["data"] if isinstance(answer, dict) and "data" in answer else [answer]
    if not rows:
        return "(none)"
    columns = next((cols for marker, cols in _COLUMNS if marker in rows[0]), tuple(rows[0]))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if v is not None) or "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)
