"""Generate the Grafana dashboards in this directory from code: ``python dashboards/generate.py``.

Two dashboards, plain Grafana JSON (``schemaVersion`` 39, Grafana 10.4 and later), importable
as they are (Dashboards > New > Import), with a Prometheus datasource variable:

- ``sla-overview.json`` (on-call): availability and error rate against the SLO, error budget
  remaining and burn rate, latency and time to first token p50/p95/p99 per provider and
  model, errors by type, calls in flight, firing alerts, open incidents and MTTR,
  notifications, proxy overhead, and the sidecar's own health (sink drops, malformed
  upstream bodies, config reload failures, tenant overflow).
- ``cost.json`` (finance): spend over the range, per tenant and per model per day, top
  tenants, cost per 1k calls, tokens by type (input, cached, cache write, output,
  reasoning), cached share, estimated (not reported) share, unpriced calls, spend against
  budget.

Template variables on both: ``datasource``, ``tenant``, ``upstream``, ``provider``, ``model``
(multi-value, "All" = ``.*``). Every metric is one the sidecar exports (README "Metrics",
and the alerting metrics served when rules are loaded); ``tests/test_dashboards.py`` runs
every query against a real Prometheus scraping a real sidecar and checks the committed
JSON equals this script's output (``--check``).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label filters. Metrics with the four call labels take SEL; others take what they have.
SEL = 'tenant=~"$tenant", upstream=~"$upstream", provider=~"$provider", model=~"$model"'
SEL_UNPRICED = 'tenant=~"$tenant", model=~"$model"'
SEL_UPSTREAM = 'upstream=~"$upstream"'
SEL_TENANT = 'tenant=~"$tenant"'
# Calls that spend the availability error budget (as in rules/slo.yaml): failures of the
# upstream or the sidecar, not the client's own (4xx, 429, aborts).
BAD = 'error_type=~"upstream_5xx|timeout|connect_error|stream_interrupted|proxy_error"'
RATE = "$__rate_interval"
INPUT, OUTPUT = 'type="input"', 'type="output"'
CACHED, REASONING = 'type="cached_input"', 'type="reasoning"'
IN_OUT, ESTIMATED = 'type=~"input|output"', 'source="estimated"'
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))


def requests(window: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (increase(llm_requests_total{{{SEL}}}[{window}]))"


def bad_ratio(window: str, by: str = "") -> str:
    """Share of calls that spent the error budget; 0 (not empty) when nothing failed."""
    group = f" by ({by})" if by else ""
    errors = f"sum{group} (increase(llm_errors_total{{{SEL}, {BAD}}}[{window}]))"
    return f"(({errors}) or (0 * {requests(window, by)})) / {requests(window, by)}"


def quantile(q: str, metric: str, by: str = "provider, model", selector: str = SEL) -> str:
    inner = f"rate({metric}_bucket{{{selector}}}[{RATE}])" if selector else f"rate({metric}_bucket[{RATE}])"
    return f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) ({inner}))"


def tokens(window: str, extra: str = "", by: str = "") -> str:
    group = f" by ({by})" if by else ""
    selector = f"{SEL}, {extra}" if extra else SEL
    return f"sum{group} (increase(llm_tokens_total{{{selector}}}[{window}]))"


def cost(window: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (increase(llm_cost_usd_total{{{SEL}}}[{window}]))"


# -- panels --------------------------------------------------------------------------------------


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"

    def to_json(self, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
            "refId": ref,
        }
        if self.fmt != "time_series":
            out["format"] = self.fmt
        return out


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | stat | gauge | bargauge | table | barchart
    targets: list[Target]
    unit: str = "short"
    width: int = 12
    height: int = 8
    description: str = ""
    decimals: int | None = None
    thresholds: list[tuple[float | None, str]] = field(default_factory=lambda: [(None, "green")])
    minimum: float | None = None
    maximum: float | None = None
    stack: bool = False
    bars: bool = False
    interval: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {
            "unit": self.unit,
            "color": {"mode": "thresholds" if self.kind in ("stat", "gauge") else "palette-classic"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": color, "value": value} for value, color in self.thresholds],
            },
        }
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.minimum is not None:
            defaults["min"] = self.minimum
        if self.maximum is not None:
            defaults["max"] = self.maximum
        if self.kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "bars" if self.bars else "line",
                "fillOpacity": 80 if self.bars else 10,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if self.stack else "none", "group": "A"},
            }
        by_kind: dict[str, dict[str, Any]] = {
            "timeseries": {
                "legend": {
                    "displayMode": "table",
                    "placement": "bottom",
                    "calcs": ["mean", "max", "lastNotNull"],
                },
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "stat": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
                "textMode": "auto",
            },
            "gauge": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
            "bargauge": {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "displayMode": "gradient",
                "orientation": "horizontal",
            },
            "table": {"showHeader": True, "cellHeight": "sm"},
        }
        options = by_kind[self.kind]
        panel: dict[str, Any] = {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {**options, **self.options},
            "targets": [t.to_json(chr(ord("A") + i)) for i, t in enumerate(self.targets)],
        }
        if self.interval:
            panel["interval"] = self.interval
        if self.kind == "table":
            panel["transformations"] = [
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}}},
            ]
        return panel


@dataclass
class Row:
    title: str
    panels: list[Panel]


def layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows of panels, left to right, wrapping at Grafana's 24 columns."""
    out: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row in rows:
        out.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            out.append(panel.to_json(next_id, x, y))
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return out


# -- template variables --------------------------------------------------------------------------


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values", "qryType": 1},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


def templating() -> dict[str, Any]:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            variable("tenant", "Tenant", "label_values(llm_requests_total, tenant)"),
            variable("upstream", "Upstream", 'label_values(llm_requests_total{tenant=~"$tenant"}, upstream)'),
            variable(
                "provider",
                "Provider",
                'label_values(llm_requests_total{tenant=~"$tenant", upstream=~"$upstream"}, provider)',
            ),
            variable(
                "model",
                "Model",
                'label_values(llm_requests_total{tenant=~"$tenant", upstream=~"$upstream", '
                'provider=~"$provider"}, model)',
            ),
            {
                "name": "slo_objective",
                "label": "SLO objective",
                "type": "custom",
                "query": "0.999,0.995,0.99",
                "current": {"selected": True, "text": "0.999", "value": "0.999"},
                "options": [],
                "hide": 0,
                "description": "Availability objective drawn against the measured availability",
            },
        ]
    }


def dashboard(uid: str, title: str, description: str, tags: list[str], rows: list[Row]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["llm-sidecar", *tags],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "title": "llm-sidecar dashboards",
                "type": "dashboards",
                "tags": ["llm-sidecar"],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": templating(),
        "panels": layout(rows),
    }


# -- the on-call dashboard -----------------------------------------------------------------------


def sla_overview() -> dict[str, Any]:
    red_amber_green = [(None, "red"), (0.99, "orange"), (0.999, "green")]
    overview = Row(
        "Service level",
        [
            Panel(
                "Availability (range)",
                "stat",
                [Target(f"1 - ({bad_ratio('$__range')})", "availability", instant=True)],
                unit="percentunit",
                width=4,
                height=5,
                decimals=3,
                thresholds=red_amber_green,
                description="Share of calls that did not fail on the upstream's or the sidecar's side "
                "(client errors, 429s and client aborts do not count), over the dashboard's range.",
            ),
            Panel(
                "Error ratio (5m)",
                "stat",
                [Target(bad_ratio("5m"), "errors", instant=True)],
                unit="percentunit",
                width=4,
                height=5,
                decimals=2,
                thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")],
            ),
            Panel(
                "Calls per second",
                "stat",
                [Target(f"sum(rate(llm_requests_total{{{SEL}}}[{RATE}]))", "calls/s")],
                unit="reqps",
                width=4,
                height=5,
            ),
            Panel(
                "In flight",
                "stat",
                [Target(f"sum(llm_inflight_requests{{{SEL_UPSTREAM}}})", "in flight")],
                width=4,
                height=5,
            ),
            Panel(
                "Alerts firing",
                "stat",
                [Target("sum(llm_alerts_firing) or vector(0)", "firing", instant=True)],
                width=4,
                height=5,
                thresholds=[(None, "green"), (1, "red")],
                description="Alerts of the sidecar's in-process rules (llm_alerts_firing).",
            ),
            Panel(
                "Open incidents",
                "stat",
                [Target("sum(llm_incidents_open) or vector(0)", "open", instant=True)],
                width=4,
                height=5,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "Availability against the objective",
                "timeseries",
                [
                    Target(f"1 - ({bad_ratio('1h', 'tenant')})", "{{tenant}}"),
                    Target(f"{requests('1h')} * 0 + $slo_objective", "objective"),
                ],
                unit="percentunit",
                width=12,
                description="Availability over a sliding hour per tenant, against the chosen objective.",
            ),
            Panel(
                "Error budget remaining",
                "timeseries",
                [Target("llm_slo_error_budget_remaining_ratio", "{{rule}} {{tenant}}")],
                unit="percentunit",
                width=6,
                thresholds=[(None, "red"), (0, "orange"), (0.25, "green")],
                description="Share of the SLO's error budget left over its period (< 0: overspent).",
            ),
            Panel(
                "Burn rate",
                "timeseries",
                [Target("llm_slo_burn_rate", "{{rule}} {{tenant}} {{window}}")],
                unit="short",
                width=6,
                thresholds=[(None, "green"), (1, "orange"), (14.4, "red")],
                description="Error ratio over each window divided by the error budget; 1 spends the "
                "budget exactly over the period, 14.4 over 1h pages.",
            ),
        ],
    )
    errors = Row(
        "Errors",
        [
            Panel(
                "Errors by type",
                "timeseries",
                [Target(f"sum by (error_type) (rate(llm_errors_total{{{SEL}}}[{RATE}]))", "{{error_type}}")],
                unit="reqps",
                width=12,
                stack=True,
            ),
            Panel(
                "Error ratio by upstream and provider",
                "timeseries",
                [Target(bad_ratio(RATE, "upstream, provider"), "{{upstream}} {{provider}}")],
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Calls by status code",
                "timeseries",
                [Target(f"sum by (code) (rate(llm_requests_total{{{SEL}}}[{RATE}]))", "{{code}}")],
                unit="reqps",
                width=12,
                stack=True,
            ),
            Panel(
                "Error ratio by tenant",
                "timeseries",
                [Target(bad_ratio(RATE, "tenant"), "{{tenant}}")],
                unit="percentunit",
                width=12,
            ),
        ],
    )
    latency = Row(
        "Latency",
        [
            Panel(
                "Request duration by provider and model",
                "timeseries",
                [
                    Target(
                        quantile(q, "llm_request_duration_seconds"), f"{name} {{{{provider}}}} {{{{model}}}}"
                    )
                    for name, q in QUANTILES
                ],
                unit="s",
                width=12,
            ),
            Panel(
                "Time to first token by provider and model",
                "timeseries",
                [
                    Target(
                        quantile(q, "llm_time_to_first_token_seconds"),
                        f"{name} {{{{provider}}}} {{{{model}}}}",
                    )
                    for name, q in QUANTILES
                ],
                unit="s",
                width=12,
                description="Streams only: request to the first generated content.",
            ),
            Panel(
                "Request duration (all selected calls)",
                "timeseries",
                [Target(quantile(q, "llm_request_duration_seconds", by=""), name) for name, q in QUANTILES],
                unit="s",
                width=8,
            ),
            Panel(
                "Time to first token (all selected streams)",
                "timeseries",
                [
                    Target(quantile(q, "llm_time_to_first_token_seconds", by=""), name)
                    for name, q in QUANTILES
                ],
                unit="s",
                width=8,
            ),
            Panel(
                "Proxy overhead",
                "timeseries",
                [
                    Target(quantile(q, "llm_proxy_overhead_seconds", by="", selector=""), name)
                    for name, q in QUANTILES
                ],
                unit="s",
                width=8,
                description="Time spent in the sidecar itself, not waiting on the upstream or the client "
                "(all calls: this histogram has no labels).",
            ),
            Panel(
                "In flight by upstream",
                "timeseries",
                [Target(f"sum by (upstream) (llm_inflight_requests{{{SEL_UPSTREAM}}})", "{{upstream}}")],
                width=24,
                height=6,
            ),
        ],
    )
    incidents = Row(
        "Alerts and incidents",
        [
            Panel(
                "Firing alerts",
                "table",
                [
                    Target(
                        "max by (rule, severity, tenant) (llm_alerts_firing) > 0", fmt="table", instant=True
                    )
                ],
                width=12,
                description="In-process rule alerts firing now (with Prometheus rules, see Alertmanager).",
            ),
            Panel(
                "Open incidents",
                "table",
                [
                    Target(
                        "max by (rule, severity) (llm_incident_open_age_seconds)",
                        fmt="table",
                        instant=True,
                    )
                ],
                unit="s",
                width=12,
                description="Age of each open incident.",
            ),
            Panel(
                "MTTR (range)",
                "stat",
                [
                    Target(
                        "sum by (rule) (increase(llm_incident_duration_seconds_sum[$__range]))"
                        " / sum by (rule) (increase(llm_incident_duration_seconds_count[$__range]))",
                        "{{rule}}",
                        instant=True,
                    )
                ],
                unit="s",
                width=8,
                description="Mean time to resolve the incidents that ended in the range, per rule.",
            ),
            Panel(
                "Incidents resolved (range)",
                "stat",
                [
                    Target(
                        "sum(increase(llm_incident_duration_seconds_count[$__range])) or vector(0)",
                        "resolved",
                        instant=True,
                    )
                ],
                width=4,
            ),
            Panel(
                "Notifications",
                "timeseries",
                [
                    Target(
                        f"sum by (channel, outcome) (increase(llm_notifications_total[{RATE}]))",
                        "{{channel}} {{outcome}}",
                    )
                ],
                width=12,
                bars=True,
                stack=True,
            ),
        ],
    )
    health = Row(
        "Sidecar health",
        [
            Panel(
                "Records dropped by sink",
                "timeseries",
                [
                    Target(f"sum by (sink) (rate(llm_sink_dropped_total[{RATE}]))", "{{sink}}"),
                    Target(f"sum(rate(llm_sink_dropped_total[{RATE}])) or vector(0)", "all sinks"),
                ],
                unit="short",
                width=6,
                description="Records a sink's full queue could not take: observability lost, never a "
                "call delayed.",
            ),
            Panel(
                "Malformed upstream bodies",
                "timeseries",
                [
                    Target(
                        f"sum by (upstream) (rate(llm_malformed_responses_total{{{SEL_UPSTREAM}}}[{RATE}]))",
                        "{{upstream}}",
                    ),
                    Target(f"sum(rate(llm_malformed_responses_total[{RATE}])) or vector(0)", "all upstreams"),
                ],
                width=6,
            ),
            Panel(
                "Config reload failures (range)",
                "stat",
                [
                    Target(
                        "sum(increase(llm_config_reload_failures_total[$__range])) or vector(0)",
                        "failures",
                        instant=True,
                    )
                ],
                width=6,
                thresholds=[(None, "green"), (1, "red")],
            ),
            Panel(
                "Calls of overflow tenants (range)",
                "stat",
                [Target("sum(increase(llm_tenant_overflow_total[$__range]))", "overflow", instant=True)],
                width=6,
                thresholds=[(None, "green"), (1, "orange")],
                description="Calls counted under tenant __overflow__ (tenants.max_distinct reached).",
            ),
        ],
    )
    gateway = Row(
        "Gateway control",
        [
            Panel(
                "Upstream attempts by outcome",
                "timeseries",
                [
                    Target(
                        "sum by (upstream, outcome) "
                        f"(rate(llm_upstream_attempts_total{{{SEL_UPSTREAM}}}[{RATE}]))",
                        "{{upstream}} {{outcome}}",
                    )
                ],
                unit="reqps",
                width=6,
                description="Every try at an upstream; a call that fell back has several.",
            ),
            Panel(
                "Fallbacks",
                "timeseries",
                [
                    Target(
                        f"sum by (from, to, reason) (rate(llm_fallbacks_total[{RATE}]))",
                        "{{from}} → {{to}} ({{reason}})",
                    ),
                    Target(f"sum(rate(llm_fallbacks_total[{RATE}])) or vector(0)", "all"),
                ],
                unit="reqps",
                width=6,
            ),
            Panel(
                "Circuit breakers",
                "timeseries",
                [Target(f"max by (upstream) (llm_upstream_state{{{SEL_UPSTREAM}}})", "{{upstream}}")],
                width=4,
                thresholds=[(None, "green"), (1, "orange"), (2, "red")],
                description="0 closed, 1 half-open (one probe), 2 open (traffic goes elsewhere).",
            ),
            Panel(
                "Refused by policy",
                "timeseries",
                [
                    Target(
                        f"sum by (reason) (rate(llm_throttled_requests_total{{{SEL_TENANT}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                    Target(f"sum(rate(llm_auth_failures_total[{RATE}])) or vector(0)", "unauthorized"),
                ],
                unit="reqps",
                width=4,
                description="Rate limits, budgets and key checks: refusals that do not burn the SLO.",
            ),
            Panel(
                "Canary weight",
                "timeseries",
                [Target("max by (route) (llm_canary_weight_percent)", "{{route}}")],
                unit="percent",
                width=4,
                description="Share of each route's calls sent to its candidate; 0 after a rollback.",
            ),
        ],
    )
    return dashboard(
        "llm-sidecar-sla",
        "LLM sidecar / SLA overview",
        "On-call view of LLM API calls through llm-sidecar: availability, error budget, latency, "
        "errors, alerts and incidents.",
        ["sla", "on-call"],
        [overview, errors, latency, incidents, gateway, health],
    )


# -- the finance dashboard -----------------------------------------------------------------------


def cost_dashboard() -> dict[str, Any]:
    usd = "currencyUSD"
    summary = Row(
        "Spend",
        [
            Panel(
                "Spend (range)",
                "stat",
                [Target(f"{cost('$__range')} or vector(0)", "USD", instant=True)],
                unit=usd,
                width=6,
                height=5,
                decimals=2,
            ),
            Panel(
                "Calls (range)",
                "stat",
                [Target(f"{requests('$__range')} or vector(0)", "calls", instant=True)],
                width=6,
                height=5,
                decimals=0,
            ),
            Panel(
                "Cost per 1k calls (range)",
                "stat",
                [
                    Target(
                        f"1000 * {cost('$__range')} / {requests('$__range')}", "USD / 1k calls", instant=True
                    )
                ],
                unit=usd,
                width=6,
                height=5,
                decimals=3,
            ),
            Panel(
                "Unpriced calls (range)",
                "stat",
                [
                    Target(
                        f"sum(increase(llm_unpriced_requests_total{{{SEL_UNPRICED}}}[$__range]))"
                        " or vector(0)",
                        "unpriced",
                        instant=True,
                    )
                ],
                width=6,
                height=5,
                decimals=0,
                thresholds=[(None, "green"), (1, "orange")],
                description="Calls with tokens to a model with no price: not in the spend. Add the model "
                "to the price table.",
            ),
            Panel(
                "Spend per tenant per day",
                "timeseries",
                [Target(cost("1d", "tenant"), "{{tenant}}")],
                unit=usd,
                width=12,
                bars=True,
                stack=True,
                interval="1d",
                description="Each bar: the spend of the day before the bar's time.",
            ),
            Panel(
                "Spend per model per day",
                "timeseries",
                [Target(cost("1d", "model"), "{{model}}")],
                unit=usd,
                width=12,
                bars=True,
                stack=True,
                interval="1d",
            ),
            Panel(
                "Top tenants (range)",
                "bargauge",
                [Target(f"topk(10, {cost('$__range', 'tenant')})", "{{tenant}}", instant=True)],
                unit=usd,
                width=8,
                decimals=2,
            ),
            Panel(
                "Top models (range)",
                "bargauge",
                [Target(f"topk(10, {cost('$__range', 'model')})", "{{model}}", instant=True)],
                unit=usd,
                width=8,
                decimals=2,
            ),
            Panel(
                "Spend rate per tenant",
                "timeseries",
                [Target(f"3600 * sum by (tenant) (rate(llm_cost_usd_total{{{SEL}}}[{RATE}]))", "{{tenant}}")],
                unit=usd,
                width=8,
                description="USD per hour at the current rate.",
            ),
        ],
    )
    token_row = Row(
        "Tokens",
        [
            Panel(
                "Tokens by type",
                "timeseries",
                [Target(f"sum by (type) (rate(llm_tokens_total{{{SEL}}}[{RATE}]))", "{{type}}")],
                unit="short",
                width=12,
                description="Tokens per second. cached_input and cache_write are parts of input, "
                "reasoning a part of output: the series overlap, do not add them up.",
            ),
            Panel(
                "Tokens by type (range)",
                "bargauge",
                [Target(tokens("$__range", by="type"), "{{type}}", instant=True)],
                unit="short",
                width=12,
            ),
            Panel(
                "Cached share of input",
                "stat",
                [
                    Target(
                        f"({tokens('$__range', CACHED)} or vector(0)) / {tokens('$__range', INPUT)}",
                        "cached",
                        instant=True,
                    )
                ],
                unit="percentunit",
                width=6,
                height=5,
                decimals=1,
            ),
            Panel(
                "Estimated share of tokens",
                "stat",
                [
                    Target(
                        f"({tokens('$__range', f'{IN_OUT}, {ESTIMATED}')} or vector(0))"
                        f" / {tokens('$__range', IN_OUT)}",
                        "estimated",
                        instant=True,
                    )
                ],
                unit="percentunit",
                width=6,
                height=5,
                decimals=2,
                thresholds=[(None, "green"), (0.05, "orange")],
                description="Tokens counted locally with tiktoken (the provider reported none: streams "
                "cut short, client aborts) against all input and output tokens.",
            ),
            Panel(
                "Reasoning share of output",
                "stat",
                [
                    Target(
                        f"({tokens('$__range', REASONING)} or vector(0)) / {tokens('$__range', OUTPUT)}",
                        "reasoning",
                        instant=True,
                    )
                ],
                unit="percentunit",
                width=6,
                height=5,
                decimals=1,
            ),
            Panel(
                "Estimated tokens by model (range)",
                "bargauge",
                [Target(tokens("$__range", ESTIMATED, by="model"), "{{model}}", instant=True)],
                width=6,
                height=5,
            ),
            Panel(
                "Unpriced calls by model",
                "timeseries",
                [
                    Target(
                        f"sum by (model) (increase(llm_unpriced_requests_total{{{SEL_UNPRICED}}}[{RATE}]))",
                        "{{model}}",
                    )
                ],
                width=12,
                bars=True,
            ),
            Panel(
                "Spend against budget",
                "bargauge",
                [
                    Target(
                        "max by (rule, tenant) (llm_budget_spent / llm_budget_limit)", "{{rule}} {{tenant}}"
                    )
                ],
                unit="percentunit",
                width=12,
                minimum=0,
                maximum=1,
                thresholds=[(None, "green"), (0.8, "orange"), (1, "red")],
                description="Spend of each budget rule's group in its current period against its limit "
                "(needs budget rules; this sidecar's share in fleet mode).",
            ),
        ],
    )
    return dashboard(
        "llm-sidecar-cost",
        "LLM sidecar / Cost",
        "Finance view of LLM API usage through llm-sidecar: spend per tenant and model, tokens by "
        "type, cached and estimated shares, unpriced calls, budgets.",
        ["cost", "finance"],
        [summary, token_row],
    )


DASHBOARDS = {"sla-overview.json": sla_overview, "cost.json": cost_dashboard}


def render(name: str) -> str:
    """The JSON text of one dashboard, as committed."""
    return json.dumps(DASHBOARDS[name](), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards (or, with ``--check``, fail when the committed ones differ)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="directory (default: beside this script)")
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = args.out / name
        text = render(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        sys.stderr.write(f"out of date: {', '.join(stale)} (run python dashboards/generate.py)\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
