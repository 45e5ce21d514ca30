"""Reject budgets shared by a fleet: the spend of every replica summed in Redis.

One replica's rule engine only sees the calls that replica served, so with N replicas an
``action: reject`` budget would let N times its limit through. With ``state.url`` set,
every finished call's spend is also added to a Redis counter per (rule, group, calendar
period) (:class:`SharedSpendSink`, off the request path), and the proxy's budget check
reads those counters (:meth:`SharedBudgets.breach`, cached for ``refresh`` seconds so a
busy tenant costs one Redis read a second, not one per call).

What it does not share: rolling-period budgets (``period: 12h`` without ``calendar``)
stay per replica (a sliding window is not one counter); spend that a replica could not
add while Redis was down counts only on that replica (its own engine still refuses on it).
When Redis does not answer, the check falls back to the local engine's decision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from zoneinfo import ZoneInfo

from sidecar.gateway.sharedstate import SharedLimiter
from sidecar.model import CallRecord
from sidecar.rules.engine import BudgetBreach, budget_amount, call_labels
from sidecar.rules.model import BudgetRule
from sidecar.rules.windows import calendar_period
from sidecar.sinks import QueueSink

log = logging.getLogger("sidecar.gateway.budgets")

#: How long a total read from Redis is trusted before the next call reads it again.
DEFAULT_REFRESH = 1.0
#: Counters outlive their period by this much (late calls, clock skew between replicas).
EXPIRY_MARGIN = 3600.0


def shared_rules(rules: Sequence[object]) -> list[BudgetRule]:
    """The rules whose spend is shared: budgets with ``action: reject`` over a calendar period."""
    return [r for r in rules if isinstance(r, BudgetRule) and r.action == "reject" and r.calendar]


def spend_key(rule: BudgetRule, group: tuple[tuple[str, str], ...], period_start: float) -> str:
    """The counter's name (the group's label values are joined, never hashed, so it reads in redis-cli)."""
    labels = ",".join(f"{k}={v}" for k, v in group)
    return f"budget:{rule.name}:{labels}:{int(period_start)}"


def _group(rule: BudgetRule, labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, labels.get(name, "")) for name in rule.group_by)


class SharedBudgets:
    """The fleet-wide spend of each reject budget, for the proxy's budget check."""

    def __init__(
        self,
        shared: SharedLimiter,
        rules: Callable[[], Sequence[object]],
        *,
        clock: Callable[[], float] = time.time,
        refresh: float = DEFAULT_REFRESH,
    ) -> None:
        self.shared = shared
        self._rules = rules
        self.clock = clock
        self.refresh = refresh
        self._zones: dict[str, ZoneInfo] = {}
        self._cache: dict[str, tuple[float, float]] = {}  # key -> (total, read at)

    def _zone(self, name: str) -> ZoneInfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = ZoneInfo(name)
        return zone

    def _period(self, rule: BudgetRule, now: float) -> tuple[float, float]:
        return calendar_period(now, rule.period_text, self._zone(rule.timezone))

    async def add(self, record: CallRecord) -> None:
        """Add one finished call's spend to every shared budget it falls under."""
        rules = shared_rules(self._rules())
        if not rules:
            return
        labels = call_labels(record)
        t = record.finished_at or self.clock()
        for rule in rules:
            if not rule.matches(labels):
                continue
            amount = budget_amount(rule, record)
            if amount <= 0:
                continue
            start, end = self._period(rule, t)
            key = spend_key(rule, _group(rule, labels), start)
            total = await self.shared.add_spend(key, amount, end + EXPIRY_MARGIN)
            if total is not None:
                self._cache[key] = (total, self.clock())

    async def breach(self, tenant: str, provider: str, model: str, upstream: str) -> BudgetBreach | None:
        """The first shared budget of this call's group that is spent; None when none is (or
        when Redis does not answer: the local engine's check then stands alone)."""
        rules = shared_rules(self._rules())
        if not rules:
            return None
        labels = {"tenant": tenant, "upstream": upstream, "provider": provider, "model": model}
        now = self.clock()
        for rule in rules:
            if not rule.matches(labels):
                continue
            group = _group(rule, labels)
            start, end = self._period(rule, now)
            key = spend_key(rule, group, start)
            cached = self._cache.get(key)
            if cached is not None and now - cached[1] < self.refresh:
                total = cached[0]
            else:
                fetched = await self.shared.spend(key)
                if fetched is None:
                    continue
                total = fetched
                self._cache[key] = (total, now)
                if len(self._cache) > 100_000:
                    self._prune(now)
            limit = rule.limit_for(group)
            if total >= limit:
                return BudgetBreach(rule.name, rule.signal, rule.token_type, total, limit, end)
        return None

    def _prune(self, now: float) -> None:
        self._cache = {k: v for k, v in self._cache.items() if now - v[1] < self.refresh}


class SharedSpendSink(QueueSink):
    """Adds each finished call's spend to the shared budgets, off the request path."""

    name = "shared-budgets"

    def __init__(self, maxsize: int = 10_000) -> None:
        super().__init__(maxsize=maxsize)
        self.budgets: SharedBudgets | None = None  # set once the gateway has connected Redis

    async def handle(self, records: list[CallRecord]) -> None:
        budgets = self.budgets
        if budgets is None:
            return
        for record in records:
            await budgets.add(record)
