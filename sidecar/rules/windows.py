"""Bucketed sliding windows: counts and latency histograms whose cost does not grow with traffic.

A :class:`Ring` keeps ``slots`` time buckets of ``window / slots`` seconds each, and in
every bucket a fixed number of float fields (``width``): two for an error ratio
(total, bad), one for a spend sum, sixteen for a latency histogram (the proxy's
fifteen bucket boundaries plus ``+Inf``). Adding a value touches one bucket; reading
a window sums at most ``slots x width`` floats, however many calls the window saw.
Memory is fixed when the ring is built: ``slots x (width + 1) x 8`` bytes plus the
two ``array`` headers (about 1 KB for a ratio ring, 8 KB for a histogram ring at the
default 60 slots).

Window edges: the window read at ``now`` is the ``slots`` buckets ending with the one
that holds ``now``; an event therefore leaves the window between ``window - step``
and ``window`` seconds after it happened (``step = window / slots``), at a bucket
boundary. Events older than the window are ignored when added.

:func:`histogram_quantile` is Prometheus's algorithm (``promql/quantile.go``,
``bucketQuantile``) over the same bucket boundaries the proxy exports, so the
in-process engine and an exported ``histogram_quantile()`` rule agree on the same
calls.

Pure module: standard library only; time is always a parameter.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = [
    "DEFAULT_SLOTS",
    "LATENCY_BUCKETS",
    "HistogramRing",
    "Ring",
    "SumRing",
    "calendar_period",
    "histogram_quantile",
]

#: Upper bounds (seconds) of the proxy's ``llm_request_duration_seconds`` and
#: ``llm_time_to_first_token_seconds`` histograms; a contract with ``sidecar.metrics``.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    4.0,
    8.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

#: Buckets per window: an event leaves the window at most ``window / 60`` early.
DEFAULT_SLOTS = 60


_ZEROS: dict[int, array[float]] = {}


def _zeros(width: int) -> array[float]:
    """``width`` zero doubles, one array shared by every ring of that width (read only)."""
    zeros = _ZEROS.get(width)
    if zeros is None:
        zeros = _ZEROS[width] = array("d", bytes(8 * width))
    return zeros


class Ring:
    """Sums of ``width`` float fields per time bucket, over a sliding window.

    >>> ring = Ring(window=60.0, width=2, slots=6)
    >>> ring.add(5.0, 0, 1.0); ring.add(5.0, 1, 1.0); ring.add(15.0, 0, 1.0)
    >>> ring.totals(20.0)
    [2.0, 1.0]
    >>> ring.totals(65.0)  # the bucket [0, 10) has left the window
    [1.0, 0.0]
    """

    __slots__ = ("_epochs", "_slots", "_values", "_zeros", "step", "width", "window")

    def __init__(self, window: float, width: int = 1, slots: int = DEFAULT_SLOTS) -> None:
        if window <= 0 or width < 1 or slots < 1:
            raise ValueError("window must be > 0, width and slots >= 1")
        self.window = window
        self.width = width
        self.step = window / slots
        self._slots = slots
        # The bucket number (floor(t / step)) each slot currently holds; -1: never used.
        self._epochs = array("q", [-1]) * slots
        self._values = array("d", bytes(8 * slots * width))
        self._zeros = _zeros(width)  # what a reused slot's fields are reset to (shared)

    def _epoch(self, t: float) -> int:
        return math.floor(t / self.step)

    def add(self, t: float, field: int, amount: float) -> None:
        """Add ``amount`` to ``field`` in the bucket holding time ``t``."""
        # The hot path of every observed call: locals, and _epoch() inlined.
        epoch = math.floor(t / self.step)
        slot = epoch % self._slots
        epochs = self._epochs
        held = epochs[slot]
        width = self.width
        if held != epoch:
            if held > epoch:
                return  # older than the window: a newer bucket already reuses this slot
            epochs[slot] = epoch
            base = slot * width
            self._values[base : base + width] = self._zeros
        self._values[slot * width + field] += amount

    def add_vector(self, t: float, amounts: Sequence[float]) -> None:
        """Add one value per field (``len(amounts) == width``) in the bucket holding ``t``."""
        for field, amount in enumerate(amounts):
            if amount:
                self.add(t, field, amount)

    def totals(self, now: float) -> list[float]:
        """Per-field sums over the window that ends at ``now``."""
        newest = self._epoch(now)
        oldest = newest - self._slots
        width = self.width
        values = self._values
        live = [slot * width for slot, epoch in enumerate(self._epochs) if oldest < epoch <= newest]
        out: list[float] = []
        # Field by field, each summed in slot order (the same float additions as slot by
        # slot); not sum(), which compensates from Python 3.12 on and changes the last bits.
        for field in range(width):
            total = 0.0
            for base in live:
                total += values[base + field]
            out.append(total)
        return out

    def empty(self, now: float) -> bool:
        """True when no bucket in the window ending at ``now`` holds anything."""
        newest = self._epoch(now)
        oldest = newest - self._slots
        return not any(oldest < epoch <= newest for epoch in self._epochs)

    def nbytes(self) -> int:
        """Bytes held by the bucket arrays (the per-series memory figure in the docs)."""
        return self._epochs.itemsize * len(self._epochs) + self._values.itemsize * len(self._values)


#: Below 2**53 every whole number is a double, so sums of whole numbers that stay below it are exact.
_EXACT_WHOLE = 2.0**53


class SumRing(Ring):
    """A one-field :class:`Ring` that answers "the window total right after this add" cheaply.

    :meth:`add_total` is what a rolling budget needs on every call. While every amount
    ever added is a whole number >= 0 and their sum stays below 2**53 (token counts),
    every partial sum, and every difference of them, is exact: the total kept since the
    previous call, moved by the buckets that left and entered the window since, is the
    very double :meth:`~Ring.totals` would return, at a cost that does not grow with the
    window. Otherwise (fractional dollars), or when ``t`` is older than the previous
    call's bucket or a whole window later, it sums the window as ``totals`` does.

    >>> ring = SumRing(window=60.0, slots=6)
    >>> ring.add_total(5.0, 2.0), ring.add_total(7.0, 3.0), ring.add_total(15.0, 1.0)
    (2.0, 5.0, 6.0)
    >>> ring.add_total(65.0, 1.0)  # the bucket [0, 10) has left the window
    2.0
    """

    __slots__ = ("_added", "_memo_epoch", "_memo_total", "_whole")

    def __init__(self, window: float, slots: int = DEFAULT_SLOTS) -> None:
        super().__init__(window, 1, slots)
        self._whole = True  # every amount so far whole and >= 0, their sum < 2**53
        self._added = 0.0
        self._memo_epoch: int | None = None  # the newest bucket of the window _memo_total sums
        self._memo_total = 0.0

    def _note(self, amount: float) -> None:
        if self._whole:
            if amount >= 0 and float(amount).is_integer() and self._added + amount < _EXACT_WHOLE:
                self._added += amount
            else:
                self._whole = False

    def add(self, t: float, field: int, amount: float) -> None:
        """As :meth:`Ring.add` (forgets the running total)."""
        super().add(t, field, amount)
        self._note(amount)
        self._memo_epoch = None

    def add_total(self, t: float, amount: float) -> float:
        """``add(t, 0, amount)``, then ``totals(t)[0]``: the same double, without the sum when exact."""
        self._note(amount)
        epoch = math.floor(t / self.step)
        memo = self._memo_epoch
        if not self._whole or memo is None or not memo <= epoch < memo + self._slots:
            Ring.add(self, t, 0, amount)
            total = self.totals(t)[0]
        else:
            total = self._moved(self._memo_total, memo, epoch)
            Ring.add(self, t, 0, amount)
            # The add landed in the newest bucket (a reused slot held one outside the
            # window), or was dropped as older than the bucket reusing the slot.
            if self._epochs[epoch % self._slots] == epoch:
                total += amount
        self._memo_epoch, self._memo_total = epoch, total
        return total

    def _moved(self, total: float, old: int, new: int) -> float:
        """The total of the window ending in bucket ``new``, from that ending in ``old``
        (``old <= new < old + slots``): minus the buckets that left, plus those that entered."""
        epochs, values, slots = self._epochs, self._values, self._slots
        for epoch in range(old - slots + 1, new - slots + 1):
            if epochs[epoch % slots] == epoch:
                total -= values[epoch % slots]
        for epoch in range(old + 1, new + 1):
            if epochs[epoch % slots] == epoch:
                total += values[epoch % slots]
        return total


class HistogramRing:
    """A sliding-window latency histogram: one :class:`Ring` field per bucket.

    Buckets are Prometheus ``le`` buckets: a value goes in the first bucket whose
    upper bound is >= the value; the last field is ``+Inf``.
    """

    __slots__ = ("bounds", "ring")

    def __init__(
        self, window: float, bounds: Sequence[float] = LATENCY_BUCKETS, slots: int = DEFAULT_SLOTS
    ) -> None:
        self.bounds = tuple(bounds)
        self.ring = Ring(window, width=len(self.bounds) + 1, slots=slots)

    def observe(self, t: float, value: float) -> None:
        """Count one observation of ``value`` seconds at time ``t``."""
        self.ring.add(t, bisect.bisect_left(self.bounds, value), 1.0)

    def cumulative(self, now: float) -> list[tuple[float, float]]:
        """``(upper bound, cumulative count)`` pairs over the window, ``+Inf`` last."""
        counts = self.ring.totals(now)
        out: list[tuple[float, float]] = []
        running = 0.0
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            running += count
            out.append((bound, running))
        return out

    def count(self, now: float) -> float:
        """Observations in the window ending at ``now``."""
        return sum(self.ring.totals(now))

    def quantile(self, q: float, now: float) -> float:
        """The ``q``-quantile over the window, as ``histogram_quantile`` computes it (NaN if empty)."""
        return histogram_quantile(q, self.cumulative(now))

    def empty(self, now: float) -> bool:
        """True when the window ending at ``now`` holds no observation."""
        return self.ring.empty(now)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus's ``histogram_quantile`` over ``(upper bound, cumulative count)`` pairs.

    A line-for-line port of ``bucketQuantile`` in Prometheus 2.42 ``promql/quantile.go``:
    linear interpolation inside the bucket holding the rank, the lower bound of the
    first bucket taken as 0, and the upper bound of the last finite bucket returned
    when the rank falls in ``+Inf``.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    # ensureMonotonic: a cumulative count never decreases.
    fixed: list[tuple[float, float]] = []
    top = -math.inf
    for bound, count in ordered:
        top = max(top, count)
        fixed.append((bound, top))
    if len(fixed) < 2:
        return math.nan
    observations = fixed[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    b = len(fixed) - 1
    for i in range(len(fixed) - 1):
        if fixed[i][1] >= rank:
            b = i
            break
    if b == len(fixed) - 1:
        return fixed[-2][0]
    if b == 0 and fixed[0][0] <= 0:
        return fixed[0][0]
    bucket_start = 0.0
    bucket_end, count = fixed[b]
    if b > 0:
        bucket_start = fixed[b - 1][0]
        count -= fixed[b - 1][1]
        rank -= fixed[b - 1][1]
    return bucket_start + (bucket_end - bucket_start) * (rank / count)


def calendar_period(now: float, unit: str, tz: ZoneInfo) -> tuple[float, float]:
    """The ``[start, end)`` epoch seconds of the calendar period holding ``now`` in ``tz``.

    ``unit`` is ``"1d"`` (midnight to midnight), ``"1w"`` (Monday to Monday) or
    ``"1mo"`` (the first of the month to the first of the next). Days are local
    days, so a period is 23 or 25 hours long across a daylight-saving change.
    """
    local = datetime.fromtimestamp(now, tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz)
    if unit == "1d":
        start = day
        nxt = day.date() + timedelta(days=1)
    elif unit == "1w":
        start_date = day.date() - timedelta(days=day.weekday())
        start = datetime(start_date.year, start_date.month, start_date.day, tzinfo=tz)
        nxt = start_date + timedelta(days=7)
    elif unit == "1mo":
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        nxt = (start.date().replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        raise ValueError(f"unknown calendar period {unit!r} (1d, 1w or 1mo)")
    end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz)
    return start.timestamp(), end.timestamp()
