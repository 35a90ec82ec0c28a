"""Every Redis key prefix the gateway writes, in one place.

Keys that one Lua script touches together carry the team as a hash tag (`{team}`), so Redis Cluster works.
"""

from __future__ import annotations

# Cache entries: prefix + 16-byte xxh3-128 digest (binary, to keep keys short).
CACHE_PREFIX = b"egc:1:"

# State store (quotas, usage, jobs) prefixes are added by the modules that own them, here.
STATE_PREFIX = "eg:"

# Usage counters (gateway/usage.py): one hash per team and UTC day, fields `<model>:<counter>`. The team is the
# hash tag: the flush script touches a team's day hashes and its writer mark together.
USAGE_PREFIX = STATE_PREFIX + "usage:"
# Set of every team that has usage (the admin's report reads it instead of scanning the keyspace).
USAGE_TEAMS = USAGE_PREFIX + "teams"


def usage_day_key(team: str, day: str) -> str:
    return f"{USAGE_PREFIX}{{{team}}}:{day}"


def usage_writer_key(team: str, writer: str) -> str:
    """The last flush number applied for `team` from one gateway process, so a retried flush is applied once."""
    return f"{USAGE_PREFIX}{{{team}}}:writer:{writer}"

# Quota state of one team: one hash (bucket levels, window counters), tagged with the team.
QUOTA_PREFIX = STATE_PREFIX + "q:"
# Pacing of the shared upstream key: a log (sorted set) and a meta hash, tagged with the upstream budget's id.
PACING_PREFIX = STATE_PREFIX + "up:"


def quota_key(team: str) -> str:
    return f"{QUOTA_PREFIX}{{{team}}}"


def pacing_keys(budget: str) -> tuple[str, str]:
    """The log and meta keys of one upstream budget (one upstream URL and key)."""
    tag = f"{PACING_PREFIX}{{{budget}}}"
    return f"{tag}:log", f"{tag}:meta"


# Batch jobs and their files (gateway/batch.py). Everything of one team shares the `{team}` hash tag, so the
# scripts in store/lua/batch_*.lua touch one slot. The runnable-jobs index spans teams: it is only ever read
# and edited with plain commands, never inside a script.
BATCH_PREFIX = STATE_PREFIX + "batch:"
BATCH_RUNNABLE = BATCH_PREFIX + "runnable"  # zset: "<job id> <team>" by creation time


def batch_key(team: str, *parts: str) -> str:
    """`eg:batch:{team}:<parts joined by ':'>`: a file, a job, or one of a job's lists."""
    return f"{BATCH_PREFIX}{{{team}}}:" + ":".join(parts)


# Teams and keys made over the admin API (gateway/admin.py), and its audit log. One `{admin}` hash tag: a change
# and its audit entry are written in one MULTI, which a cluster allows only within one slot.
ADMIN_PREFIX = STATE_PREFIX + "admin:{admin}:"
ADMIN_TEAMS = ADMIN_PREFIX + "teams"  # hash: team name → JSON record
ADMIN_KEYS = ADMIN_PREFIX + "keys"  # hash: key id → JSON record (the key's sha256, never the key)
ADMIN_VERSION = ADMIN_PREFIX + "version"  # counter, bumped by every change; replicas poll it
ADMIN_AUDIT = ADMIN_PREFIX + "audit"  # zset: JSON entry by time in ms
ADMIN_USED = ADMIN_PREFIX + "used"  # zset: key id by the last time it was used, in ms

# Budget alerts already fired: one set of thresholds per team and UTC month (gateway/budget.py).
BUDGET_PREFIX = STATE_PREFIX + "budget:"


def budget_alerts_key(team: str, month: str) -> str:
    return f"{BUDGET_PREFIX}{{{team}}}:alerts:{month}"
