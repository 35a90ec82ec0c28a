"""Money budget alerts: each threshold of a team's `budget.alerts` fires once per UTC month, fleet-wide.

The quota gate tells `BudgetWatch` of every verdict on a team with a budget (the spend itself is reserved and
reconciled in gateway/quota.py). A crossing is claimed in the state store (one replica wins it), then logged,
counted and POSTed to `budget.webhook_url` with retries and backoff, in a background task: never in a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Coroutine, Iterable
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import Any, Protocol

import aiohttp
import orjson

from . import config as cfg
from .keys import budget_alerts_key
from .metrics import Metrics
from .quota import NANO_USD, STORE_ERRORS, Limits, QuotaGate, Verdict

log = logging.getLogger("gateway.budget")

_EPOCH = date(1970, 1, 1)
CLAIM_TTL_S = 62 * 86400  # a month's claims outlive the month


@dataclass(frozen=True, slots=True)
class Alert:
    """The webhook's JSON body."""

    team: str
    month: str  # YYYY-MM, UTC
    spent: float  # USD, reservations in flight included
    budget: float  # USD per month
    threshold: float  # the fraction of the budget crossed


class AlertClaims(Protocol):
    async def claim(self, team: str, month: str, threshold: float) -> bool:
        """True for exactly one caller per (team, month, threshold), fleet-wide."""
        ...


class MemoryAlertClaims:
    def __init__(self) -> None:
        self.claimed: set[tuple[str, str, float]] = set()

    async def claim(self, team: str, month: str, threshold: float) -> bool:
        key = (team, month, threshold)
        fresh = key not in self.claimed
        self.claimed.add(key)
        return fresh


class RedisAlertClaims:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def claim(self, team: str, month: str, threshold: float) -> bool:
        key = budget_alerts_key(team, month)
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(key, repr(threshold))
        pipe.expire(key, CLAIM_TTL_S)
        added, _ = await pipe.execute()
        return bool(added)


def open_alert_claims(state_redis: Any) -> AlertClaims:
    return MemoryAlertClaims() if state_redis is None else RedisAlertClaims(state_redis)


def month_name(month_first_day: int) -> str:
    return (_EPOCH + timedelta(days=month_first_day)).strftime("%Y-%m")


class BudgetWatch:
    """The quota gate's `SpendWatch`: sets `eg_budget_spent_ratio`, and fires each crossed threshold once."""

    def __init__(
        self, claims: AlertClaims, metrics: Metrics, *, attempts: int = 8, backoff_s: float = 1.0,
        backoff_max_s: float = 300.0, timeout_s: float = 10.0,
    ) -> None:
        self.claims = claims
        self.metrics = metrics
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.failures = 0  # webhook attempts that failed (connection refused, timeout, non-2xx)
        self.delivered = 0
        self._seen: set[tuple[str, str, float]] = set()  # crossings this process has handled already
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def __call__(self, team: cfg.Team, limits: Limits, verdict: Verdict) -> None:
        if team.budget is None or not limits.budget:
            return
        spent = limits.budget - verdict.budget[0]
        ratio = spent / limits.budget
        self.metrics.budget_spent_ratio.labels(team.name).set(ratio)
        month = month_name(verdict.month)
        for threshold in team.budget.alerts:
            if ratio >= threshold and (team.name, month, threshold) not in self._seen:
                self._seen.add((team.name, month, threshold))
                alert = Alert(team.name, month, spent / NANO_USD, limits.budget / NANO_USD, threshold)
                self._spawn(self._fire(alert, team.budget.webhook_url))

    async def refresh(self, quota: QuotaGate, teams: Iterable[cfg.Team]) -> None:
        """Sets the spend gauge of every team with a budget from the shared store (a scrape hook)."""
        for team in teams:
            verdict = await quota.budget_state(team)
            if verdict is not None:
                limits = Limits.of(team)
                self.metrics.budget_spent_ratio.labels(team.name).set(
                    (limits.budget - verdict.budget[0]) / limits.budget)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, name="budget-alert")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fire(self, alert: Alert, webhook_url: str | None) -> None:
        key = (alert.team, alert.month, alert.threshold)
        try:
            claimed = await self.claims.claim(*key)
        except STORE_ERRORS as exc:
            self._seen.discard(key)  # a later verdict tries again
            log.warning("budget alert for team %r could not be claimed in the state store: %s", alert.team, exc)
            return
        if not claimed:
            return  # another replica (or an earlier life of this one) fired it
        log.warning("budget alert: team %r has spent USD %.6f of its USD %g budget for %s (threshold %g%%)",
                    alert.team, alert.spent, alert.budget, alert.month, alert.threshold * 100)
        self.metrics.budget_alerts.labels(alert.team, f"{alert.threshold:g}").inc()
        if webhook_url:
            await self._deliver(webhook_url, alert)

    async def _deliver(self, url: str, alert: Alert) -> None:
        """POSTs the alert until a 2xx answer, with jittered exponential backoff. The URL is never logged: a
        webhook URL often carries its own secret."""
        body = orjson.dumps(asdict(alert))
        for attempt in range(1, self.attempts + 1):
            try:
                reason = await self._post(url, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            if reason is None:
                self.delivered += 1
                return
            self.failures += 1
            self.metrics.budget_webhook_failures.labels(alert.team).inc()
            if attempt == self.attempts:
                break
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("budget alert webhook of team %r failed (%s, attempt %d of %d); retrying in %.1f s",
                        alert.team, reason, attempt, self.attempts, delay)
            await asyncio.sleep(delay)
        log.error("budget alert webhook of team %r: gave up after %d attempts", alert.team, self.attempts)

    async def _post(self, url: str, body: bytes) -> str | None:
        """None when the receiver took the alert, else why not."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            return None if resp.status < 300 else f"HTTP {resp.status}"

    async def idle(self) -> None:
        """Returns when every alert started so far has been claimed and delivered (or given up)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()


async def budget_rows(quota: QuotaGate, teams: Iterable[cfg.Team]) -> list[dict[str, Any]]:
    """Spend vs budget this UTC month of each team with a budget, for the usage API (store errors propagate)."""
    rows = []
    for team in sorted(teams, key=lambda t: t.name):
        verdict = await quota.budget_state(team)
        if verdict is None:
            continue
        limits = Limits.of(team)
        spent = limits.budget - verdict.budget[0]
        rows.append({"team": team.name, "month": month_name(verdict.month), "spent_usd": spent / NANO_USD,
                     "budget_usd": limits.budget / NANO_USD, "spent_ratio": spent / limits.budget})
    return rows
