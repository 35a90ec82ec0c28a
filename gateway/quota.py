"""Per-team quotas shared by every replica: reserve before the upstream call, reconcile after, 429 with an
exact Retry-After, and the IETF draft `RateLimit` / `RateLimit-Policy` headers.

Minute limits are token buckets (GCRA's twin: one level per policy that drains at `limit` per 60 s, capacity
one minute's quota). Chosen over a sliding-window log because a bucket is O(1) state per team (a log of every
reservation would grow with the traffic and make refunds a search), because refunds and charges at reconcile
are one addition, and because the exact moment a request fits is one division, which is what `Retry-After`
promises. The price: after an idle spell a team may spend its whole minute at once and then the refill, so
any 60 s can see up to twice the limit; the sustained rate is exactly the limit. Day and month quotas are
fixed windows on UTC calendar boundaries, as people read invoices.

A team's money budget (`budget.usd_per_month`) is a fifth policy in the same script: the misses' estimated cost
(tokens × the model's dearest upstream price, in nano-USD so the arithmetic stays integer) is reserved in the same
atomic step as the tokens and reconciled with what the upstreams that answered billed, so replicas overspend by at
most one request's estimate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal, Protocol

from redis.exceptions import RedisError

from . import config as cfg
from .breaker import StoreBreaker
from .errors import Overloaded, PayloadTooLarge, QuotaExceeded
from .keys import quota_key
from .metrics import QUOTA_POLICIES, Metrics
from .store.redis import read_lua

log = logging.getLogger("gateway.quota")

POLICIES = QUOTA_POLICIES  # the `Quota` config fields, in the order the Lua script takes them
PERIOD_MS = 60_000
DAY_MS = 86_400_000
# What a state store failure looks like from redis-py (refused, reset, timed out, NOSCRIPT lost...).
STORE_ERRORS = (RedisError, OSError)
_EPOCH = date(1970, 1, 1)

Mode = Literal["admit", "adjust"]


class Clock(Protocol):
    """Wall-clock time (Unix seconds) and sleeping; tests inject one instead of sleeping."""

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


BUDGET_POLICY = "budget_usd_per_month"  # the budget's name in RateLimit headers and metrics
BUDGET = 4  # its index in a Verdict's `blocking`
NANO_USD = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    """A team's policies in `POLICIES` order (0 = no such policy), and its monthly budget in nano-USD (0 = none)."""

    values: tuple[int, int, int, int]
    budget: int = 0

    @classmethod
    def of(cls, team: cfg.Team) -> Limits:
        return _limits_of(team)

    def __bool__(self) -> bool:
        return any(self.values) or self.budget > 0


_LIMITS: dict[int, tuple[cfg.Team, Limits, bool]] = {}  # id(team) → (team, its limits, whether any)


def _limits_of(team: cfg.Team) -> Limits:
    """Memoised by identity: admission asks for every request, a team's policies change only with the config
    (or its admin API record), and a frozen dataclass hashes in Python (the stored team guards against a reused
    id)."""
    hit = _LIMITS.get(id(team))
    if hit is not None and hit[0] is team:
        return hit[1]
    quota = team.quota
    budget = round(team.budget.usd_per_month * NANO_USD) if team.budget is not None else 0
    limits = Limits(tuple(getattr(quota, name) or 0 for name in POLICIES), budget)  # type: ignore[arg-type]
    if len(_LIMITS) > 4096:  # reloads keep creating Team objects: never let the memo grow without bound
        _LIMITS.clear()
    _LIMITS[id(team)] = (team, limits, bool(limits))
    return limits


@dataclass(frozen=True, slots=True)
class Verdict:
    """One admission's answer, the same from both backends."""

    admitted: bool
    blocking: int  # index into POLICIES of the policy that waits longest, -1 when admitted
    wait_ms: int
    now_ms: int
    day: int  # UTC day number (days since 1970-01-01)
    month: int  # day number of the first day of the UTC month
    states: tuple[tuple[int, int], ...]  # per policy: (remaining, ms until fully reset)
    budget: tuple[int, int] = (0, 0)  # (nano-USD left this month, ms until the month ends)

    @classmethod
    def from_reply(cls, reply: list[Any]) -> Verdict:
        v = [int(x) for x in reply]
        states = tuple((v[6 + 2 * i], v[7 + 2 * i]) for i in range(4))
        return cls(bool(v[0]), v[1] - 1, v[2], v[3], v[4], v[5], states, (v[14], v[15]))


class QuotaBackend(Protocol):
    """Checks and debits all of a team's policies at once (`admit`), or adds a signed difference (`adjust`)."""

    async def run(
        self, team: str, limits: Limits, *, mode: Mode, requests: int, tokens: int,
        reserved: tuple[int, int] = (0, 0), now_ms: int | None = None, cost: int = 0,
    ) -> Verdict: ...


# ---- the semantics, in process (the memory backend, and the reference for quota.lua) -----------------------


def month_bounds(day: int) -> tuple[int, int]:
    """Day numbers of the first day of `day`'s UTC month and of the next month."""
    d = _EPOCH + timedelta(days=day)
    first = date(d.year, d.month, 1)
    following = date(d.year + d.month // 12, d.month % 12 + 1, 1)
    return (first - _EPOCH).days, (following - _EPOCH).days


@dataclass(slots=True)
class TeamState:
    t: int | None = None  # last update, ms
    levels: list[int] = field(default_factory=lambda: [0, 0])  # buckets, scaled by PERIOD_MS
    day: int = -1
    day_used: int = 0
    month: int = -1
    month_used: int = 0
    spent: int = 0  # nano-USD of the budget spent in `month`


def evaluate(
    state: TeamState, now: int, limits: Limits, mode: Mode, requests: int, tokens: int, reserved: tuple[int, int],
    cost: int = 0,
) -> Verdict:
    """Mutates `state` exactly as quota.lua mutates the team's hash, and answers what it answers."""
    lim = limits.values
    elapsed = max(0, now - (state.t if state.t is not None else now))
    levels = [max(0, state.levels[i] - elapsed * lim[i]) if lim[i] else 0 for i in range(2)]
    day = now // DAY_MS
    month, month_end = month_bounds(day)
    window = (0, 0, day, month)
    ends = (0, 0, (day + 1) * DAY_MS, month_end * DAY_MS)
    used = [0, 0, state.day_used if state.day == day else 0, state.month_used if state.month == month else 0]
    spent = state.spent if state.month == month else 0
    admitted, blocking, wait = True, -1, 0
    if mode == "admit":
        costs = (requests, tokens, tokens, tokens)
        for i in range(4):
            w = _wait(i, lim[i], costs[i], levels[i] if i < 2 else used[i], ends[i] - now)
            if w > wait:
                admitted, blocking, wait = False, i, w
        if limits.budget and cost > 0 and spent + cost > limits.budget and ends[3] - now > wait:
            admitted, blocking, wait = False, BUDGET, ends[3] - now
        if admitted:
            for i in range(4):
                if lim[i] and i < 2:
                    levels[i] += costs[i] * PERIOD_MS
                elif lim[i]:
                    used[i] += costs[i]
            if limits.budget:
                spent += cost
    else:
        if limits.budget and (cost > 0 or reserved[1] == month):
            spent = max(0, spent + cost)
        if lim[1]:
            levels[1] = max(0, levels[1] + tokens * PERIOD_MS)
        for i in (2, 3):
            if lim[i] and (tokens > 0 or reserved[i - 2] == window[i]):
                used[i] = max(0, used[i] + tokens)
    state.t = max(now, state.t if state.t is not None else now)
    state.levels, state.day, state.day_used, state.month, state.month_used = levels, day, used[2], month, used[3]
    state.spent = spent
    states = tuple(_state(i, lim[i], levels[i] if i < 2 else used[i], ends[i] - now) for i in range(4))
    budget = (max(0, limits.budget - spent), ends[3] - now) if limits.budget else (0, 0)
    return Verdict(admitted, blocking, wait, now, day, month, states, budget)


def _wait(i: int, limit: int, cost: int, level: int, to_window_end: int) -> int:
    """Milliseconds until `cost` fits policy `i` (0 = fits now)."""
    if not limit or cost <= 0:
        return 0
    if i < 2:
        over = level + cost * PERIOD_MS - limit * PERIOD_MS
        return -(-over // limit) if over > 0 else 0
    return to_window_end if level + cost > limit else 0


def _state(i: int, limit: int, level: int, to_window_end: int) -> tuple[int, int]:
    if not limit:
        return 0, 0
    if i < 2:
        return max(0, (limit * PERIOD_MS - level) // PERIOD_MS), -(-level // limit)
    return max(0, limit - level), to_window_end


class MemoryQuotaBackend:
    """The in-process backend: state of `memory://`, and the local limiter when the state store is down."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._teams: dict[str, TeamState] = {}

    async def run(
        self, team: str, limits: Limits, *, mode: Mode, requests: int, tokens: int,
        reserved: tuple[int, int] = (0, 0), now_ms: int | None = None, cost: int = 0,
    ) -> Verdict:
        now = now_ms if now_ms is not None else math.floor(self.clock() * 1000)
        state = self._teams.setdefault(team, TeamState())
        return evaluate(state, now, limits, mode, requests, tokens, reserved, cost)


class RedisQuotaBackend:
    """One Lua script per admission over the team's `{team}`-tagged hash, with Redis TIME as the clock."""

    def __init__(self, client: Any) -> None:
        self._script = client.register_script(read_lua("quota.lua"))

    async def run(
        self, team: str, limits: Limits, *, mode: Mode, requests: int, tokens: int,
        reserved: tuple[int, int] = (0, 0), now_ms: int | None = None, cost: int = 0,
    ) -> Verdict:
        args = ["" if now_ms is None else now_ms, mode, *limits.values, requests, tokens, *reserved, limits.budget,
                cost]
        return Verdict.from_reply(await self._script(keys=[quota_key(team)], args=args))


# ---- admission: what EmbeddingService calls ---------------------------------------------------------------


@dataclass(slots=True)
class Reservation:
    team: str
    limits: Limits
    charged: int  # tokens reserved: the misses' estimate plus the weighted cached tokens
    cached_charge: int
    windows: tuple[int, int]  # the UTC day and month the tokens were reserved in
    local: bool  # reserved on the local limiter (state store down, on_store_error: open)
    headers: dict[str, str]
    cost: int = 0  # nano-USD reserved against the budget (cached tokens cost nothing)
    owner: cfg.Team | None = None  # the team, when it has a budget (its spend is watched after reconcile)


# Told of every verdict on a team with a budget (alerts, the spend gauge); must not block.
SpendWatch = Callable[[cfg.Team, Limits, Verdict], None]


class QuotaGate:
    """Implements `service.Admission`: 413 for what can never fit, 429 for what does not fit now."""

    def __init__(
        self,
        settings: cfg.QuotaSettings,
        backend: QuotaBackend,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        prices: dict[str, float] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.prices = prices or {}  # USD per 1M tokens by model (`prices`), replaced by `reconfigure`
        self.watch: SpendWatch | None = None
        self.clock = clock
        self.monotonic = monotonic
        self.local = MemoryQuotaBackend(clock.time if clock is not None else time.time)
        self.breaker = StoreBreaker(
            metrics, log, back="quota is shared by the fleet again", backoff_s=lambda: self.settings.error_backoff_s,
            down=lambda: "quota admits with the local limiter" if self.settings.on_store_error == "open"
            else "quota answers 503",
            monotonic=monotonic,
        )

    def applies(self, team: cfg.Team) -> bool:
        hit = _LIMITS.get(id(team))  # `_limits_of`'s memo, read inline: this runs for every request
        if hit is not None and hit[0] is team:
            return hit[2]
        return bool(_limits_of(team))

    async def reserve(
        self, team: cfg.Team, *, estimate_tokens: int, cached_tokens: int, model: str = ""
    ) -> Reservation | None:
        limits = Limits.of(team)
        if not limits:
            return None
        cached_charge = math.ceil(self.settings.cached_token_weight * cached_tokens)
        charge = estimate_tokens + cached_charge
        price = self.prices.get(model, 0.0) * 1000 if limits.budget else 0.0
        cost = round(estimate_tokens * price)
        self._check_fits(team, limits, charge, cost)
        verdict, local = await self._run(team.name, limits, mode="admit", requests=1, tokens=charge, cost=cost)
        headers = rate_limit_headers(limits, verdict)
        owner = team if limits.budget else None
        if owner is not None and self.watch is not None:
            self.watch(owner, limits, verdict)
        if not verdict.admitted:
            raise self._refusal(team, verdict, charge, headers)
        windows = (verdict.day, verdict.month)
        return Reservation(team.name, limits, charge, cached_charge, windows, local, headers, cost, owner)

    async def reconcile(self, reservation: object, *, actual_tokens: int, actual_cost_usd: float = 0.0) -> None:
        """Refunds or charges what the estimate got wrong (tokens, and money as the upstreams that answered billed
        it: the reservation priced the estimate at the dearest); never fails the request it follows."""
        assert isinstance(reservation, Reservation)
        diff = actual_tokens + reservation.cached_charge - reservation.charged
        cost = round(actual_cost_usd * NANO_USD) - reservation.cost if reservation.limits.budget else 0
        if diff == 0 and cost == 0:
            return
        kwargs: dict[str, Any] = {"mode": "adjust", "requests": 0, "tokens": diff, "reserved": reservation.windows,
                                  "cost": cost}
        backend: QuotaBackend = self.local if reservation.local else self.backend
        try:
            verdict = await backend.run(reservation.team, reservation.limits, now_ms=self._now(), **kwargs)
        except STORE_ERRORS as exc:
            self.breaker.failed(exc, "reconcile")
            return
        if reservation.owner is not None and self.watch is not None:
            self.watch(reservation.owner, reservation.limits, verdict)

    def reconfigure(self, config: cfg.Config) -> None:
        """A reload: `quota.*` settings and prices apply from the next request (team policies travel with each
        team)."""
        self.settings = config.quota
        self.prices = budget_prices(config)

    async def budget_state(self, team: cfg.Team) -> Verdict | None:
        """Where the team's budget stands now, spending nothing (None: no budget); store errors propagate."""
        limits = Limits.of(team)
        if not limits.budget:
            return None
        return await self.backend.run(team.name, limits, mode="admit", requests=0, tokens=0, now_ms=self._now())

    async def remaining_all(self, teams: Iterable[cfg.Team]) -> dict[tuple[str, ...], float]:
        """(team, policy) → units left now, from the shared store (for the `eg_quota_remaining` gauge).

        Store errors propagate: a scrape hook that fails leaves the gauge as it was instead of local guesses.
        """
        shared = [(t.name, Limits.of(t)) for t in teams if any(Limits.of(t).values)]
        now_ms = self._now()
        verdicts = await asyncio.gather(*(
            self.backend.run(name, limits, mode="admit", requests=0, tokens=0, now_ms=now_ms)
            for name, limits in shared
        ))
        return {
            (name, policy): verdict.states[i][0]
            for (name, limits), verdict in zip(shared, verdicts, strict=True)
            for i, policy in enumerate(POLICIES) if limits.values[i]
        }

    async def peek(self, team: cfg.Team) -> dict[str, str]:
        """The team's headers without spending anything (for answers that never reached admission)."""
        limits = Limits.of(team)
        if not limits:
            return {}
        try:
            verdict, _ = await self._run(team.name, limits, mode="admit", requests=0, tokens=0)
        except Overloaded:
            return {}
        return rate_limit_headers(limits, verdict)

    def _check_fits(self, team: cfg.Team, limits: Limits, charge: int, cost: int = 0) -> None:
        if limits.budget and cost > limits.budget:
            self.metrics.quota_rejections.labels(team.name, BUDGET_POLICY).inc()
            raise PayloadTooLarge(
                f"this request costs about USD {cost / NANO_USD:g} but team {team.name!r} has a budget of USD "
                f"{limits.budget / NANO_USD:g} per month: it could never be admitted; split its inputs over several "
                "requests", code="QUOTA_REQUEST_TOO_LARGE",
            )
        for name, limit in zip(POLICIES[1:], limits.values[1:], strict=True):
            if limit and charge > limit:
                self.metrics.quota_rejections.labels(team.name, name).inc()
                raise PayloadTooLarge(
                    f"this request needs about {charge} tokens but team {team.name!r} has {name} = {limit}: "
                    "it could never be admitted; split its inputs over several requests",
                    code="QUOTA_REQUEST_TOO_LARGE",
                )

    def _refusal(self, team: cfg.Team, verdict: Verdict, charge: int, headers: dict[str, str]) -> QuotaExceeded:
        policy = BUDGET_POLICY if verdict.blocking == BUDGET else POLICIES[verdict.blocking]
        self.metrics.quota_rejections.labels(team.name, policy).inc()
        retry_after = max(1, math.ceil(verdict.wait_ms / 1000))
        if verdict.blocking == BUDGET:
            exc = QuotaExceeded(
                policy, retry_after,
                f"team {team.name!r} has spent its budget for this month (USD "
                f"{Limits.of(team).budget / NANO_USD:g}); it renews at the start of next month (UTC), "
                f"in {retry_after} s", code="BUDGET_EXCEEDED",
            )
            exc.headers.update(headers)
            return exc
        if verdict.blocking == 0:
            code, what = "RATE_REQUEST_LIMIT_EXCEEDED", "1 request"
        else:
            code, what = "RATE_TOKEN_LIMIT_EXCEEDED", f"about {charge} tokens"
        exc = QuotaExceeded(
            policy, retry_after,
            f"team {team.name!r} is over its {policy} quota ({verdict.states[verdict.blocking][0]} left, "
            f"this request needs {what}); retry in {retry_after} s",
            code=code,
        )
        exc.headers.update(headers)
        return exc

    async def _run(self, team: str, limits: Limits, **kwargs: Any) -> tuple[Verdict, bool]:
        now_ms = self._now()
        if self.breaker.available():
            try:
                verdict = await self.backend.run(team, limits, now_ms=now_ms, **kwargs)
            except STORE_ERRORS as exc:
                self.breaker.failed(exc, "quota")
            else:
                self.breaker.ok()
                return verdict, False
        if self.settings.on_store_error == "closed":
            raise Overloaded(
                "the quota store is unavailable; retry shortly",
                retry_after=max(1, math.ceil(self.settings.error_backoff_s)), code="QUOTA_STORE_UNAVAILABLE",
            )
        return await self.local.run(team, limits, now_ms=now_ms, **kwargs), True

    def _now(self) -> int | None:
        return None if self.clock is None else round(self.clock.time() * 1000)


def budget_prices(config: cfg.Config) -> dict[str, float]:
    """USD per 1M tokens per model for money budgets: the highest price of any upstream that may serve the model
    (its `prices`, else the top-level `prices`). Admission cannot know which upstream a failover will reach, so a
    budget is charged as if the dearest one billed the tokens: it is never overspent, at worst underspent."""
    return {model: max((config.price(up, model) for up in cfg.serving(config.routes, model)),
                       default=config.prices.get(model, 0.0))
            for model in config.named_models()}


def rate_limit_headers(limits: Limits, verdict: Verdict) -> dict[str, str]:
    """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers): one item per policy."""
    month_start, month_end = month_bounds(verdict.day)
    windows = (60, 60, 86_400, (month_end - month_start) * 86_400)
    policies, states = [], []
    for i, name in enumerate(POLICIES):
        limit = limits.values[i]
        if not limit:
            continue
        unit = "" if i == 0 else ';qu="tokens"'
        policies.append(f'"{name}";q={limit}{unit};w={windows[i]}')
        remaining, reset_ms = verdict.states[i]
        states.append(f'"{name}";r={remaining};t={-(-reset_ms // 1000)}')
    if limits.budget:
        left, reset_ms = verdict.budget
        policies.append(f'"{BUDGET_POLICY}";q={_usd(limits.budget)};qu="usd";w={windows[3]}')
        states.append(f'"{BUDGET_POLICY}";r={_usd(left)};t={-(-reset_ms // 1000)}')
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}


def _usd(nano: int) -> str:
    """Dollars as a structured-field decimal (at most three fraction digits: RFC 8941), rounded down."""
    return f"{nano // 1_000_000 / 1000:.3f}"
