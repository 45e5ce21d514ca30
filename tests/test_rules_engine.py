"""The engine on a fake clock: each kind fires and resolves when it should.

Times are seconds after T0 (2023-11-14 00:00 UTC, a Tuesday). Unless said
otherwise, rules are evaluated every 15 s from T0 and calls arrive at the
evaluation instants, so window edges fall on bucket edges and the figures can be
worked out by hand (each test says how).
"""

from __future__ import annotations

import math
import random
import textwrap
from collections.abc import Iterable
from dataclasses import replace

import pytest

from sidecar.model import CallRecord, Usage
from sidecar.rules import spec
from sidecar.rules.engine import DEFAULT_MATCH_CACHE, Engine
from sidecar.rules.incidents import Incident
from sidecar.rules.model import RuleSet
from sidecar.rules.testing import call, drive, times

T0 = 1_699_920_000


def rules(body: str, defaults: str = "") -> RuleSet:
    text = "version: sidecar/v1\n" + (f"defaults: {defaults}\n" if defaults else "") + "rules:\n"
    text += textwrap.indent(textwrap.dedent(body), "  ")
    loaded, problems = spec.load([("test.yaml", text)])
    assert [str(p) for p in problems] == []
    return loaded


def samples(engine: Engine, now: float, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {s.labels: s.value for s in engine.samples(now) if s.name == name}


# -- slo -------------------------------------------------------------------------------


def test_slo_burn_rates_and_budget_against_hand_computed_figures() -> None:
    engine = Engine(rules("- {name: avail, kind: slo, objective: 99.9, period: 30d}"), T0)
    for _ in range(900):
        engine.observe(call(T0), T0)
    for i in range(100):
        engine.observe(call(T0 + 3000, error_type="upstream_5xx" if i < 10 else None), T0 + 3000)
    now = T0 + 3010
    burn = samples(engine, now, "llm_slo_burn_rate")
    # 5m and 30m windows: the 100 calls at +3000, 10 bad: ratio 0.1, burn 0.1 / 0.001 = 100.
    # 1h and longer: all 1000 calls, 10 bad: ratio 0.01, burn 10.
    expected = {"5m": 100, "30m": 100, "1h": 10, "2h": 10, "6h": 10, "1d": 10, "3d": 10}
    assert {dict(k)["window"]: round(v, 9) for k, v in burn.items()} == expected
    # Budget left over 30 days: 1 - 0.01 / 0.001 = -9 (spent ten times over).
    assert samples(engine, now, "llm_slo_error_budget_remaining_ratio") == {
        (("rule", "avail"),): pytest.approx(-9.0)
    }
    fired = engine.evaluate(now)
    # page: 1h/5m needs > 14.4 x 0.001 = 0.0144 on 1h (0.01: no); 6h/30m needs > 0.006: 0.01 and 0.1 yes.
    # ticket: 1d/2h needs > 0.003: yes.
    assert sorted((t.severity, t.status, round(t.value, 9)) for t in fired) == [
        ("page", "firing", 0.01),
        ("ticket", "firing", 0.01),
    ]
    page = next(t for t in fired if t.severity == "page")
    assert page.budget_remaining == pytest.approx(-9.0)
    assert "burn rate 10x" in page.value_text and "burn rate 6x" in page.threshold_text


def test_slo_first_pair_gives_the_value_and_each_pair_resolves_with_its_short_window() -> None:
    engine = Engine(rules("- {name: avail, kind: slo, objective: 99.9, period: 30d}"), T0)

    def traffic(t: int) -> Iterable[CallRecord]:
        if t == 0 + T0:
            return [call(t)] * 1000
        if t == T0 + 3000:
            return [call(t, error_type="timeout")] * 20 + [call(t)] * 80
        return []

    events = drive(engine, T0, T0 + 25_000, traffic)
    # At +3000: 1h ratio 20 / 1100 = 0.01818 > 0.0144 and 5m 0.2: page fires with the 1h ratio.
    firing = [(t - T0, tr.severity, round(tr.value, 6)) for t, tr in events if tr.status == "firing"]
    assert firing == [(3000, "page", round(20 / 1100, 6)), (3000, "ticket", round(20 / 1100, 6))]
    # The bad calls leave the 5m window at +3300 (page still holds by 6h/30m), the 30m one
    # at +4800 (page resolves), the 2h one at +10200 (ticket still holds by 3d/6h, factor 1)
    # and the 6h one with the 6-minute bucket holding +3000, which starts at +2880: at
    # +2880 + 6h = +24480 (ticket resolves; a window edge moves by whole buckets).
    assert [(t - T0, tr.severity) for t, tr in events if tr.status == "resolved"] == [
        (4800, "page"),
        (24480, "ticket"),
    ]


def test_slo_min_requests_and_groups() -> None:
    engine = Engine(
        rules(
            "- {name: avail, kind: slo, objective: 99, period: 7d, min_requests: 50}", "{group_by: [tenant]}"
        ),
        T0,
    )
    for _ in range(10):
        engine.observe(call(T0, tenant="tiny", error_type="timeout"), T0)
    for _ in range(60):
        engine.observe(call(T0, tenant="big", error_type="timeout"), T0)
    fired = engine.evaluate(T0)
    assert {(t.severity, t.labels) for t in fired} == {
        ("page", (("tenant", "big"),)),
        ("ticket", (("tenant", "big"),)),
    }


# -- latency ---------------------------------------------------------------------------


def test_latency_fires_after_for_and_resolves_after_keep_firing_for() -> None:
    engine = Engine(
        rules(
            "- {name: ttft, kind: latency, signal: time_to_first_token, quantile: 0.95, threshold: 2s,"
            " window: 5m, for: 10m, keep_firing_for: 5m, severity: ticket}"
        ),
        T0,
    )
    slow_from, fast_from = T0 + 600, T0 + 1800

    def traffic(t: int) -> Iterable[CallRecord]:
        if t % 15:
            return []
        ttft = 5.0 if slow_from <= t < fast_from else 0.3
        return [call(t, ttft=ttft)] * 20 + [call(t, ttft=None)]  # a call without a first token is not counted

    events = drive(engine, T0, T0 + 3000, traffic)
    # The 5m window holds 20 ticks x 20 calls. p95 > 2s once more than 5% are slow: 2 slow
    # ticks (10%), i.e. at slow_from + 15: pending; fires 10m later.
    assert times(events, "firing", T0) == [615 + 600]
    # Back to fast at 1800: one slow tick (5%) is left in the window at 1800 + 270 -> the
    # condition ends there; keep_firing_for 5m -> resolved at 2070 + 300.
    assert times(events, "resolved", T0) == [2370]
    (fired,) = [tr for _, tr in events if tr.status == "firing"]
    # By then the window is all slow: rank 0.95 x 400 = 380 in (4, 8] -> 4 + 4 x 380/400.
    assert fired.value == pytest.approx(4 + 4 * 0.95)
    assert "time to first token" in fired.value_text and fired.threshold_text == "2s"


def test_latency_duration_signal_and_min_requests() -> None:
    engine = Engine(
        rules("- {name: dur, kind: latency, quantile: 0.5, threshold: 1s, window: 1m, min_requests: 5}"),
        T0,
    )
    for _ in range(4):
        engine.observe(call(T0, duration=3.0), T0)
    assert engine.evaluate(T0) == []  # 4 < min_requests
    engine.observe(call(T0 + 1, duration=3.0), T0 + 1)
    (fired,) = engine.evaluate(T0 + 15)
    # 5 calls in (2, 4]: rank 2.5 -> 2 + 2 x 2.5/5 = 3
    assert fired.value == pytest.approx(3.0)


# -- error_rate ------------------------------------------------------------------------


def test_error_rate_for_min_requests_and_match() -> None:
    engine = Engine(
        rules(
            "- {name: errors, kind: error_rate, match: {provider: openai},"
            " bad: {error_type: [upstream_5xx, timeout]},"
            " threshold: 5%, window: 5m, min_requests: 20, for: 2m, severity: page}",
            "{group_by: [tenant]}",
        ),
        T0,
    )
    bad_from, good_from = T0 + 600, T0 + 1200

    def traffic(t: int) -> Iterable[CallRecord]:
        out: list[CallRecord] = []
        if t % 15 == 0:
            bad = 2 if bad_from <= t < good_from else 0
            out += [call(t, error_type="timeout")] * bad + [call(t)] * (10 - bad)
            # anthropic calls, all failing, are not matched
            out += [call(t, provider="anthropic", error_type="upstream_5xx")] * 10
            # client errors are not "bad" for this rule
            out += [call(t, tenant="beta", error_type="upstream_4xx")] * 10
        if t % 30 == 0:  # 10 calls per 5m: below min_requests, all bad
            out.append(call(t, tenant="tiny", error_type="timeout"))
        return out

    events = drive(engine, T0, T0 + 2000, traffic)
    # 200 calls in the window; > 5% bad needs 11 bad calls = 6 ticks of 2: at 600 + 75 pending,
    # firing 2m later.
    assert [(t - T0, tr.labels) for t, tr in events if tr.status == "firing"] == [
        (795, (("tenant", "acme"),))
    ]
    # Good again at 1200: 5 bad ticks (10 calls, 5%) remain at 1200 + 210 -> resolved.
    assert times(events, "resolved", T0) == [1410]
    fired = events[0][1]
    # At +795 the window (ticks +510..+795) holds 14 bad ticks: 28 of 200 calls.
    assert fired.value == pytest.approx(28 / 200) and fired.threshold_text == "5%"


# -- budget ----------------------------------------------------------------------------


def test_calendar_budget_with_override_in_a_time_zone() -> None:
    engine = Engine(
        rules(
            "- {name: spend, kind: budget, period: 1d, calendar: true, timezone: Europe/Paris, limit: 50,"
            " overrides: {acme: 500}, severity: ticket}",
            "{group_by: [tenant]}",
        ),
        T0,
    )

    def traffic(t: int) -> Iterable[CallRecord]:
        if t % 60 or t >= T0 + 6000:
            return []
        return [call(t, tenant="beta", cost=1), call(t, tenant="acme", cost=1), call(t, tenant="free")]

    events = drive(engine, T0, T0 + 3015, traffic)
    spent = samples(engine, T0 + 3015, "llm_budget_spent")
    assert spent[(("rule", "spend"), ("tenant", "acme"))] == 51  # minutes 0..50
    assert (("rule", "spend"), ("tenant", "free")) not in spent  # unpriced calls spend nothing
    assert samples(engine, T0 + 3015, "llm_budget_limit")[(("rule", "spend"), ("tenant", "acme"))] == 500
    events += drive(engine, T0 + 3015, T0 + 86_400, traffic)
    # beta spends $1 a minute from T0: the 50th dollar at +49 min = 2940 s.
    # acme's limit is 500 and it stops at 100 dollars. The Paris day ends at 23:00 UTC = +82800.
    assert [(t - T0, tr.status, tr.labels) for t, tr in events] == [
        (2940, "firing", (("tenant", "beta"),)),
        (82800, "resolved", (("tenant", "beta"),)),
    ]
    assert events[0][1].value == 50


def test_rolling_budget_of_tokens_of_one_type() -> None:
    engine = Engine(
        rules("- {name: tok, kind: budget, signal: tokens, token_type: output, period: 1h, limit: 1000}"),
        T0,
    )

    def traffic(t: int) -> Iterable[CallRecord]:
        if t % 60 or t >= T0 + 600:
            return []
        return [call(t, usage=Usage(input=999, output=100))]

    events = drive(engine, T0, T0 + 4000, traffic)
    # 100 output tokens a minute from T0: 1000 at +540. The first minute leaves the 1h window
    # (60 s buckets) at +3600.
    assert [(t - T0, tr.status) for t, tr in events] == [(540, "firing"), (3600, "resolved")]


def test_reject_budget_is_effective_at_once_and_lifts_with_the_period() -> None:
    engine = Engine(
        rules(
            "- {name: cap, kind: budget, period: 1d, calendar: true, limit: 10, action: reject,"
            " match: {provider: openai}}",
            "{group_by: [tenant]}",
        ),
        T0,
    )
    assert not engine.budget_exceeded("acme", "openai", "gpt-4o", "openai")
    engine.observe(call(T0 + 5, cost=9.5), T0 + 5)
    assert not engine.budget_exceeded("acme", "openai", "gpt-4o", "openai")
    engine.observe(call(T0 + 6, cost=0.5), T0 + 6)
    # No evaluation yet: the spend reached the limit on observe.
    assert engine.budget_exceeded("acme", "openai", "gpt-4o", "openai")
    assert not engine.budget_exceeded("beta", "openai", "gpt-4o", "openai")
    assert not engine.budget_exceeded("acme", "anthropic", "claude", "anthropic")  # not matched
    engine.evaluate(T0 + 15)
    assert engine.budget_exceeded("acme", "openai", "gpt-4o", "openai")
    engine.evaluate(T0 + 86_400)  # a new day
    assert not engine.budget_exceeded("acme", "openai", "gpt-4o", "openai")


def test_unpriced_calls_cost_nothing() -> None:
    engine = Engine(rules("- {name: cap, kind: budget, period: 1h, limit: 0.5}"), T0)
    for _ in range(100):
        engine.observe(call(T0, cost=None), T0)
    assert engine.evaluate(T0) == []


# -- absence ---------------------------------------------------------------------------


def test_absence_ungrouped_counts_from_the_engine_start() -> None:
    engine = Engine(rules("- {name: quiet, kind: absence, window: 15m, for: 5m}"), T0)
    events = drive(engine, T0, T0 + 3000, lambda t: [call(t)] if t == T0 + 2000 else [])
    # No call since T0: absent at +900, firing at +1200; a call at +2000 resolves it.
    assert [(t - T0, tr.status) for t, tr in events] == [(1200, "firing"), (2010, "resolved")]


def test_absence_grouped_watches_groups_that_were_seen() -> None:
    engine = Engine(rules("- {name: quiet, kind: absence, window: 10m}", "{group_by: [tenant]}"), T0)

    def traffic(t: int) -> Iterable[CallRecord]:
        out = [call(t, tenant="a")] if t % 60 == 0 else []
        if t < T0 + 300 and t % 60 == 0:
            out.append(call(t, tenant="b"))
        return out

    events = drive(engine, T0, T0 + 2000, traffic)
    # b's last call at +240: absent from +840 on.
    assert [(t - T0, tr.status, tr.labels) for t, tr in events] == [(840, "firing", (("tenant", "b"),))]


# -- incidents, mttr, incident_age ------------------------------------------------------


def closed(rule: str, start: float, end: float, **kw: object) -> Incident:
    return Incident(f"{rule}-{start}", rule, "page", (("tenant", "acme"),), start, end, **kw)  # type: ignore[arg-type]


def test_mttr_over_resolved_incidents_in_the_window() -> None:
    engine = Engine(
        rules(
            """
            - {name: errors, kind: error_rate, threshold: 5%, window: 5m, severity: page}
            - {name: mttr, kind: mttr, incidents_of: [errors], window: 7d, threshold: 30m, min_incidents: 2}
            """
        ),
        T0,
    )
    engine.restore([closed("errors", T0, T0 + 2400), closed("errors", T0 + 3600, T0 + 5400)], T0 + 6000)
    # mean of 40 min and 30 min = 35 min > 30 min, two incidents.
    (fired,) = engine.evaluate(T0 + 6000)
    assert (fired.rule, fired.status, fired.value) == ("mttr", "firing", 2100.0)
    assert engine.evaluate(T0 + 7 * 86400 + 2385) == []
    # The first incident ended at +2400: it leaves the 7-day window then, one incident is left.
    (resolved,) = engine.evaluate(T0 + 7 * 86400 + 2400)
    assert (resolved.rule, resolved.status) == ("mttr", "resolved")


def test_incidents_from_alerts_feed_incident_age_and_mttr() -> None:
    engine = Engine(
        rules(
            """
            - {name: quiet, kind: absence, window: 5m, severity: page}
            - {name: stuck, kind: incident_age, incidents_of: [quiet], threshold: 1h}
            - {name: mttr, kind: mttr, incidents_of: [quiet], window: 1d, threshold: 1h, group_by: [rule]}
            """
        ),
        T0,
        merge_gap=600,
    )
    resume = T0 + 300 + 5400  # the outage lasts 90 minutes

    def traffic(t: int) -> Iterable[CallRecord]:
        return [call(t)] if t >= resume and t % 60 == 0 else []

    events = drive(engine, T0, T0 + 8000, traffic)
    # quiet fires at +300 (an incident opens); stuck fires when the incident is older than
    # 1h: first evaluation with age > 3600 is +3915; both resolve at +5700, when calls
    # return, and mttr (one incident of 5400 s > 1h) fires in the same evaluation.
    assert [(t - T0, tr.rule, tr.status) for t, tr in events] == [
        (300, "quiet", "firing"),
        (3915, "stuck", "firing"),
        (5700, "quiet", "resolved"),
        (5700, "stuck", "resolved"),
        (5700, "mttr", "firing"),
    ]
    stuck = events[1][1]
    assert stuck.labels == (("rule", "quiet"),)
    mttr = events[-1][1]
    assert mttr.labels == (("rule", "quiet"),) and mttr.value == 5400
    incidents = engine.book.all()
    assert [(i.rule, i.start - T0, None if i.end is None else i.end - T0) for i in incidents] == [
        ("quiet", 300, 5700),
        ("stuck", 3915, 5700),
        ("mttr", 5700, None),
    ]


def test_refire_within_the_merge_gap_continues_the_incident() -> None:
    engine = Engine(rules("- {name: quiet, kind: absence, window: 1m, severity: page}"), T0, merge_gap=300)
    calls_at = {T0 + 600, T0 + 800, T0 + 2000}
    events = drive(engine, T0, T0 + 2050, lambda t: [call(t)] if t in calls_at else [])
    # Fires at +60 (no call since T0), resolves at +600, fires again at +660 (within the gap:
    # same incident), resolves at +810, fires at +870 ... resolves at +2010.
    assert times(events, "firing", T0) == [60, 660, 870]
    assert times(events, "resolved", T0) == [600, 810, 2010]
    (incident,) = engine.book.all()
    assert (incident.start - T0, incident.end and incident.end - T0, incident.fires) == (60, 2010, 3)
    assert engine.book.drain_finalized(T0 + 2010 + 300) == []
    assert [i.id for i in engine.book.drain_finalized(T0 + 2010 + 301)] == [incident.id]


# -- engine behaviour ------------------------------------------------------------------


def test_restore_puts_open_incidents_back_to_firing_then_resolves_them() -> None:
    ruleset = rules("- {name: errors, kind: error_rate, threshold: 5%, window: 5m, severity: page}")
    engine = Engine(ruleset, T0 + 1000)
    open_incident = Incident("abc", "errors", "page", (), T0, None, peak=0.3)
    gone = Incident("old", "removed-rule", "page", (), T0, None)
    engine.restore([open_incident, gone], T0 + 1000)
    assert [s.labels for s in engine.samples(T0 + 1000) if s.name == "llm_alerts_firing"] == [
        (("rule", "errors"), ("severity", "page"))
    ]
    assert engine.book.get("old") is not None and engine.book.get("old").end == T0 + 1000  # type: ignore[union-attr]
    (resolved,) = engine.evaluate(T0 + 1000)  # no traffic: the condition does not hold
    assert (resolved.status, resolved.since, resolved.at) == ("resolved", T0, T0 + 1000)
    assert engine.book.get("abc").end == T0 + 1000  # type: ignore[union-attr]


def test_reload_keeps_state_of_unchanged_rules_and_resolves_changed_ones() -> None:
    body = """
    - {name: quiet, kind: absence, window: 1m, severity: page}
    - {name: other, kind: absence, window: 1m, severity: ticket}
    """
    engine = Engine(rules(body), T0)
    fired = engine.evaluate(T0 + 60)
    assert sorted(t.rule for t in fired) == ["other", "quiet"]
    changed = body.replace(
        "{name: other, kind: absence, window: 1m", "{name: other, kind: absence, window: 2m"
    )
    out = engine.replace_rules(rules(changed), T0 + 70)
    assert [(t.rule, t.status) for t in out] == [("other", "resolved")]
    assert "the rule changed in a reload" in out[0].value_text
    assert engine.evaluate(T0 + 75) == []  # quiet still firing, no new transition; other restarts its clock
    (refired,) = engine.evaluate(T0 + 195)
    assert refired.rule == "other"
    out = engine.replace_rules(rules("- {name: quiet, kind: absence, window: 1m, severity: page}"), T0 + 200)
    assert [(t.rule, t.status) for t in out] == [("other", "resolved")]


def test_series_per_rule_are_bounded() -> None:
    engine = Engine(
        rules("- {name: e, kind: error_rate, threshold: 0.5, window: 1m}", "{group_by: [tenant]}"),
        T0,
        max_series=2,
    )
    for tenant in ("a", "b", "c", "c"):
        engine.observe(call(T0, tenant=tenant, error_type="timeout"), T0)
    assert {t.labels for t in engine.evaluate(T0)} == {(("tenant", "a"),), (("tenant", "b"),)}
    assert engine.series_dropped == 2
    # Idle series are dropped once their window is empty and their alert resolved.
    engine.evaluate(T0 + 60)
    for tenant in ("c",):
        engine.observe(call(T0 + 61, tenant=tenant, error_type="timeout"), T0 + 61)
    assert {t.labels for t in engine.evaluate(T0 + 75)} == {(("tenant", "c"),)}


def test_evaluation_interval_per_rule_and_next_due() -> None:
    engine = Engine(
        rules(
            """
            - {name: fast, kind: absence, window: 1m, evaluation_interval: 10s}
            - {name: slow, kind: absence, window: 1m, evaluation_interval: 1m}
            """
        ),
        T0,
    )
    engine.evaluate(T0)
    assert engine.next_due() == T0 + 10
    out = engine.evaluate(T0 + 65)
    assert [t.rule for t in out] == ["fast", "slow"]
    assert engine.next_due() == T0 + 70


def test_annotations_are_rendered_with_labels_and_value() -> None:
    engine = Engine(
        rules(
            """
            - name: e
              kind: error_rate
              threshold: 10%
              window: 1m
              annotations:
                summary: "{{ $labels.tenant }} at {{ $value | humanizePercentage }}"
                runbook_url: https://runbooks.example/e
            """,
            "{group_by: [tenant]}",
        ),
        T0,
    )
    engine.observe(call(T0, error_type="timeout"), T0)
    engine.observe(call(T0), T0)
    (fired,) = engine.evaluate(T0)
    assert fired.annotation("summary") == "acme at 50%"
    assert fired.annotation("runbook_url") == "https://runbooks.example/e"
    assert fired.channels == ()


def test_late_records_count_at_their_finish_time_and_future_ones_now() -> None:
    engine = Engine(rules("- {name: e, kind: error_rate, threshold: 0.5, window: 1m}"), T0)
    engine.observe(call(T0 - 120, error_type="timeout"), T0)  # finished before the window
    assert engine.evaluate(T0) == []
    engine.observe(call(T0 + 999, error_type="timeout"), T0 + 1)  # a clock ahead: counted at now
    (fired,) = engine.evaluate(T0 + 15)
    assert math.isclose(fired.value, 1.0)


def test_incident_gauges() -> None:
    engine = Engine(rules("- {name: quiet, kind: absence, window: 1m, severity: page}"), T0)
    engine.evaluate(T0 + 60)
    assert samples(engine, T0 + 100, "llm_incidents_open") == {(("rule", "quiet"), ("severity", "page")): 1.0}
    assert samples(engine, T0 + 100, "llm_incident_open_age_seconds") == {
        (("rule", "quiet"), ("severity", "page")): 40.0
    }
    assert samples(engine, T0 + 100, "llm_alerts_firing") == {(("rule", "quiet"), ("severity", "page")): 1.0}


# -- the match cache of observe -----------------------------------------------------------

_COUNTING = """
- {name: openai, kind: budget, signal: tokens, period: 1h, limit: 1000000, match: {provider: openai}}
- name: gpt4
  kind: budget
  signal: tokens
  period: 1h
  limit: 1000000
  match: {model: {regex: "gpt-4.*"}, upstream: [a, b]}
  group_by: [model, upstream]
"""


def spent(engine: Engine, now: float) -> dict[tuple[tuple[str, str], ...], float]:
    return samples(engine, now, "llm_budget_spent")


def test_each_call_gets_the_rules_its_own_labels_match() -> None:
    # One output token per call, so each budget's spend counts the calls it saw.
    engine = Engine(rules(_COUNTING, "{group_by: [tenant]}"), T0)
    one = Usage(input=0, output=1)
    traffic = [
        call(T0, provider="openai", upstream="a", model="gpt-4o", usage=one),  # both
        call(T0, provider="anthropic", upstream="a", model="gpt-4o", usage=one),  # gpt4 only
        call(T0, provider="openai", upstream="c", model="gpt-4o", usage=one),  # openai only
        call(T0, provider="openai", upstream="b", model="o1", usage=one),  # openai only
        # The answering model counts, not the requested one.
        replace(call(T0, provider="anthropic", upstream="b", model="gpt-4o", usage=one), response_model="o1"),
        replace(
            call(T0, provider="anthropic", upstream="b", model="o1", usage=one), response_model="gpt-4-x"
        ),
    ]
    for _ in range(3):  # the second and third rounds are answered from the cache
        for record in traffic:
            engine.observe(record, T0)
    assert spent(engine, T0) == {
        (("rule", "openai"), ("tenant", "acme")): 9.0,
        (("rule", "gpt4"), ("model", "gpt-4o"), ("upstream", "a")): 6.0,
        (("rule", "gpt4"), ("model", "gpt-4-x"), ("upstream", "b")): 3.0,
    }


def test_the_match_cache_is_bounded() -> None:
    small = Engine(rules(_COUNTING, "{group_by: [tenant]}"), T0, match_cache=8)
    default = Engine(rules(_COUNTING, "{group_by: [tenant]}"), T0)
    for i in range(DEFAULT_MATCH_CACHE + 50):
        record = call(T0, tenant=f"t{i}", usage=Usage(output=1))
        small.observe(record, T0)
        default.observe(record, T0)
        assert len(small._targets) <= 8
    assert 0 < len(default._targets) <= DEFAULT_MATCH_CACHE
    # Starting over loses nothing: every tenant was filed once by either engine.
    for engine in (small, default):
        openai = {k: v for k, v in spent(engine, T0).items() if k[0] == ("rule", "openai")}
        assert len(openai) == DEFAULT_MATCH_CACHE + 50 and set(openai.values()) == {1.0}


def test_a_reload_forgets_which_rules_matched() -> None:
    engine = Engine(
        rules("- {name: b, kind: budget, signal: tokens, period: 1h, limit: 99, match: {provider: openai}}"),
        T0,
    )
    one = Usage(output=1)
    openai, anthropic = call(T0, provider="openai", usage=one), call(T0, provider="anthropic", usage=one)
    engine.observe(openai, T0)
    engine.observe(anthropic, T0)  # matched no rule
    engine.replace_rules(
        rules(
            "- {name: b, kind: budget, signal: tokens, period: 1h, limit: 99, match: {provider: anthropic}}"
        ),
        T0,
    )
    engine.observe(openai, T0)  # no longer matches
    engine.observe(anthropic, T0)  # now does
    assert spent(engine, T0) == {(("rule", "b"),): 1.0}


def test_cached_and_uncached_matching_agree_on_random_traffic() -> None:
    text = """
    - name: slo
      kind: slo
      objective: 99
      period: 1d
      alerts: [{severity: page, long: 1h, short: 5m, factor: 2}]
      match: {provider: openai}
      group_by: [tenant, model]
    - {name: err, kind: error_rate, threshold: 10%, window: 2m, match: {model: {regex: "gpt-.*"}},
       group_by: [upstream]}
    - {name: lat, kind: latency, signal: duration, quantile: 0.9, threshold: 1s, window: 3m,
       group_by: [provider]}
    - {name: tok, kind: budget, signal: tokens, period: 10m, limit: 3000, action: reject,
       group_by: [tenant, model]}
    - {name: usd, kind: budget, signal: cost_usd, period: 10m, limit: 0.2, match: {upstream: [a]}}
    - {name: quiet, kind: absence, window: 2m, group_by: [upstream, provider]}
    """
    engines = [Engine(rules(text), T0, match_cache=size) for size in (0, 3, DEFAULT_MATCH_CACHE)]
    rnd = random.Random(7)
    out: list[list[str]] = [[] for _ in engines]
    for i in range(3000):
        t = T0 + i * 0.4
        record = call(
            t,
            tenant=rnd.choice(["acme", "beta", "gamma"]),
            upstream=rnd.choice(["a", "b"]),
            provider=rnd.choice(["openai", "anthropic"]),
            model=rnd.choice(["gpt-4o", "gpt-3.5", "claude"]),
            error_type=rnd.choice([None, None, None, "timeout"]),
            duration=rnd.choice([0.1, 3.0]),
            cost=rnd.randrange(1, 1000) / 100_000,
            usage=Usage(input=rnd.randrange(20), output=rnd.randrange(20)),
        )
        for engine, lines in zip(engines, out, strict=True):
            engine.observe(record, t)
            if i % 40 == 0:
                lines.extend(repr(tr) for tr in engine.evaluate(t))
                lines.extend(repr(s) for s in engine.samples(t))
    assert any("firing" in line for line in out[0])
    assert out[0] == out[1] == out[2]
