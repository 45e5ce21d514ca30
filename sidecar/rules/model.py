"""The rule model: frozen dataclasses a rule file becomes once parsed and validated.

Durations are float seconds, ratios are fractions (``objective: 99.9`` becomes
``0.999``, ``threshold: 5%`` becomes ``0.05``), and file defaults are already merged
into each rule. Two rules compare equal when they mean the same thing (their place in
the file is left out), which is how a reload tells unchanged rules apart.

Pure module: standard library and :mod:`sidecar.model` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from sidecar.model import ERROR_TYPES

__all__ = [
    "ERROR_TYPES",
    "GROUP_LABELS",
    "KINDS",
    "SEVERITIES",
    "AbsenceRule",
    "BudgetRule",
    "BurnAlert",
    "ErrorRateRule",
    "IncidentAgeRule",
    "LabelMatch",
    "LatencyRule",
    "Location",
    "MttrRule",
    "Rule",
    "RuleSet",
    "SloRule",
]

#: Call labels a rule can match on and group by (the proxy's metric labels).
GROUP_LABELS: tuple[str, ...] = ("tenant", "upstream", "provider", "model")
#: Labels an ``mttr`` rule can group incidents by.
INCIDENT_GROUP_LABELS: tuple[str, ...] = ("rule", "severity")
KINDS: tuple[str, ...] = ("slo", "latency", "error_rate", "budget", "mttr", "incident_age", "absence")
#: Severities and how they reach people (apprise notification types in ``sidecar.notify``).
SEVERITIES: tuple[str, ...] = ("page", "ticket", "info")
#: ``bad`` when a rule does not say: failures that are not the client's doing.
DEFAULT_BAD: tuple[str, ...] = (
    "upstream_5xx",
    "timeout",
    "connect_error",
    "stream_interrupted",
    "proxy_error",
)


@dataclass(frozen=True, slots=True)
class Location:
    """Where something was written: file, 1-based line and column."""

    file: str = ""
    line: int = 0
    column: int = 0


@dataclass(frozen=True, slots=True)
class LabelMatch:
    """One label condition of a ``match``: any of ``values`` exactly, or ``regex`` (fully anchored)."""

    label: str
    values: tuple[str, ...] = ()
    regex: str | None = None

    def matches(self, value: str) -> bool:
        """True when ``value`` satisfies the condition."""
        if self.regex is not None:
            # re caches compiled patterns; the rule set holds only a handful.
            return re.fullmatch(self.regex, value) is not None
        return value in self.values


def _matches(match: tuple[LabelMatch, ...], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels.get(m.label, "")) for m in match)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """What every rule kind has. ``for_`` is the file's ``for``."""

    kind: ClassVar[str] = ""
    name: str
    match: tuple[LabelMatch, ...] = ()
    group_by: tuple[str, ...] = ()
    for_: float = 0.0
    keep_firing_for: float = 0.0
    evaluation_interval: float = 15.0
    severity: str = "ticket"
    # (severity or "*", channel names); "*" applies to every severity.
    notify: tuple[tuple[str, tuple[str, ...]], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    location: Location = field(default=Location(), compare=False)

    def severities(self) -> tuple[str, ...]:
        """The severities this rule can alert with (several for ``slo``)."""
        return (self.severity,)

    def channels_for(self, severity: str) -> tuple[str, ...]:
        """Channel names to notify for an alert of ``severity``."""
        out: list[str] = []
        for sev, channels in self.notify:
            if sev in ("*", severity):
                out.extend(c for c in channels if c not in out)
        return tuple(out)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when a call with ``labels`` is selected by ``match``."""
        return _matches(self.match, labels)


@dataclass(frozen=True, slots=True)
class BurnAlert:
    """One multiwindow burn-rate alert: both windows' error ratios above ``factor x (1 - objective)``."""

    severity: str
    long: float
    short: float
    factor: float
    budget_fraction: float | None = None  # where ``factor`` came from, when it did


@dataclass(frozen=True, kw_only=True)
class SloRule(Rule):
    """``kind: slo``: an availability objective over a period, alerting on burn rates."""

    kind: ClassVar[str] = "slo"
    objective: float  # fraction of good calls, e.g. 0.999
    period: float
    bad: tuple[str, ...] = DEFAULT_BAD
    alerts: tuple[BurnAlert, ...] = ()
    min_requests: int = 0

    def severities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.severity for a in self.alerts))

    @property
    def error_budget(self) -> float:
        """The allowed bad fraction, ``1 - objective`` (to 12 digits: 0.001, not 0.0010000000000000009)."""
        return float(f"{1.0 - self.objective:.12g}")

    def ratio_limit(self, alert: BurnAlert) -> float:
        """The error ratio both windows of ``alert`` must exceed: ``factor x (1 - objective)``.

        Rounded to 12 significant digits, and the exported PromQL uses the same number,
        so both engines compare against the same double.
        """
        return float(f"{alert.factor * self.error_budget:.12g}")

    def windows(self) -> tuple[float, ...]:
        """Every distinct window the rule reads, shortest first (the period included)."""
        found = {self.period}
        for a in self.alerts:
            found.update((a.long, a.short))
        return tuple(sorted(found))


@dataclass(frozen=True, kw_only=True)
class LatencyRule(Rule):
    """``kind: latency``: a quantile of call duration or time to first token above a threshold."""

    kind: ClassVar[str] = "latency"
    signal: str  # "duration" | "time_to_first_token"
    quantile: float
    threshold: float  # seconds
    window: float
    min_requests: int = 0


@dataclass(frozen=True, kw_only=True)
class ErrorRateRule(Rule):
    """``kind: error_rate``: the fraction of bad calls over a window above a threshold."""

    kind: ClassVar[str] = "error_rate"
    bad: tuple[str, ...] = DEFAULT_BAD
    threshold: float  # fraction
    window: float
    min_requests: int = 0


@dataclass(frozen=True, kw_only=True)
class BudgetRule(Rule):
    """``kind: budget``: spend (USD or tokens) over a calendar or rolling period reaching a limit."""

    kind: ClassVar[str] = "budget"
    signal: str  # "cost_usd" | "tokens"
    token_type: str | None = None  # tokens of one type; None: input + output
    period: float  # seconds (nominal for calendar periods: 1mo counts 30d)
    period_text: str  # as written: "1d", "1w", "1mo", "12h"...
    calendar: bool = False
    timezone: str = "UTC"
    limit: float
    # (group labels as sorted pairs, limit) per overridden group
    overrides: tuple[tuple[tuple[tuple[str, str], ...], float], ...] = ()
    action: str = "notify"  # "notify" | "reject"

    def limit_for(self, labels: tuple[tuple[str, str], ...]) -> float:
        """The limit of one group (its override, else ``limit``)."""
        for key, value in self.overrides:
            if all(pair in labels for pair in key):
                return value
        return self.limit


@dataclass(frozen=True, kw_only=True)
class MttrRule(Rule):
    """``kind: mttr``: mean time to resolve the incidents of some rules, over a window."""

    kind: ClassVar[str] = "mttr"
    incidents_of: tuple[str, ...]
    window: float
    threshold: float  # seconds
    min_incidents: int = 1


@dataclass(frozen=True, kw_only=True)
class IncidentAgeRule(Rule):
    """``kind: incident_age``: an incident of some rules open for longer than a threshold."""

    kind: ClassVar[str] = "incident_age"
    incidents_of: tuple[str, ...]
    threshold: float  # seconds


@dataclass(frozen=True, kw_only=True)
class AbsenceRule(Rule):
    """``kind: absence``: no matching call for a window."""

    kind: ClassVar[str] = "absence"
    window: float


@dataclass(frozen=True)
class RuleSet:
    """The rules of one or more files, names unique, references resolved."""

    rules: tuple[Rule, ...] = ()

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, name: str) -> Rule | None:
        """The rule called ``name``."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """Rule names in file order."""
        return tuple(r.name for r in self.rules)
