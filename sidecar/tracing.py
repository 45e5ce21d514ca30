"""OpenTelemetry traces: one CLIENT span per proxied call, built from the finished record.

The proxy decides the trace context when a call starts (:mod:`sidecar.tracecontext`:
the client's ``traceparent`` continued, a new span id, parent-based ratio sampling)
and sends ``traceparent`` upstream; the finished :class:`~sidecar.model.CallRecord`
carries those ids and times. This module turns the record into a span after the
fact, with the same ids, so a trace reads client → sidecar → upstream:

- :func:`span_name` and :func:`span_attributes` are pure: names and attributes per
  the OpenTelemetry GenAI semantic conventions (v1.41; see ``docs/observability.md``
  for the table), plus ``sidecar.*`` attributes of our own;
- :func:`to_span` builds an SDK ``ReadableSpan`` (kind CLIENT, parent = the
  client's span, start and end in ns, status ERROR with ``error.type`` on failure);
- :class:`TracingSink` hands spans to a ``BatchSpanProcessor`` (its own thread,
  a bounded queue) exporting with OTLP over gRPC or HTTP/protobuf.

:meth:`TracingSink.offer` never waits: it builds the span (a few microseconds) and
appends it to the processor's queue. The number of spans not yet exported is
bounded by ``queue_size``; past it a span is dropped and counted
(``llm_spans_dropped_total{reason="queue_full"}``), as are spans whose export
failed (``reason="export_failed"``: collector down, refusing or too slow for the
export timeout) and spans still queued when shutdown ran out of time
(``reason="shutdown"``).

Configuration comes from the standard ``OTEL_*`` environment variables and the
config file's ``tracing`` section (the file wins key by key); see
:func:`resolve_tracing`. Tracing is off unless an endpoint or
``OTEL_TRACES_EXPORTER=otlp`` or ``tracing.enabled: true`` says otherwise.

Imports the OpenTelemetry SDK; the OTLP exporters (and grpc) are imported only
when the sink starts, so reading the config stays light.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import AttributeValue
from opentelemetry.version import __version__ as otel_sdk_version
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from yaml.nodes import Node

from sidecar import __version__
from sidecar.calllog import tokens_source
from sidecar.model import CallRecord
from sidecar.yamlspec import Reader, join

__all__ = [
    "DROP_REASONS",
    "PROTOCOLS",
    "SAMPLERS",
    "TracingSection",
    "TracingSettings",
    "TracingSink",
    "build_resource",
    "operation_name",
    "parse_tracing",
    "resolve_tracing",
    "span_attributes",
    "span_name",
    "to_span",
]

log = logging.getLogger("sidecar.tracing")

#: OTLP transports supported (``http/json`` is not).
PROTOCOLS: tuple[str, ...] = ("grpc", "http/protobuf")
#: ``OTEL_TRACES_SAMPLER`` values understood. The proxy samples parent-based, so the
#: non-parent-based ones are read as their parent-based counterparts (with a warning).
SAMPLERS: tuple[str, ...] = (
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
    "always_on",
    "always_off",
    "traceidratio",
)
#: Reasons a span can be dropped, the values of ``llm_spans_dropped_total{reason}``.
DROP_REASONS: tuple[str, ...] = ("queue_full", "export_failed", "shutdown", "invalid")

SERVICE_NAME = "llm-sidecar"
_DEFAULT_HTTP_ENDPOINT = "http://localhost:4318/v1/traces"
_DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"

# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class TracingSettings:
    """Everything the tracing sink needs, resolved from the environment and the config file.

    ``endpoint`` is the full URL of the traces endpoint for ``http/protobuf``
    (``http://collector:4318/v1/traces``) and the collector's address for ``grpc``
    (``http://collector:4317``; ``https`` or ``insecure: false`` for TLS).
    Durations are seconds.
    """

    enabled: bool = False
    protocol: str = "http/protobuf"
    endpoint: str = _DEFAULT_HTTP_ENDPOINT
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    compression: str = "none"
    insecure: bool | None = None
    certificate: str | None = None
    service_name: str = SERVICE_NAME
    resource_attributes: tuple[tuple[str, str], ...] = ()
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    queue_size: int = 2048
    batch_size: int = 512
    schedule_delay: float = 5.0

    @property
    def sample_ratio(self) -> float:
        """The fraction of new traces (no sampled parent decision) to sample: pass it to the proxy."""
        if self.sampler.endswith("always_on"):
            return 1.0
        if self.sampler.endswith("always_off"):
            return 0.0
        return self.sampler_arg


@dataclass(frozen=True)
class TracingSection:
    """The config file's ``tracing`` section as written: ``None`` means "not set in the file"."""

    enabled: bool | None = None
    protocol: str | None = None
    endpoint: str | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    timeout: float | None = None
    compression: str | None = None
    insecure: bool | None = None
    certificate: str | None = None
    service_name: str | None = None
    resource_attributes: tuple[tuple[str, str], ...] | None = None
    sampler: str | None = None
    sampler_arg: float | None = None
    queue_size: int | None = None
    batch_size: int | None = None
    schedule_delay: float | None = None


class _PathContext(Protocol):
    def path(self, text: str) -> Path: ...


_TRACING_KEYS = tuple(TracingSection.__dataclass_fields__)


def _string_map(r: Reader, node: Node | None, path: str) -> tuple[tuple[str, str], ...] | None:
    if node is None:
        return None
    out: list[tuple[str, str]] = []
    for key, _key_node, value_node in r.entries(node, path) or []:
        value = r.string(value_node, join(path, key), allow_empty=True)
        if value is not None:
            out.append((key, value))
    return tuple(out)


def parse_tracing(r: Reader, node: Node, path: str, ctx: _PathContext | None = None) -> TracingSection:
    """Parse the ``tracing`` section; every problem is recorded on ``r`` with its location.

    ``certificate`` is resolved against the config file's directory through ``ctx``
    (the config loader's parse context).
    """
    m = r.mapping(node, path, _TRACING_KEYS)
    if m is None:
        return TracingSection()

    def at(key: str) -> tuple[Node | None, str]:
        return m.get(key), join(path, key)

    certificate = r.string(*at("certificate"))
    if certificate is not None and ctx is not None:
        certificate = str(ctx.path(certificate))
    sampler_arg = r.number(*at("sampler_arg"))
    if sampler_arg is not None and not 0.0 <= sampler_arg <= 1.0:
        r.problem(
            m.get("sampler_arg"), join(path, "sampler_arg"), f"must be between 0 and 1, got {sampler_arg}"
        )
        sampler_arg = None
    endpoint = r.convert(*at("endpoint"), _check_endpoint, what="endpoint")
    headers = _string_map(r, *at("headers"))
    return TracingSection(
        enabled=r.boolean(*at("enabled")),
        protocol=r.string(*at("protocol"), choices=PROTOCOLS),
        endpoint=endpoint,
        headers=tuple((k.lower(), v) for k, v in headers) if headers is not None else None,
        timeout=r.duration(*at("timeout"), positive=True),
        compression=r.string(*at("compression"), choices=("none", "gzip")),
        insecure=r.boolean(*at("insecure")),
        certificate=certificate,
        service_name=r.string(*at("service_name")),
        resource_attributes=_string_map(r, *at("resource_attributes")),
        sampler=r.string(*at("sampler"), choices=SAMPLERS),
        sampler_arg=sampler_arg,
        queue_size=r.integer(*at("queue_size"), minimum=1),
        batch_size=r.integer(*at("batch_size"), minimum=1),
        schedule_delay=r.duration(*at("schedule_delay"), positive=True),
    )


def _check_endpoint(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return text


def _pairs(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``k1=v1,k2=v2`` (values percent-decoded) as pairs, and the members that were malformed."""
    pairs: list[tuple[str, str]] = []
    bad: list[str] = []
    for member in text.split(","):
        if not member.strip():
            continue
        key, sep, value = member.partition("=")
        if not sep or not key.strip():
            bad.append(member.strip())
            continue
        pairs.append((unquote(key.strip()), unquote(value.strip())))
    return pairs, bad


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def resolve_tracing(
    section: TracingSection | None, env: Mapping[str, str]
) -> tuple[TracingSettings, list[str]]:
    """Merge the ``OTEL_*`` environment and the file's section (the file wins) into settings.

    Returns the settings and a list of warnings about environment values that were
    malformed or unsupported (each then falls back to its default, as the
    OpenTelemetry SDK does); the caller logs them. Pure: reads ``env`` only.

    Environment variables read: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``,
    ``OTEL_EXPORTER_OTLP[_TRACES]_{PROTOCOL,ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,
    INSECURE,CERTIFICATE}``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_{MAX_QUEUE_SIZE,MAX_EXPORT_BATCH_SIZE,
    SCHEDULE_DELAY}``. Timeouts and delays in the environment are milliseconds, as
    the specification says.
    """
    s = section or TracingSection()
    warnings: list[str] = []
    d = TracingSettings()

    def signal(suffix: str) -> tuple[str, str] | None:
        return _first(env, f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}")

    def env_bool(suffix: str) -> bool | None:
        found = signal(suffix)
        if found is None:
            return None
        if found[1].lower() not in ("true", "false"):
            warnings.append(f"{found[0]}={found[1]!r} is not true or false: ignored")
            return None
        return found[1].lower() == "true"

    def env_int(name: str, minimum: int) -> int | None:
        found = _first(env, name)
        if found is None:
            return None
        try:
            value = int(found[1])
        except ValueError:
            value = minimum - 1
        if value < minimum:
            warnings.append(f"{name}={found[1]!r} is not an integer >= {minimum}: ignored")
            return None
        return value

    def env_ms(found: tuple[str, str] | None) -> float | None:
        if found is None:
            return None
        try:
            value = float(found[1])
        except ValueError:
            value = -1.0
        if not math.isfinite(value) or value <= 0:
            warnings.append(f"{found[0]}={found[1]!r} is not a positive number of milliseconds: ignored")
            return None
        return value / 1000

    # On or off.
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    unsupported = exporters - {"otlp", "none"}
    if unsupported:
        warnings.append(
            f"OTEL_TRACES_EXPORTER: only otlp is supported, ignoring {', '.join(sorted(unsupported))}"
        )
    env_disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporters == {"none"}
    env_endpoint = signal("ENDPOINT")
    env_on = "otlp" in exporters or env_endpoint is not None
    env_enabled = (env_on or s.endpoint is not None) and not env_disabled
    enabled = s.enabled if s.enabled is not None else env_enabled

    # Protocol and endpoint.
    protocol = s.protocol
    if protocol is None:
        found = signal("PROTOCOL")
        if found is not None and found[1] not in PROTOCOLS:
            warnings.append(
                f"{found[0]}={found[1]!r} is not supported (grpc or http/protobuf): using {d.protocol}"
            )
        elif found is not None:
            protocol = found[1]
    protocol = protocol or d.protocol
    endpoint = s.endpoint
    if endpoint is None:
        specific = _first(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        generic = _first(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if specific is not None:
            endpoint = specific[1]
        elif generic is not None:
            # The generic endpoint is a base URL: HTTP appends the signal's path.
            endpoint = generic[1] if protocol == "grpc" else generic[1].rstrip("/") + "/v1/traces"
        source = specific or generic
        if endpoint is not None and source is not None:
            try:
                _check_endpoint(endpoint)
            except ValueError as exc:
                warnings.append(f"{source[0]}={source[1]!r}: {exc}: using the default")
                endpoint = None
    if endpoint is None:
        endpoint = _DEFAULT_GRPC_ENDPOINT if protocol == "grpc" else _DEFAULT_HTTP_ENDPOINT

    headers = s.headers
    if headers is None:
        found = signal("HEADERS")
        if found is not None:
            pairs, bad = _pairs(found[1])
            if bad:
                warnings.append(f"{found[0]}: malformed members ignored: {', '.join(bad)}")
            headers = tuple((k.lower(), v) for k, v in pairs)
    compression = s.compression
    if compression is None:
        found = signal("COMPRESSION")
        if found is not None and found[1].lower() not in ("gzip", "none"):
            warnings.append(f"{found[0]}={found[1]!r} is not supported (gzip or none): using none")
        elif found is not None:
            compression = found[1].lower()
    certificate = s.certificate
    if certificate is None:
        found = signal("CERTIFICATE")
        certificate = found[1] if found is not None else None

    # Resource.
    resource: dict[str, str] = {}
    found = _first(env, "OTEL_RESOURCE_ATTRIBUTES")
    if found is not None:
        pairs, bad = _pairs(found[1])
        if bad:
            warnings.append(f"OTEL_RESOURCE_ATTRIBUTES: malformed members ignored: {', '.join(bad)}")
        resource.update(pairs)
    resource.update(s.resource_attributes or ())
    service_name = s.service_name
    if service_name is None:
        found = _first(env, "OTEL_SERVICE_NAME")
        service_name = found[1] if found is not None else resource.get("service.name", d.service_name)
    resource.pop("service.name", None)

    # Sampler.
    sampler = s.sampler
    if sampler is None:
        found = _first(env, "OTEL_TRACES_SAMPLER")
        if found is not None and found[1] not in SAMPLERS:
            warnings.append(f"OTEL_TRACES_SAMPLER={found[1]!r} is not supported: using {d.sampler}")
        elif found is not None:
            sampler = found[1]
    sampler = sampler or d.sampler
    if not sampler.startswith("parentbased_"):
        warnings.append(
            f"sampler {sampler} is applied parent-based (parentbased_{sampler}): the sidecar continues "
            "its client's sampling decision"
        )
        sampler = f"parentbased_{sampler}"
    sampler_arg = s.sampler_arg
    if sampler_arg is None:
        found = _first(env, "OTEL_TRACES_SAMPLER_ARG")
        if found is not None:
            try:
                sampler_arg = float(found[1])
            except ValueError:
                sampler_arg = -1.0
            if not 0.0 <= sampler_arg <= 1.0:
                warnings.append(f"OTEL_TRACES_SAMPLER_ARG={found[1]!r} is not between 0 and 1: using 1.0")
                sampler_arg = None

    settings = TracingSettings(
        enabled=enabled,
        protocol=protocol,
        endpoint=endpoint,
        headers=headers if headers is not None else d.headers,
        timeout=s.timeout or env_ms(signal("TIMEOUT")) or d.timeout,
        compression=compression or d.compression,
        insecure=s.insecure if s.insecure is not None else env_bool("INSECURE"),
        certificate=certificate,
        service_name=service_name,
        resource_attributes=tuple(sorted(resource.items())),
        sampler=sampler,
        sampler_arg=sampler_arg if sampler_arg is not None else d.sampler_arg,
        queue_size=s.queue_size or env_int("OTEL_BSP_MAX_QUEUE_SIZE", 1) or d.queue_size,
        batch_size=s.batch_size or env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1) or d.batch_size,
        schedule_delay=s.schedule_delay or env_ms(_first(env, "OTEL_BSP_SCHEDULE_DELAY")) or d.schedule_delay,
    )
    if settings.batch_size > settings.queue_size:
        warnings.append(
            f"batch size {settings.batch_size} exceeds the queue size {settings.queue_size}: "
            f"using {settings.queue_size}"
        )
        settings = dataclasses.replace(settings, batch_size=settings.queue_size)
    return settings, warnings


# -- pure: record → name and attributes -------------------------------------------------

#: ``CallRecord.operation`` → ``gen_ai.operation.name``. The Responses API and
#: Anthropic Messages are chat operations (OpenAI's ``openai.api.type`` tells the
#: two OpenAI APIs apart); other paths have no GenAI operation.
_OPERATIONS: dict[str, str] = {
    "chat": "chat",
    "text_completion": "text_completion",
    "responses": "chat",
    "embeddings": "embeddings",
    "messages": "chat",
}
_OPENAI_API_TYPES: dict[str, str] = {"chat": "chat_completions", "responses": "responses"}
#: Token types → GenAI usage attributes.
_USAGE_ATTRIBUTES: dict[str, str] = {
    "input": "gen_ai.usage.input_tokens",
    "output": "gen_ai.usage.output_tokens",
    "cached_input": "gen_ai.usage.cache_read.input_tokens",
    "cache_write": "gen_ai.usage.cache_creation.input_tokens",
    "reasoning": "gen_ai.usage.reasoning.output_tokens",
}
#: Failures with no HTTP response from the upstream (the status is the sidecar's own).
_NO_UPSTREAM_RESPONSE = frozenset({"connect_error", "timeout", "client_abort", "proxy_error"})


def operation_name(record: CallRecord) -> str | None:
    """The ``gen_ai.operation.name`` of a call, or ``None`` for a path with no known API shape."""
    return _OPERATIONS.get(record.operation)


def span_name(record: CallRecord) -> str:
    """``{gen_ai.operation.name} {gen_ai.request.model}``; the HTTP method for other paths."""
    operation = operation_name(record)
    if operation is None:
        return record.method or "HTTP"
    model = record.request_model or record.response_model
    return f"{operation} {model}" if model else operation


def span_attributes(record: CallRecord) -> dict[str, AttributeValue]:
    """The span's attributes (GenAI semantic conventions v1.41 plus ``sidecar.*``)."""
    attrs: dict[str, AttributeValue] = {}
    operation = operation_name(record)
    if operation is not None:
        attrs["gen_ai.operation.name"] = operation
    if record.provider:
        attrs["gen_ai.provider.name"] = record.provider
    if record.request_model:
        attrs["gen_ai.request.model"] = record.request_model
    if record.stream:
        attrs["gen_ai.request.stream"] = True  # set if and only if the request streamed
    if record.response_model:
        attrs["gen_ai.response.model"] = record.response_model
    if record.response_id:
        attrs["gen_ai.response.id"] = record.response_id
    if record.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = list(record.finish_reasons)
    for count in record.token_counts():
        attrs[_USAGE_ATTRIBUTES[count.type]] = count.count
    if record.provider == "openai":
        api_type = _OPENAI_API_TYPES.get(record.operation)
        if api_type is not None:
            attrs["openai.api.type"] = api_type
        if record.service_tier:
            attrs["openai.response.service_tier"] = record.service_tier
    if record.server_address:
        attrs["server.address"] = record.server_address
        if record.server_port:
            attrs["server.port"] = record.server_port
    if record.method:
        attrs["http.request.method"] = record.method
    if record.status and record.error_type not in _NO_UPSTREAM_RESPONSE:
        attrs["http.response.status_code"] = record.status
    if record.error_type is not None:
        attrs["error.type"] = record.error_type
    attrs["sidecar.request_id"] = record.request_id
    attrs["sidecar.tenant"] = record.tenant
    attrs["sidecar.upstream"] = record.upstream
    attrs["sidecar.status_code"] = record.status
    if record.cost_usd is not None:
        attrs["sidecar.cost_usd"] = float(record.cost_usd)
    if record.price_version:
        attrs["sidecar.price_version"] = record.price_version
    source = tokens_source(record)
    if source is not None:
        attrs["sidecar.tokens.source"] = source
    if record.ttft_s is not None:
        attrs["sidecar.time_to_first_token_s"] = record.ttft_s
    attrs["sidecar.overhead_s"] = record.overhead_s
    return attrs


def build_resource(settings: TracingSettings) -> Resource:
    """The resource of every span: service name, SDK identity and the configured attributes."""
    attributes: dict[str, AttributeValue] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": otel_sdk_version,
        "service.version": __version__,
    }
    attributes.update(dict(settings.resource_attributes))
    attributes["service.name"] = settings.service_name
    return Resource(attributes)


_SCOPE = InstrumentationScope("llm-sidecar", __version__)


def _ns(epoch: float) -> int:
    # Through microseconds: a float epoch has no more precision than that, and a direct
    # ``* 1e9`` turns 1.75 s into ...750000128 ns.
    return round(epoch * 1_000_000) * 1000


def to_span(record: CallRecord, resource: Resource, scope: InstrumentationScope = _SCOPE) -> ReadableSpan:
    """The record's span with the ids the proxy chose; raises ``ValueError`` when it has none."""
    if not record.trace_id or not record.span_id:
        raise ValueError(f"record {record.request_id} carries no trace context")
    trace_id = int(record.trace_id, 16)
    flags = TraceFlags(TraceFlags.SAMPLED if record.trace_sampled else TraceFlags.DEFAULT)
    state = TraceState.from_header([record.tracestate]) if record.tracestate else TraceState()
    context = SpanContext(trace_id, int(record.span_id, 16), False, flags, state)
    parent = None
    if record.parent_span_id:
        parent = SpanContext(trace_id, int(record.parent_span_id, 16), True, flags, state)
    start_ns = _ns(record.started_at)
    end_ns = max(start_ns, _ns(record.finished_at or record.started_at + record.duration_s))
    status = Status(StatusCode.ERROR, record.error_type) if record.error_type else Status(StatusCode.UNSET)
    return ReadableSpan(
        name=span_name(record),
        context=context,
        parent=parent,
        resource=resource,
        attributes=span_attributes(record),
        kind=SpanKind.CLIENT,
        status=status,
        start_time=start_ns,
        end_time=end_ns,
        instrumentation_scope=scope,
    )


# -- the sink ---------------------------------------------------------------------------


def build_exporter(settings: TracingSettings) -> SpanExporter:
    """The OTLP exporter named by the settings (blocking: reads the certificate file)."""
    if settings.protocol == "grpc":
        import grpc  # type: ignore[import-untyped]
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        gzip = settings.compression == "gzip"
        scheme = urlsplit(settings.endpoint).scheme
        insecure = settings.insecure if settings.insecure is not None else scheme == "http"
        if scheme == "https":
            insecure = False
        credentials = None
        if not insecure and settings.certificate:
            credentials = grpc.ssl_channel_credentials(Path(settings.certificate).read_bytes())
        elif not insecure:
            credentials = grpc.ssl_channel_credentials()
        return GrpcExporter(
            endpoint=settings.endpoint,
            insecure=insecure,
            credentials=credentials,
            headers=dict(settings.headers),
            timeout=settings.timeout,
            compression=GrpcCompression.Gzip if gzip else GrpcCompression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(
        endpoint=settings.endpoint,
        certificate_file=settings.certificate,
        headers=dict(settings.headers),
        timeout=settings.timeout,
        compression=Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression,
    )


class _CountingExporter(SpanExporter):
    """Wraps the real exporter to count exported and failed spans (called on the processor's thread)."""

    def __init__(self, inner: SpanExporter, sink: TracingSink) -> None:
        self.inner = inner
        self.sink = sink

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            log.exception("span exporter raised")
            result = SpanExportResult.FAILURE
        self.sink._settle(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _SpanCounters(Collector):
    def __init__(self, sink: TracingSink) -> None:
        self.sink = sink

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        exported = CounterMetricFamily("llm_spans_exported", "Spans the OTLP collector accepted")
        exported.add_metric([], self.sink.exported)
        yield exported
        dropped = CounterMetricFamily(
            "llm_spans_dropped",
            "Spans lost: queue full, export failed (collector down, refusing or too slow), shutdown",
            labels=["reason"],
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], self.sink.dropped[reason])
        yield dropped
        yield GaugeMetricFamily("llm_spans_queued", "Spans waiting for export", value=self.sink.queued)


@dataclass
class _State:
    queued: int = 0  # handed to the processor, export not settled
    closed: bool = False
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class TracingSink:
    """The pipeline's traces sink: records → spans → ``BatchSpanProcessor`` → OTLP.

    ``exporter`` replaces the OTLP exporter built from ``settings`` (tests pass the
    SDK's ``InMemorySpanExporter``); with neither an exporter nor
    ``settings.enabled`` the sink accepts records and does nothing. ``registry``
    (optional) gets ``llm_spans_exported_total``, ``llm_spans_dropped_total{reason}``
    and ``llm_spans_queued``.
    """

    name = "traces"

    def __init__(
        self,
        settings: TracingSettings,
        registry: CollectorRegistry | None = None,
        exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled or exporter is not None
        self._exporter = exporter
        self._resource = build_resource(settings)
        self._processor: BatchSpanProcessor | None = None
        self._lock = threading.Lock()
        self._state = _State()
        self.exported = 0
        self.skipped = 0  # records with no sampled trace context: nothing to export
        if registry is not None:
            registry.register(_SpanCounters(self))

    @property
    def dropped(self) -> dict[str, int]:
        """Spans dropped so far, by reason (a copy)."""
        with self._lock:
            return dict(self._state.dropped)

    @property
    def queued(self) -> int:
        """Spans handed to the processor whose export has not finished."""
        return self._state.queued

    def offer(self, record: CallRecord) -> bool:
        """Turn the record into a span and queue it for export; ``False`` when the queue is full."""
        processor = self._processor
        if processor is None:
            return True
        if not record.trace_sampled or not record.trace_id or not record.span_id:
            self.skipped += 1
            return True
        with self._lock:
            state = self._state
            if state.queued >= self.settings.queue_size:
                state.dropped["queue_full"] += 1
                return False
            state.queued += 1
        try:
            span = to_span(record, self._resource)
        except ValueError:
            log.warning("record %s has a malformed trace context: no span", record.request_id)
            with self._lock:
                self._state.queued -= 1
                self._state.dropped["invalid"] += 1
            return True
        processor.on_end(span)
        return True

    def _settle(self, count: int, ok: bool) -> None:
        with self._lock:
            if self._state.closed:
                return  # counted as shutdown drops already
            self._state.queued -= count
            if ok:
                self.exported += count
            else:
                self._state.dropped["export_failed"] += count

    async def start(self) -> None:
        """Build the exporter (off the loop: it may read a certificate) and start the processor."""
        if not self.enabled or self._processor is not None:
            return
        with self._lock:
            self._state.closed = False
        exporter = self._exporter
        settings = self.settings

        def build() -> BatchSpanProcessor:
            inner = exporter if exporter is not None else build_exporter(settings)
            return BatchSpanProcessor(
                _CountingExporter(inner, self),
                max_queue_size=settings.queue_size,
                schedule_delay_millis=settings.schedule_delay * 1000,
                max_export_batch_size=settings.batch_size,
                export_timeout_millis=settings.timeout * 1000,
            )

        self._processor = await asyncio.to_thread(build)
        log.info(
            "tracing on: OTLP %s to %s (service %s, sample ratio %g)",
            settings.protocol,
            settings.endpoint,
            settings.service_name,
            settings.sample_ratio,
        )

    async def stop(self, timeout: float) -> None:
        """Export what is queued, waiting at most ``timeout`` seconds; spans left over are counted."""
        processor, self._processor = self._processor, None
        if processor is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def shutdown() -> None:
            try:
                processor.shutdown()  # type: ignore[no-untyped-call]
            except Exception:
                log.exception("span processor shutdown failed")
            finally:
                # Cancelled when stop() gave up waiting (wait_for cancels the wrapped future).
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    done.set_result(None)

        # A thread of its own rather than the loop's executor: an export stuck on a
        # collector that never answers must not hold up the loop's shutdown.
        threading.Thread(target=shutdown, name="sidecar-traces-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), timeout)
        except TimeoutError:
            log.warning("span export did not finish within %.1fs at shutdown", timeout)
        with self._lock:
            left = self._state.queued
            self._state.queued = 0
            self._state.closed = True
            self._state.dropped["shutdown"] += left
        if left:
            log.warning("%d spans were not exported at shutdown", left)
