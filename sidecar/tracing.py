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
  a bounded queue) exporting with OTLP over gRPC or HTTP/protobuf;
- opt-in content capture (``tracing.capture_content``): :func:`content_attributes`
  turns a record's captured prompt and completion into the GenAI
  ``gen_ai.input.messages`` / ``gen_ai.system_instructions`` / ``gen_ai.output.messages``
  attributes, redacted (:mod:`sidecar.redact`) and truncated, on the export thread.

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
import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.util.types import AttributeValue
from opentelemetry.version import __version__ as otel_sdk_version
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from yaml.nodes import Node

from sidecar import __version__, otlp_wire
from sidecar.model import TOKEN_TYPES, CallRecord
from sidecar.redact import RedactionSettings, Redactor, parse_redaction
from sidecar.threads import Pacer, background, no_pace
from sidecar.yamlspec import Reader, join

__all__ = [
    "CONTENT_DROP_REASONS",
    "CONTENT_TRUNCATED",
    "DROP_REASONS",
    "INPUT_MESSAGES",
    "OUTPUT_MESSAGES",
    "PROTOCOLS",
    "SAMPLERS",
    "SYSTEM_INSTRUCTIONS",
    "ExportSection",
    "ExportTarget",
    "OtlpExport",
    "TracingSection",
    "TracingSettings",
    "TracingSink",
    "build_resource",
    "check_endpoint",
    "content_attributes",
    "env_int",
    "env_ms",
    "grpc_channel",
    "operation_name",
    "parse_tracing",
    "request_content",
    "resolve_otlp_export",
    "resolve_resource",
    "resolve_tracing",
    "span_attributes",
    "span_name",
    "string_map",
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
_DEFAULT_HTTP_BASE = "http://localhost:4318"
_DEFAULT_HTTP_ENDPOINT = _DEFAULT_HTTP_BASE + "/v1/traces"
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
    # Opt-in prompt and completion capture (see "content capture" below).
    capture_content: bool = False
    capture_max_length: int = 8192
    redaction: RedactionSettings = field(default_factory=RedactionSettings)

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
    capture_content: bool | None = None
    capture_max_length: int | None = None
    redaction: RedactionSettings | None = None


class _PathContext(Protocol):
    def path(self, text: str) -> Path: ...


_TRACING_KEYS = tuple(TracingSection.__dataclass_fields__)


def string_map(r: Reader, node: Node | None, path: str) -> tuple[tuple[str, str], ...] | None:
    """A mapping of strings (``headers``, ``resource_attributes``) as pairs; ``None`` when absent."""
    if node is None:
        return None
    out: list[tuple[str, str]] = []
    for key, _key_node, value_node in r.entries(node, path) or []:
        value = r.string(value_node, join(path, key), allow_empty=True)
        if value is not None:
            out.append((key, value))
    return tuple(out)


def parse_export_keys(
    r: Reader, m: Mapping[str, Node], path: str, ctx: _PathContext | None
) -> dict[str, Any]:
    """The exporter and batching keys every OTLP section shares (``tracing``, ``usage_logs``).

    Returns keyword arguments for the section dataclass; ``certificate`` is resolved
    against the config file's directory through ``ctx``.
    """

    def at(key: str) -> tuple[Node | None, str]:
        return m.get(key), join(path, key)

    certificate = r.string(*at("certificate"))
    if certificate is not None and ctx is not None:
        certificate = str(ctx.path(certificate))
    headers = string_map(r, *at("headers"))
    return {
        "enabled": r.boolean(*at("enabled")),
        "protocol": r.string(*at("protocol"), choices=PROTOCOLS),
        "endpoint": r.convert(*at("endpoint"), check_endpoint, what="endpoint"),
        "headers": tuple((k.lower(), v) for k, v in headers) if headers is not None else None,
        "timeout": r.duration(*at("timeout"), positive=True),
        "compression": r.string(*at("compression"), choices=("none", "gzip")),
        "insecure": r.boolean(*at("insecure")),
        "certificate": certificate,
        "queue_size": r.integer(*at("queue_size"), minimum=1),
        "batch_size": r.integer(*at("batch_size"), minimum=1),
        "schedule_delay": r.duration(*at("schedule_delay"), positive=True),
    }


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

    export = parse_export_keys(r, m, path, ctx)
    sampler_arg = r.number(*at("sampler_arg"))
    if sampler_arg is not None and not 0.0 <= sampler_arg <= 1.0:
        r.problem(
            m.get("sampler_arg"), join(path, "sampler_arg"), f"must be between 0 and 1, got {sampler_arg}"
        )
        sampler_arg = None
    redaction_node = m.get("redaction")
    redaction = None
    if redaction_node is not None:
        redaction = parse_redaction(r, redaction_node, join(path, "redaction"), headers=False)
    return TracingSection(
        **export,
        service_name=r.string(*at("service_name")),
        resource_attributes=string_map(r, *at("resource_attributes")),
        sampler=r.string(*at("sampler"), choices=SAMPLERS),
        sampler_arg=sampler_arg,
        capture_content=r.boolean(*at("capture_content")),
        capture_max_length=r.integer(*at("capture_max_length"), minimum=1),
        redaction=redaction,
    )


def check_endpoint(text: str) -> str:
    """``text`` if it is an ``http(s)://`` URL with a host; raises ``ValueError`` otherwise."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return text


def loggable_endpoint(text: str) -> str:
    """An endpoint as it may be logged: scheme, host, port and path only (no credentials in the
    userinfo, no query that may carry a token)."""
    parts = urlsplit(text)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


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


class ExportSection(Protocol):
    """The exporter keys of a config section (``tracing``, ``usage_logs``): ``None`` = not set."""

    @property
    def protocol(self) -> str | None: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...] | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def compression(self) -> str | None: ...
    @property
    def insecure(self) -> bool | None: ...
    @property
    def certificate(self) -> str | None: ...


@dataclass(frozen=True)
class OtlpExport:
    """Where and how one signal goes: a section's exporter keys merged with ``OTEL_EXPORTER_OTLP_*``."""

    protocol: str
    endpoint: str
    headers: tuple[tuple[str, str], ...]
    timeout: float
    compression: str
    insecure: bool | None
    certificate: str | None


def env_bool(env: Mapping[str, str], names: Sequence[str], warnings: list[str]) -> bool | None:
    """The first of ``names`` set, read as ``true``/``false`` (anything else: a warning and ``None``)."""
    found = _first(env, *names)
    if found is None:
        return None
    if found[1].lower() not in ("true", "false"):
        warnings.append(f"{found[0]}={found[1]!r} is not true or false: ignored")
        return None
    return found[1].lower() == "true"


def env_int(env: Mapping[str, str], name: str, minimum: int, warnings: list[str]) -> int | None:
    """``name`` as an integer of at least ``minimum`` (anything else: a warning and ``None``)."""
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


def env_ms(found: tuple[str, str] | None, warnings: list[str]) -> float | None:
    """A positive number of milliseconds (as the specification writes durations), in seconds."""
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


def resolve_otlp_export(
    section: ExportSection,
    env: Mapping[str, str],
    signal: str,
    warnings: list[str],
    default_timeout: float = 10.0,
) -> OtlpExport:
    """The exporter of one signal (``TRACES``, ``LOGS``): the section's keys, else the environment.

    Reads ``OTEL_EXPORTER_OTLP_{signal}_*`` then ``OTEL_EXPORTER_OTLP_*`` (``PROTOCOL``,
    ``ENDPOINT``, ``HEADERS``, ``TIMEOUT``, ``COMPRESSION``, ``INSECURE``,
    ``CERTIFICATE``). The generic endpoint is a base URL: HTTP appends ``/v1/<signal>``.
    Malformed values are appended to ``warnings`` and their defaults used.
    """
    path = f"/v1/{signal.lower()}"

    def var(suffix: str) -> tuple[str, str] | None:
        return _first(env, f"OTEL_EXPORTER_OTLP_{signal}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}")

    protocol = section.protocol
    if protocol is None:
        found = var("PROTOCOL")
        if found is not None and found[1] not in PROTOCOLS:
            warnings.append(
                f"{found[0]}={found[1]!r} is not supported (grpc or http/protobuf): using http/protobuf"
            )
        elif found is not None:
            protocol = found[1]
    protocol = protocol or "http/protobuf"
    endpoint = section.endpoint
    if endpoint is None:
        specific = _first(env, f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
        generic = _first(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if specific is not None:
            endpoint = specific[1]
        elif generic is not None:
            endpoint = generic[1] if protocol == "grpc" else generic[1].rstrip("/") + path
        source = specific or generic
        if endpoint is not None and source is not None:
            try:
                check_endpoint(endpoint)
            except ValueError as exc:
                warnings.append(f"{source[0]}={source[1]!r}: {exc}: using the default")
                endpoint = None
    if endpoint is None:
        endpoint = _DEFAULT_GRPC_ENDPOINT if protocol == "grpc" else _DEFAULT_HTTP_BASE + path

    headers = section.headers
    if headers is None:
        found = var("HEADERS")
        if found is not None:
            pairs, bad = _pairs(found[1])
            if bad:
                warnings.append(f"{found[0]}: malformed members ignored: {', '.join(bad)}")
            headers = tuple((k.lower(), v) for k, v in pairs)
    compression = section.compression
    if compression is None:
        found = var("COMPRESSION")
        if found is not None and found[1].lower() not in ("gzip", "none"):
            warnings.append(f"{found[0]}={found[1]!r} is not supported (gzip or none): using none")
        elif found is not None:
            compression = found[1].lower()
    certificate = section.certificate
    if certificate is None:
        found = var("CERTIFICATE")
        certificate = found[1] if found is not None else None
    insecure = section.insecure
    if insecure is None:
        insecure = env_bool(
            env, (f"OTEL_EXPORTER_OTLP_{signal}_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"), warnings
        )
    return OtlpExport(
        protocol=protocol,
        endpoint=endpoint,
        headers=headers or (),
        timeout=section.timeout or env_ms(var("TIMEOUT"), warnings) or default_timeout,
        compression=compression or "none",
        insecure=insecure,
        certificate=certificate,
    )


def resolve_resource(
    service_name: str | None,
    attributes: tuple[tuple[str, str], ...] | None,
    env: Mapping[str, str],
    warnings: list[str],
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The service name and the other resource attributes: the file's, else ``OTEL_SERVICE_NAME``
    and ``OTEL_RESOURCE_ATTRIBUTES`` (whose ``service.name`` is the fallback), else ``llm-sidecar``."""
    resource: dict[str, str] = {}
    found = _first(env, "OTEL_RESOURCE_ATTRIBUTES")
    if found is not None:
        pairs, bad = _pairs(found[1])
        if bad:
            warnings.append(f"OTEL_RESOURCE_ATTRIBUTES: malformed members ignored: {', '.join(bad)}")
        resource.update(pairs)
    resource.update(attributes or ())
    if service_name is None:
        found = _first(env, "OTEL_SERVICE_NAME")
        service_name = found[1] if found is not None else resource.get("service.name", SERVICE_NAME)
    resource.pop("service.name", None)
    return service_name, tuple(sorted(resource.items()))


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
    the specification says. Content capture is set in the file only: no environment
    variable turns it on.
    """
    s = section or TracingSection()
    warnings: list[str] = []
    d = TracingSettings()

    # On or off.
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    unsupported = exporters - {"otlp", "none"}
    if unsupported:
        warnings.append(
            f"OTEL_TRACES_EXPORTER: only otlp is supported, ignoring {', '.join(sorted(unsupported))}"
        )
    env_disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporters == {"none"}
    env_endpoint = _first(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    env_on = "otlp" in exporters or env_endpoint is not None
    env_enabled = (env_on or s.endpoint is not None) and not env_disabled
    enabled = s.enabled if s.enabled is not None else env_enabled

    export = resolve_otlp_export(s, env, "TRACES", warnings, d.timeout)
    service_name, resource = resolve_resource(s.service_name, s.resource_attributes, env, warnings)

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
        protocol=export.protocol,
        endpoint=export.endpoint,
        headers=export.headers,
        timeout=export.timeout,
        compression=export.compression,
        insecure=export.insecure,
        certificate=export.certificate,
        service_name=service_name,
        resource_attributes=resource,
        sampler=sampler,
        sampler_arg=sampler_arg if sampler_arg is not None else d.sampler_arg,
        queue_size=s.queue_size or env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 1, warnings) or d.queue_size,
        batch_size=s.batch_size
        or env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 1, warnings)
        or d.batch_size,
        schedule_delay=s.schedule_delay
        or env_ms(_first(env, "OTEL_BSP_SCHEDULE_DELAY"), warnings)
        or d.schedule_delay,
        capture_content=s.capture_content if s.capture_content is not None else d.capture_content,
        capture_max_length=s.capture_max_length or d.capture_max_length,
        redaction=s.redaction if s.redaction is not None else d.redaction,
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
#: ``sidecar.tokens.source`` by a mask of the sources seen (1: reported, 2: estimated).
_TOKEN_SOURCES = ("", "reported", "estimated", "mixed")
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
    # Each token type with a count, reported where reported, else estimated (what
    # CallRecord.token_counts gives, without building its objects), and where they came from.
    usage, estimated = record.usage, record.estimated
    sources = 0
    for token_type in TOKEN_TYPES:
        count = getattr(usage, token_type)
        if count is not None:
            sources |= 1
        else:
            count = getattr(estimated, token_type)
            if count is None:
                continue
            sources |= 2
        attrs[_USAGE_ATTRIBUTES[token_type]] = count
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
    if sources:
        attrs["sidecar.tokens.source"] = _TOKEN_SOURCES[sources]
    if record.ttft_s is not None:
        attrs["sidecar.time_to_first_token_s"] = record.ttft_s
    attrs["sidecar.overhead_s"] = record.overhead_s
    if record.route:
        attrs["sidecar.route"] = record.route
    if record.variant:
        attrs["sidecar.variant"] = record.variant
    if len(record.attempts) > 1:
        attrs["sidecar.attempts"] = len(record.attempts)
        attrs["sidecar.attempted_upstreams"] = [a.upstream for a in record.attempts]
    if record.throttled:
        attrs["sidecar.throttled"] = record.throttled
    return attrs


def span_events(record: CallRecord) -> list[Event]:
    """The gateway's decisions during the call (fallbacks, breaker transitions) as span events."""
    start = record.started_at
    return [
        Event(f"sidecar.{e.name}", dict(e.attributes), timestamp=_ns(start + e.offset_s))
        for e in record.events
    ]


class ResourceSettings(Protocol):
    """What the resource is made of (:class:`TracingSettings`, the usage logs' settings)."""

    @property
    def service_name(self) -> str: ...
    @property
    def resource_attributes(self) -> tuple[tuple[str, str], ...]: ...


def build_resource(settings: ResourceSettings) -> Resource:
    """The resource of every span (and usage log): service name, SDK identity, configured attributes."""
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


def to_span(
    record: CallRecord,
    resource: Resource,
    scope: InstrumentationScope = _SCOPE,
    cls: type[ReadableSpan] = ReadableSpan,
) -> ReadableSpan:
    """The record's span with the ids the proxy chose; raises ``ValueError`` when it has none.

    ``cls`` is the span class to build (the sink's :class:`_ContentSpan` when the content
    attributes are still to be added).
    """
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
    return cls(
        name=span_name(record),
        context=context,
        parent=parent,
        resource=resource,
        attributes=span_attributes(record),
        events=span_events(record) if record.events else (),
        kind=SpanKind.CLIENT,
        status=status,
        start_time=start_ns,
        end_time=end_ns,
        instrumentation_scope=scope,
    )


# -- opt-in content capture (pure) -------------------------------------------------------
#
# OpenTelemetry GenAI semantic conventions v1.41, docs/gen-ai/gen-ai-spans.md, "Capturing
# instructions, inputs, and outputs": prompts and completions are not captured by default;
# when the user opts in they go on the inference span as the Opt-In attributes
# ``gen_ai.input.messages`` (the chat history, in the order sent), ``gen_ai.system_instructions``
# (instructions given apart from the history: Anthropic ``system``, Responses
# ``instructions``) and ``gen_ai.output.messages``, shaped per gen-ai-input-messages.json and
# gen-ai-output-messages.json (``{"role", "parts": [{"type": "text", "content"}, ...]}``).
# The Python SDK has no structured (complex) span attributes, so each is recorded as a JSON
# string, as the conventions say to do then ("SHOULD be serialized to JSON string on spans").
# Truncation keeps the JSON structure and cuts the message contents ("Instrumentation MAY
# provide a configuration option allowing to truncate properties such as individual message
# contents, preserving JSON structure"). The embeddings span has no content attributes.

INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
CONTENT_TRUNCATED = "sidecar.content.truncated"
#: Operations whose spans carry content (by ``gen_ai.operation.name``).
CONTENT_OPERATIONS = frozenset({"chat", "text_completion"})
#: Roles, part types, ids and names from the client are cut to this many characters.
_LABEL_MAX = 256

_Part = dict[str, str]


@dataclass
class _Message:
    role: str
    parts: list[_Part]


class _Budget:
    """Characters of content one attribute may still take; every string is redacted first."""

    def __init__(self, redactor: Redactor, limit: int) -> None:
        self.redactor = redactor
        self.left = limit
        self.truncated = False

    def take(self, text: str) -> str:
        if not text:
            return text
        kept, cut = self.redactor.redact_prefix(text, self.left)
        self.left -= len(kept)
        if cut:
            self.truncated = True
            self.left = 0
        return kept

    def label(self, text: str) -> str:
        """A role, part type, id or name: short, redacted, not counted."""
        return self.redactor.redact(text[:_LABEL_MAX])

    def part(self, part: _Part) -> _Part:
        return {key: self.label(value) if key == "type" else self.take(value) for key, value in part.items()}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _obj(value: object) -> dict[str, object] | None:
    return value if isinstance(value, dict) else None


def _text(text: str) -> _Part:
    return {"type": "text", "content": text}


def _tool_call(call_id: str | None, name: str | None, arguments: object) -> _Part:
    part: _Part = {"type": "tool_call", "name": name or ""}
    if call_id:
        part["id"] = call_id
    if isinstance(arguments, str):
        part["arguments"] = arguments
    elif arguments is not None:
        part["arguments"] = json.dumps(arguments, ensure_ascii=False)
    return part


def _tool_response(call_id: str | None, response: object) -> _Part:
    part: _Part = {"type": "tool_call_response", "response": _joined_text(response)}
    if call_id:
        part["id"] = call_id
    return part


def _joined_text(content: object) -> str:
    """A string, or the text of a list of content parts joined with newlines; else JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [_str(p.get("text")) for p in content if isinstance(p, dict)]
        return "\n".join(t for t in texts if t is not None)
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def _generic(kind: object) -> _Part:
    """A part with no text (image, audio, file, ...): recorded by its type only."""
    return {"type": _str(kind) or "unknown"}


def _openai_parts(content: object) -> list[_Part]:
    """Chat Completions / Responses content: a string or a list of typed parts."""
    if isinstance(content, str):
        return [_text(content)]
    parts: list[_Part] = []
    for item in _list(content):
        part = _obj(item)
        if part is None:
            continue
        text = _str(part.get("text"))
        if text is None:
            text = _str(part.get("refusal"))
        parts.append(_text(text) if text is not None else _generic(part.get("type")))
    return parts


def _chat_messages(request: dict[str, object]) -> list[_Message]:
    """OpenAI Chat Completions ``messages`` (system and developer messages are chat history)."""
    out: list[_Message] = []
    for item in _list(request.get("messages")):
        message = _obj(item)
        if message is None:
            continue
        role = _str(message.get("role")) or "user"
        parts: list[_Part] = []
        if role in ("tool", "function"):
            call_id = _str(message.get("tool_call_id")) or _str(message.get("name"))
            parts.append(_tool_response(call_id, message.get("content")))
        else:
            parts.extend(_openai_parts(message.get("content")))
        for raw in _list(message.get("tool_calls")):
            call = _obj(raw)
            function = _obj(call.get("function")) if call is not None else None
            if call is not None:
                name = _str(function.get("name")) if function is not None else None
                arguments = function.get("arguments") if function is not None else None
                parts.append(_tool_call(_str(call.get("id")), name, arguments))
        legacy = _obj(message.get("function_call"))
        if legacy is not None:
            parts.append(_tool_call(None, _str(legacy.get("name")), legacy.get("arguments")))
        out.append(_Message(role, parts))
    return out


def _anthropic_parts(content: object) -> list[_Part]:
    if isinstance(content, str):
        return [_text(content)]
    parts: list[_Part] = []
    for item in _list(content):
        block = _obj(item)
        if block is None:
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(_text(_str(block.get("text")) or ""))
        elif kind == "tool_use":
            parts.append(_tool_call(_str(block.get("id")), _str(block.get("name")), block.get("input")))
        elif kind == "tool_result":
            parts.append(_tool_response(_str(block.get("tool_use_id")), block.get("content")))
        elif kind == "thinking":
            parts.append({"type": "reasoning", "content": _str(block.get("thinking")) or ""})
        else:
            parts.append(_generic(kind))
    return parts


def _anthropic_messages(request: dict[str, object]) -> list[_Message]:
    out: list[_Message] = []
    for item in _list(request.get("messages")):
        message = _obj(item)
        if message is not None:
            role = _str(message.get("role")) or "user"
            out.append(_Message(role, _anthropic_parts(message.get("content"))))
    return out


def _responses_input(request: dict[str, object]) -> list[_Message]:
    """OpenAI Responses ``input``: a string, or items (messages, function calls and outputs)."""
    given = request.get("input")
    if isinstance(given, str):
        return [_Message("user", [_text(given)])]
    out: list[_Message] = []
    for raw in _list(given):
        item = _obj(raw)
        if item is None:
            continue
        kind = item.get("type")
        role = _str(item.get("role"))
        if role is not None:
            out.append(_Message(role, _openai_parts(item.get("content"))))
        elif kind == "function_call":
            call = _tool_call(_str(item.get("call_id")), _str(item.get("name")), item.get("arguments"))
            out.append(_Message("assistant", [call]))
        elif kind == "function_call_output":
            out.append(_Message("tool", [_tool_response(_str(item.get("call_id")), item.get("output"))]))
        else:
            out.append(_Message("assistant", [_generic(kind)]))
    return out


def _completion_prompt(request: dict[str, object]) -> list[_Message]:
    """Legacy Completions ``prompt``: a string or a list of strings (token-id prompts have no text)."""
    prompt = request.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else [p for p in _list(prompt) if isinstance(p, str)]
    return [_Message("user", [_text(t) for t in texts])] if texts else []


def _instructions(value: object) -> list[_Part]:
    """Anthropic ``system`` or Responses ``instructions``: a string or a list of text blocks."""
    if isinstance(value, str):
        return [_text(value)] if value else []
    parts: list[_Part] = []
    for item in _list(value):
        block = _obj(item)
        text = _str(block.get("text")) if block is not None else None
        if text is not None:
            parts.append(_text(text))
    return parts


def request_content(operation: str, request: dict[str, object]) -> tuple[list[_Message], list[_Part]]:
    """The input messages and system instructions of a parsed request, by ``CallRecord.operation``."""
    if operation == "chat":
        return _chat_messages(request), []
    if operation == "messages":
        return _anthropic_messages(request), _instructions(request.get("system"))
    if operation == "responses":
        return _responses_input(request), _instructions(request.get("instructions"))
    if operation == "text_completion":
        return _completion_prompt(request), []
    return [], []


def _load_request(body: bytes) -> dict[str, object] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a compressed body among them), or absurdly deep
        return None
    return value if isinstance(value, dict) else None


def _json(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # A lone surrogate (a JSON "\ud800" escape) cannot go into the protobuf's UTF-8 string.
    return text if text.isascii() else text.encode("utf-8", "replace").decode("utf-8")


def content_attributes(record: CallRecord, redactor: Redactor, max_length: int) -> dict[str, AttributeValue]:
    """The content attributes of a call whose record carries captured content (else none).

    Every string is redacted before it is cut, and each attribute holds at most
    ``max_length`` characters of content (texts, tool arguments and results): input
    messages are kept newest first (older messages that do not fit are left out, the
    one that does not fit whole is cut), system instructions and output in order.
    ``sidecar.content.truncated`` is ``true`` when anything was cut or left out. A
    request body that is not a JSON object (compressed, malformed) gives no input.

    CPU-bound (JSON parsing, regular expressions): the tracing sink runs it on the
    export thread, never on the event loop.
    """
    content = record.content
    if content is None or operation_name(record) not in CONTENT_OPERATIONS:
        return {}
    attrs: dict[str, AttributeValue] = {}
    truncated = False
    request = _load_request(content.request_body) if content.request_body else None
    if request is not None:
        messages, system = request_content(record.operation, request)
        budget = _Budget(redactor, max_length)
        kept: list[dict[str, object]] = []
        for message in reversed(messages):
            if budget.left <= 0:
                budget.truncated = True
                break
            parts = [budget.part(part) for part in message.parts]
            kept.append({"role": budget.label(message.role), "parts": parts})
        if kept:
            kept.reverse()
            attrs[INPUT_MESSAGES] = _json(kept)
        truncated = budget.truncated
        if system:
            budget = _Budget(redactor, max_length)
            attrs[SYSTEM_INSTRUCTIONS] = _json([budget.part(part) for part in system])
            truncated = truncated or budget.truncated
    if content.output_text:
        budget = _Budget(redactor, max_length)
        output: dict[str, object] = {"role": "assistant", "parts": [budget.part(_text(content.output_text))]}
        if record.finish_reasons:
            output["finish_reason"] = record.finish_reasons[0]
        attrs[OUTPUT_MESSAGES] = _json([output])
        truncated = truncated or budget.truncated
    if truncated:
        attrs[CONTENT_TRUNCATED] = True
    return attrs


# -- the sink ---------------------------------------------------------------------------


class ExportTarget(Protocol):
    """Resolved exporter settings (:class:`TracingSettings`, :class:`OtlpExport`, ...)."""

    @property
    def protocol(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def compression(self) -> str: ...
    @property
    def insecure(self) -> bool | None: ...
    @property
    def certificate(self) -> str | None: ...


def grpc_channel(target: ExportTarget) -> tuple[bool, object]:
    """``(insecure, credentials)`` for an OTLP gRPC exporter (blocking: reads the certificate file).

    Plain text for an ``http://`` endpoint unless ``insecure`` says otherwise, TLS for
    ``https://``, with the configured CA bundle or the system's.
    """
    import grpc  # type: ignore[import-untyped]

    scheme = urlsplit(target.endpoint).scheme
    insecure = target.insecure if target.insecure is not None else scheme == "http"
    if scheme == "https":
        insecure = False
    credentials = None
    if not insecure and target.certificate:
        credentials = grpc.ssl_channel_credentials(Path(target.certificate).read_bytes())
    elif not insecure:
        credentials = grpc.ssl_channel_credentials()
    return insecure, credentials


def build_exporter(settings: TracingSettings) -> SpanExporter:
    """The OTLP exporter named by the settings (blocking: reads the certificate file)."""
    if settings.protocol == "grpc":
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        gzip = settings.compression == "gzip"
        insecure, credentials = grpc_channel(settings)
        return GrpcExporter(
            endpoint=settings.endpoint,
            insecure=insecure,
            credentials=credentials,
            headers=dict(settings.headers),
            timeout=settings.timeout,
            compression=GrpcCompression.Gzip if gzip else GrpcCompression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression

    return _wire_http_exporter()(
        endpoint=settings.endpoint,
        certificate_file=settings.certificate,
        headers=dict(settings.headers),
        timeout=settings.timeout,
        compression=Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression,
    )


@functools.cache
def _wire_http_exporter() -> Callable[..., SpanExporter]:
    """The OTLP/HTTP exporter with the span encoding of :mod:`sidecar.otlp_wire`.

    The SDK's encoder builds a protobuf object per attribute: about 100 µs of CPU per span,
    more than the rest of a proxied call's accounting. This subclass encodes the same
    request straight to bytes (tests prove the messages equal) and hands them to the
    exporter's own HTTP client, so retries, compression, TLS and headers stay the SDK's.
    That client is a private attribute: where a future SDK lacks it, or our encoder
    refuses a batch, the export takes the SDK's path unchanged (counted in ``sdk_exports``).
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class WireHttpExporter(OTLPSpanExporter):
        wire_exports = 0  # batches sent with sidecar.otlp_wire's encoding
        sdk_exports = 0  # batches sent through the SDK's own encoder

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            client = getattr(self, "_client", None)
            export = getattr(client, "export", None)
            if getattr(self, "_shutdown", True) or export is None:
                self.sdk_exports += 1
                return super().export(spans)
            try:
                data = otlp_wire.encode_spans(spans, _export_pace())
            except (TypeError, ValueError, UnicodeError) as exc:
                log.debug("span batch left to the SDK's encoder: %s", exc)
                self.sdk_exports += 1
                return super().export(spans)
            limit = getattr(self, "_max_request_size", 0)
            if isinstance(limit, int) and 0 < limit < len(data):
                log.warning(
                    "dropping a span batch of %d bytes: over the %d-byte request limit", len(data), limit
                )
                return SpanExportResult.FAILURE
            self.wire_exports += 1
            result = export(data)
            return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    return WireHttpExporter


#: Captured content (request bodies and generated text) that spans waiting for export may
#: hold, in bytes; past it a span goes out without its content (counted).
MAX_PENDING_CONTENT = 64 * 1024 * 1024
#: Spans with content are exported in requests of about this many bytes of content at most,
#: well under the 4 MiB a Collector's gRPC receiver accepts by default.
MAX_CONTENT_PER_EXPORT = 2 * 1024 * 1024
#: Reasons captured content is left off a span, the values of ``llm_spans_content_dropped_total``.
CONTENT_DROP_REASONS: tuple[str, ...] = ("memory", "error")
_CONTENT_KEYS = (INPUT_MESSAGES, SYSTEM_INSTRUCTIONS, OUTPUT_MESSAGES)


class _ContentSpan(ReadableSpan):
    """A span whose content attributes are still to be built from ``pending`` (on the export thread)."""

    pending: CallRecord | None = None


def _content_weight(span: ReadableSpan) -> int:
    attrs = span.attributes or {}
    return 512 + sum(len(value) for key in _CONTENT_KEYS if isinstance(value := attrs.get(key), str))


_export_thread = threading.local()  # the span processor's thread: its pacer, once set up
#: Name prefix of the SDK's batch processor threads (``OtelBatchSpanRecordProcessor``).
_PROCESSOR_THREAD = "OtelBatch"


def _export_pace() -> Callable[[], None]:
    """The pacer of the thread that exports spans, set up on its first export.

    The SDK's batch processor encodes and sends a batch of up to ``batch_size`` spans on a
    thread of its own at the default priority: measured at one client with 100 % sampling
    (``perf sched timehist``), it ran in stretches of half a millisecond on average and
    kept the event loop waiting for the core or the GIL, which set the p99. So on its
    first export that thread lowers its priority and gets a :class:`~sidecar.threads.Pacer`
    (between two spans) like the sidecar's own background threads. Any other thread that
    exports (a flush at shutdown, a test) is left as it is.
    """
    pace: Callable[[], None] | None = getattr(_export_thread, "pace", None)
    if pace is None:
        pace = no_pace
        if threading.current_thread().name.startswith(_PROCESSOR_THREAD):
            background()
            pace = Pacer()
        _export_thread.pace = pace
    return pace


class _CountingExporter(SpanExporter):
    """Wraps the real exporter (called on the processor's thread, never on the event loop).

    Counts exported and failed spans; with content capture on, it first adds the content
    attributes (parsing, redacting, truncating: CPU work kept off the loop) and sends the
    batch in requests of at most :data:`MAX_CONTENT_PER_EXPORT` bytes of content.
    """

    def __init__(self, inner: SpanExporter, sink: TracingSink) -> None:
        self.inner = inner
        self.sink = sink

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        pace = _export_pace()
        if not self.sink.settings.capture_content:
            return self._export(spans)
        ready = []
        for span in spans:
            pace()
            ready.append(self.sink._with_content(span) if isinstance(span, _ContentSpan) else span)
        result = SpanExportResult.SUCCESS
        piece: list[ReadableSpan] = []
        size = 0
        for span in ready:
            weight = _content_weight(span)
            if piece and size + weight > MAX_CONTENT_PER_EXPORT:
                result = self._export(piece, result)
                piece, size = [], 0
            piece.append(span)
            size += weight
        return self._export(piece, result) if piece else result

    def _export(
        self, spans: Sequence[ReadableSpan], so_far: SpanExportResult = SpanExportResult.SUCCESS
    ) -> SpanExportResult:
        if so_far is not SpanExportResult.SUCCESS:
            # An earlier piece of this batch failed: the collector is down or refusing, and
            # trying the rest would only hold the export thread for another timeout each.
            self.sink._settle(len(spans), False)
            return so_far
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
        if self.sink.settings.capture_content:
            content = CounterMetricFamily(
                "llm_spans_content_dropped",
                "Spans exported without their captured content: too much content waiting (memory), "
                "or it could not be read (error)",
                labels=["reason"],
            )
            for reason, count in self.sink.content_dropped.items():
                content.add_metric([reason], count)
            yield content


@dataclass
class _State:
    queued: int = 0  # handed to the processor, export not settled
    closed: bool = False
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    content_pending: int = 0  # bytes of captured content held by spans not yet exported
    content_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONTENT_DROP_REASONS, 0))


class TracingSink:
    """The pipeline's traces sink: records → spans → ``BatchSpanProcessor`` → OTLP.

    ``exporter`` replaces the OTLP exporter built from ``settings`` (tests pass the
    SDK's ``InMemorySpanExporter``); with neither an exporter nor
    ``settings.enabled`` the sink accepts records and does nothing. ``registry``
    (optional) gets ``llm_spans_exported_total``, ``llm_spans_dropped_total{reason}``
    and ``llm_spans_queued`` (and ``llm_spans_content_dropped_total{reason}`` with
    content capture on).

    Content capture (``settings.capture_content``): a record that carries
    :class:`~sidecar.model.CapturedContent` becomes a span marked to receive it;
    :meth:`offer` only notes its size. The exporter wrapper, on the processor's
    thread, builds the content attributes (:func:`content_attributes`: JSON parsing,
    redaction, truncation) just before the span is sent.
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
        self._redactor = Redactor.from_settings(settings.redaction) if settings.capture_content else None
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

    @property
    def content_dropped(self) -> dict[str, int]:
        """Spans exported without their captured content, by reason (a copy)."""
        with self._lock:
            return dict(self._state.content_dropped)

    def offer(self, record: CallRecord) -> bool:
        """Turn the record into a span and queue it for export; ``False`` when the queue is full.

        O(1) and allocation-light whatever the call carried: captured content is only
        measured here; its attributes are built on the export thread.
        """
        processor = self._processor
        if processor is None:
            return True
        if not record.trace_sampled or not record.trace_id or not record.span_id:
            self.skipped += 1
            return True
        content = record.content if self._redactor is not None else None
        size = 0
        with self._lock:
            state = self._state
            if state.queued >= self.settings.queue_size:
                state.dropped["queue_full"] += 1
                return False
            state.queued += 1
            if content is not None:
                size = content.size
                if state.content_pending + size > MAX_PENDING_CONTENT:
                    state.content_dropped["memory"] += 1
                    content, size = None, 0
                else:
                    state.content_pending += size
        try:
            span = to_span(record, self._resource, cls=ReadableSpan if content is None else _ContentSpan)
        except ValueError:
            log.warning("record %s has a malformed trace context: no span", record.request_id)
            with self._lock:
                self._state.queued -= 1
                self._state.dropped["invalid"] += 1
                self._state.content_pending -= size
            return True
        if isinstance(span, _ContentSpan):
            span.pending = record
        processor.on_end(span)
        return True

    def _with_content(self, span: _ContentSpan) -> ReadableSpan:
        """The span with its content attributes (called on the export thread)."""
        record, span.pending = span.pending, None
        if record is None or record.content is None or self._redactor is None:
            return span
        try:
            extra = content_attributes(record, self._redactor, self.settings.capture_max_length)
        except Exception as exc:  # never let one odd body fail the batch; never log the content
            log.error(
                "request %s: content not recorded on its span (%s)", record.request_id, type(exc).__name__
            )
            extra = {}
            with self._lock:
                self._state.content_dropped["error"] += 1
        finally:
            with self._lock:
                self._state.content_pending = max(0, self._state.content_pending - record.content.size)
        attributes = dict(span.attributes or {})
        attributes.update(extra)
        return ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=attributes,
            kind=span.kind,
            status=span.status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

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
            loggable_endpoint(settings.endpoint),
            settings.service_name,
            settings.sample_ratio,
        )
        if settings.capture_content:
            log.warning(
                "content capture is on: prompts and completions of sampled calls go on their spans, "
                "redacted (%d rules), at most %d characters per attribute",
                len(self._redactor.rules) if self._redactor is not None else 0,
                settings.capture_max_length,
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
            self._state.content_pending = 0
            self._state.closed = True
            self._state.dropped["shutdown"] += left
        if left:
            log.warning("%d spans were not exported at shutdown", left)
