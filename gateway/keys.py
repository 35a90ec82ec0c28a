"""Every Redis key prefix the gateway writes, in one place.

Keys that one Lua script touches together carry the team as a hash tag (`{team}`), so Redis Cluster works.
"""

from __future__ import annotations

# Cache entries: prefix + 16-byte xxh3-128 digest (binary, to keep keys short).
CACHE_PREFIX = b"egc:1:"

# State store (quotas, usage, jobs) prefixes are added by the modules that own them, here.
STATE_PREFIX = "eg:"
