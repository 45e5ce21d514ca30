"""The per-call metrics are plain-number counters, histograms and gauges (sidecar.metrics): they
must expose exactly what prometheus_client's own Counter, Histogram and Gauge expose for the same
observations, in both exposition formats, since dashboards and rules read that text."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as _generate_openmetrics

from sidecar.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS, _CallCollector, _Counter, _Gauge, _Histogram

# Every bucket edge exactly (le is inclusive), values between edges, beyond the last, and zero.
EDGES = [0.0, *OVERHEAD_BUCKETS, *LATENCY_BUCKETS]
AMOUNTS = [*EDGES, *(b * 1.0001 for b in EDGES), *(b * 0.9999 for b in EDGES), 1e-9, 599.0, 601.0, 1e6]


def generate_openmetrics(registry: CollectorRegistry) -> bytes:
    return _generate_openmetrics(registry)  # type: ignore[no-untyped-call,no-any-return]


def normalise(text: str) -> list[str]:
    """Exposition lines with the wall-clock parts (``_created`` values, exemplar times) blanked."""
    text = re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 T", text)
    text = re.sub(r'(# \{trace_id="[0-9a-f]+"\} \S+) \S+', r"\1 T", text)
    return sorted(text.splitlines())


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, OVERHEAD_BUCKETS])
def test_histogram_exposes_what_prometheus_client_exposes(buckets: tuple[float, ...]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["tenant"], buckets=buckets, registry=theirs)
    histogram = _Histogram("h_seconds", "doc", ["tenant"], buckets)
    ours.register(_CallCollector((histogram,)))
    for i, amount in enumerate(AMOUNTS):
        tenant = ("a", "b")[i % 2]
        trace_id = f"{i:032x}" if i % 3 == 0 else None
        reference.labels(tenant).observe(amount, {"trace_id": trace_id} if trace_id else None)
        histogram.observe((tenant,), amount, trace_id)
    assert normalise(generate_latest(ours).decode()) == normalise(generate_latest(theirs).decode())
    assert normalise(generate_openmetrics(ours).decode()) == normalise(generate_openmetrics(theirs).decode())


def test_counter_exposes_what_prometheus_client_exposes() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("c", "doc", ["tenant", "code"], registry=theirs)
    counter = _Counter("c", "doc", ["tenant", "code"])
    ours.register(_CallCollector((counter,)))
    for i in range(50):
        labels = (f"t{i % 4}", ("200", "429", "500")[i % 3])
        reference.labels(*labels).inc(i % 7)  # zero increments still create their series
        counter.inc(labels, i % 7)
    assert normalise(generate_latest(ours).decode()) == normalise(generate_latest(theirs).decode())
    assert normalise(generate_openmetrics(ours).decode()) == normalise(generate_openmetrics(theirs).decode())


def test_gauge_exposes_what_prometheus_client_exposes() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Gauge("llm_inflight_requests", "doc", ["upstream"], registry=theirs)
    gauge = _Gauge("llm_inflight_requests", "doc", ["upstream"])
    ours.register(_CallCollector((gauge,)))
    for i in range(60):  # up by two and down by one, on three series; one series back at zero
        upstream = ("a", "b", "c")[i % 3]
        if upstream == "c" and i % 2:
            reference.labels(upstream).dec()
            gauge.labels(upstream).value -= 1
        else:
            reference.labels(upstream).inc(2 if upstream != "c" else 1)
            gauge.labels(upstream).value += 2 if upstream != "c" else 1
    assert gauge.labels("c").value == 0 and gauge.labels("a").value == 40
    assert normalise(generate_latest(ours).decode()) == normalise(generate_latest(theirs).decode())
    assert normalise(generate_openmetrics(ours).decode()) == normalise(generate_openmetrics(theirs).decode())


def test_gauge_refuses_the_wrong_number_of_label_values() -> None:
    gauge = _Gauge("g", "doc", ["upstream"])
    with pytest.raises(ValueError, match="g takes 1 label values, got 2"):
        gauge.labels("a", "b")
    assert gauge.cells == {}


def test_empty_metrics_still_have_their_help_and_type() -> None:
    registry = CollectorRegistry()
    metrics = (_Counter("c", "doc", ["x"]), _Histogram("h", "doc", ["x"], (1.0,)), _Gauge("g", "doc", ["x"]))
    registry.register(_CallCollector(metrics))
    text = generate_latest(registry).decode()
    assert "# TYPE c_total counter" in text
    assert "# TYPE h histogram" in text
    assert "# TYPE g gauge" in text
