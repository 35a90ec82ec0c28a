"""Gateway keys → teams. Keys are stored as sha256 digests; a presented key is hashed and looked up.

Lookup is by digest, so timing reveals nothing about a stored key; the final comparison is
`hmac.compare_digest` all the same. Keys from the config file and keys made over the admin API (`RuntimeKeys`,
kept current by gateway/admin.py) are checked here alike, on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import config as cfg
from .errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a team, or an admin (admin keys see every team in the usage API)."""

    team: cfg.Team | None
    admin: bool = False
    key_id: str = ""  # names the key in the audit log: an API key's id, or `cfg:` and its hash's first hex digits

    @property
    def name(self) -> str:
        return self.team.name if self.team else "admin"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "eg-" + secrets.token_urlsafe(32)


def config_key_id(stored: str) -> str:
    """The id of a config-file key in the audit log: a few hex digits of its (already public) hash."""
    return "cfg:" + stored.removeprefix("sha256:")[:12]


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    digest: bytes
    principal: Principal
    expires_at: float | None  # Unix seconds; None = never


class RuntimeKeys:
    """Keys made over the admin API, by digest. `replace` swaps the whole table (a request sees the old one or
    the new one); expiry is checked against `clock` on every request, so an expired key fails at once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.by_hash: Mapping[bytes, RuntimeKey] = {}
        self.teams: Mapping[str, cfg.Team] = {}  # the teams those keys belong to, by name
        self.used: dict[str, float] = {}  # key id → when this process last accepted it (flushed by admin.py)

    def replace(self, keys: Mapping[bytes, RuntimeKey], teams: Mapping[str, cfg.Team]) -> None:
        self.by_hash, self.teams = keys, teams

    def find(self, digest: bytes) -> RuntimeKey | None:
        return self.by_hash.get(digest)


class KeyRing:
    def __init__(self, config: cfg.Config, runtime: RuntimeKeys | None = None) -> None:
        self._by_hash: dict[bytes, tuple[bytes, Principal]] = {}
        self.runtime = runtime
        for team in config.teams:
            for key in team.keys:
                self._add(key, Principal(team, key_id=config_key_id(key)))
        for key in config.admin_keys:
            self._add(key, Principal(None, admin=True, key_id=config_key_id(key)))

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
        if stored is _NO_KEY and self.runtime is not None:
            return self._runtime(self.runtime, digest)
        if not hmac.compare_digest(stored, digest):
            raise Unauthorized("invalid API key", code="AUTH_INVALID_API_KEY")
        return principal

    def _runtime(self, runtime: RuntimeKeys, digest: bytes) -> Principal:
        entry = runtime.find(digest)
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise Unauthorized("invalid API key", code="AUTH_INVALID_API_KEY")
        now = runtime.clock()
        if entry.expires_at is not None and now >= entry.expires_at:
            raise Unauthorized("API key expired", code="AUTH_INVALID_API_KEY")
        runtime.used[entry.principal.key_id] = now
        return entry.principal


_NO_KEY = bytes(32)
_NOBODY = Principal(None)
