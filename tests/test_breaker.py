"""The circuit breaker: its timelines at exact fake times, its two triggers, its single probe."""

from __future__ import annotations

import textwrap

import pytest

from sidecar.gateway.breaker import (
    BreakerOverride,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Transition,
    parse_breaker,
    parse_breaker_override,
)
from sidecar.yamlspec import Reader

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN

# Only the consecutive trigger can fire (the ratio needs more calls than these tests make).
CONSECUTIVE = BreakerSettings(consecutive_failures=3, min_calls=1000, cooldown=30.0)
# Only the ratio trigger can fire.
RATIO = BreakerSettings(consecutive_failures=1000, error_ratio=0.5, window=60.0, min_calls=20, cooldown=30.0)


def opened_at(t: float, settings: BreakerSettings = CONSECUTIVE) -> CircuitBreaker:
    """A breaker that opened at ``t`` from consecutive failures."""
    breaker = CircuitBreaker(settings)
    for _ in range(settings.consecutive_failures - 1):
        assert breaker.record(False, t) is None
    assert breaker.record(False, t) is not None
    return breaker


def test_state_values_are_the_metric_values() -> None:
    assert [int(s) for s in (CLOSED, HALF_OPEN, OPEN)] == [0, 1, 2]


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(CONSECUTIVE)
    assert breaker.record(False, 1.0) is None
    assert breaker.record(False, 2.0) is None
    assert breaker.record(True, 3.0) is None  # the run of failures is broken
    assert breaker.record(False, 4.0) is None
    assert breaker.record(False, 5.0) is None
    assert breaker.state(5.0) is CLOSED and breaker.allow(5.0)
    assert breaker.record(False, 6.0) == Transition(CLOSED, OPEN, "3 consecutive failures", 6.0)
    assert breaker.state(6.0) is OPEN


def test_open_then_half_open_then_closed_timeline() -> None:
    breaker = opened_at(100.0)
    assert not breaker.allow(100.0)
    assert not breaker.allow(129.999)
    assert breaker.state(129.999) is OPEN
    assert breaker.retry_after(110.0) == pytest.approx(20.0)
    # Half-open by time alone, exactly at the end of the cool-down.
    assert breaker.state(130.0) is HALF_OPEN
    assert breaker.retry_after(130.0) == 0.0
    assert breaker.allow(130.0)  # the probe
    assert not breaker.allow(130.5)  # only one probe while it is out
    assert not breaker.available(130.5)
    assert breaker.record(True, 131.0) == Transition(HALF_OPEN, CLOSED, "probe succeeded", 131.0)
    assert breaker.state(131.0) is CLOSED
    assert all(breaker.allow(131.0 + i) for i in range(5))


def test_a_failed_probe_reopens_with_a_fresh_cooldown() -> None:
    breaker = opened_at(0.0)
    assert breaker.allow(30.0)
    assert breaker.record(False, 35.0) == Transition(HALF_OPEN, OPEN, "probe failed", 35.0)
    assert breaker.state(35.0) is OPEN
    assert not breaker.allow(64.999)  # 30 s from the failed probe, not from the first opening
    assert breaker.retry_after(50.0) == pytest.approx(15.0)
    assert breaker.state(65.0) is HALF_OPEN
    assert breaker.allow(65.0)
    assert breaker.record(True, 66.0) == Transition(HALF_OPEN, CLOSED, "probe succeeded", 66.0)


def test_available_does_not_take_the_probe() -> None:
    breaker = opened_at(0.0)
    assert breaker.available(30.0) and breaker.available(30.0)
    assert breaker.allow(30.0)
    assert not breaker.available(30.0)


def test_cancelled_probe_lets_the_next_call_probe() -> None:
    breaker = opened_at(0.0)
    assert breaker.allow(30.0)
    assert not breaker.allow(31.0)
    breaker.cancel_probe()  # the client went away: says nothing about the upstream
    assert breaker.state(31.0) is HALF_OPEN
    assert breaker.allow(31.0)
    assert not breaker.allow(31.0)


def test_a_probe_that_never_reports_is_presumed_lost_after_a_cooldown() -> None:
    breaker = opened_at(0.0)
    assert breaker.allow(30.0)
    assert not breaker.allow(59.999)
    assert breaker.retry_after(50.0) == pytest.approx(10.0)
    assert breaker.allow(60.0)
    assert not breaker.allow(60.0)


def test_results_while_open_are_ignored() -> None:
    breaker = opened_at(0.0)
    assert breaker.record(True, 10.0) is None
    assert breaker.record(False, 10.0) is None
    assert breaker.state(10.0) is OPEN
    assert breaker.state(30.0) is HALF_OPEN  # the cool-down was not restarted


def test_poll_reports_half_open_once_at_the_end_of_the_cooldown() -> None:
    breaker = opened_at(10.0)
    assert breaker.poll(39.0) is None
    assert breaker.poll(45.0) == Transition(OPEN, HALF_OPEN, "cool-down of 30s elapsed", 40.0)
    assert breaker.poll(46.0) is None
    assert breaker.allow(46.0)
    assert breaker.record(False, 47.0) is not None  # reopened: the next half-open is new news
    assert breaker.poll(76.0) is None
    assert breaker.poll(77.0) == Transition(OPEN, HALF_OPEN, "cool-down of 30s elapsed", 77.0)


def test_error_ratio_opens_once_the_window_has_min_calls() -> None:
    breaker = CircuitBreaker(RATIO)
    for i in range(10):
        assert breaker.record(True, float(i)) is None
    for i in range(9):
        assert breaker.record(False, 10.0 + i) is None  # 9 / 19: below min_calls anyway
    transition = breaker.record(False, 19.0)  # 10 / 20 = 0.50
    assert transition == Transition(CLOSED, OPEN, "error ratio 0.50 >= 0.50 over 1m (20 calls)", 19.0)


def test_error_ratio_below_the_threshold_keeps_it_closed() -> None:
    breaker = CircuitBreaker(RATIO)
    for i in range(100):  # every odd call fails but two: just under half, never many in a row
        assert breaker.record(i % 2 == 0 or i in (1, 99), i / 10) is None
    assert breaker.state(10.0) is CLOSED


def test_few_calls_never_open_it_on_the_ratio() -> None:
    breaker = CircuitBreaker(RATIO)
    for i in range(19):
        assert breaker.record(i % 4 == 0, float(i)) is None  # 14 failures out of 19
    # The 20th call, even a success, brings the window to min_calls at 14/20 = 0.70.
    transition = breaker.record(True, 19.0)
    assert transition is not None and transition.reason == "error ratio 0.70 >= 0.50 over 1m (20 calls)"


def test_failures_leave_the_window() -> None:
    breaker = CircuitBreaker(RATIO)
    for i in range(15):
        assert breaker.record(False, 0.0 + i * 0.1) is None
    # 60 s later the bucket holding them has left the window: 5 new failures of 20 calls.
    for i in range(15):
        assert breaker.record(True, 61.0 + i * 0.1) is None
    for i in range(5):
        assert breaker.record(False, 63.0 + i * 0.1) is None
    assert breaker.state(64.0) is CLOSED


def test_closing_starts_with_an_empty_window() -> None:
    settings = BreakerSettings(consecutive_failures=1000, error_ratio=0.5, window=600.0, min_calls=10)
    breaker = CircuitBreaker(settings)
    for i in range(10):
        breaker.record(False, float(i))
    assert breaker.state(10.0) is OPEN
    assert breaker.allow(40.0) and breaker.record(True, 40.0) is not None
    # Nine calls in the fresh window: below min_calls, whatever the old window held.
    for i in range(9):
        assert breaker.record(False, 41.0 + i) is None
    assert breaker.state(50.0) is CLOSED


def test_half_open_any_result_decides() -> None:
    breaker = opened_at(0.0)
    assert breaker.allow(30.0)
    # A call sent before the breaker opened answers now: it closes the breaker too.
    assert breaker.record(True, 31.0) == Transition(HALF_OPEN, CLOSED, "probe succeeded", 31.0)
    assert breaker.record(True, 32.0) is None  # the probe's own answer, now counted as closed


# -- config -----------------------------------------------------------------------


def read(text: str) -> tuple[BreakerSettings, list[str]]:
    r = Reader("cfg.yaml")
    node = r.compose(textwrap.dedent(text))
    assert node is not None
    settings = parse_breaker(r, node, "circuit_breakers")
    return settings, [str(p) for p in sorted(r.problems, key=lambda p: (p.line, p.column))]


def test_parse_defaults_and_values() -> None:
    assert read("{}") == (BreakerSettings(), [])
    settings, problems = read(
        "{consecutive_failures: 3, error_ratio: 0.25, window: 2m, min_calls: 10, cooldown: 500ms}"
    )
    assert problems == []
    assert settings == BreakerSettings(3, 0.25, 120.0, 10, 0.5)


def test_parse_errors_each_at_its_own_line_and_column() -> None:
    _, problems = read(
        """\
        consecutive_failures: 0
        error_ratio: 1.5
        window: soon
        min_calls: many
        cooldown: 0s
        colldown: 1s
        """
    )
    assert problems == [
        "cfg.yaml:1:23: circuit_breakers.consecutive_failures: must be at least 1, got 0",
        "cfg.yaml:2:14: circuit_breakers.error_ratio: must be in (0, 1], got 1.5",
        'cfg.yaml:3:9: circuit_breakers.window: invalid duration "soon": expected <integer><unit> '
        "parts such as 30s, 1h30m, 500ms (units y, w, d, h, m, s, ms)",
        'cfg.yaml:4:12: circuit_breakers.min_calls: expected an integer, got string "many"',
        "cfg.yaml:5:11: circuit_breakers.cooldown: must be greater than 0s",
        'cfg.yaml:6:1: circuit_breakers.colldown: unknown key "colldown"; did you mean "cooldown"?',
    ]


def test_parse_error_ratio_zero_and_not_a_mapping() -> None:
    _, problems = read("error_ratio: 0\n")
    assert problems == ["cfg.yaml:1:14: circuit_breakers.error_ratio: must be in (0, 1], got 0"]
    settings, problems = read("[1, 2]\n")
    assert settings == BreakerSettings()
    assert problems == ["cfg.yaml:1:1: circuit_breakers: expected a circuit breaker mapping, got a list"]


def test_override_keeps_only_what_was_written() -> None:
    r = Reader("cfg.yaml")
    node = r.compose("{cooldown: 10s, min_calls: 5}")
    assert node is not None
    override = parse_breaker_override(r, node, "routes[0].breaker")
    assert override == BreakerOverride(cooldown=10.0, min_calls=5)
    base = BreakerSettings(consecutive_failures=7, error_ratio=0.9)
    assert override.apply(base) == BreakerSettings(7, 0.9, 60.0, 5, 10.0)
