"""The alert state machine: for, keep_firing_for and their edges, as Prometheus has them."""

from __future__ import annotations

from sidecar.rules.state import AlertTable, Event, Phase

A = (("tenant", "acme"),)
B = (("tenant", "beta"),)


def run(
    table: AlertTable, active_at: dict[int, set[tuple[tuple[str, str], ...]]], until: int, step: int = 15
):
    """Evaluate every ``step`` s; ``active_at[t]`` is the set active from t on (until the next key)."""
    events: list[tuple[int, Event, tuple[tuple[str, str], ...]]] = []
    current: set[tuple[tuple[str, str], ...]] = set()
    for t in range(0, until, step):
        if t in active_at:
            current = active_at[t]
        for change in table.update({labels: 1.0 for labels in current}, t):
            events.append((t, change.event, change.labels))
    return events


def test_for_zero_fires_at_the_first_active_evaluation() -> None:
    table = AlertTable(hold=0)
    events = run(table, {30: {A}, 60: set()}, 120)
    assert events == [(30, Event.PENDING, A), (30, Event.FIRING, A), (60, Event.RESOLVED, A)]


def test_for_fires_when_held_exactly_that_long() -> None:
    table = AlertTable(hold=120)
    events = run(table, {0: {A}}, 200)
    assert [(t, e) for t, e, _ in events] == [(0, Event.PENDING), (120, Event.FIRING)]
    alert = table.get(A)
    assert (
        alert is not None and alert.phase is Phase.FIRING and alert.active_at == 0 and alert.fired_at == 120
    )


def test_pending_alert_that_stops_one_evaluation_short_never_fires() -> None:
    table = AlertTable(hold=120)
    # Active at 0..105 (8 evaluations), gone at 120: the hold is not reached.
    events = run(table, {0: {A}, 120: set(), 150: {A}}, 300)
    assert events == [
        (0, Event.PENDING, A),
        (120, Event.CANCELLED, A),
        (150, Event.PENDING, A),  # a fresh pending period: active_at is 150
        (270, Event.FIRING, A),
    ]


def test_keep_firing_for_holds_then_resolves_at_the_first_evaluation_past_it() -> None:
    table = AlertTable(hold=0, keep_firing_for=300)
    events = run(table, {0: {A}, 60: set()}, 600)
    # Condition gone at 60; 60 + 300 = 360 is the first evaluation with t - 60 >= 300.
    assert events == [(0, Event.PENDING, A), (0, Event.FIRING, A), (360, Event.RESOLVED, A)]


def test_keep_firing_for_is_reset_when_the_condition_returns() -> None:
    table = AlertTable(hold=0, keep_firing_for=300)
    events = run(table, {0: {A}, 60: set(), 345: {A}, 360: set()}, 900)
    # Back at 345 (one evaluation before 360): the count restarts at 360 -> resolves at 660.
    assert [(t, e) for t, e, _ in events] == [(0, Event.PENDING), (0, Event.FIRING), (660, Event.RESOLVED)]


def test_keep_firing_for_does_not_apply_to_pending_alerts() -> None:
    table = AlertTable(hold=60, keep_firing_for=300)
    events = run(table, {0: {A}, 30: set()}, 120)
    assert events == [(0, Event.PENDING, A), (30, Event.CANCELLED, A)]


def test_one_alert_per_label_set() -> None:
    table = AlertTable(hold=30)
    events = run(table, {0: {A}, 15: {A, B}, 60: {B}}, 120)
    assert events == [
        (0, Event.PENDING, A),
        (15, Event.PENDING, B),
        (30, Event.FIRING, A),
        (45, Event.FIRING, B),
        (60, Event.RESOLVED, A),
    ]
    assert [a.labels for a in table.firing()] == [B]


def test_value_and_peak_follow_the_results() -> None:
    table = AlertTable()
    table.update({A: 2.0}, 0)
    table.update({A: 5.0}, 15)
    table.update({A: 3.0}, 30)
    alert = table.get(A)
    assert alert is not None and alert.value == 3.0 and alert.peak == 5.0
    (change,) = table.update({}, 45)
    assert change.event is Event.RESOLVED and change.peak == 5.0 and change.fired_at == 0


def test_restore_puts_an_alert_back_to_firing_without_an_event() -> None:
    table = AlertTable(hold=600)
    table.restore(A, fired_at=100, value=1.0)
    assert table.update({A: 2.0}, 200) == []  # still firing, no new pending period
    (change,) = table.update({}, 215)
    assert change.event is Event.RESOLVED and change.fired_at == 100


def test_clear_resolves_firing_alerts_only() -> None:
    table = AlertTable(hold=60)
    table.update({A: 1.0}, 0)
    table.update({A: 1.0, B: 1.0}, 60)
    changes = table.clear(75)
    assert [(c.event, c.labels) for c in changes] == [(Event.RESOLVED, A)]
    assert len(table) == 0
