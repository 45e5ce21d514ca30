"""The Prometheus export, checked with the real tools (promtool 2.42, amtool 0.25).

1. Golden files: the export of the shipped ``rules/`` is compared with
   ``tests/promtool/golden/`` (``UPDATE_GOLDEN=1`` rewrites them).
2. ``promtool check rules`` accepts every exported file; ``amtool check-config``
   accepts the Alertmanager snippet.
3. ``promtool test rules``: each scenario below runs the in-process engine on a fake
   clock, turns the same calls into the series a sidecar exports (scraped every
   15 s), and asserts that the exported rules fire and resolve at the engine's times
   within a tolerance: the alert state must equal the engine's at ``T - tolerance``
   and ``T + tolerance`` around every in-process transition ``T``.

Tolerances (documented in docs/alerting.md): one evaluation interval (15 s) plus one
scrape interval (15 s) plus the bucket width of the longest window that decides the
transition (``window / 60``): ``rate()`` extrapolates at the window edges and
ignores a new series' first sample, while the sidecar's windows move by whole
buckets. Rules read through helper metrics add their own delay: ``mttr`` sees an
incident only when it is final (``merge_gap`` after it ended).

The tools are required: a missing ``promtool`` fails these tests (``.ci/run`` and
``apt-get install prometheus prometheus-alertmanager`` provide it).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sidecar.model import CallRecord, Usage
from sidecar.rules import export, spec
from sidecar.rules.engine import Engine
from sidecar.rules.loader import expand, load_files
from sidecar.rules.model import RuleSet
from sidecar.rules.state import Transition
from sidecar.rules.testing import call
from sidecar.rules.windows import LATENCY_BUCKETS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOLDEN = HERE / "promtool" / "golden"
STEP = 15


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: apt-get install -y --no-install-recommends prometheus "
            "prometheus-alertmanager (these tests never skip)"
        )
    return path


def run_tool(*argv: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{output}"
    return output


# -- golden files and static checks -------------------------------------------------------


def example_rules() -> tuple[RuleSet, list[str]]:
    files = expand([REPO / "rules"])
    rules, problems = load_files(files)
    assert problems == []
    return rules, [str(f.relative_to(REPO)) for f in files]


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs from the export (UPDATE_GOLDEN=1 to accept)"


def test_exports_match_the_golden_files() -> None:
    rules, sources = example_rules()
    golden("rules.prometheus.yml", export.export_prometheus(rules, sources))
    golden("rules.operator.yml", export.export_operator(rules, sources, namespace="monitoring"))
    golden("rules.alertmanager.yml", export.export_alertmanager(rules, sources=sources))


def test_promtool_checks_every_exported_file(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules, sources = example_rules()
    prom = tmp_path / "rules.yml"
    prom.write_text(export.export_prometheus(rules, sources))
    out = run_tool(promtool, "check", "rules", str(prom))
    assert f"SUCCESS: {sum(len(g['rules']) for g, _ in export.rule_groups(rules))} rules found" in out
    # The PrometheusRule's spec is a rule file too.
    resource = yaml.safe_load(export.export_operator(rules, sources))
    assert resource["kind"] == "PrometheusRule" and resource["apiVersion"] == "monitoring.coreos.com/v1"
    spec_file = tmp_path / "operator-spec.yml"
    spec_file.write_text(yaml.safe_dump(resource["spec"]))
    run_tool(promtool, "check", "rules", str(spec_file))
    # No group-level labels or query_offset (promtool 2.42 refuses them anyway).
    for group in yaml.safe_load(prom.read_text())["groups"]:
        assert set(group) == {"name", "interval", "rules"}


def test_amtool_accepts_the_alertmanager_snippet(tmp_path: Path) -> None:
    amtool = tool("amtool")
    rules, sources = example_rules()
    config = tmp_path / "alertmanager.yml"
    config.write_text(export.export_alertmanager(rules, sources=sources))
    out = run_tool(amtool, "check-config", str(config))
    assert "SUCCESS" in out
    routes = yaml.safe_load(config.read_text())["route"]["routes"]
    pager = {
        "receiver": "pager",
        "matchers": ['alertname=~"errors|stuck-incident|availability"', 'severity="page"'],
        "continue": True,
    }
    assert pager in routes


def test_export_quotes_and_escapes_label_values() -> None:
    rules, problems = spec.load(
        [
            (
                "q.yaml",
                "version: sidecar/v1\nrules:\n"
                "  - {name: e, kind: error_rate, threshold: 1%, window: 1m,\n"
                '     match: {model: [gpt-4.1, "a\\"b"], tenant: {regex: "acme|b.*"}}}\n',
            )
        ]
    )
    assert problems == []
    text = export.export_prometheus(rules)
    assert 'model=~"gpt-4\\\\.1|a\\"b"' in text and 'tenant=~"acme|b.*"' in text


# -- scenarios: the same calls through both engines ----------------------------------------


@dataclass
class Scenario:
    name: str
    rules: str
    traffic: Callable[[int], list[CallRecord]]
    end: int
    tolerance: int
    merge_gap: float = 300.0
    # Extra tolerance for some rules (mttr: the merge gap before an incident is final).
    extra: dict[str, int] | None = None
    # At least these in-process transitions must happen (the scenario is not vacuous).
    expect: tuple[tuple[str, str, int], ...] = ()


def every(period: int, t: int) -> bool:
    return t % period == 0


def errors_traffic(t: int) -> list[CallRecord]:
    bad = 2 if 600 <= t < 1200 else 0
    out = [call(t, error_type="timeout")] * bad + [call(t)] * (10 - bad)
    out += [call(t, tenant="beta")] * 10
    return out


def latency_traffic(t: int) -> list[CallRecord]:
    ttft = 5.0 if 600 <= t < 1800 else 0.3
    return [call(t, ttft=ttft, duration=ttft + 1)] * 20


def slo_traffic(t: int) -> list[CallRecord]:
    bad = 2 if 3600 <= t < 5400 else 0
    return [call(t, error_type="upstream_5xx")] * bad + [call(t)] * (10 - bad)


def budget_traffic(t: int) -> list[CallRecord]:
    if t == 0:  # the counters exist before the spending starts (rate() ignores a first sample)
        return [call(t, tenant=tenant, cost=0, usage=Usage(input=0, output=0)) for tenant in ("beta", "acme")]
    if every(60, t) and t <= 600:
        return [
            call(t, tenant="beta", cost=1, usage=Usage(input=5, output=5)),
            call(t, tenant="acme", cost=3, usage=Usage(input=5, output=5)),
        ]
    return []


def calendar_traffic(t: int) -> list[CallRecord]:
    if every(60, t) and t < 6000:
        return [call(t, tenant="beta", cost=1), call(t, tenant="acme", cost=1)]
    return []


def absence_traffic(t: int) -> list[CallRecord]:
    out = [call(t, tenant="a")] if (t < 1800 or t >= 4005) else []
    if t < 900:
        out.append(call(t, tenant="b"))
    return out


def outage_traffic(t: int) -> list[CallRecord]:
    return [call(t)] if (t < 300 or t >= 5700) and every(60, t) else []


SCENARIOS = [
    Scenario(
        "error-rate",
        """
        - {name: errors, kind: error_rate, match: {provider: openai},
           bad: {error_type: [upstream_5xx, timeout]}, threshold: 5%, window: 5m, min_requests: 20,
           for: 2m, severity: page, group_by: [tenant]}
        """,
        errors_traffic,
        end=2400,
        tolerance=60,
        expect=(("errors", "firing", 795), ("errors", "resolved", 1410)),
    ),
    Scenario(
        "latency",
        """
        - {name: ttft, kind: latency, signal: time_to_first_token, quantile: 0.95, threshold: 2s, window: 5m,
           for: 10m, keep_firing_for: 5m, severity: ticket}
        - {name: slow-calls, kind: latency, signal: duration, quantile: 0.5, threshold: 4s, window: 10m,
           min_requests: 100, severity: page, group_by: [model]}
        """,
        latency_traffic,
        end=3000,
        tolerance=60,
        expect=(("ttft", "firing", 1215), ("ttft", "resolved", 2370)),
    ),
    Scenario(
        "slo-multiwindow",
        """
        - {name: availability, kind: slo, objective: 99.9, period: 30d, group_by: [tenant]}
        """,
        slo_traffic,
        end=28_800,
        # The ticket pair resolves with the 6h window: 6-minute buckets.
        tolerance=360 + 2 * STEP,
        # ticket (3d/6h, factor 1) at 3615, page (6h/30m, factor 6) at 3705; page resolves with
        # the 30m window, ticket with the 6h one.
        expect=(
            ("availability", "firing", 3615),
            ("availability", "firing", 3705),
            ("availability", "resolved", 7140),
            ("availability", "resolved", 26640),
        ),
    ),
    Scenario(
        "rolling-budget",
        """
        - {name: spend, kind: budget, period: 1h, limit: 10, overrides: {acme: 20}, group_by: [tenant]}
        - {name: tokens, kind: budget, signal: tokens, period: 30m, limit: 100, severity: info}
        """,
        budget_traffic,
        end=4000,
        tolerance=60 + 2 * STEP,
        # beta: $1/min from 60, limit 10; acme: $3/min, its limit 20 is reached at 420 and it
        # drops below it when the 4th call (240) leaves the hour; 20 tokens a minute reach 100 at 300.
        expect=(
            ("spend", "firing", 420),
            ("spend", "firing", 600),
            ("spend", "resolved", 3660),
            ("spend", "resolved", 3840),
            ("tokens", "firing", 300),
        ),
    ),
    Scenario(
        "calendar-budget",
        """
        - {name: daily, kind: budget, period: 1d, calendar: true, limit: 50, overrides: {acme: 500},
           group_by: [tenant]}
        """,
        calendar_traffic,
        end=86_400 + 120,
        tolerance=2 * STEP,
        expect=(("daily", "firing", 2940), ("daily", "resolved", 86_400)),
    ),
    Scenario(
        "absence",
        """
        - {name: quiet, kind: absence, window: 15m, for: 5m, severity: ticket}
        - {name: tenant-quiet, kind: absence, window: 10m, group_by: [tenant], severity: info}
        """,
        absence_traffic,
        end=5000,
        tolerance=2 * STEP,
        expect=(("quiet", "firing", 2985), ("quiet", "resolved", 4005), ("tenant-quiet", "firing", 1485)),
    ),
    Scenario(
        "incidents",
        """
        - {name: outage, kind: absence, window: 5m, severity: page}
        - {name: stuck, kind: incident_age, incidents_of: [outage], threshold: 1h}
        - {name: mttr, kind: mttr, incidents_of: [outage], window: 1d, threshold: 1h, group_by: [rule]}
        """,
        outage_traffic,
        end=8000,
        tolerance=2 * STEP,
        merge_gap=600,
        extra={"mttr": 600 + STEP},
        # The last call before the outage is at 240: outage fires at 540, stuck 1h later.
        expect=(
            ("outage", "firing", 540),
            ("stuck", "firing", 4155),
            ("stuck", "resolved", 5700),
            ("mttr", "firing", 5700),
        ),
    ),
]


class Scrape:
    """What a sidecar exports after each step: the proxy's counters and the alerting helper gauges."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.counters: dict[str, float] = {}
        self.series: dict[str, list[float | None]] = {}

    def inc(self, series: str, amount: float = 1.0) -> None:
        self.counters[series] = self.counters.get(series, 0.0) + amount

    def record(self, rec: CallRecord) -> None:
        base = (
            f'tenant="{rec.tenant}",upstream="{rec.upstream}",provider="{rec.provider}",model="{rec.model}"'
        )
        self.inc(f'llm_requests_total{{{base},code="{rec.status}"}}')
        if rec.error_type is not None:
            self.inc(f'llm_errors_total{{{base},error_type="{rec.error_type}"}}')
        if rec.cost_usd is not None:
            self.inc(f"llm_cost_usd_total{{{base}}}", float(rec.cost_usd))
        for count in rec.token_counts():
            self.inc(f'llm_tokens_total{{{base},type="{count.type}",source="{count.source}"}}', count.count)
        for metric, value in (
            ("llm_request_duration_seconds", rec.duration_s),
            ("llm_time_to_first_token_seconds", rec.ttft_s),
        ):
            if value is None:
                continue
            self.inc(f"{metric}_count{{{base}}}")
            self.inc(f"{metric}_sum{{{base}}}", value)
            for bound in (*LATENCY_BUCKETS, math.inf):
                le = "+Inf" if math.isinf(bound) else export._number(bound)
                self.inc(f'{metric}_bucket{{{base},le="{le}"}}', 1.0 if value <= bound else 0.0)

    def snapshot(self, step: int, gauges: dict[str, float]) -> None:
        current = dict(self.counters)
        current.update(gauges)
        for name, value in current.items():
            self.series.setdefault(name, [None] * self.steps)[step] = value

    def input_series(self) -> list[dict[str, str]]:
        return [
            {"series": name, "values": values_text(values)} for name, values in sorted(self.series.items())
        ]


def values_text(values: list[float | None]) -> str:
    """promtool's expanding notation: ``_xN`` for missing, ``stale`` when a gauge goes away, ``a+bxN``."""
    tokens: list[str] = []
    i = 0
    seen = False
    while i < len(values):
        if values[i] is None:
            j = i
            while j < len(values) and values[j] is None:
                j += 1
            if seen:
                tokens.append("stale")
                i += 1
            if j > i:
                tokens.append(f"_x{j - i}")
            i = j
            continue
        seen = True
        start = values[i]
        assert start is not None
        j = i + 1
        diff = None
        while j < len(values) and values[j] is not None:
            d = values[j] - values[j - 1]  # type: ignore[operator]
            if diff is None:
                diff = d
            elif abs(d - diff) > 1e-9:
                break
            j += 1
        count = j - i - 1
        tokens.append(
            f"{export._number(start)}{'+' if (diff or 0) >= 0 else ''}{export._number(diff or 0)}x{count}"
        )
        i = j
    return " ".join(tokens)


def in_process(scenario: Scenario, ruleset: RuleSet) -> tuple[list[tuple[int, Transition]], Scrape]:
    engine = Engine(ruleset, 0.0, merge_gap=scenario.merge_gap)
    steps = scenario.end // STEP + 1
    scrape = Scrape(steps)
    # The sidecar creates the incident duration series of every rule and severity at start
    # (zero), so that increase() counts the first incident too.
    durations = {(rule.name, sev): (0.0, 0.0) for rule in ruleset for sev in rule.severities()}
    events: list[tuple[int, Transition]] = []
    for step in range(steps):
        t = step * STEP
        for rec in scenario.traffic(t):
            engine.observe(rec, t)
            scrape.record(rec)
        events.extend((t, tr) for tr in engine.evaluate(t))
        for inc in engine.book.drain_finalized(t):
            total, count = durations.get((inc.rule, inc.severity), (0.0, 0.0))
            durations[(inc.rule, inc.severity)] = (total + inc.duration(t), count + 1)
        gauges = {
            series_name(s.name, s.labels): s.value
            for s in engine.samples(t)
            if s.name in ("llm_budget_spent", "llm_incident_open_age_seconds")
        }
        for (rule, severity), (total, count) in durations.items():
            labels = f'rule="{rule}",severity="{severity}"'
            gauges[f"llm_incident_duration_seconds_sum{{{labels}}}"] = total
            gauges[f"llm_incident_duration_seconds_count{{{labels}}}"] = count
        scrape.snapshot(step, gauges)
    return events, scrape


def series_name(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def firing_at(events: list[tuple[int, Transition]], alertname: str, t: int) -> dict[tuple, Transition]:
    state: dict[tuple, Transition] = {}
    for when, tr in events:
        if when > t:
            break
        if tr.rule != alertname:
            continue
        if tr.status == "firing":
            state[(tr.severity, tr.labels)] = tr
        else:
            state.pop((tr.severity, tr.labels), None)
    return state


def promtool_test(
    scenario: Scenario, ruleset: RuleSet, events: list[tuple[int, Transition]], scrape: Scrape
) -> dict:
    checks: dict[tuple[int, str], None] = {}
    for t, tr in events:
        tol = (scenario.extra or {}).get(tr.rule, scenario.tolerance)
        for c in (t - tol, t + tol):
            if 0 <= c <= scenario.end:
                checks[(c, tr.rule)] = None
    tests = []
    for c, alertname in sorted(checks):
        rule = ruleset.get(alertname)
        assert rule is not None
        expected = [
            {"exp_labels": export.alert_labels(rule, tr.severity, tr.labels)}
            | ({"exp_annotations": dict(tr.annotations)} if tr.annotations else {})
            for tr in firing_at(events, alertname, c).values()
        ]
        tests.append({"eval_time": f"{c}s", "alertname": alertname, "exp_alerts": expected})
    return {
        "rule_files": ["rules.yml"],
        "evaluation_interval": f"{STEP}s",
        "tests": [{"interval": f"{STEP}s", "input_series": scrape.input_series(), "alert_rule_test": tests}],
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_exported_rules_fire_and_resolve_when_the_engine_does(scenario: Scenario, tmp_path: Path) -> None:
    promtool = tool("promtool")
    text = "version: sidecar/v1\nrules:\n" + textwrap.indent(
        textwrap.dedent(scenario.rules).strip() + "\n", "  "
    )
    ruleset, problems = spec.load([(f"{scenario.name}.yaml", text)])
    assert [str(p) for p in problems] == []
    events, scrape = in_process(scenario, ruleset)
    happened = {(tr.rule, tr.status, t) for t, tr in events}
    for expected in scenario.expect:
        assert expected in happened, f"in-process {expected} missing from {sorted(happened)}"
    (tmp_path / "rules.yml").write_text(export.export_prometheus(ruleset, [f"{scenario.name}.yaml"]))
    (tmp_path / "test.yml").write_text(yaml.safe_dump(promtool_test(scenario, ruleset, events, scrape)))
    run_tool(promtool, "test", "rules", "test.yml", cwd=tmp_path)
