"""The in-process rule engine: calls in, alert transitions out, time always a parameter.

:meth:`Engine.observe` files one finished call into the windows of every rule that
matches it (one series per rule and group labels); :meth:`Engine.evaluate` reads
the windows of the rules that are due, steps their alert state machines
(:mod:`sidecar.rules.state`) and returns the firing and resolved
:class:`~sidecar.rules.state.Transition` objects, which also feed the
:class:`~sidecar.rules.incidents.IncidentBook` that ``mttr`` and ``incident_age``
rules read. Rules of those two kinds are evaluated after the others, so they see
the incidents opened at the same evaluation.

What each kind measures (the same definitions :mod:`sidecar.rules.export` writes in
PromQL):

- ``slo``: error ratio ``bad / all`` per window; an alert of a severity is active
  when, for one of its window pairs, both ratios exceed ``factor x (1 - objective)``.
  Its value is the long window's ratio of the first such pair.
- ``latency``: ``histogram_quantile`` over the proxy's buckets, above ``threshold``.
- ``error_rate``: ``bad / all`` over the window above ``threshold``, with at least
  ``min_requests`` calls.
- ``budget``: USD (unpriced calls count 0) or tokens (one type, else input + output)
  spent in the calendar or rolling period, reaching ``limit`` (``>=``).
- ``mttr``: mean ``end - start`` of the incidents of ``incidents_of`` that ended in the
  window, above ``threshold``, with at least ``min_incidents`` of them.
- ``incident_age``: an open incident of ``incidents_of`` older than ``threshold``.
- ``absence``: no matching call for ``window`` (an ungrouped rule counts from when
  the engine, or the rule, started).

Memory is bounded: each series is a fixed set of :class:`~sidecar.rules.windows.Ring`
buffers, a rule holds at most ``max_series`` series (calls of further groups are
counted in :attr:`Engine.series_dropped`), and idle series are dropped.

Pure module: standard library and :mod:`sidecar` core modules only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Generic, TypeVar
from zoneinfo import ZoneInfo

from sidecar.durations import format_duration
from sidecar.model import TOKEN_TYPES, CallRecord, Usage
from sidecar.rules import templates
from sidecar.rules.incidents import Incident, IncidentBook
from sidecar.rules.model import (
    AbsenceRule,
    BudgetRule,
    ErrorRateRule,
    IncidentAgeRule,
    LatencyRule,
    MttrRule,
    Rule,
    RuleSet,
    SloRule,
)
from sidecar.rules.state import AlertTable, Event, LabelSet, Transition
from sidecar.rules.windows import HistogramRing, Ring, SumRing, calendar_period

__all__ = [
    "DEFAULT_MATCH_CACHE",
    "DEFAULT_MAX_SERIES",
    "BudgetBreach",
    "Engine",
    "Result",
    "Sample",
    "budget_amount",
    "call_labels",
    "describe_duration",
]

DEFAULT_MAX_SERIES = 10_000
#: Distinct call label sets whose matching rules and groups :meth:`Engine.observe` remembers.
DEFAULT_MATCH_CACHE = 4096
#: A failed upstream attempt's outcome → the error type a rule sees for it.
_ATTEMPT_ERRORS = {
    "5xx": "upstream_5xx",
    "timeout": "timeout",
    "connect_error": "connect_error",
    "429": "rate_limited",
}
_ATTEMPT_STATUS = {"5xx": 502, "timeout": 504, "connect_error": 502, "429": 429}
S = TypeVar("S")
_INCIDENT_KINDS = ("mttr", "incident_age")


@dataclass(frozen=True, slots=True)
class Result:
    """What a rule measured for one alert at one evaluation."""

    value: float
    value_text: str
    threshold_text: str
    budget_remaining: float | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """One gauge value for the metrics collector: metric name, labels, value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float


def describe_duration(seconds: float) -> str:
    """Seconds as a short Prometheus-style duration (``1h5m``), rounded to the second (or ms below 10s)."""
    if not math.isfinite(seconds) or seconds < 0:
        return str(seconds)
    return format_duration(round(seconds, 3) if seconds < 10 else round(seconds))


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.3g}%"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _metric_labels(base: LabelSet, labels: LabelSet) -> LabelSet:
    """``base`` then ``labels``; a group label named like a base one (an ``incident_age`` or
    ``mttr`` alert's ``rule``/``severity``) becomes ``incident_<name>``."""
    names = {k for k, _ in base}
    return (*base, *((f"incident_{k}" if k in names else k, v) for k, v in labels))


# -- evaluators ------------------------------------------------------------------------


class _Evaluator:
    """Per-rule state: series by group labels, one alert table per severity."""

    def __init__(self, rule: Rule, now: float, max_series: int) -> None:
        self.rule = rule
        self.max_series = max_series
        self.created = now
        self.next_due = now
        self.tables = {sev: AlertTable(rule.for_, rule.keep_firing_for) for sev in rule.severities()}
        self.last: dict[tuple[str, LabelSet], Result] = {}  # latest result of each pending/firing alert
        self.dropped = 0

    def group(self, labels: Mapping[str, str]) -> LabelSet:
        return tuple((name, labels.get(name, "")) for name in self.rule.group_by)

    def observe(self, labels: Mapping[str, str], record: CallRecord, t: float) -> None:
        """File one matching call at time ``t``."""
        self.file(self.group(labels), record, t)

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        """File one matching call of the group ``key`` (``group(labels)``) at time ``t``."""

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        """Active label sets per severity, with what was measured."""
        raise NotImplementedError

    def samples(self, now: float) -> list[Sample]:
        """Gauges this rule exposes besides ``llm_alerts_firing``."""
        return []

    def gc(self, now: float) -> None:
        """Drop series with nothing in their windows and no alert."""

    def has_alert(self, key: LabelSet) -> bool:
        return any(table.get(key) is not None for table in self.tables.values())

    def due(self, now: float) -> bool:
        return now >= self.next_due

    def advance(self, now: float) -> None:
        interval = self.rule.evaluation_interval
        if now >= self.next_due:
            self.next_due += interval * (math.floor((now - self.next_due) / interval) + 1)


class _SeriesEvaluator(_Evaluator, Generic[S]):
    """Evaluators that keep a bounded dict of per-group series."""

    def __init__(self, rule: Rule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        self.series: dict[LabelSet, S] = {}

    def _series(self, key: LabelSet) -> S | None:
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.max_series:
                self.dropped += 1
                return None
            series = self.new_series(key)
            self.series[key] = series
        return series

    def new_series(self, key: LabelSet) -> S:
        raise NotImplementedError

    def idle(self, series: S, now: float) -> bool:
        return False

    def gc(self, now: float) -> None:
        for key, series in list(self.series.items()):
            if self.idle(series, now) and not self.has_alert(key):
                del self.series[key]


class _SloEvaluator(_SeriesEvaluator[dict[float, Ring]]):
    rule: SloRule

    def __init__(self, rule: SloRule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        self.windows = rule.windows()
        self.bad = frozenset(rule.bad)

    def new_series(self, key: LabelSet) -> dict[float, Ring]:
        return {w: Ring(w, 2) for w in self.windows}

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        series = self._series(key)
        if series is None:
            return
        if record.error_type in self.bad:
            for ring in series.values():
                ring.add(t, 0, 1.0)
                ring.add(t, 1, 1.0)
        else:
            for ring in series.values():
                ring.add(t, 0, 1.0)

    def ratios(self, series: dict[float, Ring], now: float) -> dict[float, tuple[float, float]]:
        out: dict[float, tuple[float, float]] = {}
        for window, ring in series.items():
            total, bad = ring.totals(now)
            out[window] = (total, bad)
        return out

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        out: dict[str, dict[LabelSet, Result]] = {sev: {} for sev in self.tables}
        budget = rule.error_budget
        for key, series in self.series.items():
            counts = self.ratios(series, now)

            def ratio(window: float, counts: dict[float, tuple[float, float]] = counts) -> float | None:
                total, bad = counts[window]
                return bad / total if total > 0 else None

            total_period, bad_period = counts[rule.period]
            remaining = 1.0 - (bad_period / total_period) / budget if total_period > 0 else 1.0
            for alert in rule.alerts:
                if key in out[alert.severity]:
                    continue  # an earlier pair of this severity already holds (PromQL "or" keeps the left)
                long, short = ratio(alert.long), ratio(alert.short)
                limit = rule.ratio_limit(alert)
                if long is None or short is None or not (long > limit and short > limit):
                    continue
                if counts[alert.long][0] < rule.min_requests:
                    continue
                out[alert.severity][key] = Result(
                    value=long,
                    value_text=(
                        f"error ratio {_pct(long)} over {describe_duration(alert.long)} "
                        f"(burn rate {long / budget:.3g}x), "
                        f"{_pct(short)} over {describe_duration(alert.short)} "
                        f"(burn rate {short / budget:.3g}x)"
                    ),
                    threshold_text=f"burn rate {alert.factor:.3g}x (error ratio {_pct(limit)})",
                    budget_remaining=remaining,
                )
        return out

    def samples(self, now: float) -> list[Sample]:
        """Budget left over the period, and the burn rate of every alert window with traffic."""
        out: list[Sample] = []
        budget = self.rule.error_budget
        alert_windows = {w for a in self.rule.alerts for w in (a.long, a.short)}
        for key, series in self.series.items():
            counts = self.ratios(series, now)
            total, bad = counts[self.rule.period]
            remaining = 1.0 - (bad / total) / budget if total > 0 else 1.0
            out.append(
                Sample("llm_slo_error_budget_remaining_ratio", (("rule", self.rule.name), *key), remaining)
            )
            for window in sorted(alert_windows):
                total, bad = counts[window]
                if total > 0:
                    labels = (("rule", self.rule.name), ("window", describe_duration(window)), *key)
                    out.append(Sample("llm_slo_burn_rate", labels, (bad / total) / budget))
        return out

    def idle(self, series: dict[float, Ring], now: float) -> bool:
        return series[self.rule.period].empty(now)


class _LatencyEvaluator(_SeriesEvaluator[HistogramRing]):
    rule: LatencyRule

    def __init__(self, rule: LatencyRule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        self.duration = rule.signal == "duration"

    def new_series(self, key: LabelSet) -> HistogramRing:
        return HistogramRing(self.rule.window)

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        value = record.duration_s if self.duration else record.ttft_s
        if value is None:
            return
        series = self._series(key)
        if series is not None:
            series.observe(t, value)

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        active: dict[LabelSet, Result] = {}
        what = "duration" if rule.signal == "duration" else "time to first token"
        for key, series in self.series.items():
            count = series.count(now)
            if count == 0 or count < rule.min_requests:
                continue
            q = series.quantile(rule.quantile, now)
            if math.isnan(q) or not q > rule.threshold:
                continue
            active[key] = Result(
                value=q,
                value_text=(
                    f"p{rule.quantile * 100:g} {what} {describe_duration(q)} over "
                    f"{describe_duration(rule.window)} ({count:.0f} calls)"
                ),
                threshold_text=describe_duration(rule.threshold),
            )
        return {rule.severity: active}

    def idle(self, series: HistogramRing, now: float) -> bool:
        return series.empty(now)


class _ErrorRateEvaluator(_SeriesEvaluator[Ring]):
    rule: ErrorRateRule

    def __init__(self, rule: ErrorRateRule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        self.bad = frozenset(rule.bad)

    def new_series(self, key: LabelSet) -> Ring:
        return Ring(self.rule.window, 2)

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        series = self._series(key)
        if series is not None:
            series.add(t, 0, 1.0)
            if record.error_type in self.bad:
                series.add(t, 1, 1.0)

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        active: dict[LabelSet, Result] = {}
        for key, series in self.series.items():
            total, bad = series.totals(now)
            if total <= 0 or total < rule.min_requests:
                continue
            ratio = bad / total
            if ratio > rule.threshold:
                active[key] = Result(
                    value=ratio,
                    value_text=f"{_pct(ratio)} of {total:.0f} calls bad in {describe_duration(rule.window)}",
                    threshold_text=_pct(rule.threshold),
                )
        return {rule.severity: active}

    def idle(self, series: Ring, now: float) -> bool:
        return series.empty(now)


def budget_amount(rule: BudgetRule, record: CallRecord) -> float:
    """What one call spends of a budget rule: its cost, or its tokens (of one type, or input + output)."""
    if rule.signal == "cost_usd":
        return float(record.cost_usd) if record.cost_usd is not None else 0.0
    if rule.token_type is not None:
        return float(_token_count(record, rule.token_type))
    return float(_token_count(record, "input") + _token_count(record, "output"))


def _token_count(record: CallRecord, token_type: str) -> int:
    """What ``record.token_counts()`` says of one type (reported, else estimated; 0 without
    either), without building the list: this runs for every call a token budget sees."""
    if token_type not in TOKEN_TYPES:
        return 0
    count = record.usage.get(token_type)
    if count is None:
        count = record.estimated.get(token_type)
    return count if count is not None else 0


#: The labels a rule matches and groups a call by, in the order of :func:`_call_key`.
_CALL_LABELS = ("tenant", "upstream", "provider", "model")


def _call_key(record: CallRecord) -> tuple[str, str, str, str]:
    return (record.tenant, record.upstream, record.provider, record.model)


def call_labels(record: CallRecord) -> dict[str, str]:
    """The labels a rule matches and groups a call by."""
    return dict(zip(_CALL_LABELS, _call_key(record), strict=True))


@dataclass(frozen=True, slots=True)
class BudgetBreach:
    """A spent ``action: reject`` budget: what the refusal tells the client."""

    rule: str
    signal: str  # "cost_usd" | "tokens"
    token_type: str | None
    spent: float
    limit: float
    resets_at: float | None  # the end of the calendar period; None for a rolling one

    def message(self) -> str:
        """``budget "x" is exhausted: $12.34 of $10.00 spent; it resets at 2026-12-07T00:00:00Z``."""
        if self.signal == "cost_usd":
            amounts = f"${self.spent:,.2f} of ${self.limit:,.2f} spent"
        else:
            what = f"{self.token_type or 'input+output'} tokens"
            amounts = f"{self.spent:,.0f} of {self.limit:,.0f} {what} used"
        if self.resets_at is not None:
            when = datetime.fromtimestamp(self.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            reset = f"it resets at {when}"
        else:
            reset = "it is a rolling period: calls pass again as older spend leaves it"
        return f'budget "{self.rule}" is exhausted: {amounts}; {reset}'


@dataclass(slots=True)
class _Spend:
    start: float = 0.0  # calendar: the period start this sum belongs to
    end: float = 0.0
    spent: float = 0.0
    ring: SumRing | None = None  # rolling periods
    limit: float = math.inf  # the group's limit (rule.limit_for(key)), looked up once


class _BudgetEvaluator(_SeriesEvaluator[_Spend]):
    rule: BudgetRule

    def __init__(self, rule: BudgetRule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        self.tz = ZoneInfo(rule.timezone)
        self.exceeded: set[LabelSet] = set()

    def new_series(self, key: LabelSet) -> _Spend:
        ring = None if self.rule.calendar else SumRing(self.rule.period)
        return _Spend(ring=ring, limit=self.rule.limit_for(key))

    def amount(self, record: CallRecord) -> float:
        return budget_amount(self.rule, record)

    def spent(self, spend: _Spend, now: float) -> float:
        if spend.ring is not None:
            return spend.ring.totals(now)[0]
        return spend.spent if spend.start <= now < spend.end else 0.0

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        amount = self.amount(record)
        spend = self._series(key)
        if spend is None or amount <= 0:
            return
        if spend.ring is not None:
            if key in self.exceeded:
                spend.ring.add(t, 0, amount)  # already over: the total would change nothing
                return
            total = spend.ring.add_total(t, amount)
        else:
            if not spend.start <= t < spend.end:
                start, end = calendar_period(t, self.rule.period_text, self.tz)
                if start < spend.start:
                    return  # a late call of a period already closed
                spend.start, spend.end, spend.spent = start, end, 0.0
            spend.spent += amount
            total = spend.spent
        if total >= spend.limit:
            self.exceeded.add(key)  # effective at once for action: reject, before the next evaluation

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        active: dict[LabelSet, Result] = {}
        exceeded: set[LabelSet] = set()
        unit = "$" if rule.signal == "cost_usd" else ""
        what = "" if rule.signal == "cost_usd" else f" {rule.token_type or 'input+output'} tokens"
        for key, spend in self.series.items():
            spent = self.spent(spend, now)
            limit = rule.limit_for(key)
            if spent < limit:
                continue
            exceeded.add(key)
            if rule.calendar:
                period = f"since {_when(spend.start)} ({rule.period_text} in {rule.timezone})"
            else:
                period = f"over the last {describe_duration(rule.period)}"
            active[key] = Result(
                value=spent,
                value_text=f"{unit}{spent:,.2f}{what} spent {period}",
                threshold_text=f"{unit}{limit:,.2f}{what}",
            )
        self.exceeded = exceeded
        return {rule.severity: active}

    def samples(self, now: float) -> list[Sample]:
        out: list[Sample] = []
        for key, spend in self.series.items():
            labels = (("rule", self.rule.name), *key)
            out.append(Sample("llm_budget_spent", labels, self.spent(spend, now)))
            out.append(Sample("llm_budget_limit", labels, self.rule.limit_for(key)))
        return out

    def idle(self, series: _Spend, now: float) -> bool:
        return self.spent(series, now) == 0.0


class _AbsenceEvaluator(_Evaluator):
    rule: AbsenceRule

    def __init__(self, rule: AbsenceRule, now: float, max_series: int) -> None:
        super().__init__(rule, now, max_series)
        # An ungrouped rule watches from the start; grouped ones from each group's first call.
        self.last_seen: dict[LabelSet, float] = {} if rule.group_by else {(): now}

    def file(self, key: LabelSet, record: CallRecord, t: float) -> None:
        seen = self.last_seen.get(key)
        if seen is None:
            if len(self.last_seen) >= self.max_series:
                self.dropped += 1
                return
            self.last_seen[key] = t
        elif t > seen:  # max(seen, t)
            self.last_seen[key] = t

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        window = self.rule.window
        active: dict[LabelSet, Result] = {}
        for key, seen in self.last_seen.items():
            quiet = now - seen
            if quiet >= window:
                active[key] = Result(
                    value=quiet,
                    value_text=f"no calls for {describe_duration(quiet)} (last at {_when(seen)})",
                    threshold_text=f"no calls for {describe_duration(window)}",
                )
        return {self.rule.severity: active}


class _MttrEvaluator(_Evaluator):
    rule: MttrRule

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        groups: dict[LabelSet, list[Incident]] = {}
        for inc in book.resolved_between(rule.incidents_of, now - rule.window, now):
            values = {"rule": inc.rule, "severity": inc.severity}
            groups.setdefault(tuple((n, values[n]) for n in rule.group_by), []).append(inc)
        active: dict[LabelSet, Result] = {}
        for key, incs in groups.items():
            mttr = sum(i.duration(now) for i in incs) / len(incs)
            if len(incs) >= rule.min_incidents and mttr > rule.threshold:
                active[key] = Result(
                    value=mttr,
                    value_text=(
                        f"MTTR {describe_duration(mttr)} over {len(incs)} incidents resolved in the last "
                        f"{describe_duration(rule.window)}"
                    ),
                    threshold_text=describe_duration(rule.threshold),
                )
        return {rule.severity: active}


class _IncidentAgeEvaluator(_Evaluator):
    rule: IncidentAgeRule

    def results(self, now: float, book: IncidentBook) -> dict[str, dict[LabelSet, Result]]:
        rule = self.rule
        oldest: dict[LabelSet, Incident] = {}
        for inc in book.open_incidents(rule.incidents_of):
            key: LabelSet = (("rule", inc.rule), *inc.labels)
            if key not in oldest or inc.start < oldest[key].start:
                oldest[key] = inc
        active: dict[LabelSet, Result] = {}
        for key, inc in oldest.items():
            age = now - inc.start
            if age > rule.threshold:
                active[key] = Result(
                    value=age,
                    value_text=f"incident {inc.id} ({inc.severity}) open for {describe_duration(age)}",
                    threshold_text=describe_duration(rule.threshold),
                )
        return {rule.severity: active}


_EVALUATORS: dict[str, type[_Evaluator]] = {
    "slo": _SloEvaluator,
    "latency": _LatencyEvaluator,
    "error_rate": _ErrorRateEvaluator,
    "budget": _BudgetEvaluator,
    "absence": _AbsenceEvaluator,
    "mttr": _MttrEvaluator,
    "incident_age": _IncidentAgeEvaluator,
}


# -- the engine ------------------------------------------------------------------------


@dataclass
class Engine:
    """Rules, their windows and alerts, and the incident book. Not thread-safe: one loop owns it.

    ``match_cache`` bounds how many distinct call label sets (tenant, upstream, provider,
    model) :meth:`observe` remembers the matching rules and group keys of; the labels
    come from clients, so when it is full it starts over. 0 turns it off.
    """

    rules: RuleSet
    now: float
    merge_gap: float = 300.0
    max_series: int = DEFAULT_MAX_SERIES
    match_cache: int = DEFAULT_MATCH_CACHE
    book: IncidentBook = field(init=False)
    _evaluators: list[_Evaluator] = field(init=False, default_factory=list)
    #: Call labels (``_call_key``) -> the call rules that match them, each with its group key.
    _targets: dict[tuple[str, str, str, str], tuple[tuple[_Evaluator, LabelSet], ...]] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )
    _rejects: list[_BudgetEvaluator] = field(init=False, default_factory=list)
    #: Rules that also see each failed attempt of a rewritten model (canary ``rollback_on``).
    attempt_rules: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        self.book = IncidentBook(self.merge_gap)
        self._evaluators = [self._build(rule, self.now) for rule in self._ordered(self.rules)]
        self._index_rejects()

    # -- construction -------------------------------------------------------------

    @staticmethod
    def _ordered(rules: Iterable[Rule]) -> list[Rule]:
        rules = list(rules)
        return [r for r in rules if r.kind not in _INCIDENT_KINDS] + [
            r for r in rules if r.kind in _INCIDENT_KINDS
        ]

    def _build(self, rule: Rule, now: float) -> _Evaluator:
        return _EVALUATORS[rule.kind](rule, now, self.max_series)

    def _index_rejects(self) -> None:
        self._rejects = [
            ev for ev in self._evaluators if isinstance(ev, _BudgetEvaluator) and ev.rule.action == "reject"
        ]

    def replace_rules(self, rules: RuleSet, now: float) -> list[Transition]:
        """Swap in a new rule set; unchanged rules keep their windows and alerts.

        Firing alerts of rules that were removed or changed are resolved (and their
        incidents closed) at ``now``; the returned transitions say so.
        """
        old = {ev.rule.name: ev for ev in self._evaluators}
        kept: list[_Evaluator] = []
        out: list[Transition] = []
        new_names = set()
        for rule in self._ordered(rules):
            new_names.add(rule.name)
            ev = old.get(rule.name)
            if ev is not None and ev.rule == rule:
                kept.append(ev)
                continue
            if ev is not None:
                out.extend(self._retire(ev, now, "the rule changed in a reload"))
            kept.append(self._build(rule, now))
        for name, ev in old.items():
            if name not in new_names:
                out.extend(self._retire(ev, now, "the rule was removed in a reload"))
        self.rules = rules
        self._evaluators = kept
        self._targets.clear()
        self._index_rejects()
        return out

    def _retire(self, ev: _Evaluator, now: float, why: str) -> list[Transition]:
        out: list[Transition] = []
        for severity, table in ev.tables.items():
            for change in table.clear(now):
                result = ev.last.get((severity, change.labels)) or Result(change.value, "", "")
                result = replace(result, value_text=f"{result.value_text} ({why})".strip())
                t = self._transition(
                    ev.rule, severity, change.labels, "resolved", now, change.fired_at, result, change.peak
                )
                self.book.apply(t)
                out.append(t)
        return out

    # -- the record path ----------------------------------------------------------

    def observe(self, record: CallRecord, now: float) -> None:
        """File one finished call (at its ``finished_at``, never later than ``now``)."""
        t = record.finished_at if 0 < record.finished_at <= now else now
        for ev, key in self._targets_of(record):
            ev.file(key, record, t)
        if self.attempt_rules and len(record.attempts) > 1:
            self._observe_failed_attempts(record, t)

    def _targets_of(self, record: CallRecord) -> tuple[tuple[_Evaluator, LabelSet], ...]:
        """The call rules (not ``mttr``/``incident_age``) that match ``record``, in order, each
        with the record's group key; a rule's match and group read only these labels."""
        labels_key = _call_key(record)
        targets = self._targets.get(labels_key)
        if targets is None:
            labels = dict(zip(_CALL_LABELS, labels_key, strict=True))
            targets = tuple(
                (ev, ev.group(labels))
                for ev in self._evaluators
                if ev.rule.kind not in _INCIDENT_KINDS and ev.rule.matches(labels)
            )
            if len(self._targets) >= self.match_cache:
                self._targets.clear()
            if self.match_cache > 0:
                self._targets[labels_key] = targets
        return targets

    def _observe_failed_attempts(self, record: CallRecord, t: float) -> None:
        """File the failed attempts of a rewritten model (a canary candidate) with the rules
        in :attr:`attempt_rules`.

        A candidate that fails falls back to the primary version, so the client's call, and
        its record, succeed: without this, the rules that judge the candidate would never see
        its failures. Only those rules get them; every other rule sees one observation per call.
        """
        for attempt in record.attempts[:-1]:
            error_type = _ATTEMPT_ERRORS.get(attempt.outcome)
            if attempt.model is None or error_type is None:
                continue
            failed = replace(
                record,
                upstream=attempt.upstream,
                request_model=attempt.model,
                response_model=None,
                status=_ATTEMPT_STATUS.get(attempt.outcome, 502),
                error_type=error_type,
                duration_s=attempt.duration_s,
                ttft_s=None,
                usage=Usage(),
                estimated=Usage(),
                cost_usd=None,
                attempts=(),
                events=(),
            )
            for ev, key in self._targets_of(failed):
                if ev.rule.name in self.attempt_rules:
                    ev.file(key, failed, t)

    def budget_exceeded(self, tenant: str, provider: str, model: str, upstream: str) -> bool:
        """True when a ``budget`` rule with ``action: reject`` has spent the budget of this call's group."""
        return self.budget_breach(tenant, provider, model, upstream, None) is not None

    def budget_breach(
        self, tenant: str, provider: str, model: str, upstream: str, now: float | None
    ) -> BudgetBreach | None:
        """The spent ``action: reject`` budget of this call's group, if any (dict lookups only).

        ``now`` (None: skip the figures) fills in what was spent and when the period resets,
        for the refusal's message.
        """
        if not self._rejects:
            return None
        labels = {"tenant": tenant, "upstream": upstream, "provider": provider, "model": model}
        for ev in self._rejects:
            if not ev.exceeded or not ev.rule.matches(labels):
                continue
            key = ev.group(labels)
            if key not in ev.exceeded:
                continue
            rule = ev.rule
            spend = ev.series.get(key)
            spent = ev.spent(spend, now) if spend is not None and now is not None else 0.0
            resets = spend.end if spend is not None and rule.calendar else None
            return BudgetBreach(rule.name, rule.signal, rule.token_type, spent, rule.limit_for(key), resets)
        return None

    # -- evaluation ---------------------------------------------------------------

    def next_due(self) -> float:
        """The earliest time a rule is due (``inf`` without rules)."""
        return min((ev.next_due for ev in self._evaluators), default=math.inf)

    def evaluate(self, now: float, pace: Callable[[], None] | None = None) -> list[Transition]:
        """Evaluate the rules due at ``now``; return the alerts that fired or resolved.

        Rules over calls go first and their transitions reach the incident book
        before the ``mttr`` and ``incident_age`` rules read it. ``pace`` (when given) is
        called before each rule (a background thread's :class:`sidecar.threads.Pacer`).
        """
        out: list[Transition] = []
        for incident_kinds in (False, True):
            done = len(out)
            for ev in self._evaluators:
                if (ev.rule.kind in _INCIDENT_KINDS) != incident_kinds or not ev.due(now):
                    continue
                if pace is not None:
                    pace()
                ev.advance(now)
                out.extend(self._step(ev, now))
                ev.gc(now)
            for t in out[done:]:
                self.book.apply(t)
        return out

    def _step(self, ev: _Evaluator, now: float) -> list[Transition]:
        out: list[Transition] = []
        results = ev.results(now, self.book)
        for severity, table in ev.tables.items():
            active = results.get(severity, {})
            for change in table.update({k: r.value for k, r in active.items()}, now):
                key = (severity, change.labels)
                result = active.get(change.labels) or ev.last.get(key) or Result(change.value, "", "")
                if change.event is Event.FIRING:
                    out.append(
                        self._transition(
                            ev.rule, severity, change.labels, "firing", now, now, result, change.peak
                        )
                    )
                elif change.event is Event.RESOLVED:
                    out.append(
                        self._transition(
                            ev.rule,
                            severity,
                            change.labels,
                            "resolved",
                            now,
                            change.fired_at,
                            result,
                            change.peak,
                        )
                    )
                if change.event in (Event.RESOLVED, Event.CANCELLED):
                    ev.last.pop(key, None)
            for labels, result in active.items():
                if table.get(labels) is not None:
                    ev.last[(severity, labels)] = result
            for alert in table.firing():
                self.book.note_value((ev.rule.name, severity, alert.labels), alert.value)
        return out

    def _transition(
        self,
        rule: Rule,
        severity: str,
        labels: LabelSet,
        status: str,
        at: float,
        since: float,
        result: Result,
        peak: float,
    ) -> Transition:
        label_map = dict(labels)
        annotations = tuple((k, templates.render(v, label_map, result.value)) for k, v in rule.annotations)
        return Transition(
            rule=rule.name,
            kind=rule.kind,
            severity=severity,
            labels=labels,
            status=status,
            at=at,
            since=since,
            value=result.value,
            peak=peak if math.isfinite(peak) else result.value,
            value_text=result.value_text,
            threshold_text=result.threshold_text,
            channels=rule.channels_for(severity),
            annotations=annotations,
            budget_remaining=result.budget_remaining,
        )

    def firing(self, now: float) -> list[Transition]:
        """Every alert firing now, as ``firing`` transitions at ``now`` (for repeat notifications)."""
        out: list[Transition] = []
        for ev in self._evaluators:
            for severity, table in ev.tables.items():
                for alert in table.firing():
                    result = ev.last.get((severity, alert.labels)) or Result(alert.value, "", "")
                    out.append(
                        self._transition(
                            ev.rule, severity, alert.labels, "firing", now, alert.fired_at, result, alert.peak
                        )
                    )
        return out

    # -- incidents ----------------------------------------------------------------

    def restore(self, incidents: Sequence[Incident], now: float) -> None:
        """Seed the incident book after a restart and put alerts of open incidents back to firing.

        An open incident whose rule (or severity) no longer exists is closed at ``now``.
        """
        self.book.seed(incidents, now)
        tables = {(ev.rule.name, sev): table for ev in self._evaluators for sev, table in ev.tables.items()}
        for inc in incidents:
            if inc.end is not None:
                continue
            table = tables.get((inc.rule, inc.severity))
            if table is None:
                self.book.close(inc.key, now)
            else:
                table.restore(inc.labels, inc.start, inc.peak)

    def ack(self, incident_id: str, by: str, now: float) -> bool:
        """Acknowledge an incident the book holds; ``False`` when unknown."""
        return self.book.ack(incident_id, by, now)

    # -- metrics ------------------------------------------------------------------

    @property
    def series_dropped(self) -> int:
        """Calls not filed because a rule already held ``max_series`` groups."""
        return sum(ev.dropped for ev in self._evaluators)

    def samples(self, now: float) -> list[Sample]:
        """Every gauge the alerting collector exposes, computed at ``now``."""
        out: list[Sample] = []
        for ev in self._evaluators:
            for severity, table in ev.tables.items():
                for alert in table.firing():
                    labels = _metric_labels((("rule", ev.rule.name), ("severity", severity)), alert.labels)
                    out.append(Sample("llm_alerts_firing", labels, 1.0))
            out.extend(ev.samples(now))
        open_counts: dict[tuple[str, str], int] = {
            (ev.rule.name, sev): 0 for ev in self._evaluators for sev in ev.tables
        }
        for inc in self.book.open_incidents():
            open_counts[(inc.rule, inc.severity)] = open_counts.get((inc.rule, inc.severity), 0) + 1
            labels = _metric_labels((("rule", inc.rule), ("severity", inc.severity)), inc.labels)
            out.append(Sample("llm_incident_open_age_seconds", labels, now - inc.start))
        for (rule, severity), count in open_counts.items():
            out.append(Sample("llm_incidents_open", (("rule", rule), ("severity", severity)), float(count)))
        return out
