"""The alert state machine, as Prometheus runs it: inactive → pending → firing → resolved.

One :class:`AlertTable` per rule (and severity) holds one :class:`Alert` per group
labels. :meth:`AlertTable.update` takes the set of label sets whose condition holds
at an evaluation (with their values) and returns what changed. The rules are those
of Prometheus 2.42 ``rules/alerting.go`` (``AlertingRule.Eval``):

- A label set that becomes active is *pending* from that evaluation (``active_at``).
- It fires at the first evaluation ``t`` with ``t - active_at >= for`` while it stayed
  active at every evaluation in between; with ``for: 0`` it fires at once.
- A pending alert whose condition stops holding is dropped (no notification).
- A firing alert whose condition stops holding at ``t0`` keeps firing while
  ``t - t0 < keep_firing_for`` and resolves at the first evaluation where
  ``t - t0 >= keep_firing_for``; a return of the condition meanwhile cancels that.
- A resolved label set that becomes active again starts over as pending.

Pure module: standard library only; time is always a parameter.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Alert", "AlertTable", "Change", "Event", "LabelSet", "Phase", "Transition"]

#: Group labels of one alert, as sorted ``(name, value)`` pairs (hashable, ordered).
LabelSet = tuple[tuple[str, str], ...]


class Phase(enum.Enum):
    """Where one alert is in its life."""

    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"


class Event(enum.Enum):
    """What :meth:`AlertTable.update` reports for one alert."""

    PENDING = "pending"  # became active, waiting for ``for``
    CANCELLED = "cancelled"  # was pending, condition gone: nothing to tell anyone
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(slots=True)
class Alert:
    """The mutable state of one alert (one rule, severity and group labels)."""

    labels: LabelSet
    phase: Phase = Phase.INACTIVE
    active_at: float = 0.0
    fired_at: float = 0.0
    keep_firing_since: float | None = None
    value: float = math.nan
    peak: float = -math.inf  # the largest value seen while pending or firing


@dataclass(frozen=True, slots=True)
class Change:
    """One alert's change at one evaluation, with a copy of its state after it."""

    event: Event
    labels: LabelSet
    at: float
    active_at: float
    fired_at: float
    value: float
    peak: float


@dataclass(frozen=True, slots=True)
class Transition:
    """A firing or resolved alert, with everything a notification and an incident need.

    ``since`` is when the alert started firing; ``at`` is the evaluation time of the
    change (for a repeated notification of a still-firing alert, the time of the
    repeat). ``value`` is the rule's measured value, the same number Prometheus puts
    in ``$value`` for the exported rule; ``value_text`` and ``threshold_text`` say it
    for people.
    """

    rule: str
    kind: str  # the rule kind: slo, latency, error_rate, budget, mttr, incident_age, absence
    severity: str
    labels: LabelSet
    status: str  # "firing" | "resolved"
    at: float
    since: float
    value: float
    peak: float
    value_text: str
    threshold_text: str
    channels: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    budget_remaining: float | None = None  # SLO rules: the error budget left over the period

    @property
    def key(self) -> tuple[str, str, LabelSet]:
        """The identity of the alert: rule, severity and group labels."""
        return (self.rule, self.severity, self.labels)

    def annotation(self, name: str) -> str:
        """One rendered annotation, or ``""``."""
        return dict(self.annotations).get(name, "")


class AlertTable:
    """All alerts of one rule and severity, stepped together at each evaluation."""

    def __init__(self, hold: float = 0.0, keep_firing_for: float = 0.0) -> None:
        self.hold = hold
        self.keep_firing_for = keep_firing_for
        self._alerts: dict[LabelSet, Alert] = {}

    def __len__(self) -> int:
        return len(self._alerts)

    def __iter__(self) -> Iterator[Alert]:
        return iter(list(self._alerts.values()))

    def get(self, labels: LabelSet) -> Alert | None:
        """The alert for ``labels``, if pending or firing."""
        return self._alerts.get(labels)

    def firing(self) -> list[Alert]:
        """Alerts currently firing (keep-firing ones included)."""
        return [a for a in self._alerts.values() if a.phase is Phase.FIRING]

    def restore(self, labels: LabelSet, fired_at: float, value: float) -> None:
        """Put ``labels`` back in the firing state (after a restart), without an event."""
        self._alerts[labels] = Alert(
            labels, Phase.FIRING, active_at=fired_at, fired_at=fired_at, value=value, peak=value
        )

    def update(self, results: Mapping[LabelSet, float], now: float) -> list[Change]:
        """Step every alert to evaluation time ``now``; ``results`` are the active label sets."""
        changes: list[Change] = []
        for labels, value in results.items():
            alert = self._alerts.get(labels)
            if alert is None or alert.phase is Phase.INACTIVE:
                alert = Alert(labels, Phase.PENDING, active_at=now)
                self._alerts[labels] = alert
                changes.append(self._change(Event.PENDING, alert, now))
            alert.value = value
            if not math.isnan(value):
                alert.peak = max(alert.peak, value)
        for labels, alert in list(self._alerts.items()):
            if labels not in results:
                keep = False
                if alert.phase is Phase.FIRING and self.keep_firing_for > 0:
                    if alert.keep_firing_since is None:
                        alert.keep_firing_since = now
                    keep = now - alert.keep_firing_since < self.keep_firing_for
                if not keep:
                    del self._alerts[labels]
                    event = Event.RESOLVED if alert.phase is Phase.FIRING else Event.CANCELLED
                    alert.phase = Phase.INACTIVE
                    changes.append(self._change(event, alert, now))
                    continue
            else:
                alert.keep_firing_since = None
            if alert.phase is Phase.PENDING and now - alert.active_at >= self.hold:
                alert.phase = Phase.FIRING
                alert.fired_at = now
                changes.append(self._change(Event.FIRING, alert, now))
        return changes

    def clear(self, now: float) -> list[Change]:
        """Drop every alert (the rule went away): firing ones resolve at ``now``."""
        changes = [
            self._change(Event.RESOLVED, alert, now)
            for alert in self._alerts.values()
            if alert.phase is Phase.FIRING
        ]
        self._alerts.clear()
        return changes

    @staticmethod
    def _change(event: Event, alert: Alert, now: float) -> Change:
        return Change(event, alert.labels, now, alert.active_at, alert.fired_at, alert.value, alert.peak)
