"""Rule files: parsing, defaults, and every problem with its line and column."""

# ruff: noqa: E501 - the rule lines are long on purpose: expected columns point into them.

from __future__ import annotations

import textwrap

import pytest

from sidecar.rules import spec
from sidecar.rules.burnrate import default_alerts, factor
from sidecar.rules.model import (
    AbsenceRule,
    BudgetRule,
    ErrorRateRule,
    IncidentAgeRule,
    LabelMatch,
    LatencyRule,
    MttrRule,
    SloRule,
)

ISSUE_EXAMPLE = """\
version: sidecar/v1
defaults: {evaluation_interval: 15s, group_by: [tenant], notify: [oncall]}
rules:
  - name: availability            # unique, [a-z0-9-]+; becomes alertname
    kind: slo
    objective: 99.9               # percent of good calls over the period
    period: 30d
    bad: {error_type: [upstream_5xx, timeout, connect_error, stream_interrupted, proxy_error]}
    alerts: multiwindow
    notify: {page: [pager], ticket: [oncall]}
  - {name: ttft-p95, kind: latency, signal: time_to_first_token, quantile: 0.95, threshold: 2s, window: 5m, for: 10m, keep_firing_for: 5m, severity: ticket}
  - {name: errors, kind: error_rate, match: {provider: openai}, bad: {error_type: [upstream_5xx, timeout]}, threshold: 5%, window: 5m, min_requests: 20, for: 2m, severity: page}
  - {name: daily-spend, kind: budget, signal: cost_usd, period: 1d, calendar: true, timezone: UTC, limit: 50, overrides: {acme: 500}, action: notify, severity: ticket}
  - {name: mttr, kind: mttr, incidents_of: [availability, errors], window: 7d, threshold: 30m, min_incidents: 2, severity: ticket}
  - {name: stuck-incident, kind: incident_age, incidents_of: [availability], threshold: 1h, severity: page}
  - {name: no-traffic, kind: absence, window: 15m, for: 5m, severity: ticket}
"""


def load_ok(text: str, name: str = "rules.yaml"):
    rules, problems = spec.load([(name, textwrap.dedent(text))])
    assert [str(p) for p in problems] == []
    return rules


def messages(text: str, name: str = "r.yaml") -> list[str]:
    _, problems = spec.load([(name, textwrap.dedent(text))])
    return [str(p) for p in problems]


def test_the_issue_example_parses_with_defaults_merged() -> None:
    rules = load_ok(ISSUE_EXAMPLE)
    assert rules.names == (
        "availability",
        "ttft-p95",
        "errors",
        "daily-spend",
        "mttr",
        "stuck-incident",
        "no-traffic",
    )
    slo = rules.get("availability")
    assert isinstance(slo, SloRule)
    assert slo.objective == 0.999 and slo.period == 30 * 86400
    assert slo.group_by == ("tenant",) and slo.evaluation_interval == 15
    assert slo.severities() == ("page", "ticket")
    assert slo.channels_for("page") == ("pager",) and slo.channels_for("ticket") == ("oncall",)
    # budget_fraction x period / long, for 30 days: 14.4, 6, 3, 1
    assert [(a.severity, a.long, a.short, round(a.factor, 9)) for a in slo.alerts] == [
        ("page", 3600, 300, 14.4),
        ("page", 21600, 1800, 6.0),
        ("ticket", 86400, 7200, 3.0),
        ("ticket", 259200, 21600, 1.0),
    ]
    lat = rules.get("ttft-p95")
    assert isinstance(lat, LatencyRule)
    assert (lat.signal, lat.quantile, lat.threshold, lat.window, lat.for_, lat.keep_firing_for) == (
        "time_to_first_token",
        0.95,
        2.0,
        300.0,
        600.0,
        300.0,
    )
    assert lat.channels_for("ticket") == ("oncall",)  # from defaults
    err = rules.get("errors")
    assert isinstance(err, ErrorRateRule)
    assert err.threshold == 0.05 and err.min_requests == 20 and err.bad == ("upstream_5xx", "timeout")
    assert err.match == (LabelMatch("provider", values=("openai",)),)
    budget = rules.get("daily-spend")
    assert isinstance(budget, BudgetRule)
    assert budget.calendar and budget.period_text == "1d" and budget.limit == 50
    assert budget.limit_for((("tenant", "acme"),)) == 500 and budget.limit_for((("tenant", "beta"),)) == 50
    mttr = rules.get("mttr")
    assert isinstance(mttr, MttrRule)
    assert mttr.group_by == () and mttr.incidents_of == ("availability", "errors") and mttr.min_incidents == 2
    assert isinstance(rules.get("stuck-incident"), IncidentAgeRule)
    absence = rules.get("no-traffic")
    assert isinstance(absence, AbsenceRule) and absence.window == 900 and absence.for_ == 300


def test_burn_rate_table_scales_with_the_period() -> None:
    table = default_alerts()
    assert [(s.severity, s.budget_fraction) for s in table] == [
        ("page", 0.02),
        ("page", 0.05),
        ("ticket", 0.1),
        ("ticket", 0.1),
    ]
    week = 7 * 86400
    # 2% of a week in 1h: 0.02 * 168 = 3.36; 5% in 6h: 0.05 * 28 = 1.4; 10% in 1d: 0.7; 10% in 3d: 0.2333
    assert [round(factor(s, week), 4) for s in table] == [3.36, 1.4, 0.7, 0.2333]


def test_explicit_alert_list_with_factor_or_fraction() -> None:
    rules = load_ok(
        """
        version: sidecar/v1
        rules:
          - name: avail
            kind: slo
            objective: "99.5%"
            period: 7d
            alerts:
              - {severity: page, long: 1h, short: 5m, factor: 10}
              - {severity: ticket, long: 1d, short: 2h, budget_fraction: 20%}
        """
    )
    slo = rules.get("avail")
    assert isinstance(slo, SloRule)
    assert slo.objective == 0.995
    assert [(a.severity, round(a.factor, 6), a.budget_fraction) for a in slo.alerts] == [
        ("page", 10.0, None),
        ("ticket", 1.4, 0.2),
    ]
    assert slo.group_by == ()  # no defaults


def test_every_problem_is_reported_with_line_and_column() -> None:
    text = """\
    version: sidecar/v1
    defaults: {group_by: [tenant], notify: [oncall]}
    rules:
      - name: Availability
        kind: slo
        objective: 100.5
        period: 30x
        bad: {error_type: [upstream_5xxx]}
      - {name: ttft, kind: latency, quantile: 0.95, threshold: 2s, windw: 5m, severity: urgent}
      - {name: errs, kind: error_rate, threshold: 5%, window: 5m, annotations: {summary: "{{ $labels.model }}"}}
      - {name: spend, kind: budget, period: 1mo, limit: -1, overrides: {"model=x": 10}}
      - {name: x, kind: wat}
    """
    assert messages(text) == [
        "r.yaml:4:11: rules[0].name: invalid value \"Availability\": lower-case letters, digits and '-' only",
        "r.yaml:6:16: rules[0].objective: must be between 0 and 100 (percent), exclusive",
        'r.yaml:7:13: rules[0].period: invalid duration "30x": ' + messages_of_duration("30x"),
        "r.yaml:8:24: rules[0].bad.error_type[0]: unknown error type 'upstream_5xxx'; did you mean \"upstream_5xx\"?",
        'r.yaml:9:5: rules[1].window: missing required key "window"',
        'r.yaml:9:64: rules[1].windw: unknown key "windw"; did you mean "window"?',
        'r.yaml:9:85: rules[1].severity: invalid value "urgent": expected one of page, ticket, info',
        "r.yaml:10:86: rules[2].annotations.summary: $labels.model is not a label of this rule's alerts "
        "(labels: tenant)",
        "r.yaml:11:41: rules[3].period: 1mo needs calendar: true (a rolling period is a duration: 30d)",
        "r.yaml:11:53: rules[3].limit: must be greater than 0",
        "r.yaml:11:69: rules[3].overrides.model=x: label 'model' is not in group_by (tenant)",
        'r.yaml:12:21: rules[4].kind: invalid value "wat": expected one of slo, latency, error_rate, budget, '
        "mttr, incident_age, absence",
    ]


def messages_of_duration(text: str) -> str:
    from sidecar.durations import parse_duration

    with pytest.raises(ValueError) as info:
        parse_duration(text)
    return str(info.value).removeprefix(f'invalid duration "{text}": ')


def test_version_is_checked_first_and_alone() -> None:
    assert messages("version: sidecar/v2\nrules: [{bogus: 1}]\n") == [
        "r.yaml:1:10: version: unsupported version 'sidecar/v2' (this sidecar reads sidecar/v1)"
    ]
    assert messages("rules: []\n") == [
        'r.yaml:1:1: version: missing required key "version" (expected sidecar/v1)'
    ]
    assert messages("") == ["r.yaml:1:1: empty rule file (expected version: sidecar/v1 and rules)"]
    (syntax,) = messages("version: sidecar/v1\nrules: [\n")
    assert syntax.startswith("r.yaml:3:1: invalid YAML: ")


def test_unknown_top_level_and_kind_keys() -> None:
    got = messages(
        """
        version: sidecar/v1
        rulez: []
        rules:
          - {name: a, kind: absence, window: 5m, threshold: 3}
          - {name: b, kind: incident_age, incidents_of: [a], threshold: 1h, group_by: [tenant]}
        """
    )
    assert got == [
        'r.yaml:3:1: rulez: unknown key "rulez"; did you mean "rules"?',
        'r.yaml:5:42: rules[0].threshold: unknown key "threshold" (known keys: name, kind, for, keep_firing_for, '
        "evaluation_interval, notify, annotations, match, group_by, severity, window)",
        'r.yaml:6:69: rules[1].group_by: unknown key "group_by" (known keys: name, kind, for, keep_firing_for, '
        "evaluation_interval, notify, annotations, severity, incidents_of, threshold)",
    ]


def test_references_and_names_across_files() -> None:
    a = "version: sidecar/v1\nrules:\n  - {name: errs, kind: error_rate, threshold: 5%, window: 5m}\n"
    b = (
        "version: sidecar/v1\nrules:\n"
        "  - {name: errs, kind: absence, window: 5m}\n"
        "  - {name: m, kind: mttr, incidents_of: [errs, nope, m], window: 7d, threshold: 30m}\n"
        "  - {name: age, kind: incident_age, incidents_of: [m], threshold: 1h}\n"
    )
    _, problems = spec.load([("a.yaml", a), ("b.yaml", b)])
    assert [str(p) for p in problems] == [
        "b.yaml:3:5: name: rule 'errs' is also defined at a.yaml:3",
        "b.yaml:4:48: rules[1].incidents_of[1]: no rule named 'nope'",
        "b.yaml:4:54: rules[1].incidents_of[2]: a rule cannot watch its own incidents",
        "b.yaml:5:52: rules[2].incidents_of[0]: rule 'm' is of kind mttr; incidents_of names rules of other kinds",
    ]


def test_duplicate_names_in_one_file() -> None:
    got = messages(
        "version: sidecar/v1\nrules:\n"
        "  - {name: a, kind: absence, window: 5m}\n"
        "  - {name: a, kind: absence, window: 6m}\n"
    )
    assert got == ["r.yaml:4:12: rules[1].name: duplicate rule name 'a' (also rules[0])"]


def test_match_forms_and_regex_checks() -> None:
    rules = load_ok(
        """
        version: sidecar/v1
        rules:
          - name: a
            kind: error_rate
            threshold: 0.1
            window: 5m
            match: {tenant: [acme, beta], model: {regex: "gpt-4.*"}, provider: openai}
        """
    )
    rule = rules.get("a")
    assert rule is not None
    assert rule.matches({"tenant": "beta", "model": "gpt-4o", "provider": "openai"})
    assert not rule.matches({"tenant": "beta", "model": "xgpt-4o", "provider": "openai"})  # anchored
    assert not rule.matches({"tenant": "gamma", "model": "gpt-4o", "provider": "openai"})
    got = messages(
        """
        version: sidecar/v1
        rules:
          - {name: a, kind: absence, window: 5m, match: {model: {regex: "(?!x)y"}, tenant: {regex: "("}, zone: a}}
        """
    )
    assert len(got) == 3
    assert got[0].startswith("r.yaml:4:65: rules[0].match.model.regex: lookarounds and backreferences")
    assert got[1].startswith("r.yaml:4:92: rules[0].match.tenant.regex: invalid regex:")
    assert got[2].startswith('r.yaml:4:98: rules[0].match.zone: unknown key "zone"')


def test_slo_alerts_that_can_never_fire_are_refused() -> None:
    got = messages(
        """
        version: sidecar/v1
        rules:
          - {name: a, kind: slo, objective: 90, period: 30d}
          - {name: b, kind: slo, objective: 99.9, period: 2h}
        """
    )
    # 90%: factor 14.4 x 0.1 >= 1 (6 x 0.1 is fine); a 2h period is shorter than the 6h, 1d and 3d windows.
    assert got[0].startswith("r.yaml:4:37: rules[0].alerts: can never fire: factor 14.4 x error budget 0.1")
    assert got[1:] == [
        f"r.yaml:5:51: rules[1].alerts: the long window is longer than the period ({w}s > 7200s)"
        for w in (21600, 86400, 259200)
    ]


def test_notify_and_annotations() -> None:
    rules = load_ok(
        """
        version: sidecar/v1
        defaults:
          notify: [oncall]
          group_by: [tenant, model]
          annotations: {runbook_url: "https://runbooks/{{ $labels.tenant }}"}
        rules:
          - name: a
            kind: latency
            quantile: 0.99
            threshold: 500ms
            window: 5m
            notify: {page: [pager, oncall]}
            severity: page
            annotations: {summary: "p99 {{ $value | humanizeDuration }} for {{ $labels.model }}"}
          - {name: m, kind: mttr, incidents_of: [a], window: 7d, threshold: 1h, group_by: [rule]}
        """
    )
    a = rules.get("a")
    assert a is not None
    assert a.channels_for("page") == ("pager", "oncall")
    assert dict(a.annotations) == {
        "summary": "p99 {{ $value | humanizeDuration }} for {{ $labels.model }}",
        "runbook_url": "https://runbooks/{{ $labels.tenant }}",
    }
    m = rules.get("m")
    assert m is not None and m.group_by == ("rule",)
    got = messages(
        """
        version: sidecar/v1
        defaults: {annotations: {summary: "{{ $labels.zone }}"}}
        rules:
          - {name: a, kind: latency, quantile: 0.9, threshold: 1s, window: 5m, notify: {ticket: [x], page: ["a b"]}}
        """
    )
    assert got == [
        "r.yaml:3:35: defaults.annotations.summary: $labels.zone is not a label of this rule's alerts "
        "(labels: rule, severity, tenant, upstream, provider, model)",
        "r.yaml:5:101: rules[0].notify.page[0]: invalid channel name 'a b'",
    ]


def test_budget_forms() -> None:
    rules = load_ok(
        """
        version: sidecar/v1
        rules:
          - {name: a, kind: budget, signal: tokens, token_type: output, period: 1w, calendar: true,
             timezone: Europe/Paris, limit: 1_000_000, group_by: [tenant, model],
             overrides: {"tenant=acme,model=gpt-4o": 5000000}, action: reject}
          - {name: b, kind: budget, period: 12h, limit: 5.5}
        """
    )
    a = rules.get("a")
    assert isinstance(a, BudgetRule)
    assert (a.signal, a.token_type, a.period_text, a.timezone, a.limit, a.action) == (
        "tokens",
        "output",
        "1w",
        "Europe/Paris",
        1_000_000,
        "reject",
    )
    assert a.limit_for((("tenant", "acme"), ("model", "gpt-4o"))) == 5_000_000
    assert a.limit_for((("tenant", "acme"), ("model", "o3"))) == 1_000_000
    b = rules.get("b")
    assert isinstance(b, BudgetRule) and not b.calendar and b.period == 43200 and b.action == "notify"
    got = messages(
        """
        version: sidecar/v1
        rules:
          - {name: a, kind: budget, period: 2d, calendar: true, timezone: Mars/Base, limit: 5, token_type: input}
        """
    )
    assert got == [
        "r.yaml:4:37: rules[0].period: a calendar period is 1d, 1w or 1mo",
        "r.yaml:4:67: rules[0].timezone: unknown time zone 'Mars/Base' (an IANA name)",
        "r.yaml:4:100: rules[0].token_type: only applies with signal: tokens",
    ]


def test_equal_rules_ignore_their_location() -> None:
    a = load_ok("version: sidecar/v1\nrules:\n  - {name: a, kind: absence, window: 5m}\n", "one.yaml")
    b = load_ok("version: sidecar/v1\n\n\nrules: [{name: a, kind: absence, window: 5m}]\n", "two.yaml")
    assert a.rules == b.rules
    assert a.rules[0].location != b.rules[0].location


def test_a_threshold_written_as_a_percent_number_gets_a_hint() -> None:
    got = messages("version: sidecar/v1\nrules:\n  - {name: e, kind: error_rate, threshold: 5, window: 5m}\n")
    assert got == [
        "r.yaml:3:44: rules[0].threshold: must be in [0, 100%) (a fraction: for 5 percent write 5%)"
    ]
