"""Rule files: text → validated :mod:`sidecar.rules.model` rules, with every problem located.

The steps follow sloth and Prometheus's ``rulefmt``: compose the YAML keeping each
node's line and column, check ``version`` first (nothing else is read under an
unknown version), map each rule to its frozen dataclass with ``defaults`` merged,
validate, and collect every problem instead of stopping at the first. A problem
reads ``rules/slo.yaml:12:5: rules[2].window: must be greater than 0s``; list
indexes count from 0; unknown keys are errors.

:func:`parse` handles one file; :func:`check_set` adds what needs every file of a
rule set (unique names, ``incidents_of`` references); :func:`load` does both.

The file format (``version: sidecar/v1``)::

    version: sidecar/v1
    defaults: {evaluation_interval: 15s, group_by: [tenant], notify: [oncall], annotations: {...}}
    rules:
      - {name: ..., kind: slo | latency | error_rate | budget | mttr | incident_age | absence, ...}

Pure module: imports :mod:`sidecar.yamlspec` (PyYAML) and the standard library; the
only file it reads is the packaged burn-rate table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yaml.nodes import MappingNode, Node, ScalarNode

from sidecar import yamlspec
from sidecar.errors import Problem
from sidecar.rules import templates
from sidecar.rules.burnrate import BurnSpec, default_alerts, factor, parse_fraction, parse_spec_list
from sidecar.rules.model import (
    ERROR_TYPES,
    GROUP_LABELS,
    INCIDENT_GROUP_LABELS,
    KINDS,
    SEVERITIES,
    AbsenceRule,
    BudgetRule,
    BurnAlert,
    ErrorRateRule,
    IncidentAgeRule,
    LabelMatch,
    LatencyRule,
    Location,
    MttrRule,
    Rule,
    RuleSet,
    SloRule,
)

__all__ = ["VERSION", "ParsedFile", "Reference", "check_set", "load", "parse"]

VERSION = "sidecar/v1"

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_CHANNEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_COMMON = ("name", "kind", "for", "keep_firing_for", "evaluation_interval", "notify", "annotations")
_KIND_KEYS: dict[str, tuple[str, ...]] = {
    "slo": ("match", "group_by", "objective", "period", "bad", "alerts", "min_requests"),
    "latency": ("match", "group_by", "severity", "signal", "quantile", "threshold", "window", "min_requests"),
    "error_rate": ("match", "group_by", "severity", "bad", "threshold", "window", "min_requests"),
    "budget": (
        "match",
        "group_by",
        "severity",
        "signal",
        "token_type",
        "period",
        "calendar",
        "timezone",
        "limit",
        "overrides",
        "action",
    ),
    "mttr": ("group_by", "severity", "incidents_of", "window", "threshold", "min_incidents"),
    "incident_age": ("severity", "incidents_of", "threshold"),
    "absence": ("match", "group_by", "severity", "window"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "slo": ("objective", "period"),
    "latency": ("quantile", "threshold", "window"),
    "error_rate": ("threshold", "window"),
    "budget": ("period", "limit"),
    "mttr": ("incidents_of", "window", "threshold"),
    "incident_age": ("incidents_of", "threshold"),
    "absence": ("window",),
}
_ANNOTATIONS = ("summary", "description", "runbook_url", "dashboard_url")
_TOKEN_TYPES = ("input", "cached_input", "cache_write", "output", "reasoning")
_CALENDAR_PERIODS = {"1d": 86400.0, "1w": 7 * 86400.0, "1mo": 30 * 86400.0}
# Constructs Python's re accepts and Prometheus's RE2 does not.
_NOT_RE2 = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=")


@dataclass(frozen=True)
class Reference:
    """A rule naming another rule (``incidents_of``), checked once every file is read."""

    rule: str
    target: str
    file: str
    line: int
    column: int
    field: str


@dataclass(frozen=True)
class Declared:
    """A rule's name and kind as written (valid or not), and where."""

    name: str
    kind: str
    file: str
    line: int
    column: int


@dataclass(frozen=True)
class ParsedFile:
    """One file's rules (the valid ones) and every problem found in it."""

    filename: str
    rules: tuple[Rule, ...] = ()
    problems: tuple[Problem, ...] = ()
    references: tuple[Reference, ...] = ()
    declared: tuple[Declared, ...] = ()


@dataclass
class _Defaults:
    evaluation_interval: float = 15.0
    group_by: tuple[str, ...] = ()
    notify: tuple[tuple[str, tuple[str, ...]], ...] = ()
    annotations: dict[str, tuple[str, Node, str]] = field(default_factory=dict)  # key → (text, node, path)


def parse(text: str, filename: str) -> ParsedFile:
    """Parse and validate one rule file; rules with problems are left out of ``rules``."""
    r = yamlspec.Reader(filename)
    root = r.compose(text)
    if root is None:
        if not r.problems:
            r.problem(None, "", f"empty rule file (expected version: {VERSION} and rules)")
        return ParsedFile(filename, problems=tuple(r.problems))
    if not isinstance(root, MappingNode):
        r.problem(root, "", f"expected a mapping with version and rules, got {yamlspec.describe(root)}")
        return ParsedFile(filename, problems=tuple(r.problems))
    version_node = _child(root, "version")
    if version_node is None:
        r.problem(root, "version", f'missing required key "version" (expected {VERSION})')
        return ParsedFile(filename, problems=tuple(r.problems))
    version = r.string(version_node, "version")
    if version is not None and version != VERSION:
        r.problem(version_node, "version", f"unsupported version {version!r} (this sidecar reads {VERSION})")
    if version != VERSION:
        return ParsedFile(filename, problems=tuple(r.problems))
    fields = r.mapping(root, "", ("version", "defaults", "rules"), required=("rules",)) or {}
    defaults = _parse_defaults(r, fields.get("defaults"))
    rules: list[Rule] = []
    refs: list[Reference] = []
    names: dict[str, int] = {}
    items = r.sequence(fields["rules"], "rules", "a list of rules") if "rules" in fields else None
    declared: list[Declared] = []
    for i, item in enumerate(items or []):
        before = len(r.problems)
        name_node, kind_node = _child(item, "name"), _child(item, "kind")
        if isinstance(name_node, ScalarNode) and isinstance(kind_node, ScalarNode):
            name, mark = str(name_node.value), item.start_mark
            if name in names:
                r.problem(
                    name_node, f"rules[{i}].name", f"duplicate rule name {name!r} (also rules[{names[name]}])"
                )
                continue
            names[name] = i
            declared.append(Declared(name, str(kind_node.value), filename, mark.line + 1, mark.column + 1))
        rule = _parse_rule(r, item, yamlspec.index("rules", i), defaults, refs)
        if rule is not None and len(r.problems) == before:
            rules.append(rule)
    problems = sorted(r.problems, key=lambda p: (p.line, p.column))
    return ParsedFile(filename, tuple(rules), tuple(problems), tuple(refs), tuple(declared))


def check_set(files: Sequence[ParsedFile]) -> list[Problem]:
    """Problems across files: a name used twice, ``incidents_of`` naming a missing or wrong rule.

    Rules that had problems of their own still count as declared, so one mistake
    does not cascade into "no rule named ..." elsewhere.
    """
    problems: list[Problem] = []
    seen: dict[str, Declared] = {}
    for parsed in files:
        for decl in parsed.declared:
            other = seen.get(decl.name)
            if other is None:
                seen[decl.name] = decl
            elif other.file != decl.file:
                where = f"{other.file}:{other.line}"
                problems.append(
                    Problem(
                        decl.file,
                        decl.line,
                        decl.column,
                        "name",
                        f"rule {decl.name!r} is also defined at {where}",
                    )
                )
    for parsed in files:
        for ref in parsed.references:
            target = seen.get(ref.target)
            message = ""
            if ref.target == ref.rule:
                message = "a rule cannot watch its own incidents"
            elif target is None:
                message = f"no rule named {ref.target!r}"
            elif target.kind in ("mttr", "incident_age"):
                message = (
                    f"rule {ref.target!r} is of kind {target.kind}; incidents_of names rules of other kinds"
                )
            if message:
                problems.append(Problem(ref.file, ref.line, ref.column, ref.field, message))
    return problems


def load(sources: Sequence[tuple[str, str]]) -> tuple[RuleSet, list[Problem]]:
    """Parse ``(filename, text)`` pairs as one rule set: the rules and every problem of every file."""
    parsed = [parse(text, name) for name, text in sources]
    problems = [p for f in parsed for p in f.problems]
    problems.extend(check_set(parsed))
    rules = tuple(rule for f in parsed for rule in f.rules)
    return RuleSet(rules), problems


# -- helpers ------------------------------------------------------------------------


def _child(node: Node, key: str) -> Node | None:
    if isinstance(node, MappingNode):
        for k, v in node.value:
            if isinstance(k, ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    return None


def _labels(
    r: yamlspec.Reader, node: Node | None, path: str, allowed: tuple[str, ...]
) -> tuple[str, ...] | None:
    values = r.string_list(node, path)
    if values is None:
        return None
    assert node is not None
    ok = True
    for i, value in enumerate(values):
        if value not in allowed:
            item = node.value[i] if i < len(node.value) else node
            r.problem(item, yamlspec.index(path, i), f"unknown label {value!r} (one of {', '.join(allowed)})")
            ok = False
    if len(set(values)) != len(values):
        r.problem(node, path, "a label is listed twice")
        ok = False
    return tuple(values) if ok else None


def _notify(
    r: yamlspec.Reader, node: Node | None, path: str
) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if node is None:
        return None

    def channels(n: Node, p: str) -> tuple[str, ...] | None:
        names = r.string_list(n, p)
        if names is None:
            return None
        for i, name in enumerate(names):
            if not _CHANNEL.fullmatch(name):
                r.problem(n.value[i], yamlspec.index(p, i), f"invalid channel name {name!r}")
                return None
        return tuple(names)

    if isinstance(node, MappingNode):
        fields = r.mapping(node, path, SEVERITIES, what="a list of channels or a mapping severity → channels")
        if fields is None:
            return None
        out: list[tuple[str, tuple[str, ...]]] = []
        for severity, value in fields.items():
            names = channels(value, yamlspec.join(path, severity))
            if names is not None:
                out.append((severity, names))
        return tuple(out)
    names = channels(node, path)
    return None if names is None else (("*", names),)


def _annotations(r: yamlspec.Reader, node: Node | None, path: str) -> dict[str, tuple[str, Node, str]]:
    out: dict[str, tuple[str, Node, str]] = {}
    if node is None:
        return out
    fields = r.mapping(node, path, _ANNOTATIONS) or {}
    for key, value in fields.items():
        text = r.string(value, yamlspec.join(path, key), allow_empty=True)
        if text is not None:
            out[key] = (text, value, yamlspec.join(path, key))
    return out


def _parse_defaults(r: yamlspec.Reader, node: Node | None) -> _Defaults:
    d = _Defaults()
    if node is None:
        return d
    fields = r.mapping(node, "defaults", ("evaluation_interval", "group_by", "notify", "annotations")) or {}
    d.evaluation_interval = r.duration(
        fields.get("evaluation_interval"), "defaults.evaluation_interval", 15.0, minimum=1.0
    )
    d.group_by = _labels(r, fields.get("group_by"), "defaults.group_by", GROUP_LABELS) or ()
    d.notify = _notify(r, fields.get("notify"), "defaults.notify") or ()
    d.annotations = _annotations(r, fields.get("annotations"), "defaults.annotations")
    for text, anode, apath in d.annotations.values():
        # Shared by every rule: any label name is fine (a missing one renders empty, as in Prometheus).
        for message in templates.check(text, ("rule", "severity", *GROUP_LABELS)):
            r.problem(anode, apath, message)
    return d


def _match(r: yamlspec.Reader, node: Node | None, path: str) -> tuple[LabelMatch, ...]:
    if node is None:
        return ()
    out: list[LabelMatch] = []
    fields = r.mapping(
        node, path, GROUP_LABELS, what="a mapping of labels (tenant, upstream, provider, model)"
    )
    for label, value in (fields or {}).items():
        lpath = yamlspec.join(path, label)
        if isinstance(value, MappingNode):
            sub = r.mapping(value, lpath, ("regex",), required=("regex",)) or {}
            pattern = r.string(sub.get("regex"), yamlspec.join(lpath, "regex"))
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                r.problem(sub["regex"], yamlspec.join(lpath, "regex"), f"invalid regex: {exc}")
                continue
            if _NOT_RE2.search(pattern):
                r.problem(
                    sub["regex"],
                    yamlspec.join(lpath, "regex"),
                    "lookarounds and backreferences are not RE2 syntax (Prometheus could not run it)",
                )
                continue
            out.append(LabelMatch(label, regex=pattern))
        elif isinstance(value, ScalarNode):
            text = r.string(value, lpath)
            if text is not None:
                out.append(LabelMatch(label, values=(text,)))
        else:
            values = r.string_list(value, lpath)
            if values is not None:
                if not values:
                    r.problem(value, lpath, "must list at least one value")
                else:
                    out.append(LabelMatch(label, values=tuple(values)))
    return tuple(out)


def _bad(r: yamlspec.Reader, node: Node | None, path: str) -> tuple[str, ...] | None:
    if node is None:
        return None
    fields = r.mapping(node, path, ("error_type",), required=("error_type",))
    if not fields or "error_type" not in fields:
        return None
    epath = yamlspec.join(path, "error_type")
    values = r.string_list(fields["error_type"], epath)
    if values is None:
        return None
    if not values:
        r.problem(fields["error_type"], epath, "must list at least one error type")
        return None
    for i, value in enumerate(values):
        if value not in ERROR_TYPES:
            hint = yamlspec.suggest(value, ERROR_TYPES)
            r.problem(
                fields["error_type"].value[i],
                yamlspec.index(epath, i),
                f"unknown error type {value!r}" + (f'; did you mean "{hint}"?' if hint else ""),
            )
            return None
    return tuple(values)


def _parse_rule(
    r: yamlspec.Reader, node: Node, path: str, defaults: _Defaults, refs: list[Reference]
) -> Rule | None:
    kind_node = _child(node, "kind")
    kind = r.string(kind_node, yamlspec.join(path, "kind"), choices=KINDS) if kind_node is not None else None
    allowed = _COMMON + (_KIND_KEYS[kind] if kind else tuple(k for keys in _KIND_KEYS.values() for k in keys))
    required = ("name", "kind") + (_REQUIRED[kind] if kind else ())
    fields = r.mapping(
        node, path, tuple(dict.fromkeys(allowed)), required=required, what="a rule (a mapping)"
    )
    if fields is None or kind is None:
        return None

    def p(key: str) -> str:
        return yamlspec.join(path, key)

    name = r.string(
        fields.get("name"), p("name"), pattern=_NAME, pattern_hint="lower-case letters, digits and '-' only"
    )
    if name is None:
        name = "invalid-name"  # keep reading: every problem of the rule is wanted, not the first
    start = node.start_mark
    common: dict[str, Any] = {
        "name": name,
        "location": Location(r.filename, start.line + 1, start.column + 1),
        "for_": r.duration(fields.get("for"), p("for"), 0.0),
        "keep_firing_for": r.duration(fields.get("keep_firing_for"), p("keep_firing_for"), 0.0),
        "evaluation_interval": r.duration(
            fields.get("evaluation_interval"),
            p("evaluation_interval"),
            defaults.evaluation_interval,
            minimum=1.0,
        ),
        "notify": _notify(r, fields.get("notify"), p("notify")) or defaults.notify,
    }
    if "severity" in _KIND_KEYS[kind]:
        common["severity"] = r.string(fields.get("severity"), p("severity"), "ticket", choices=SEVERITIES)
    if "match" in _KIND_KEYS[kind]:
        common["match"] = _match(r, fields.get("match"), p("match"))
    label_names: tuple[str, ...]
    if kind == "mttr":
        common["group_by"] = _labels(r, fields.get("group_by"), p("group_by"), INCIDENT_GROUP_LABELS) or ()
        label_names = common["group_by"]
    elif kind == "incident_age":
        label_names = ("rule", *GROUP_LABELS)
    else:
        group_by = _labels(r, fields.get("group_by"), p("group_by"), GROUP_LABELS)
        common["group_by"] = (
            defaults.group_by if group_by is None and "group_by" not in fields else group_by or ()
        )
        label_names = common["group_by"]
    annotations = dict(defaults.annotations)
    own = _annotations(r, fields.get("annotations"), p("annotations"))
    for text, anode, apath in own.values():
        for message in templates.check(text, label_names):
            r.problem(anode, apath, message)
    annotations.update(own)
    common["annotations"] = tuple((k, annotations[k][0]) for k in _ANNOTATIONS if k in annotations)

    builder = _BUILDERS[kind]
    rule = builder(r, fields, path, common, refs)
    if rule is None:
        return None
    if isinstance(rule, SloRule | LatencyRule | ErrorRateRule | BudgetRule | AbsenceRule):
        _check_notify_severities(r, fields.get("notify"), p("notify"), rule)
    return rule


def _check_notify_severities(r: yamlspec.Reader, node: Node | None, path: str, rule: Rule) -> None:
    if node is None or not isinstance(node, MappingNode):
        return
    for severity, _ in rule.notify:
        if severity != "*" and severity not in rule.severities():
            r.problem(
                _child(node, severity) or node,
                yamlspec.join(path, severity),
                f"this rule never alerts with severity {severity!r} (it uses {', '.join(rule.severities())})",
            )


_Builder = Callable[[yamlspec.Reader, dict[str, Node], str, dict[str, Any], list[Reference]], Rule | None]


def _min_requests(r: yamlspec.Reader, fields: dict[str, Node], path: str) -> int:
    return r.integer(fields.get("min_requests"), yamlspec.join(path, "min_requests"), 0, minimum=0)


def _build_slo(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    objective = parse_fraction(
        r, fields.get("objective"), yamlspec.join(path, "objective"), numbers_are_percent=True
    )
    if objective is not None and not 0 < objective < 1:
        r.problem(
            fields["objective"],
            yamlspec.join(path, "objective"),
            "must be between 0 and 100 (percent), exclusive",
        )
        objective = None
    period = r.duration(fields.get("period"), yamlspec.join(path, "period"), positive=True)
    bad = _bad(r, fields.get("bad"), yamlspec.join(path, "bad"))
    apath = yamlspec.join(path, "alerts")
    anode = fields.get("alerts")
    specs: list[tuple[BurnSpec, Node | None, str]]
    if anode is None or (isinstance(anode, ScalarNode) and anode.tag == "tag:yaml.org,2002:str"):
        if anode is not None:
            r.string(anode, apath, choices=("multiwindow",))
        specs = [(s, anode, apath) for s in default_alerts()]
    else:
        specs = [(s, n, p) for s, n, p in parse_spec_list(r, anode, apath, SEVERITIES)]
    if objective is None or period is None:
        return None
    alerts: list[BurnAlert] = []
    for spec, node, spath in specs:
        f = factor(spec, period)
        if spec.long > period:
            where = node if node is not None else fields["period"]
            r.problem(
                where, spath, f"the long window is longer than the period ({spec.long:g}s > {period:g}s)"
            )
            continue
        if f * (1 - objective) >= 1:
            r.problem(
                node if node is not None else fields["objective"],
                spath,
                f"can never fire: factor {f:g} x error budget {1 - objective:g} is not below 1 "
                "(raise the objective or lower the factor)",
            )
            continue
        alerts.append(BurnAlert(spec.severity, spec.long, spec.short, f, spec.budget_fraction))
    extra: dict[str, Any] = {}
    if bad is not None:
        extra["bad"] = bad
    return SloRule(
        objective=objective,
        period=period,
        alerts=tuple(alerts),
        min_requests=_min_requests(r, fields, path),
        **extra,
        **common,
    )


def _build_latency(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    signal = r.string(
        fields.get("signal"),
        yamlspec.join(path, "signal"),
        "duration",
        choices=("duration", "time_to_first_token"),
    )
    quantile = r.number(fields.get("quantile"), yamlspec.join(path, "quantile"))
    if quantile is not None and not 0 < quantile < 1:
        r.problem(fields["quantile"], yamlspec.join(path, "quantile"), "must be between 0 and 1, exclusive")
        quantile = None
    threshold = r.duration(fields.get("threshold"), yamlspec.join(path, "threshold"), positive=True)
    window = r.duration(fields.get("window"), yamlspec.join(path, "window"), positive=True)
    if quantile is None or threshold is None or window is None:
        return None
    return LatencyRule(
        signal=signal,
        quantile=quantile,
        threshold=threshold,
        window=window,
        min_requests=_min_requests(r, fields, path),
        **common,
    )


def _build_error_rate(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    threshold = parse_fraction(r, fields.get("threshold"), yamlspec.join(path, "threshold"))
    if threshold is not None and not 0 <= threshold < 1:
        hint = f" (a fraction: for {threshold:g} percent write {threshold:g}%)" if threshold >= 1 else ""
        r.problem(fields["threshold"], yamlspec.join(path, "threshold"), f"must be in [0, 100%){hint}")
        threshold = None
    window = r.duration(fields.get("window"), yamlspec.join(path, "window"), positive=True)
    bad = _bad(r, fields.get("bad"), yamlspec.join(path, "bad"))
    if threshold is None or window is None:
        return None
    extra: dict[str, Any] = {"bad": bad} if bad is not None else {}
    return ErrorRateRule(
        threshold=threshold, window=window, min_requests=_min_requests(r, fields, path), **extra, **common
    )


def _build_budget(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    def p(key: str) -> str:
        return yamlspec.join(path, key)

    signal = r.string(fields.get("signal"), p("signal"), "cost_usd", choices=("cost_usd", "tokens"))
    token_type = r.string(fields.get("token_type"), p("token_type"), choices=_TOKEN_TYPES)
    if token_type is not None and signal != "tokens":
        r.problem(fields["token_type"], p("token_type"), "only applies with signal: tokens")
    calendar = r.boolean(fields.get("calendar"), p("calendar"), False)
    timezone = r.string(fields.get("timezone"), p("timezone"), "UTC")
    if "timezone" in fields:
        if not calendar:
            r.problem(fields["timezone"], p("timezone"), "only applies with calendar: true")
        else:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                r.problem(fields["timezone"], p("timezone"), f"unknown time zone {timezone!r} (an IANA name)")
                timezone = "UTC"
    period_text = r.string(fields.get("period"), p("period"))
    period: float | None = None
    if period_text is not None:
        if calendar:
            period = _CALENDAR_PERIODS.get(period_text)
            if period is None:
                r.problem(fields["period"], p("period"), "a calendar period is 1d, 1w or 1mo")
        elif period_text == "1mo":
            r.problem(
                fields["period"],
                p("period"),
                "1mo needs calendar: true (a rolling period is a duration: 30d)",
            )
        else:
            period = r.duration(fields["period"], p("period"), positive=True)
    limit = r.number(fields.get("limit"), p("limit"))
    if limit is not None and limit <= 0:
        r.problem(fields["limit"], p("limit"), "must be greater than 0")
        limit = None
    action = r.string(fields.get("action"), p("action"), "notify", choices=("notify", "reject"))
    overrides = _overrides(r, fields.get("overrides"), p("overrides"), common["group_by"])
    if period is None or limit is None or period_text is None or overrides is None:
        return None
    return BudgetRule(
        signal=signal,
        token_type=token_type,
        period=period,
        period_text=period_text,
        calendar=calendar,
        timezone=timezone,
        limit=limit,
        overrides=overrides,
        action=action,
        **common,
    )


def _overrides(
    r: yamlspec.Reader, node: Node | None, path: str, group_by: tuple[str, ...]
) -> tuple[tuple[tuple[tuple[str, str], ...], float], ...] | None:
    if node is None:
        return ()
    entries = r.entries(node, path, "a mapping of group → limit")
    if entries is None:
        return None
    out: list[tuple[tuple[tuple[str, str], ...], float]] = []
    ok = True
    for key, key_node, value_node in entries:
        kpath = yamlspec.join(path, key)
        limit = r.number(value_node, kpath)
        if limit is not None and limit <= 0:
            r.problem(value_node, kpath, "must be greater than 0")
            limit = None
        pairs: list[tuple[str, str]] = []
        if "=" not in key:
            if len(group_by) != 1:
                r.problem(
                    key_node,
                    kpath,
                    "write the group as label=value,label=value (group_by has not exactly one label)",
                )
                ok = False
                continue
            pairs.append((group_by[0], key))
        else:
            for part in key.split(","):
                label, _, value = part.strip().partition("=")
                if label not in group_by:
                    r.problem(
                        key_node,
                        kpath,
                        f"label {label!r} is not in group_by ({', '.join(group_by) or 'none'})",
                    )
                    ok = False
                    break
                pairs.append((label, value))
        if limit is None:
            ok = False
            continue
        out.append((tuple(sorted(pairs, key=lambda kv: group_by.index(kv[0]))), limit))
    return tuple(out) if ok else None


def _incidents_of(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, rule: str, refs: list[Reference]
) -> tuple[str, ...] | None:
    ipath = yamlspec.join(path, "incidents_of")
    names = r.string_list(fields.get("incidents_of"), ipath)
    if names is None:
        return None
    if not names:
        r.problem(fields["incidents_of"], ipath, "must name at least one rule")
        return None
    for i, target in enumerate(names):
        mark = fields["incidents_of"].value[i].start_mark
        refs.append(
            Reference(rule, target, r.filename, mark.line + 1, mark.column + 1, yamlspec.index(ipath, i))
        )
    return tuple(names)


def _build_mttr(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    of = _incidents_of(r, fields, path, common["name"], refs)
    window = r.duration(fields.get("window"), yamlspec.join(path, "window"), positive=True)
    threshold = r.duration(fields.get("threshold"), yamlspec.join(path, "threshold"), positive=True)
    least = r.integer(fields.get("min_incidents"), yamlspec.join(path, "min_incidents"), 1, minimum=1)
    if of is None or window is None or threshold is None:
        return None
    return MttrRule(incidents_of=of, window=window, threshold=threshold, min_incidents=least, **common)


def _build_incident_age(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    of = _incidents_of(r, fields, path, common["name"], refs)
    threshold = r.duration(fields.get("threshold"), yamlspec.join(path, "threshold"), positive=True)
    if of is None or threshold is None:
        return None
    return IncidentAgeRule(incidents_of=of, threshold=threshold, **common)


def _build_absence(
    r: yamlspec.Reader, fields: dict[str, Node], path: str, common: dict[str, Any], refs: list[Reference]
) -> Rule | None:
    window = r.duration(fields.get("window"), yamlspec.join(path, "window"), positive=True)
    if window is None:
        return None
    return AbsenceRule(window=window, **common)


_BUILDERS: dict[str, _Builder] = {
    "slo": _build_slo,
    "latency": _build_latency,
    "error_rate": _build_error_rate,
    "budget": _build_budget,
    "mttr": _build_mttr,
    "incident_age": _build_incident_age,
    "absence": _build_absence,
}
