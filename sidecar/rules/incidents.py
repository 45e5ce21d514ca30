"""Incidents: each firing episode of an alert, with re-fires inside a gap merged into one.

An :class:`IncidentBook` turns firing and resolved transitions into
:class:`Incident` records (start, end, rule, severity, labels, peak value, first
acknowledgement) and answers the questions the ``mttr`` and ``incident_age`` rule
kinds ask. It holds the open incidents and the recently closed ones (for the
merge gap and the longest MTTR window); the durable copy lives in
:mod:`sidecar.incidents`, which seeds a book after a restart.

- An alert that fires while an incident for the same rule, severity and labels is
  open continues it (after a restart, the restored alert).
- An alert that fires within ``merge_gap`` seconds of the end of the last incident
  for the same key reopens that incident: its end is cleared.
- MTTR over a window is the mean of ``end - start`` over incidents whose end lies
  in the window; MTTA the mean of ``acked_at - start`` over acknowledged ones.

Pure module: standard library only; time is always a parameter.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from sidecar.rules.state import LabelSet, Transition

__all__ = ["Incident", "IncidentBook", "Stats", "stats"]


@dataclass(frozen=True, slots=True)
class Incident:
    """One incident. ``end`` is ``None`` while open; times are epoch seconds."""

    id: str
    rule: str
    severity: str
    labels: LabelSet
    start: float
    end: float | None = None
    peak: float = math.nan
    acked_at: float | None = None
    acked_by: str | None = None
    fires: int = 1  # firing episodes merged into this incident

    @property
    def key(self) -> tuple[str, str, LabelSet]:
        """Rule, severity and labels: the alert this incident belongs to."""
        return (self.rule, self.severity, self.labels)

    @property
    def is_open(self) -> bool:
        """True while the incident has not ended."""
        return self.end is None

    def duration(self, now: float) -> float:
        """``end - start``, or the age so far when open."""
        return (self.end if self.end is not None else now) - self.start


def _new_id() -> str:
    return secrets.token_hex(6)


class IncidentBook:
    """Open and recent incidents, updated from transitions; changes are drained for storage."""

    def __init__(self, merge_gap: float = 300.0, id_factory: Callable[[], str] = _new_id) -> None:
        self.merge_gap = merge_gap
        self._new_id = id_factory
        self._by_id: dict[str, Incident] = {}
        self._open: dict[tuple[str, str, LabelSet], str] = {}
        self._last_closed: dict[tuple[str, str, LabelSet], str] = {}
        self._changed: dict[str, Incident] = {}
        self._finalized: set[str] = set()

    # -- updates ------------------------------------------------------------------

    def seed(self, incidents: Iterable[Incident], now: float) -> None:
        """Load incidents from storage (after a restart); nothing is reported as changed.

        Closed incidents whose merge gap has passed are not finalized again.
        """
        for inc in sorted(incidents, key=lambda i: i.start):
            self._by_id[inc.id] = inc
            if inc.end is None:
                self._open[inc.key] = inc.id
            else:
                last = self._last_closed.get(inc.key)
                if last is None or (self._by_id[last].end or 0) <= inc.end:
                    self._last_closed[inc.key] = inc.id
                if now - inc.end > self.merge_gap:
                    self._finalized.add(inc.id)

    def apply(self, transition: Transition) -> Incident | None:
        """Open, continue, reopen or close the incident of a firing/resolved transition."""
        key = transition.key
        at = transition.at
        if transition.status == "firing":
            open_id = self._open.get(key)
            if open_id is not None:
                inc = self._by_id[open_id]
                return self._put(replace(inc, peak=_max(inc.peak, transition.value)))
            last_id = self._last_closed.get(key)
            if last_id is not None:
                last = self._by_id.get(last_id)
                if last is not None and last.end is not None and at - last.end <= self.merge_gap:
                    self._finalized.discard(last_id)
                    del self._last_closed[key]
                    self._open[key] = last_id
                    return self._put(
                        replace(last, end=None, peak=_max(last.peak, transition.value), fires=last.fires + 1)
                    )
            inc = Incident(
                self._new_id(),
                transition.rule,
                transition.severity,
                transition.labels,
                start=transition.since,
                peak=transition.value,
            )
            self._open[key] = inc.id
            return self._put(inc)
        if transition.status == "resolved":
            open_id = self._open.pop(key, None)
            if open_id is None:
                return None
            inc = self._by_id[open_id]
            self._last_closed[key] = open_id
            return self._put(replace(inc, end=at, peak=_max(inc.peak, transition.peak)))
        return None

    def note_value(self, key: tuple[str, str, LabelSet], value: float) -> Incident | None:
        """Raise the open incident's peak to ``value`` when higher (reported as a change then)."""
        open_id = self._open.get(key)
        if open_id is None or math.isnan(value):
            return None
        inc = self._by_id[open_id]
        if not math.isnan(inc.peak) and inc.peak >= value:
            return None
        return self._put(replace(inc, peak=value))

    def close(self, key: tuple[str, str, LabelSet], at: float) -> Incident | None:
        """Close the open incident of ``key`` (its rule went away)."""
        open_id = self._open.pop(key, None)
        if open_id is None:
            return None
        self._last_closed[key] = open_id
        return self._put(replace(self._by_id[open_id], end=at))

    def ack(self, incident_id: str, by: str, at: float) -> bool:
        """Record the first acknowledgement of a known incident; ``False`` when unknown."""
        inc = self._by_id.get(incident_id)
        if inc is None:
            return False
        if inc.acked_at is None:
            self._put(replace(inc, acked_at=at, acked_by=by))
        return True

    def _put(self, inc: Incident) -> Incident:
        self._by_id[inc.id] = inc
        self._changed[inc.id] = inc
        return inc

    # -- draining -----------------------------------------------------------------

    def drain_changes(self) -> list[Incident]:
        """Incidents created or changed since the last call (for the durable store)."""
        out = list(self._changed.values())
        self._changed.clear()
        return out

    def drain_finalized(self, now: float) -> list[Incident]:
        """Closed incidents whose merge gap has passed, each reported once (for duration metrics)."""
        out: list[Incident] = []
        for inc_id in self._last_closed.values():
            inc = self._by_id.get(inc_id)
            if inc is None or inc.end is None or inc_id in self._finalized:
                continue
            if now - inc.end > self.merge_gap:
                self._finalized.add(inc_id)
                out.append(inc)
        return out

    def prune(self, now: float, keep: float) -> None:
        """Forget closed incidents that ended more than ``keep`` seconds ago."""
        for inc_id, inc in list(self._by_id.items()):
            if inc.end is not None and now - inc.end > keep and inc_id not in self._changed:
                del self._by_id[inc_id]
                self._finalized.discard(inc_id)
                if self._last_closed.get(inc.key) == inc_id:
                    del self._last_closed[inc.key]

    # -- queries ------------------------------------------------------------------

    def get(self, incident_id: str) -> Incident | None:
        """An incident by id, if the book holds it."""
        return self._by_id.get(incident_id)

    def open_incidents(self, rules: Sequence[str] | None = None) -> list[Incident]:
        """Open incidents, of ``rules`` when given."""
        out = [self._by_id[i] for i in self._open.values()]
        return [i for i in out if rules is None or i.rule in rules]

    def resolved_between(self, rules: Sequence[str], since: float, until: float) -> list[Incident]:
        """Closed incidents of ``rules`` whose end is in ``(since, until]``."""
        return [
            i
            for i in self._by_id.values()
            if i.end is not None and i.rule in rules and since < i.end <= until
        ]

    def all(self) -> list[Incident]:
        """Every incident the book holds, oldest first."""
        return sorted(self._by_id.values(), key=lambda i: i.start)


def _max(a: float, b: float) -> float:
    if math.isnan(a):
        return b
    if math.isnan(b):
        return a
    return max(a, b)


@dataclass(frozen=True, slots=True)
class Stats:
    """MTTR and MTTA over some incidents (seconds; ``None`` without data)."""

    resolved: int
    mttr: float | None
    acked: int
    mtta: float | None
    open: int
    oldest_open_age: float | None


def stats(incidents: Iterable[Incident], since: float, until: float) -> Stats:
    """MTTR over incidents resolved in ``(since, until]``, MTTA over those acked in it, open ones by age."""
    all_incidents = list(incidents)
    resolved = [i for i in all_incidents if i.end is not None and since < i.end <= until]
    acked = [i for i in all_incidents if i.acked_at is not None and since < i.acked_at <= until]
    open_ = [i for i in all_incidents if i.end is None and i.start <= until]
    return Stats(
        resolved=len(resolved),
        mttr=sum(i.duration(until) for i in resolved) / len(resolved) if resolved else None,
        acked=len(acked),
        mtta=sum((i.acked_at or 0) - i.start for i in acked) / len(acked) if acked else None,
        open=len(open_),
        oldest_open_age=max((until - i.start for i in open_), default=None),
    )
