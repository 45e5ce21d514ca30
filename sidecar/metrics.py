"""Prometheus metrics of proxied calls: the contract that dashboards and rules build on.

Adapter over ``prometheus_client``; the registry is passed in (tests use a fresh
``CollectorRegistry()``). :class:`Metrics` owns the metric objects; :class:`MetricsSink`
turns each finished :class:`~sidecar.model.CallRecord` into counter and histogram
updates from the pipeline's queue, off the request path. Only ``llm_inflight_requests``
is updated on the request path itself (a gauge must be live).

Cost is accumulated as exact ``Decimal`` per label set and converted to a float only
when scraped, so it equals the ledger's sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sidecar.model import CallRecord
from sidecar.sinks import QueueSink
from sidecar.tenants import TenantCap

#: Latency buckets for LLM calls: tens of milliseconds to ten minutes.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
#: Sidecar overhead buckets: tens of microseconds to a quarter second.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

#: Labels of every per-call metric. ``route`` is the gateway route that planned the call
#: ("" when no route did); ``upstream`` is the upstream that finally served it.
CALL_LABELS = ("tenant", "upstream", "provider", "model", "route")
Labels = tuple[str, str, str, str, str]
MAX_LABEL_LENGTH = 128
MAX_MODELS = 500
OVERFLOW = "__overflow__"


def _clip(value: str) -> str:
    return value if len(value) <= MAX_LABEL_LENGTH else value[:MAX_LABEL_LENGTH]


class _CostCollector(Collector):
    """``llm_cost_usd_total``: exact Decimal sums, floats only at scrape time."""

    def __init__(self) -> None:
        self.totals: dict[Labels, Decimal] = {}

    def add(self, labels: Labels, cost: Decimal) -> None:
        self.totals[labels] = self.totals.get(labels, Decimal(0)) + cost

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "llm_cost_usd", "Cost of proxied calls in USD, from the price table", labels=CALL_LABELS
        )
        for labels, total in list(self.totals.items()):
            family.add_metric(labels, float(total))
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily("llm_cost_usd", "Cost of proxied calls in USD", labels=CALL_LABELS)


class Metrics:
    """Every metric of the proxy core, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, max_tenants: int = 1000) -> None:
        self.registry = registry
        self.tenants = TenantCap(max_tenants)
        self._models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "llm_requests_total",
            "Finished client calls, by the HTTP status the client got (499: client abort)",
            [*CALL_LABELS, "code"],
            registry=registry,
        )
        self.errors = Counter(
            "llm_errors_total", "Failed calls by error type", [*CALL_LABELS, "error_type"], registry=registry
        )
        self.tokens = Counter(
            "llm_tokens_total",
            "Tokens by normalised type, reported by the provider or estimated locally",
            [*CALL_LABELS, "type", "source"],
            registry=registry,
        )
        self.cost = _CostCollector()
        registry.register(self.cost)
        self.duration = Histogram(
            "llm_request_duration_seconds",
            "Time from the client's request to the end of the response",
            CALL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Streams: time from the request to the first event carrying generated content",
            CALL_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "llm_proxy_overhead_seconds",
            "Time spent in the sidecar itself, not waiting on the upstream or the client",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.malformed = Counter(
            "llm_malformed_responses_total",
            "Upstream JSON or SSE bodies that could not be parsed (forwarded unchanged)",
            ["upstream", "provider"],
            registry=registry,
        )
        self.throttled = Counter(
            "llm_throttled_requests_total",
            "Calls the sidecar refused itself (reason: budget, rpm, tpm, concurrency, state_unavailable)",
            ["tenant", "reason"],
            registry=registry,
        )
        self.inflight = Gauge("llm_inflight_requests", "Calls in flight", ["upstream"], registry=registry)
        self.unpriced = Counter(
            "llm_unpriced_requests_total",
            "Calls to a model with no price",
            ["tenant", "model"],
            registry=registry,
        )
        self.tenant_overflow = Counter(
            "llm_tenant_overflow_total",
            "Calls attributed to tenant __overflow__ because the distinct-tenant cap was reached",
            registry=registry,
        )
        self.sink_dropped = Counter(
            "llm_sink_dropped_total",
            "Records a sink could not take (queue full)",
            ["sink"],
            registry=registry,
        )
        # -- gateway control (issue 6) --
        self.upstream_attempts = Counter(
            "llm_upstream_attempts_total",
            "Upstream attempts, one or more per call (outcome: success, 4xx, 429, 5xx, connect_error, "
            "timeout, aborted)",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "llm_fallbacks_total",
            "Calls moved from one upstream to the next (reason: the failure, or circuit_open)",
            ["from", "to", "reason"],
            registry=registry,
        )
        self.upstream_state = Gauge(
            "llm_upstream_state",
            "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open",
            ["upstream"],
            registry=registry,
        )
        self.breaker_transitions = Counter(
            "llm_circuit_breaker_transitions_total",
            "Circuit breaker state changes per upstream",
            ["upstream", "state"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "llm_auth_failures_total",
            "Calls refused with 401/403 (reason: missing, unknown, expired, model_not_allowed)",
            ["reason"],
            registry=registry,
        )
        self.canary_rollbacks = Counter(
            "llm_canary_rollbacks_total",
            "Canary candidates rolled back (by: rule or admin)",
            ["route", "by"],
            registry=registry,
        )
        self.canary_weight = Gauge(
            "llm_canary_weight_percent",
            "Share of a route's calls sent to its canary candidate (0 when rolled back)",
            ["route"],
            registry=registry,
        )
        self.state_backend_up = Gauge(
            "llm_state_backend_up",
            "1 when the shared state backend (Redis) answers, 0 while limits are counted locally",
            registry=registry,
        )
        self.state_backend_errors = Counter(
            "llm_state_backend_errors_total",
            "Failed operations on the shared state backend",
            ["operation"],
            registry=registry,
        )
        self.keys_reloads = Counter(
            "llm_keys_reloads_total",
            "Reloads of the keys file and provider secret files (outcome: success, failure)",
            ["outcome"],
            registry=registry,
        )
        self.reload_failures = Counter(
            "llm_config_reload_failures_total",
            "Reloads rejected because a file was invalid",
            ["file"],
            registry=registry,
        )

    def _model_label(self, model: str) -> str:
        model = _clip(model)
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return OVERFLOW

    def labels_for(self, record: CallRecord) -> Labels:
        """The (tenant, upstream, provider, model, route) label values of a record, capped."""
        tenant = self.tenants.label(_clip(record.tenant))
        if tenant == OVERFLOW and record.tenant != OVERFLOW:
            self.tenant_overflow.inc()
        return tenant, record.upstream, record.provider, self._model_label(record.model), record.route

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, cached: label values are capped, so the cache is bounded
        by the series the metric holds anyway, and a dict hit skips prometheus_client's lock."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: CallRecord) -> None:
        """Account one finished call."""
        labels = self.labels_for(record)
        child = self._child
        child(self.requests, (*labels, str(record.status))).inc()
        if record.error_type is not None:
            child(self.errors, (*labels, record.error_type)).inc()
        counts = record.token_counts()
        for count in counts:
            # A reported zero still creates its series: it says "reported, and zero".
            child(self.tokens, (*labels, count.type, count.source)).inc(count.count)
        if record.cost_usd is not None:
            self.cost.add(labels, record.cost_usd)
        elif counts:
            self.unpriced.labels(labels[0], labels[3]).inc()
        exemplar = {"trace_id": record.trace_id} if record.trace_id and record.trace_sampled else None
        child(self.duration, labels).observe(record.duration_s, exemplar)
        if record.ttft_s is not None:
            child(self.ttft, labels).observe(record.ttft_s, exemplar)
        self.overhead.observe(record.overhead_s)
        if record.throttled is not None:
            self.throttled.labels(labels[0], record.throttled).inc()
        if record.malformed:
            self.malformed.labels(record.upstream, record.provider).inc()
        for attempt in record.attempts:
            child(self.upstream_attempts, (attempt.upstream, attempt.outcome)).inc()
        for event in record.events:
            if event.name == "fallback":
                moved = dict(event.attributes)
                source, target = moved.get("from", ""), moved.get("to", "")
                self.fallbacks.labels(source, target, moved.get("reason", "")).inc()


class MetricsSink(QueueSink):
    """The pipeline's metrics sink: a bounded queue drained into :class:`Metrics`."""

    name = "metrics"

    def __init__(self, metrics: Metrics, maxsize: int = 10_000) -> None:
        super().__init__(maxsize=maxsize)
        self.metrics = metrics

    async def handle(self, records: list[CallRecord]) -> None:
        for record in records:
            self.metrics.observe(record)


def iter_samples(registry: CollectorRegistry, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` (tests and the demo summary)."""
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield dict(sample.labels), sample.value
