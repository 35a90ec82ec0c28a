"""The config the app serves with, swapped whole on reload (SIGHUP) so a request never sees half of two configs.

Readers take `live.config` / `live.keyring` once per request. Teams, keys, quotas, prices, coalescing, limits and
metrics settings change live; what is bound at start-up (listen address, upstream, store URLs, ...) keeps its
running value and is logged as needing a restart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config as cfg
from .auth import KeyRing

log = logging.getLogger("gateway")

# Top-level sections a reload applies; any other section (including ones added later) needs a restart.
LIVE_SECTIONS = frozenset(
    {"teams", "admin_keys", "prices", "coalesce", "quota", "metrics", "limits", "log_level"}
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: cfg.Config
    keyring: KeyRing


class LiveConfig:
    def __init__(self, config: cfg.Config, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._now = Snapshot(config, KeyRing(config))
        self._listeners: list[Callable[[cfg.Config], None]] = []
        self.reloads = 0

    @property
    def config(self) -> cfg.Config:
        return self._now.config

    @property
    def keyring(self) -> KeyRing:
        return self._now.keyring

    def on_change(self, listener: Callable[[cfg.Config], None]) -> None:
        """Parts that copied a live setting at start-up (the coalescer's batching) get the new one here."""
        self._listeners.append(listener)

    def swap(self, new: cfg.Config) -> list[str]:
        """Applies `new`; returns the settings that changed but need a restart (they keep their running value)."""
        effective, pending = keep_restart_only(self.config, new)
        keyring = KeyRing(effective)  # built before the swap: a request sees the old ring or the new, whole
        self._now = Snapshot(effective, keyring)
        self.reloads += 1
        for listener in self._listeners:
            listener(effective)
        return pending

    def reload(self) -> bool:
        """Re-reads the config file; a file that does not validate is refused and the running config stays."""
        if self.path is None:
            log.warning("config reload: the gateway was started without a config file; nothing to reload")
            return False
        try:
            new = cfg.load_config(self.path)
        except (cfg.ConfigError, OSError) as exc:
            log.error("config reload refused: %s: %s; still serving the previous config", self.path, exc)
            return False
        pending = self.swap(new)
        keys = sum(len(t.keys) for t in new.teams)
        log.info("config reloaded from %s: %d teams, %d team keys, %d admin keys", self.path, len(new.teams),
                 keys, len(new.admin_keys))
        if pending:
            log.warning("config reload: %s changed but need a restart; still running with the previous values",
                        ", ".join(pending))
        return True


def keep_restart_only(old: cfg.Config, new: cfg.Config) -> tuple[cfg.Config, list[str]]:
    keep: dict[str, object] = {}
    pending: list[str] = []
    for f in dataclasses.fields(cfg.Config):
        if f.name not in LIVE_SECTIONS and getattr(old, f.name) != getattr(new, f.name):
            keep[f.name] = getattr(old, f.name)
            pending.append(f.name)
    # aiohttp's client_max_size is fixed when the app is built, the connection limits when the process listens.
    for name in ("max_body_bytes", "header_timeout_s", "keepalive_timeout_s", "max_connections"):
        if getattr(old.limits, name) != getattr(new.limits, name):
            limits = keep.get("limits", new.limits)
            keep["limits"] = dataclasses.replace(limits, **{name: getattr(old.limits, name)})  # type: ignore[type-var]
            pending.append(f"limits.{name}")
    return dataclasses.replace(new, **keep), pending  # type: ignore[arg-type]
