"""Prometheus metrics of proxied calls: the contract that dashboards and rules build on.

Adapter over ``prometheus_client``; the registry is passed in (tests use a fresh
``CollectorRegistry()``). :class:`Metrics` owns the metric objects; :class:`MetricsSink`
turns each finished :class:`~sidecar.model.CallRecord` into counter and histogram
updates from the pipeline's queue, off the request path. Only ``llm_inflight_requests``
is updated on the request path itself (a gauge must be live): a plain integer per
upstream (:class:`Cell`), read at scrape time.

Cost is accumulated as exact ``Decimal`` per label set and converted to a float only
when scraped, so it equals the ledger's sum.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from sidecar.model import TOKEN_TYPES, CallRecord
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


class _Counter:
    """A labelled counter kept as plain numbers: ``values[labels]`` and when each series began.

    Written only by :meth:`Metrics.observe` (on the event loop); read at scrape time.
    """

    __slots__ = ("created", "doc", "labelnames", "name", "values")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        value = self.values.get(labels)
        if value is None:
            self.created[labels] = time.time()
            self.values[labels] = amount
        else:
            self.values[labels] = value + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        created = self.created
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value, created=created.get(labels))
        return family


class Cell:
    """One series of a :class:`_Gauge`: its ``value``, changed in place by its one writer."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _Gauge:
    """A labelled gauge kept as plain numbers (see :class:`_Counter`): :meth:`labels` gives
    the series' :class:`Cell`, which the event loop adds to and subtracts from.

    ``prometheus_client.Gauge`` takes a lock and checks its labels on every ``inc`` and
    ``dec``; ``llm_inflight_requests`` changes twice per call on the request path, and only
    ever on the event loop.
    """

    __slots__ = ("cells", "doc", "labelnames", "name")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.cells: dict[tuple[str, ...], Cell] = {}

    def labels(self, *values: str) -> Cell:
        """The series of these label values (created at 0 on first use)."""
        cell = self.cells.get(values)
        if cell is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, got {len(values)}")
            cell = self.cells[values] = Cell()
        return cell

    def family(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        for labels, cell in list(self.cells.items()):
            family.add_metric(labels, float(cell.value))
        return family


class _Series:
    """One histogram series: a count per bucket (not cumulative), the sum, the last exemplar per bucket."""

    __slots__ = ("counts", "created", "exemplars", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0
        self.exemplars: list[tuple[str, float, float] | None] = [None] * size
        self.created = time.time()


class _Histogram:
    """A labelled histogram kept as plain numbers (see :class:`_Counter`), exposed as
    ``prometheus_client.Histogram`` exposes it: cumulative buckets, ``_count``, ``_sum``,
    ``_created``, and a ``trace_id`` exemplar on the bucket of the last sampled call."""

    __slots__ = ("bounds", "doc", "labelnames", "les", "name", "series")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.bounds = (*(float(b) for b in buckets), math.inf)
        self.les = tuple(floatToGoString(b) for b in self.bounds)  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], _Series] = {}

    def observe(self, labels: tuple[str, ...], amount: float, trace_id: str | None = None) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = _Series(len(self.bounds))
        # The first bucket whose upper bound is >= amount (prometheus_client's "le"); the
        # amounts are durations, finite and not negative.
        index = bisect_left(self.bounds, amount)
        series.counts[index] += 1
        series.total += amount
        if trace_id is not None:
            series.exemplars[index] = (trace_id, amount, time.time())

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = self.les
        for labels, series in list(self.series.items()):
            buckets: list[Any] = []
            running = 0
            for le, count, exemplar in zip(les, list(series.counts), list(series.exemplars), strict=True):
                running += count
                if exemplar is None:
                    buckets.append((le, float(running)))
                else:
                    trace_id, value, at = exemplar
                    buckets.append((le, float(running), Exemplar({"trace_id": trace_id}, value, at)))
            family.add_metric(labels, buckets, series.total)
            family.samples.append(
                Sample(
                    f"{self.name}_created", dict(zip(self.labelnames, labels, strict=True)), series.created
                )
            )
        return family


class _CallCollector(Collector):
    """The per-call counters and histograms of :class:`Metrics`, built at scrape time.

    ``prometheus_client``'s own metric objects take a lock on every increment and walk
    their buckets in Python; the sidecar updates these from one thread (the event
    loop, through :class:`MetricsSink`), so plain dicts do, and the exposition is the
    same text.
    """

    def __init__(self, metrics: Sequence[_Counter | _Histogram | _Gauge]) -> None:
        self.metrics = tuple(metrics)

    def collect(self) -> Iterable[Metric]:
        for metric in self.metrics:
            yield metric.family()

    def describe(self) -> Iterable[Metric]:
        for metric in self.metrics:
            if isinstance(metric, _Counter):
                yield CounterMetricFamily(metric.name, metric.doc, labels=metric.labelnames)
            elif isinstance(metric, _Gauge):
                yield GaugeMetricFamily(metric.name, metric.doc, labels=metric.labelnames)
            else:
                yield HistogramMetricFamily(metric.name, metric.doc, labels=metric.labelnames)


class Metrics:
    """Every metric of the proxy core, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, max_tenants: int = 1000) -> None:
        self.registry = registry
        self.tenants = TenantCap(max_tenants)
        self._models: set[str] = set()
        self.requests = _Counter(
            "llm_requests",
            "Finished client calls, by the HTTP status the client got (499: client abort)",
            [*CALL_LABELS, "code"],
        )
        self.errors = _Counter("llm_errors", "Failed calls by error type", [*CALL_LABELS, "error_type"])
        self.tokens = _Counter(
            "llm_tokens",
            "Tokens by normalised type, reported by the provider or estimated locally",
            [*CALL_LABELS, "type", "source"],
        )
        self.duration = _Histogram(
            "llm_request_duration_seconds",
            "Time from the client's request to the end of the response",
            CALL_LABELS,
            LATENCY_BUCKETS,
        )
        self.ttft = _Histogram(
            "llm_time_to_first_token_seconds",
            "Streams: time from the request to the first event carrying generated content",
            CALL_LABELS,
            LATENCY_BUCKETS,
        )
        self.overhead = _Histogram(
            "llm_proxy_overhead_seconds",
            "Time spent in the sidecar itself, not waiting on the upstream or the client",
            (),
            OVERHEAD_BUCKETS,
        )
        self.overhead.series[()] = _Series(len(self.overhead.bounds))  # exposed from the start
        self.upstream_attempts = _Counter(
            "llm_upstream_attempts",
            "Upstream attempts, one or more per call (outcome: success, 4xx, 429, 5xx, connect_error, "
            "timeout, aborted)",
            ["upstream", "outcome"],
        )
        registry.register(
            _CallCollector((self.requests, self.errors, self.tokens, self.duration, self.ttft, self.overhead))
        )
        self.cost = _CostCollector()
        registry.register(self.cost)
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
        self.inflight = _Gauge("llm_inflight_requests", "Calls in flight", ["upstream"])
        registry.register(_CallCollector((self.inflight,)))
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
        registry.register(_CallCollector((self.upstream_attempts,)))
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

    def observe(self, record: CallRecord) -> None:
        """Account one finished call."""
        labels = self.labels_for(record)
        self.requests.inc((*labels, str(record.status)))
        if record.error_type is not None:
            self.errors.inc((*labels, record.error_type))
        # Each token type with a count, reported where reported, else estimated (what
        # CallRecord.token_counts gives, without building its objects). A reported zero
        # still creates its series: it says "reported, and zero".
        usage, estimated = record.usage, record.estimated
        tokens = self.tokens
        counted = False
        for token_type in TOKEN_TYPES:
            count = getattr(usage, token_type)
            if count is not None:
                tokens.inc((*labels, token_type, "reported"), count)
                counted = True
                continue
            count = getattr(estimated, token_type)
            if count is not None:
                tokens.inc((*labels, token_type, "estimated"), count)
                counted = True
        if record.cost_usd is not None:
            self.cost.add(labels, record.cost_usd)
        elif counted:
            self.unpriced.labels(labels[0], labels[3]).inc()
        trace_id = record.trace_id if record.trace_id and record.trace_sampled else None
        self.duration.observe(labels, record.duration_s, trace_id)
        if record.ttft_s is not None:
            self.ttft.observe(labels, record.ttft_s, trace_id)
        self.overhead.observe((), record.overhead_s)
        if record.throttled is not None:
            self.throttled.labels(labels[0], record.throttled).inc()
        if record.malformed:
            self.malformed.labels(record.upstream, record.provider).inc()
        for attempt in record.attempts:
            self.upstream_attempts.inc((attempt.upstream, attempt.outcome))
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
        observe = self.metrics.observe
        async for part in self.slices(records):
            for record in part:
                observe(record)


def iter_samples(registry: CollectorRegistry, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample called ``name`` (tests and the demo summary)."""
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield dict(sample.labels), sample.value
