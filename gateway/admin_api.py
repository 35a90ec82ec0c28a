"""HTTP handlers of the admin API (`/admin/...`): teams, keys and the audit log. Admin keys only.

The middleware has authenticated the caller already (as on every route); these handlers refuse team keys.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from . import appkeys as K
from .admin import MAX_AUDIT_PAGE, Admin, parse_since
from .auth import Principal
from .errors import Forbidden, ValidationFailed
from .incoming import principal_of, read_body
from .middleware import Routes
from .protocol import parse_json_object


def add_routes(router: Routes) -> None:
    router.add_get("/admin/teams", list_teams)
    router.add_post("/admin/teams", create_team)
    router.add_get("/admin/teams/{name}", get_team)
    router.add_patch("/admin/teams/{name}", update_team)
    router.add_delete("/admin/teams/{name}", delete_team)
    router.add_get("/admin/teams/{name}/keys", list_keys)
    router.add_post("/admin/teams/{name}/keys", create_key)
    router.add_delete("/admin/keys/{key_id}", revoke_key)
    router.add_get("/admin/audit", audit)


def _admin(request: web.Request) -> tuple[Admin, Principal]:
    principal = principal_of(request)
    if not principal.admin:
        raise Forbidden("the admin API needs an admin key", code="ADMIN_ONLY")
    return request.app[K.ADMIN], principal


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request))


async def list_teams(request: web.Request) -> web.Response:
    admin, _ = _admin(request)
    await admin.refresh()
    return _json({"data": admin.list_teams()})


async def create_team(request: web.Request) -> web.Response:
    admin, who = _admin(request)
    return _json(await admin.create_team(who, await _body(request)), 201)


async def get_team(request: web.Request) -> web.Response:
    admin, _ = _admin(request)
    await admin.refresh()
    return _json(admin.get_team(request.match_info["name"]))


async def update_team(request: web.Request) -> web.Response:
    admin, who = _admin(request)
    return _json(await admin.update_team(who, request.match_info["name"], await _body(request)))


async def delete_team(request: web.Request) -> web.Response:
    admin, who = _admin(request)
    return _json(await admin.delete_team(who, request.match_info["name"]))


async def list_keys(request: web.Request) -> web.Response:
    admin, _ = _admin(request)
    await admin.refresh()
    return _json({"data": await admin.list_keys(request.match_info["name"])})


async def create_key(request: web.Request) -> web.Response:
    admin, who = _admin(request)
    body = await _body(request) if request.can_read_body else {}
    return _json(await admin.create_key(who, request.match_info["name"], body), 201)


async def revoke_key(request: web.Request) -> web.Response:
    admin, who = _admin(request)
    return _json(await admin.revoke_key(who, request.match_info["key_id"]))


async def audit(request: web.Request) -> web.Response:
    """`GET /admin/audit?since=&limit=`: entries at or after `since` (ISO 8601 or Unix seconds), oldest first."""
    admin, _ = _admin(request)
    since = parse_since(request.query.get("since"))
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise ValidationFailed("limit", "an integer") from None
    if not 1 <= limit <= MAX_AUDIT_PAGE:
        raise ValidationFailed("limit", f"between 1 and {MAX_AUDIT_PAGE}")
    return _json({"data": await admin.audit(since, limit)})
