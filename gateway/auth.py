"""Gateway keys → teams. Keys are stored as sha256 digests; a presented key is hashed and looked up.

Lookup is by digest, so timing reveals nothing about a stored key; the final comparison is
`hmac.compare_digest` all the same.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from . import config as cfg
from .errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a team, or an admin (admin keys see every team in the usage API)."""

    team: cfg.Team | None
    admin: bool = False

    @property
    def name(self) -> str:
        return self.team.name if self.team else "admin"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "eg-" + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, config: cfg.Config) -> None:
        self._by_hash: dict[bytes, tuple[bytes, Principal]] = {}
        for team in config.teams:
            for key in team.keys:
                self._add(key, Principal(team))
        for key in config.admin_keys:
            self._add(key, Principal(None, admin=True))

    def _add(self, stored: str, principal: Principal) -> None:
        digest = bytes.fromhex(stored.removeprefix("sha256:"))
        self._by_hash[digest] = (digest, principal)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'", code="AUTH_MISSING_API_KEY"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "malformed Authorization header: expected 'Bearer <key>'", code="AUTH_MISSING_API_KEY"
            )
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        stored, principal = self._by_hash.get(digest, (_NO_KEY, _NOBODY))
        if not hmac.compare_digest(stored, digest):
            raise Unauthorized("invalid API key", code="AUTH_INVALID_API_KEY")
        return principal


_NO_KEY = bytes(32)
_NOBODY = Principal(None)
