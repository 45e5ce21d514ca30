"""Tracing: settings from OTEL_* and the file, span names and attributes, and the sink's span shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from decimal import Decimal

import pytest
from blockbuster import blockbuster_ctx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from sidecar.errors import ConfigError
from sidecar.model import CallRecord, Usage
from sidecar.tracing import (
    TracingSection,
    TracingSettings,
    TracingSink,
    parse_tracing,
    resolve_tracing,
    span_attributes,
    span_name,
)
from sidecar.yamlspec import Reader

TRACE = "0af7651916cd43dd8448eb211c80319c"
BASE = CallRecord(
    request_id="req-1",
    started_at=1735689600.5,
    finished_at=1735689601.75,
    tenant="acme",
    upstream="openai",
    provider="openai",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    stream=True,
    status=200,
    error_type=None,
    request_model="gpt-4o",
    response_model="gpt-4o-2024-08-06",
    duration_s=1.25,
    ttft_s=0.25,
    overhead_s=0.001,
    usage=Usage(input=100, cached_input=40, cache_write=10, output=20, reasoning=8),
    cost_usd=Decimal("0.00045"),
    price_version="abc123",
    response_id="chatcmpl-1",
    finish_reasons=("stop",),
    service_tier="default",
    server_address="api.openai.com",
    server_port=443,
    trace_id=TRACE,
    span_id="b7ad6b7169203331",
    parent_span_id="00f067aa0ba902b7",
    trace_sampled=True,
    tracestate="vendor=opaque",
)


def rec(**changes: object) -> CallRecord:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


# -- names and attributes ------------------------------------------------------------------


def test_chat_stream_attributes() -> None:
    assert span_name(BASE) == "chat gpt-4o"
    assert span_attributes(BASE) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.request.stream": True,
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.cache_read.input_tokens": 40,
        "gen_ai.usage.cache_creation.input_tokens": 10,
        "gen_ai.usage.output_tokens": 20,
        "gen_ai.usage.reasoning.output_tokens": 8,
        "openai.api.type": "chat_completions",
        "openai.response.service_tier": "default",
        "server.address": "api.openai.com",
        "server.port": 443,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "sidecar.request_id": "req-1",
        "sidecar.tenant": "acme",
        "sidecar.upstream": "openai",
        "sidecar.status_code": 200,
        "sidecar.cost_usd": 0.00045,
        "sidecar.price_version": "abc123",
        "sidecar.tokens.source": "reported",
        "sidecar.time_to_first_token_s": 0.25,
        "sidecar.overhead_s": 0.001,
    }


def test_operations_map_to_genai_names() -> None:
    responses = span_attributes(rec(operation="responses"))
    assert (responses["gen_ai.operation.name"], responses["openai.api.type"]) == ("chat", "responses")
    anthropic = rec(
        operation="messages", provider="anthropic", request_model="claude-sonnet-4-5", stream=False
    )
    attrs = span_attributes(anthropic)
    assert span_name(anthropic) == "chat claude-sonnet-4-5"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert "openai.api.type" not in attrs
    assert "gen_ai.request.stream" not in attrs  # set only when the request streamed
    assert span_name(rec(operation="embeddings", request_model="text-embedding-3-small")) == (
        "embeddings text-embedding-3-small"
    )
    assert span_name(rec(operation="text_completion")) == "text_completion gpt-4o"
    other = rec(operation="other", provider="", method="GET", request_model=None)
    assert span_name(other) == "GET"
    assert "gen_ai.operation.name" not in span_attributes(other)


def test_failure_attributes() -> None:
    upstream = span_attributes(rec(status=503, error_type="upstream_5xx"))
    assert (upstream["error.type"], upstream["http.response.status_code"]) == ("upstream_5xx", 503)
    timeout = span_attributes(rec(status=504, error_type="timeout", usage=Usage(), cost_usd=None))
    assert timeout["error.type"] == "timeout"
    assert "http.response.status_code" not in timeout  # the 504 is the sidecar's, not the upstream's
    assert timeout["sidecar.status_code"] == 504
    assert "sidecar.tokens.source" not in timeout and "sidecar.cost_usd" not in timeout


def test_estimated_tokens_source() -> None:
    estimated = rec(usage=Usage(), estimated=Usage(input=50, output=9))
    assert span_attributes(estimated)["sidecar.tokens.source"] == "estimated"
    mixed = rec(usage=Usage(input=50), estimated=Usage(output=9))
    assert span_attributes(mixed)["sidecar.tokens.source"] == "mixed"


# -- settings --------------------------------------------------------------------------------


def test_off_unless_configured() -> None:
    settings, warnings = resolve_tracing(None, {})
    assert not settings.enabled and warnings == []
    assert settings.sample_ratio == 1.0


def test_generic_endpoint_gets_signal_path() -> None:
    settings, _ = resolve_tracing(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert settings.enabled
    assert (settings.protocol, settings.endpoint) == ("http/protobuf", "http://collector:4318/v1/traces")
    settings, _ = resolve_tracing(
        None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert (settings.protocol, settings.endpoint) == ("grpc", "http://c:4317")
    settings, _ = resolve_tracing(
        None,
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x"},
    )
    assert settings.endpoint == "https://t/x"


def test_full_environment() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "X-Team=ab%20c,x-other=1",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "gateway",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=ignored,team=ml",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_BSP_MAX_QUEUE_SIZE": "100",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    settings, warnings = resolve_tracing(None, env)
    assert warnings == []
    assert settings == TracingSettings(
        enabled=True,
        protocol="grpc",
        endpoint="http://localhost:4317",
        headers=(("x-team", "ab c"), ("x-other", "1")),
        timeout=2.5,
        compression="gzip",
        insecure=True,
        service_name="gateway",
        resource_attributes=(("deployment.environment", "prod"), ("team", "ml")),
        sampler="parentbased_traceidratio",
        sampler_arg=0.25,
        queue_size=100,
        batch_size=10,
        schedule_delay=0.2,
    )
    assert settings.sample_ratio == 0.25


def test_disabled_and_bad_values_warn() -> None:
    off, _ = resolve_tracing(
        None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert not off.enabled
    off, _ = resolve_tracing(
        None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}
    )
    assert not off.enabled
    settings, warnings = resolve_tracing(
        None,
        {
            "OTEL_TRACES_EXPORTER": "zipkin,otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "soon",
            "OTEL_TRACES_SAMPLER": "always_off",
            "OTEL_TRACES_SAMPLER_ARG": "7",
            "OTEL_BSP_MAX_QUEUE_SIZE": "-1",
            "OTEL_EXPORTER_OTLP_HEADERS": "novalue,a=b",
        },
    )
    assert settings.enabled and settings.protocol == "http/protobuf" and settings.timeout == 10.0
    assert settings.sampler == "parentbased_always_off" and settings.sample_ratio == 0.0
    assert settings.headers == (("a", "b"),)
    assert len(warnings) == 7, warnings


def test_file_section_wins_key_by_key() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318", "OTEL_SERVICE_NAME": "env-name"}
    section = TracingSection(service_name="file-name", timeout=3.0, headers=(("k", "v"),))
    settings, _ = resolve_tracing(section, env)
    assert settings.endpoint == "http://env:4318/v1/traces"
    assert (settings.service_name, settings.timeout, settings.headers) == ("file-name", 3.0, (("k", "v"),))
    settings, _ = resolve_tracing(TracingSection(enabled=False), env)
    assert not settings.enabled
    settings, _ = resolve_tracing(TracingSection(endpoint="http://file:4318/v1/traces"), {})
    assert settings.enabled and settings.endpoint == "http://file:4318/v1/traces"


class _Ctx:
    def path(self, text: str) -> object:
        from pathlib import Path

        return Path("/etc/sidecar") / text


def _parse(text: str) -> TracingSection:
    r = Reader("c.yaml")
    node = r.compose(text)
    assert node is not None
    section = parse_tracing(r, node, "tracing", _Ctx())  # type: ignore[arg-type]
    r.raise_for_problems()
    return section


def test_parse_section() -> None:
    section = _parse(
        "protocol: grpc\nendpoint: http://c:4317\nheaders: {X-Key: abc}\ntimeout: 2s\ncertificate: ca.pem\n"
        "resource_attributes: {team: ml}\nsampler: parentbased_traceidratio\nsampler_arg: 0.5\n"
        "queue_size: 10\n"
    )
    assert section == TracingSection(
        protocol="grpc",
        endpoint="http://c:4317",
        headers=(("x-key", "abc"),),
        timeout=2.0,
        certificate="/etc/sidecar/ca.pem",
        resource_attributes=(("team", "ml"),),
        sampler="parentbased_traceidratio",
        sampler_arg=0.5,
        queue_size=10,
    )
    with pytest.raises(ConfigError) as info:
        _parse("protocol: http/json\nendpoint: collector:4317\nsampler_arg: 2\nqueue_size: 0\nbogus: 1\n")
    assert sorted(p.field for p in info.value.problems) == [
        "tracing.bogus",
        "tracing.endpoint",
        "tracing.protocol",
        "tracing.queue_size",
        "tracing.sampler_arg",
    ]


# -- the sink with the SDK's in-memory exporter ----------------------------------------------


@pytest.fixture
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


@pytest.mark.usefixtures("no_blocking_calls")
async def test_sink_builds_the_span_from_the_record() -> None:
    exporter = InMemorySpanExporter()
    registry = CollectorRegistry()
    sink = TracingSink(TracingSettings(service_name="sc"), registry, exporter=exporter)
    await sink.start()
    assert sink.offer(BASE)
    assert sink.offer(rec(request_id="unsampled", trace_sampled=False))
    assert sink.offer(rec(request_id="no-context", trace_id=None, span_id=None))
    root = rec(request_id="root", span_id="1111111111111111", parent_span_id=None, tracestate=None)
    assert sink.offer(root)
    failed = rec(request_id="failed", span_id="2222222222222222", status=502, error_type="connect_error")
    assert sink.offer(failed)
    await sink.stop(5.0)

    spans = {
        str((span.attributes or {})["sidecar.request_id"]): span for span in exporter.get_finished_spans()
    }
    assert sorted(spans) == ["failed", "req-1", "root"]
    span = spans["req-1"]
    assert span.name == "chat gpt-4o"
    assert span.kind is SpanKind.CLIENT
    assert span.context.trace_id == int(TRACE, 16) and span.context.span_id == 0xB7AD6B7169203331
    assert span.parent is not None and span.parent.span_id == 0x00F067AA0BA902B7 and span.parent.is_remote
    assert span.context.trace_state.to_header() == "vendor=opaque"
    assert (span.start_time, span.end_time) == (1735689600_500000000, 1735689601_750000000)
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "sc"
    assert spans["root"].parent is None
    assert spans["failed"].status.status_code is StatusCode.ERROR
    assert spans["failed"].status.description == "connect_error"
    assert sink.exported == 3 and sink.skipped == 2
    assert registry.get_sample_value("llm_spans_exported_total") == 3
    assert registry.get_sample_value("llm_spans_dropped_total", {"reason": "queue_full"}) == 0


async def test_disabled_sink_accepts_and_does_nothing() -> None:
    sink = TracingSink(TracingSettings(enabled=False))
    await sink.start()
    assert sink.offer(BASE)
    await sink.stop(1.0)
    assert sink.exported == 0


def test_gateway_decisions_become_span_events_and_attributes() -> None:
    from opentelemetry.sdk.resources import Resource

    from sidecar.model import GatewayEvent, UpstreamAttempt
    from sidecar.tracing import span_attributes, to_span

    record = rec(
        route="chat",
        variant="candidate",
        attempts=(UpstreamAttempt("a", "5xx", 0.0, 0.1), UpstreamAttempt("b", "success", 0.1, 0.2)),
        events=(GatewayEvent("fallback", 0.1, (("from", "a"), ("to", "b"), ("reason", "5xx"))),),
    )
    attrs = span_attributes(record)
    assert attrs["sidecar.route"] == "chat" and attrs["sidecar.variant"] == "candidate"
    assert attrs["sidecar.attempts"] == 2 and attrs["sidecar.attempted_upstreams"] == ["a", "b"]
    span = to_span(record, Resource({}))
    [event] = span.events
    assert event.name == "sidecar.fallback"
    assert dict(event.attributes or {}) == {"from": "a", "to": "b", "reason": "5xx"}
    assert event.timestamp == span.start_time + 100_000_000  # 0.1 s after the call started
    assert "sidecar.route" not in span_attributes(BASE) and not to_span(BASE, Resource({})).events
