"""One circuit breaker per upstream: closed → open → half-open → closed (or open again).

Why a breaker at all: an upstream that is down or throttling answers slowly or not
at all, and every call sent to it spends the caller's deadline before falling back.
While the breaker is open the router skips the upstream at once; after a cool-down
one *probe* call finds out whether it has recovered.

The rules, with every time a parameter (``now``, seconds on any monotonic clock):

- **Closed** (metric value 0): every call goes. The breaker opens when either
  ``consecutive_failures`` calls in a row failed, or the failures over the last
  ``window`` seconds reach ``error_ratio`` of the calls, counted only once the
  window holds ``min_calls`` calls (so three failures out of four calls at night
  do not open it). The window is a ring of :data:`WINDOW_BUCKETS` time buckets
  (:class:`sidecar.rules.windows.Ring`): memory is constant however busy the
  upstream is, and a call leaves the window at a bucket boundary, up to
  ``window / 10`` early.
- **Open** (2): no call goes. :meth:`CircuitBreaker.retry_after` says for how long.
- **Half-open** (1): reached by time alone, ``cooldown`` seconds after opening.
  Exactly one probe may go (:meth:`CircuitBreaker.allow` returns True once); a
  success closes the breaker with an empty window, a failure opens it again with a
  fresh cool-down. A probe abandoned for a reason that says nothing about the
  upstream (the client went away) is handed back with
  :meth:`CircuitBreaker.cancel_probe`, so the next call may probe. A probe that
  never reports back at all is presumed lost after one more ``cooldown``, so a
  caller's missing ``record`` can never shut an upstream out for good.

While half-open, *any* result recorded decides, not only the probe's: a call that
was sent before the breaker opened and answers now is as good a witness of the
upstream's health as the probe (Resilience4j counts them the same way).
Results recorded while open are ignored: the decision to open is made, and the
cool-down is what gives the upstream time.

What counts as a failure is the caller's choice; the proxy records the failures
it retries on (connect error, timeout before the first byte, 5xx, 429) and counts
any other answer, a 4xx included, as a success: the upstream is working.

Reporting: :meth:`CircuitBreaker.record` returns the :class:`Transition` it
caused; the one time causes (open → half-open) is returned once by
:meth:`CircuitBreaker.poll`, which the caller runs from its periodic tick (and may
run before :meth:`~CircuitBreaker.allow`) to set ``llm_upstream_state`` and tell
the rule engine. :class:`BreakerState` values are the metric's values.

Pure module: standard library, :mod:`sidecar.rules.windows`, :mod:`sidecar.durations`
and :mod:`sidecar.yamlspec` only; no I/O, no clock, no asyncio.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from yaml.nodes import Node

from sidecar.durations import format_duration
from sidecar.rules.windows import Ring
from sidecar.yamlspec import Reader, join

__all__ = [
    "BREAKER_KEYS",
    "WINDOW_BUCKETS",
    "BreakerOverride",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "Transition",
    "parse_breaker",
    "parse_breaker_override",
]

T = TypeVar("T")

#: The keys of a breaker mapping (``circuit_breakers:`` and ``routes[].breaker``).
BREAKER_KEYS = ("consecutive_failures", "error_ratio", "window", "min_calls", "cooldown")

#: Time buckets of the error-ratio window: 10 keeps memory at a few hundred bytes per
#: upstream while a failure leaves the window at most a tenth of it early.
WINDOW_BUCKETS = 10


class BreakerState(enum.IntEnum):
    """Where a breaker is; the value is what ``llm_upstream_state{upstream}`` exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and how long it stays open (durations in seconds)."""

    consecutive_failures: int = 5
    error_ratio: float = 0.5
    window: float = 60.0
    min_calls: int = 20
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class BreakerOverride:
    """The keys a route's ``breaker:`` mapping sets; ``None`` keeps the base value.

    A route's mapping overrides the ``circuit_breakers:`` defaults key by key, and
    the two sections are parsed apart, so the route keeps only what it wrote and
    :meth:`apply` merges it onto whatever the defaults turn out to be.
    """

    consecutive_failures: int | None = None
    error_ratio: float | None = None
    window: float | None = None
    min_calls: int | None = None
    cooldown: float | None = None

    def apply(self, base: BreakerSettings) -> BreakerSettings:
        """``base`` with every key this override sets replaced."""
        return BreakerSettings(
            consecutive_failures=_pick(self.consecutive_failures, base.consecutive_failures),
            error_ratio=_pick(self.error_ratio, base.error_ratio),
            window=_pick(self.window, base.window),
            min_calls=_pick(self.min_calls, base.min_calls),
            cooldown=_pick(self.cooldown, base.cooldown),
        )


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def parse_breaker_override(r: Reader, node: Node, path: str) -> BreakerOverride:
    """Read a breaker mapping keeping only the keys written (bad values recorded, then left out)."""
    m = r.mapping(node, path, BREAKER_KEYS, what="a circuit breaker mapping")
    if m is None:
        return BreakerOverride()
    ratio = r.number(m.get("error_ratio"), join(path, "error_ratio"))
    if ratio is not None and not 0 < ratio <= 1:
        r.problem(m["error_ratio"], join(path, "error_ratio"), f"must be in (0, 1], got {ratio:g}")
        ratio = None
    return BreakerOverride(
        consecutive_failures=r.integer(
            m.get("consecutive_failures"), join(path, "consecutive_failures"), minimum=1
        ),
        error_ratio=ratio,
        window=r.duration(m.get("window"), join(path, "window"), positive=True),
        min_calls=r.integer(m.get("min_calls"), join(path, "min_calls"), minimum=1),
        cooldown=r.duration(m.get("cooldown"), join(path, "cooldown"), positive=True),
    )


def parse_breaker(r: Reader, node: Node, path: str) -> BreakerSettings:
    """Read ``{consecutive_failures: 5, error_ratio: 0.5, window: 60s, min_calls: 20, cooldown: 30s}``.

    Every key is optional (the defaults above); ``consecutive_failures`` and
    ``min_calls`` are >= 1, ``error_ratio`` in (0, 1], ``window`` and ``cooldown``
    durations > 0.
    """
    return parse_breaker_override(r, node, path).apply(BreakerSettings())


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of state: from ``old`` to ``new`` at ``at``, and why, in words for people."""

    old: BreakerState
    new: BreakerState
    reason: str
    at: float


class CircuitBreaker:
    """The breaker of one upstream (see the module docstring for the rules).

    Not thread-safe; the proxy uses it from its one event loop. Each call the
    caller lets through after :meth:`allow` must end in :meth:`record` or, when the
    outcome says nothing about the upstream, :meth:`cancel_probe`.
    """

    __slots__ = (
        "_consecutive",
        "_half_open_reported",
        "_opened_at",
        "_probe_sent_at",
        "_ring",
        "_state",
        "settings",
    )

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self._state = BreakerState.CLOSED  # CLOSED or OPEN; HALF_OPEN is derived from time
        self._opened_at = 0.0
        self._consecutive = 0
        self._probe_sent_at: float | None = None
        self._half_open_reported = False
        self._ring = self._new_ring()

    def _new_ring(self) -> Ring:
        # Two fields per bucket: calls, failures.
        return Ring(self.settings.window, width=2, slots=WINDOW_BUCKETS)

    def _half_open_at(self) -> float:
        return self._opened_at + self.settings.cooldown

    def state(self, now: float) -> BreakerState:
        """The state at ``now``: an open breaker whose cool-down has passed is half-open."""
        if self._state is BreakerState.OPEN and now >= self._half_open_at():
            return BreakerState.HALF_OPEN
        return self._state

    def available(self, now: float) -> bool:
        """Whether :meth:`allow` would let a call through at ``now``, without taking the probe.

        The router plans with this (a plan lists upstreams it may never reach, and
        must not hold the single probe for them); the proxy calls :meth:`allow` just
        before each attempt it actually makes.
        """
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return self._probe_sent_at is None or now - self._probe_sent_at >= self.settings.cooldown

    def allow(self, now: float) -> bool:
        """Whether a call may go to the upstream now; in half-open, True for the one probe only."""
        if not self.available(now):
            return False
        if self.state(now) is BreakerState.HALF_OPEN:
            self._probe_sent_at = now
        return True

    def cancel_probe(self) -> None:
        """Hand back the probe of a call abandoned for a reason not the upstream's (client gone)."""
        self._probe_sent_at = None

    def retry_after(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when a call may go now)."""
        if self.state(now) is BreakerState.OPEN:
            return self._half_open_at() - now
        if self.available(now):
            return 0.0
        assert self._probe_sent_at is not None  # half-open with the probe out
        return self._probe_sent_at + self.settings.cooldown - now

    def poll(self, now: float) -> Transition | None:
        """The open → half-open transition time caused by ``now``, returned once.

        ``at`` is when the cool-down ended, not when it was noticed.
        """
        if self.state(now) is BreakerState.HALF_OPEN and not self._half_open_reported:
            self._half_open_reported = True
            cooldown = format_duration(self.settings.cooldown)
            return Transition(
                BreakerState.OPEN,
                BreakerState.HALF_OPEN,
                f"cool-down of {cooldown} elapsed",
                self._half_open_at(),
            )
        return None

    def record(self, ok: bool, now: float) -> Transition | None:
        """Count one call's outcome at ``now``; the transition it caused, if any."""
        state = self.state(now)
        if state is BreakerState.OPEN:
            return None
        if state is BreakerState.HALF_OPEN:
            if ok:
                self._close()
                return Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED, "probe succeeded", now)
            self._open(now)
            return Transition(BreakerState.HALF_OPEN, BreakerState.OPEN, "probe failed", now)
        s = self.settings
        self._ring.add(now, 0, 1.0)
        if ok:
            self._consecutive = 0
        else:
            self._consecutive += 1
            self._ring.add(now, 1, 1.0)
        if self._consecutive >= s.consecutive_failures:
            reason = f"{self._consecutive} consecutive failures"
        else:
            calls, failures = self._ring.totals(now)
            if calls < s.min_calls or failures / calls < s.error_ratio:
                return None
            reason = (
                f"error ratio {failures / calls:.2f} >= {s.error_ratio:.2f} "
                f"over {format_duration(s.window)} ({calls:.0f} calls)"
            )
        self._open(now)
        return Transition(BreakerState.CLOSED, BreakerState.OPEN, reason, now)

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probe_sent_at = None
        self._half_open_reported = False

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._probe_sent_at = None
        self._ring = self._new_ring()
