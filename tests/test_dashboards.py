"""The Grafana dashboards (``dashboards/*.json``), tested against a real Prometheus.

The test runs the Helm chart's demo pod as local processes, all on 127.0.0.1: the chart is
rendered with ``helm template`` (the repository's rule files in-process, notification off
as with a PrometheusRule) and its containers are started from the rendered pod spec —
the mock LLM upstream (``files/mock_upstream.py``), the sidecar (``python -m sidecar run``
with the rendered config and args, listeners moved to free loopback ports) and the demo
application (``files/demo_app.py``) sending a few seconds of mixed traffic. A real
Prometheus (Debian's ``prometheus``, started here with a temporary config, scraping the
sidecar every second and loading the PrometheusRule export of the same rules) then
answers every query of every panel:

- every expression parses and evaluates, as an instant query and as a range query;
- the core panels (calls, errors, latency, tokens, cost...) return data;
- every template variable finds values;
- every metric a dashboard names is one the sidecar served on ``/metrics`` in this run
  or one of the documented alerting metrics;
- the committed JSON is what ``dashboards/generate.py`` writes, importable shape (a
  datasource variable, tenant/upstream/provider/model variables, units, schemaVersion).

``helm`` and ``prometheus`` are required: a missing one fails these tests.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dashboards.demo_stack import Stack, demo_stack

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = REPO / "dashboards"
TRAFFIC_SECONDS = 6.0
# Metrics served once rules are loaded (README "SLA and MTTR alerting"); with no alert, no
# incident and notification off, some have no samples in a short run.
ALERTING_METRICS = {
    "llm_alerts_firing",
    "llm_slo_error_budget_remaining_ratio",
    "llm_slo_burn_rate",
    "llm_budget_spent",
    "llm_budget_limit",
    "llm_incidents_open",
    "llm_incident_open_age_seconds",
    "llm_incident_duration_seconds",
    "llm_notifications_total",
}
# Panels whose queries may rightly be empty after a short healthy run (no drop, no
# malformed body, no alert or incident yet, no notification sent).
MAY_BE_EMPTY = {
    "Error budget remaining",
    "Burn rate",
    "Firing alerts",
    "Open incidents",
    "MTTR (range)",
    "Notifications",
    "Records dropped by sink",
    "Malformed upstream bodies",
    "Spend against budget",
    # Gateway control: only with breakers, canaries, limits or keys configured and used.
    "Circuit breakers",
    "Canary weight",
    "Fallbacks",
    "Refused by policy",
}
SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "$__interval": "15s",
    "$__range": "1h",
    "$slo_objective": "0.999",
    "$tenant": ".*",
    "$upstream": ".*",
    "$provider": ".*",
    "$model": ".*",
}


# -- the dashboards -----------------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return data


def dashboard_files() -> list[str]:
    return sorted(p.name for p in DASHBOARDS.glob("*.json"))


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    kind: str
    expr: str

    def promql(self) -> str:
        text = self.expr
        for variable, value in SUBSTITUTIONS.items():
            text = text.replace(variable, value)
        assert "$" not in text, f"unsubstituted variable in {self.panel}: {text}"
        return text


def queries() -> list[Query]:
    found = []
    for name in dashboard_files():
        for panel in load(name)["panels"]:
            for target in panel.get("targets", []):
                found.append(Query(name, panel["title"], panel["type"], target["expr"]))
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (label values and strings removed first)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"\bllm_[a-z0-9_]+\b(?!:)", without_strings))


# -- the running stack --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        with demo_stack(tmp_path_factory.mktemp("dashboards"), traffic_seconds=TRAFFIC_SECONDS) as running:
            yield running
    except RuntimeError as exc:  # a tool missing or a process that did not start
        pytest.fail(str(exc), pytrace=False)


# -- the tests ----------------------------------------------------------------------------------


def test_dashboards_are_generated_from_the_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert dashboard_files() == ["cost.json", "sla-overview.json"]


@pytest.mark.parametrize("name", dashboard_files())
def test_dashboard_is_importable(name: str) -> None:
    board = load(name)
    assert board["schemaVersion"] >= 39
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for label in ("tenant", "upstream", "provider", "model"):
        assert variables[label]["type"] == "query"
        assert variables[label]["includeAll"] and variables[label]["allValue"] == ".*"
        assert f", {label})" in variables[label]["definition"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        unit = panel["fieldConfig"]["defaults"]["unit"]
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if "llm_cost_usd_total" in exprs and "llm_requests_total" not in exprs.split("/")[0]:
            assert unit == "currencyUSD", panel["title"]
        if "_seconds_bucket" in exprs:
            assert unit == "s", panel["title"]


def test_the_on_call_and_finance_panels_are_there() -> None:
    sla = {p["title"] for p in load("sla-overview.json")["panels"]}
    cost = {p["title"] for p in load("cost.json")["panels"]}
    assert {
        "Availability (range)",
        "Error budget remaining",
        "Burn rate",
        "Errors by type",
        "Request duration by provider and model",
        "Time to first token by provider and model",
        "In flight",
        "Alerts firing",
        "Open incidents",
        "MTTR (range)",
        "Records dropped by sink",
        "Proxy overhead",
    } <= sla
    assert {
        "Spend per tenant per day",
        "Spend per model per day",
        "Top tenants (range)",
        "Tokens by type",
        "Cached share of input",
        "Estimated share of tokens",
        "Unpriced calls (range)",
        "Cost per 1k calls (range)",
        "Spend against budget",
    } <= cost


def test_every_query_runs_against_prometheus(stack: Stack) -> None:
    now = time.time()
    empty = []
    for query in queries():
        promql = query.promql()
        instant = stack.api("query", query=promql, time=f"{now:.3f}")
        assert instant["status"] == "success", f"{query.dashboard} / {query.panel}: {instant}\n{promql}"
        ranged = stack.api("query_range", query=promql, start=f"{now - 30:.3f}", end=f"{now:.3f}", step="2")
        assert ranged["status"] == "success", f"{query.dashboard} / {query.panel}: {ranged}\n{promql}"
        if not instant["data"]["result"] and query.panel not in MAY_BE_EMPTY:
            empty.append(f"{query.dashboard} / {query.panel}: {promql}")
    assert not empty, "queries with no data after the demo traffic:\n" + "\n".join(empty)


def test_core_values_are_plausible(stack: Stack) -> None:
    def value(promql: str) -> float:
        result = stack.api("query", query=promql)["data"]["result"]
        assert result, promql
        return float(result[0]["value"][1])

    for query in queries():
        if query.panel == "Availability (range)":
            assert 0.5 < value(query.promql()) <= 1.0  # increase() skips the first failures of a new series
        if query.panel == "Spend (range)":
            assert value(query.promql()) > 0
        if query.panel == "Unpriced calls (range)":
            assert value(query.promql()) >= 0
    # The demo calls a model with no price. (increase() skips a series' first sample, so a
    # counter born during this short run may show no increase yet: read it raw.)
    assert value('sum(llm_unpriced_requests_total{model="acme-finetune-v2"})') >= 1
    assert value('sum(llm_tokens_total{source="estimated"})') > 0
    assert value("count(count by (error_type) (llm_errors_total))") >= 2
    assert value("count(llm_time_to_first_token_seconds_count > 0)") >= 1


def test_template_variables_find_values(stack: Stack) -> None:
    for name in dashboard_files():
        for variable in load(name)["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
            assert match is not None, variable["definition"]
            selector = Query("", "", "", match.group(1)).promql()
            values = stack.api(f"label/{match.group(2)}/values", **{"match[]": selector})
            assert values["status"] == "success"
            assert values["data"], f"{name}: no values for ${variable['name']}"


def test_every_metric_a_dashboard_names_is_exported(stack: Stack) -> None:
    served = set(re.findall(r"^(?:# TYPE )?(llm_[a-z0-9_]+)", stack.metrics_text, flags=re.MULTILINE))
    names = set().union(*(metric_names(q.expr) for q in queries()))
    assert names, "no metric found in the dashboards"
    histogram_parts = {n for n in names if n.endswith(("_bucket", "_sum", "_count"))}
    for name in names:
        if name in served:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name in histogram_parts else name
        assert base in ALERTING_METRICS, f"{name} is neither served by the sidecar nor a documented metric"
    core = {n for n in names if re.sub(r"_(bucket|sum|count)$", "", n) not in ALERTING_METRICS}
    assert core <= served, f"core metrics not served: {core - served}"


def test_prometheus_loaded_the_exported_rules(stack: Stack) -> None:
    rules = stack.api("rules")
    assert rules["status"] == "success"
    groups = rules["data"]["groups"]
    assert groups and all(rule["health"] != "err" for g in groups for rule in g["rules"])
