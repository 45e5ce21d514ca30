"""Bucketed windows, Prometheus's histogram_quantile, calendar periods."""

from __future__ import annotations

import math
import random
from zoneinfo import ZoneInfo

import pytest

from sidecar.rules.windows import (
    LATENCY_BUCKETS,
    HistogramRing,
    Ring,
    SumRing,
    calendar_period,
    histogram_quantile,
)

# 2023-11-14 00:00:00 UTC, a Tuesday.
T0 = 1_699_920_000


def test_ring_sums_fields_and_drops_buckets_at_the_window_edge() -> None:
    ring = Ring(window=60.0, width=2, slots=6)  # 10 s buckets
    ring.add(T0 + 1, 0, 1.0)
    ring.add(T0 + 9, 1, 2.0)
    ring.add(T0 + 25, 0, 4.0)
    assert ring.totals(T0 + 30) == [5.0, 2.0]
    # The bucket [T0, T0+10) is in the window until the 6th bucket after it starts.
    assert ring.totals(T0 + 59.9) == [5.0, 2.0]
    assert ring.totals(T0 + 60) == [4.0, 0.0]
    assert ring.totals(T0 + 80) == [0.0, 0.0]
    assert ring.empty(T0 + 80)
    assert not ring.empty(T0 + 79)


def test_ring_reuses_slots_and_ignores_events_older_than_the_window() -> None:
    ring = Ring(window=60.0, width=1, slots=6)
    for t in range(0, 600, 5):  # 120 events, 2 per bucket
        ring.add(T0 + t, 0, 1.0)
    assert ring.totals(T0 + 599) == [12.0]  # 6 buckets x 2
    ring.add(T0 + 100, 0, 1000.0)  # far older than the window: its slot holds a newer bucket
    assert ring.totals(T0 + 599) == [12.0]
    assert ring.nbytes() == 6 * 8 + 6 * 1 * 8


def test_ring_cost_does_not_depend_on_the_number_of_calls() -> None:
    ring = Ring(window=300.0, width=2)
    size = ring.nbytes()
    for i in range(100_000):
        ring.add(T0 + i * 0.003, 0, 1.0)
    assert ring.nbytes() == size
    assert ring.totals(T0 + 299.998) == [100_000.0, 0.0]


def test_ring_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        Ring(window=0)
    with pytest.raises(ValueError):
        Ring(window=10, width=0)


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "fractional"])
@pytest.mark.parametrize("slots", [1, 3, 60])
def test_sum_ring_add_total_is_the_same_double_as_totals(whole: bool, slots: int) -> None:
    # Calls in order, at the same instant, bursts, gaps of several buckets or whole windows,
    # and late ones (inside the window or dropped as too old), against a plain Ring.
    rnd = random.Random(slots * 2 + whole)
    window = 60.0
    for _ in range(40):
        plain, ring = Ring(window, 1, slots), SumRing(window, slots)
        t = T0 + rnd.uniform(0, 1000)
        for _ in range(150):
            t += rnd.choice([0.0, rnd.expovariate(slots / window), rnd.uniform(0, 2.5 * window)])
            at = t - rnd.uniform(0, 1.5 * window) if rnd.random() < 0.2 else t
            amount = float(rnd.randrange(1, 10**6)) if whole else rnd.randrange(1, 10**6) / 10**8
            if rnd.random() < 0.05:
                plain.add(at, 0, amount)  # the plain add also keeps the running total honest
                ring.add(at, 0, amount)
                continue
            plain.add(at, 0, amount)
            assert ring.add_total(at, amount) == plain.totals(at)[0]
        assert ring.totals(t) == plain.totals(t)


def test_sum_ring_sums_the_window_only_when_it_must(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = 0
    totals = Ring.totals

    def counting(self: Ring, now: float) -> list[float]:
        nonlocal sums
        sums += 1
        return totals(self, now)

    monkeypatch.setattr(Ring, "totals", counting)
    tokens, plain = SumRing(3600.0), Ring(3600.0)
    for i in range(1000):  # a call every 30 s: a new bucket every other call
        plain.add(T0 + i * 30.0, 0, 50.0)
        assert tokens.add_total(T0 + i * 30.0, 50.0) == totals(plain, T0 + i * 30.0)[0]
    assert tokens.add_total(T0 + 1000 * 30.0, 50.0) == 50.0 * 119  # 59 buckets of 2 calls, and this one
    assert sums == 1  # the first call; then O(1) per call
    sums = 0
    dollars = SumRing(3600.0)
    for i in range(100):
        dollars.add_total(T0 + i * 30.0, 0.1)
    assert sums == 100  # fractions: summed in slot order, as totals does


def test_sum_ring_past_2_to_the_53_falls_back_to_summing() -> None:
    # 2**53 - 1 in one bucket, then 2 and 1 in the next: the running total would round
    # 2**53 + 1 to 2**53, where the window's sum is (2**53 - 1) + 3 = 2**53 + 2.
    plain, ring = Ring(60.0), SumRing(60.0)
    for at, amount in ((T0, 2.0**53 - 1), (T0 + 1, 2.0), (T0 + 1, 1.0), (T0 + 2, 5.0)):
        plain.add(at, 0, amount)
        assert ring.add_total(at, amount) == plain.totals(at)[0]


def test_histogram_quantile_is_prometheus_bucket_quantile() -> None:
    inf = math.inf
    # Cumulative (le, count) as Prometheus sees them.
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (inf, 100.0)]
    # rank 50 -> the 0.1 bucket, whole of it: 0 + 0.1 * 50/50
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    # rank 70 -> (0.1, 0.5]: 0.1 + 0.4 * (70-50)/40
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.3)
    # rank 95 -> (0.5, 1]: 0.5 + 0.5 * 5/10
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.75)
    # A rank in +Inf gives the highest finite bound.
    assert histogram_quantile(0.99, [(1.0, 1.0), (inf, 10.0)]) == 1.0
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (inf, 0.0)]))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 3.0)]))  # no +Inf bucket
    assert histogram_quantile(-1, buckets) == -inf
    assert histogram_quantile(2, buckets) == inf
    # Non-monotonic counts are fixed as Prometheus does.
    assert histogram_quantile(0.5, [(1.0, 10.0), (2.0, 5.0), (inf, 10.0)]) == pytest.approx(0.5)


def test_histogram_ring_uses_le_buckets_and_the_window() -> None:
    ring = HistogramRing(window=300.0)
    assert len(ring.bounds) == len(LATENCY_BUCKETS) == 15
    for _ in range(19):
        ring.observe(T0, 0.3)  # bucket (0.25, 0.5]
    ring.observe(T0, 5.0)  # bucket (4, 8]
    ring.observe(T0, 0.5)  # exactly on a bound: le is inclusive
    cumulative = dict(ring.cumulative(T0 + 1))
    assert cumulative[0.25] == 0 and cumulative[0.5] == 20 and cumulative[8.0] == 21
    assert ring.count(T0 + 1) == 21
    # rank 0.95 * 21 = 19.95 -> (0.25, 0.5]: 0.25 + 0.25 * 19.95/20
    assert ring.quantile(0.95, T0 + 1) == pytest.approx(0.499375)
    assert math.isnan(ring.quantile(0.95, T0 + 300))
    assert ring.empty(T0 + 300)


def test_calendar_periods() -> None:
    utc = ZoneInfo("UTC")
    assert calendar_period(T0 + 5, "1d", utc) == (T0, T0 + 86400)
    # Weeks start on Monday: 2023-11-13.
    assert calendar_period(T0 + 5, "1w", utc) == (T0 - 86400, T0 + 6 * 86400)
    start, end = calendar_period(T0, "1mo", utc)
    assert (start, end) == (1698796800, 1701388800)  # 2023-11-01 .. 2023-12-01
    start, end = calendar_period(1703980800 + 10, "1mo", utc)  # 2023-12-31
    assert (start, end) == (1701388800, 1704067200)  # .. 2024-01-01
    paris = ZoneInfo("Europe/Paris")
    # Local midnight in Paris is 23:00 UTC in November.
    assert calendar_period(T0 + 5, "1d", paris) == (T0 - 3600, T0 + 82800)
    # 2024-03-31 has 23 hours in Paris (clocks jump at 02:00).
    start, end = calendar_period(1711872000, "1d", paris)  # 2024-03-31 08:00 UTC
    assert end - start == 23 * 3600
    with pytest.raises(ValueError):
        calendar_period(T0, "2d", utc)
