"""Rules → Prometheus recording and alerting rules meaning the same, for fleets of sidecars.

Every sidecar replica exports the proxy's counters and histograms; Prometheus sums
them across replicas (``sum by (group labels)``) *before* dividing, so a ratio is the
fleet's ratio, not an average of replicas' ratios. One rule group per sidecar rule
(``sidecar-<name>``, evaluated at the rule's ``evaluation_interval``) holds the
recording rules and then the alerting rules, so both see the same instant.

What each kind becomes (``M`` is the rule's ``match`` as label matchers):

- ``slo``: ``llm_slo:error_ratio:rate<w>{rule}`` per window, ``bad / all`` from
  ``llm_errors_total`` and ``llm_requests_total``; one alert per severity, the pairs
  joined with ``or`` (value: the first pair's long-window ratio, as in-process).
- ``latency``: ``histogram_quantile`` over ``sum by (le, ...) (rate(..._bucket[w]))``
  (the in-process engine runs the same algorithm over the same buckets).
- ``error_rate``: the ratio, ``and`` ``min_requests`` by ``increase()``.
- ``budget``: rolling periods by ``increase(llm_cost_usd_total[period])`` or
  ``llm_tokens_total``; calendar periods by the sidecar's helper gauge
  ``llm_budget_spent`` (PromQL has no calendar ranges); overrides as ``unless``/``or``.
- ``mttr``: ``llm_incident_duration_seconds`` sum / count over the window (helper).
- ``incident_age``: ``llm_incident_open_age_seconds`` (helper), oldest across replicas.
- ``absence``: ``increase(llm_requests_total[w]) == 0`` (``or vector(0)`` ungrouped).

Each group carries a comment saying how it differs from the in-process rule. The
output works with Prometheus 2.42 (no group ``labels``, no ``query_offset``).

Pure module: PyYAML and the standard library; returns text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from sidecar.rules.model import (
    GROUP_LABELS,
    AbsenceRule,
    BudgetRule,
    ErrorRateRule,
    IncidentAgeRule,
    LabelMatch,
    LatencyRule,
    MttrRule,
    Rule,
    RuleSet,
    SloRule,
)

__all__ = [
    "RECORDING_KINDS",
    "alert_labels",
    "export_alertmanager",
    "export_operator",
    "export_prometheus",
    "promql_duration",
    "rule_groups",
]

#: Kinds whose exported alerts read a recording rule, hence carry a ``rule`` label.
RECORDING_KINDS = ("slo", "latency", "error_rate", "budget")

_NOTES: dict[str, str] = {
    "slo": (
        "rate() extrapolates to the window edges and the sidecar's windows move in buckets of "
        "window/60: firing and resolved times agree within one evaluation interval, one scrape "
        "interval and one bucket (checked with promtool test rules)."
    ),
    "latency": (
        "Same buckets and the same histogram_quantile algorithm as in-process; the window edges "
        "differ as for the other ratios (one evaluation + one scrape interval + window/60)."
    ),
    "error_rate": (
        "min_requests counts with increase(), which extrapolates: a count near the minimum can "
        "differ by a fraction of a call. Window edges as for slo rules."
    ),
    "budget_rolling": "increase() over the period, summed across replicas: the same sum as in-process.",
    "budget_calendar": (
        "PromQL has no calendar ranges: this reads llm_budget_spent, each sidecar's spend in the "
        "current calendar period, summed across replicas. A replica that restarts forgets its part "
        "of the period."
    ),
    "mttr": (
        "Reads llm_incident_duration_seconds, observed by each sidecar when an incident is final "
        "(its merge gap has passed), per replica: with N replicas, min_incidents counts each "
        "incident N times."
    ),
    "incident_age": (
        "Reads llm_incident_open_age_seconds, each sidecar's open incidents (refreshed at each "
        "evaluation); the oldest across replicas counts."
    ),
    "absence": (
        "increase() needs two samples in the window. A group whose series are gone (a sidecar "
        "restart) is not reported; ungrouped rules count no series at all as absent "
        "(or vector(0)). The value is 0, not the quiet time the sidecar reports."
    ),
}

_RE2_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")


def promql_duration(seconds: float) -> str:
    """A range for PromQL in the largest unit that divides it: ``30d``, ``90m``, ``1500ms``."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _number(value: float) -> str:
    """A float as PromQL reads it back to the same double (``repr`` round-trips)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _matcher(m: LabelMatch) -> str:
    if m.regex is not None:
        return f"{m.label}=~{_quote(m.regex)}"
    if len(m.values) == 1:
        return f"{m.label}={_quote(m.values[0])}"
    return f"{m.label}=~{_alternatives(m.values)}"


def _alternatives(values: Sequence[str]) -> str:
    """A quoted RE2 regex matching exactly one of ``values``."""
    return _quote("|".join(_RE2_SPECIAL.sub(r"\\\1", v) for v in values))


def _selector(matchers: Sequence[str]) -> str:
    return "{" + ",".join(matchers) + "}" if matchers else ""


def _match(rule: Rule, *extra: str) -> str:
    return _selector([_matcher(m) for m in rule.match] + list(extra))


def _by(labels: Sequence[str], *extra: str) -> str:
    names = list(extra) + list(labels)
    return f" by ({', '.join(names)})" if names else ""


def _on(labels: Sequence[str]) -> str:
    return f"on ({', '.join(labels)})"


def _sum(labels: Sequence[str], inner: str) -> str:
    return f"sum{_by(labels)} ({inner})"


def _ratio(rule: Rule, bad: Sequence[str], window: float) -> str:
    w = promql_duration(window)
    g = rule.group_by
    bad_sel = _match(rule, f"error_type=~{_quote('|'.join(bad))}")
    total = _sum(g, f"rate(llm_requests_total{_match(rule)}[{w}])")
    # "or 0 * total": a group with calls and no error series yet has a ratio of 0, not none.
    return f"(\n  {_sum(g, f'rate(llm_errors_total{bad_sel}[{w}])')}\n  or 0 * {total}\n)\n/ {total}"


def _requests(rule: Rule, window: float, metric: str = "llm_requests_total") -> str:
    return _sum(rule.group_by, f"increase({metric}{_match(rule)}[{promql_duration(window)}])")


def alert_labels(rule: Rule, severity: str, labels: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The labels Prometheus gives the exported alert for an in-process alert (``alertname`` aside).

    Kinds read through recording rules also carry ``rule``; empty label values are
    absent in Prometheus.
    """
    out = {k: v for k, v in labels if v != ""}
    if rule.kind in RECORDING_KINDS:
        out["rule"] = rule.name
    out["severity"] = severity
    return out


# -- rules per kind --------------------------------------------------------------------


def _alert(rule: Rule, severity: str, expr: str) -> dict[str, Any]:
    alert: dict[str, Any] = {"alert": rule.name, "expr": expr}
    if rule.for_:
        alert["for"] = promql_duration(rule.for_)
    if rule.keep_firing_for:
        alert["keep_firing_for"] = promql_duration(rule.keep_firing_for)
    alert["labels"] = {"severity": severity}
    if rule.annotations:
        alert["annotations"] = dict(rule.annotations)
    return alert


def _record(name: str, expr: str, rule: Rule) -> dict[str, Any]:
    return {"record": name, "expr": expr, "labels": {"rule": rule.name}}


def _slo(rule: SloRule) -> tuple[list[dict[str, Any]], str]:
    out: list[dict[str, Any]] = []
    names: dict[float, str] = {}
    for window in rule.windows():
        names[window] = f"llm_slo:error_ratio:rate{promql_duration(window)}"
        out.append(_record(names[window], _ratio(rule, rule.bad, window), rule))
    sel = _selector([f"rule={_quote(rule.name)}"])
    for severity in rule.severities():
        pairs: list[str] = []
        for a in rule.alerts:
            if a.severity != severity:
                continue
            limit = _number(rule.ratio_limit(a))
            pair = f"{names[a.long]}{sel} > {limit}\nand\n{names[a.short]}{sel} > {limit}"
            if rule.min_requests:
                pair += f"\nand {_on(rule.group_by)}\n{_requests(rule, a.long)} >= {rule.min_requests}"
            pairs.append(f"(\n{_indent(pair)}\n)")
        out.append(_alert(rule, severity, "\nor\n".join(pairs)))
    return out, _NOTES["slo"]


def _latency(rule: LatencyRule) -> tuple[list[dict[str, Any]], str]:
    metric = "llm_time_to_first_token_seconds"
    if rule.signal == "duration":
        metric = "llm_request_duration_seconds"
    w = promql_duration(rule.window)
    name = f"llm_rule:{metric.removeprefix('llm_')}:quantile_rate{w}"
    buckets = f"sum{_by(rule.group_by, 'le')} (rate({metric}_bucket{_match(rule)}[{w}]))"
    record = _record(name, f"histogram_quantile({_number(rule.quantile)}, {buckets})", rule)
    expr = f"{name}{{rule={_quote(rule.name)}}} > {_number(rule.threshold)}"
    if rule.min_requests:
        count = _requests(rule, rule.window, metric + "_count")
        expr += f"\nand {_on(rule.group_by)}\n{count} >= {rule.min_requests}"
    return [record, _alert(rule, rule.severity, expr)], _NOTES["latency"]


def _error_rate(rule: ErrorRateRule) -> tuple[list[dict[str, Any]], str]:
    name = f"llm_rule:error_ratio:rate{promql_duration(rule.window)}"
    record = _record(name, _ratio(rule, rule.bad, rule.window), rule)
    expr = f"{name}{{rule={_quote(rule.name)}}} > {_number(rule.threshold)}"
    if rule.min_requests:
        expr += f"\nand {_on(rule.group_by)}\n{_requests(rule, rule.window)} >= {rule.min_requests}"
    return [record, _alert(rule, rule.severity, expr)], _NOTES["error_rate"]


def _budget(rule: BudgetRule) -> tuple[list[dict[str, Any]], str]:
    if rule.calendar:
        inner = f"llm_budget_spent{{rule={_quote(rule.name)}}}"
        note = _NOTES["budget_calendar"]
    else:
        p = promql_duration(rule.period)
        if rule.signal == "cost_usd":
            inner = f"increase(llm_cost_usd_total{_match(rule)}[{p}])"
        else:
            types = rule.token_type or "input|output"
            op = "=" if rule.token_type else "=~"
            inner = f"increase(llm_tokens_total{_match(rule, f'type{op}{_quote(types)}')}[{p}])"
        note = _NOTES["budget_rolling"]
    name = "llm_rule:budget_spent"
    record = _record(name, _sum(rule.group_by, inner), rule)

    def spent(*pairs: tuple[str, str]) -> str:
        return name + _selector([f"rule={_quote(rule.name)}", *(f"{k}={_quote(v)}" for k, v in pairs)])

    expr = f"{spent()} >= {_number(rule.limit)}"
    if rule.overrides:
        others = " or ".join(spent(*key) for key, _ in rule.overrides)
        expr = f"(\n  {expr}\n  unless {_on(rule.group_by)}\n  ({others})\n)"
        for key, limit in rule.overrides:
            expr += f"\nor\n{spent(*key)} >= {_number(limit)}"
    return [record, _alert(rule, rule.severity, expr)], note


def _rules_regex(names: Sequence[str]) -> str:
    return _alternatives(names)


def _mttr(rule: MttrRule) -> tuple[list[dict[str, Any]], str]:
    w = promql_duration(rule.window)
    sel = f"{{rule=~{_rules_regex(rule.incidents_of)}}}"
    total = _sum(rule.group_by, f"increase(llm_incident_duration_seconds_sum{sel}[{w}])")
    count = _sum(rule.group_by, f"increase(llm_incident_duration_seconds_count{sel}[{w}])")
    expr = f"(\n  {total}\n  /\n  {count}\n) > {_number(rule.threshold)}"
    expr += f"\nand {_on(rule.group_by)}\n{count} >= {rule.min_incidents}"
    return [_alert(rule, rule.severity, expr)], _NOTES["mttr"]


def _incident_age(rule: IncidentAgeRule, rules: RuleSet) -> tuple[list[dict[str, Any]], str]:
    labels: list[str] = []
    for name in rule.incidents_of:
        source = rules.get(name)
        for label in source.group_by if source is not None else GROUP_LABELS:
            if label not in labels:
                labels.append(label)
    sel = f"{{rule=~{_rules_regex(rule.incidents_of)}}}"
    expr = f"max{_by(labels, 'rule')} (llm_incident_open_age_seconds{sel}) > {_number(rule.threshold)}"
    return [_alert(rule, rule.severity, expr)], _NOTES["incident_age"]


def _absence(rule: AbsenceRule) -> tuple[list[dict[str, Any]], str]:
    calls = _requests(rule, rule.window)
    expr = f"{calls} == 0" if rule.group_by else f"({calls} or vector(0)) == 0"
    return [_alert(rule, rule.severity, expr)], _NOTES["absence"]


def rule_groups(rules: RuleSet) -> list[tuple[dict[str, Any], str]]:
    """One Prometheus rule group per rule, with the note saying how it differs in-process."""
    out: list[tuple[dict[str, Any], str]] = []
    for rule in rules:
        if isinstance(rule, SloRule):
            items, note = _slo(rule)
        elif isinstance(rule, LatencyRule):
            items, note = _latency(rule)
        elif isinstance(rule, ErrorRateRule):
            items, note = _error_rate(rule)
        elif isinstance(rule, BudgetRule):
            items, note = _budget(rule)
        elif isinstance(rule, MttrRule):
            items, note = _mttr(rule)
        elif isinstance(rule, IncidentAgeRule):
            items, note = _incident_age(rule, rules)
        elif isinstance(rule, AbsenceRule):
            items, note = _absence(rule)
        else:  # pragma: no cover - every kind is handled above
            raise TypeError(f"unknown rule kind {rule.kind}")
        group = {
            "name": f"sidecar-{rule.name}",
            "interval": promql_duration(rule.evaluation_interval),
            "rules": items,
        }
        out.append((group, f"{rule.name} ({rule.kind}): {note}"))
    return out


# -- rendering -------------------------------------------------------------------------


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (PromQL reads better that way)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(value: object) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def _wrap(note: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in note.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(line)
    return lines


def _groups_text(rules: RuleSet, indent: str) -> str:
    parts: list[str] = []
    for group, note in rule_groups(rules):
        comment = "\n".join(f"{indent}# {line}" for line in _wrap(note))
        parts.append(comment + "\n" + _indent(_dump([group]).rstrip("\n"), indent))
    return "\n".join(parts) + "\n"


def _header(sources: Sequence[str], what: str) -> str:
    files = ", ".join(sources) if sources else "(no files)"
    return (
        f"# {what} generated by `llm-sidecar rules export` from {files}.\n"
        "# Do not edit: change the sidecar rule files and export again. With these rules in\n"
        "# Prometheus, switch in-process notifications off (notify: {enabled: false}).\n"
    )


def export_prometheus(rules: RuleSet, sources: Sequence[str] = ()) -> str:
    """A Prometheus rule file (``groups:``) for ``rules``."""
    if not len(rules):
        return _header(sources, "Prometheus rules") + "groups: []\n"
    return _header(sources, "Prometheus rules") + "groups:\n" + _groups_text(rules, "  ")


def export_operator(
    rules: RuleSet,
    sources: Sequence[str] = (),
    name: str = "llm-sidecar-rules",
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The same groups in a prometheus-operator ``PrometheusRule`` resource."""
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    metadata["labels"] = dict(labels or {"app.kubernetes.io/name": "llm-sidecar"})
    head = _dump({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": metadata})
    body = "spec:\n  groups:\n" + _groups_text(rules, "    ") if len(rules) else "spec:\n  groups: []\n"
    return _header(sources, "A PrometheusRule") + head + body


def export_alertmanager(
    rules: RuleSet,
    group_wait: float = 30.0,
    repeat_interval: float = 4 * 3600.0,
    sources: Sequence[str] = (),
) -> str:
    """An Alertmanager ``route``/``receivers``/``inhibit_rules`` snippet for the rules' channels.

    One route per (channel, severity), matching the alert names that notify that
    channel at that severity, with ``continue: true`` so every channel gets its
    copy; one (empty) receiver per channel to fill in; pages inhibit tickets of the
    same alert and group labels.
    """
    routes: dict[tuple[str, str], list[str]] = {}
    for rule in rules:
        for severity in rule.severities():
            for channel in rule.channels_for(severity):
                names = routes.setdefault((channel, severity), [])
                if rule.name not in names:
                    names.append(rule.name)
    channels = sorted({c for c, _ in routes})
    config: dict[str, Any] = {
        "route": {
            "receiver": "sidecar-unrouted",
            "group_by": ["alertname", "severity"],
            "group_wait": promql_duration(group_wait),
            "repeat_interval": promql_duration(repeat_interval),
            "routes": [
                {
                    "receiver": channel,
                    "matchers": [f"alertname=~{_rules_regex(names)}", f"severity={_quote(severity)}"],
                    "continue": True,
                }
                for (channel, severity), names in sorted(routes.items())
            ],
        },
        "receivers": [{"name": "sidecar-unrouted"}] + [{"name": c} for c in channels],
        "inhibit_rules": [
            {
                "source_matchers": ['severity="page"'],
                "target_matchers": ['severity=~"ticket|info"'],
                "equal": ["alertname", *GROUP_LABELS],
            }
        ],
    }
    note = (
        "# Alertmanager routing generated by `llm-sidecar rules export --alertmanager`"
        + (f" from {', '.join(sources)}" if sources else "")
        + ".\n# Each receiver is a sidecar notify channel: give it the Alertmanager integration\n"
        "# (slack_configs, pagerduty_configs, webhook_configs...) matching its apprise URLs.\n"
        "# Pages inhibit tickets of the same alert and labels.\n"
    )
    return note + _dump(config)
