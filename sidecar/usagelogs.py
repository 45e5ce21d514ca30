"""Usage logs for fleets: every ledger row also goes out as an OpenTelemetry log record.

With OTLP logs export configured (``OTEL_LOGS_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``, or the config file's ``usage_logs`` section),
:class:`UsageLogsSink` turns each finished call into one log record whose attributes
are the ledger's row (:func:`sidecar.ledger.to_row`: the same column names and
values, ``cost_usd`` as exact decimal text; columns with no value are left out),
so that a Collector can ship usage from every replica to a central store
(warehouse, Kafka, ClickHouse). The local ledger stays the embedded default and the
source of ``cost report``.

The record: event name ``llm_sidecar.usage``, severity ``INFO``, timestamp = when the
call started (the row's ``time``), the call's trace and span ids in the record's
trace context (for correlation with its span), no body. Its ``call_id`` is unique
per call, for de-duplicating a batch the exporter retried; it is the usage log's
own, not the local ledger's ``call_id`` (join the two on ``request_id`` and
``time``, or ``trace_id``).

Off the request path like the other sinks: :meth:`UsageLogsSink.offer` builds the
row and hands it to the SDK's ``LoggerProvider`` → ``BatchLogRecordProcessor`` (its
own thread, a bounded queue) → OTLP log exporter (gRPC or HTTP/protobuf). The records
not yet exported are bounded by ``queue_size``; past it a record is dropped at once
and counted (``llm_usage_logs_dropped_total{reason="queue_full"}``), as are records
whose export failed (``export_failed``: collector down, refusing or too slow) and those
still queued when shutdown ran out of time (``shutdown``). A collector that is down
never delays a call.

Configuration: the config file's ``usage_logs`` section wins key by key over the
environment (:func:`resolve_usage_logs`); the resource (service name and
attributes) is the traces' one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from opentelemetry import trace
from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.context import Context
from opentelemetry.sdk._logs import Logger, LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from yaml.nodes import Node

from sidecar import __version__
from sidecar.ledger import Row, to_row
from sidecar.model import CallRecord
from sidecar.tracing import (
    SERVICE_NAME,
    build_resource,
    env_int,
    env_ms,
    grpc_channel,
    loggable_endpoint,
    parse_export_keys,
    resolve_otlp_export,
)
from sidecar.yamlspec import Reader

__all__ = [
    "DROP_REASONS",
    "EVENT_NAME",
    "UsageLogsSection",
    "UsageLogsSettings",
    "UsageLogsSink",
    "log_attributes",
    "parse_usage_logs",
    "resolve_usage_logs",
]

log = logging.getLogger("sidecar.usagelogs")

#: The event name of every usage log record.
EVENT_NAME = "llm_sidecar.usage"
#: Reasons a usage log record can be dropped, the values of ``llm_usage_logs_dropped_total{reason}``.
DROP_REASONS: tuple[str, ...] = ("queue_full", "export_failed", "shutdown")

# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class UsageLogsSettings:
    """Everything the usage logs sink needs (durations in seconds).

    ``endpoint`` is the full URL of the logs endpoint for ``http/protobuf``
    (``http://collector:4318/v1/logs``) and the collector's address for ``grpc``.
    Defaults follow the specification's batch log processor (2048, 512, 1 s).
    """

    enabled: bool = False
    protocol: str = "http/protobuf"
    endpoint: str = "http://localhost:4318/v1/logs"
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0
    compression: str = "none"
    insecure: bool | None = None
    certificate: str | None = None
    service_name: str = SERVICE_NAME
    resource_attributes: tuple[tuple[str, str], ...] = ()
    queue_size: int = 2048
    batch_size: int = 512
    schedule_delay: float = 1.0


@dataclass(frozen=True)
class UsageLogsSection:
    """The config file's ``usage_logs`` section as written: ``None`` means "not set in the file"."""

    enabled: bool | None = None
    protocol: str | None = None
    endpoint: str | None = None
    headers: tuple[tuple[str, str], ...] | None = None
    timeout: float | None = None
    compression: str | None = None
    insecure: bool | None = None
    certificate: str | None = None
    queue_size: int | None = None
    batch_size: int | None = None
    schedule_delay: float | None = None


class _PathContext(Protocol):
    def path(self, text: str) -> Path: ...


_KEYS = tuple(UsageLogsSection.__dataclass_fields__)


def parse_usage_logs(r: Reader, node: Node, path: str, ctx: _PathContext | None = None) -> UsageLogsSection:
    """Parse the ``usage_logs`` section (the exporter keys of ``tracing``, for logs)::

        usage_logs:
          enabled: true                          # default: on when an endpoint is set
          protocol: grpc                         # grpc | http/protobuf
          endpoint: http://otel-collector:4317   # http/protobuf: the full URL, .../v1/logs
          headers: {x-team: ml}
          timeout: 10s
          compression: gzip
          queue_size: 2048
          batch_size: 512
          schedule_delay: 1s

    Every problem is recorded on ``r`` with its location; ``certificate`` is resolved
    against the config file's directory through ``ctx``.
    """
    m = r.mapping(node, path, _KEYS)
    if m is None:
        return UsageLogsSection()
    return UsageLogsSection(**parse_export_keys(r, m, path, ctx))


def resolve_usage_logs(
    section: UsageLogsSection | None,
    env: Mapping[str, str],
    service_name: str = SERVICE_NAME,
    resource_attributes: tuple[tuple[str, str], ...] = (),
) -> tuple[UsageLogsSettings, list[str]]:
    """Merge the ``OTEL_*`` environment and the file's section (the file wins) into settings.

    On when ``OTEL_LOGS_EXPORTER`` names ``otlp``, when ``OTEL_EXPORTER_OTLP_LOGS_ENDPOINT``
    or the section's ``endpoint`` is set, or with ``enabled: true``; off with
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_LOGS_EXPORTER=none`` (unless the file says
    ``enabled: true``). The generic ``OTEL_EXPORTER_OTLP_ENDPOINT`` alone does not turn
    usage logs on (it turns on traces): a collector that takes traces may not take logs.
    Also read: ``OTEL_EXPORTER_OTLP[_LOGS]_{PROTOCOL,ENDPOINT,HEADERS,TIMEOUT,COMPRESSION,
    INSECURE,CERTIFICATE}`` and ``OTEL_BLRP_{MAX_QUEUE_SIZE,MAX_EXPORT_BATCH_SIZE,
    SCHEDULE_DELAY}`` (milliseconds). ``service_name`` and ``resource_attributes`` are
    the resolved traces' ones. Returns the settings and warnings about malformed
    environment values (their defaults are used). Pure: reads ``env`` only.
    """
    s = section or UsageLogsSection()
    d = UsageLogsSettings()
    warnings: list[str] = []
    exporters = {e.strip().lower() for e in env.get("OTEL_LOGS_EXPORTER", "").split(",") if e.strip()}
    unsupported = exporters - {"otlp", "none"}
    if unsupported:
        warnings.append(
            "OTEL_LOGS_EXPORTER: only otlp is supported for usage logs, ignoring "
            + ", ".join(sorted(unsupported))
        )
    env_disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporters == {"none"}
    env_on = "otlp" in exporters or bool(env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "").strip())
    enabled = s.enabled if s.enabled is not None else (env_on or s.endpoint is not None) and not env_disabled
    export = resolve_otlp_export(s, env, "LOGS", warnings, d.timeout)
    queue_size = s.queue_size or env_int(env, "OTEL_BLRP_MAX_QUEUE_SIZE", 1, warnings) or d.queue_size
    batch_size = s.batch_size or env_int(env, "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE", 1, warnings)
    if batch_size is not None and batch_size > queue_size:
        warnings.append(f"batch size {batch_size} exceeds the queue size {queue_size}: using {queue_size}")
    batch_size = min(batch_size or d.batch_size, queue_size)  # the default shrinks with a small queue
    delay = s.schedule_delay or env_ms(_env(env, "OTEL_BLRP_SCHEDULE_DELAY"), warnings) or d.schedule_delay
    settings = UsageLogsSettings(
        enabled=enabled,
        protocol=export.protocol,
        endpoint=export.endpoint,
        headers=export.headers,
        timeout=export.timeout,
        compression=export.compression,
        insecure=export.insecure,
        certificate=export.certificate,
        service_name=service_name,
        resource_attributes=resource_attributes,
        queue_size=queue_size,
        batch_size=batch_size,
        schedule_delay=delay,
    )
    return settings, warnings


def _env(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    value = env.get(name, "").strip()
    return (name, value) if value else None


# -- pure: row → log record --------------------------------------------------------------


_ATTRIBUTE_TYPES = (str, int, float)


def log_attributes(row: Row) -> dict[str, AttributeValue]:
    """The row's columns as log attributes, minus those with no value (``NULL`` in the ledger)."""
    return {column: value for column, value in row.items() if isinstance(value, _ATTRIBUTE_TYPES)}


def _context(record: CallRecord) -> Context:
    """A context carrying the call's span (so the log record names its trace), or an empty one."""
    if not record.trace_id or not record.span_id:
        return Context()
    try:
        span = SpanContext(
            int(record.trace_id, 16),
            int(record.span_id, 16),
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if record.trace_sampled else TraceFlags.DEFAULT),
        )
    except ValueError:
        return Context()
    return trace.set_span_in_context(NonRecordingSpan(span), Context())


def _ns(epoch: float) -> int:
    return round(epoch * 1_000_000) * 1000


# -- the sink ---------------------------------------------------------------------------


def build_log_exporter(settings: UsageLogsSettings) -> LogRecordExporter:
    """The OTLP log exporter named by the settings (blocking: reads the certificate file)."""
    if settings.protocol == "grpc":
        from grpc import Compression as GrpcCompression  # type: ignore[import-untyped]
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as GrpcExporter

        insecure, credentials = grpc_channel(settings)
        return GrpcExporter(
            endpoint=settings.endpoint,
            insecure=insecure,
            credentials=credentials,
            headers=dict(settings.headers),
            timeout=settings.timeout,
            compression=GrpcCompression.Gzip
            if settings.compression == "gzip"
            else GrpcCompression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpExporter

    return HttpExporter(
        endpoint=settings.endpoint,
        certificate_file=settings.certificate,
        headers=dict(settings.headers),
        timeout=settings.timeout,
        compression=Compression.Gzip if settings.compression == "gzip" else Compression.NoCompression,
    )


class _CountingExporter(LogRecordExporter):
    """Wraps the real exporter to count exported and failed records (on the processor's thread)."""

    def __init__(self, inner: LogRecordExporter, sink: UsageLogsSink) -> None:
        self.inner = inner
        self.sink = sink

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        try:
            result = self.inner.export(batch)
        except Exception:
            log.exception("usage log exporter raised")
            result = LogRecordExportResult.FAILURE
        self.sink._settle(len(batch), result is LogRecordExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _Counters(Collector):
    def __init__(self, sink: UsageLogsSink) -> None:
        self.sink = sink

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        exported = CounterMetricFamily(
            "llm_usage_logs_exported", "Usage log records (one per call) the OTLP collector accepted"
        )
        exported.add_metric([], self.sink.exported)
        yield exported
        dropped = CounterMetricFamily(
            "llm_usage_logs_dropped",
            "Usage log records lost: queue full, export failed (collector down, refusing or too slow), "
            "shutdown; the local ledger still has them",
            labels=["reason"],
        )
        for reason, count in self.sink.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "llm_usage_logs_queued", "Usage log records waiting for export", value=self.sink.queued
        )


@dataclass
class _State:
    queued: int = 0  # handed to the processor, export not settled
    closed: bool = False
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


class UsageLogsSink:
    """The pipeline's usage logs sink: records → ledger rows → log records → OTLP.

    ``exporter`` replaces the OTLP exporter built from ``settings`` (tests pass the
    SDK's ``InMemoryLogRecordExporter``); with neither an exporter nor
    ``settings.enabled`` the sink accepts records and does nothing. ``registry``
    (optional) gets ``llm_usage_logs_exported_total``,
    ``llm_usage_logs_dropped_total{reason}`` and ``llm_usage_logs_queued``.
    """

    name = "usage_logs"

    def __init__(
        self,
        settings: UsageLogsSettings,
        registry: CollectorRegistry | None = None,
        exporter: LogRecordExporter | None = None,
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled or exporter is not None
        self._exporter = exporter
        self._provider: LoggerProvider | None = None
        self._logger: Logger | None = None
        self._lock = threading.Lock()
        self._state = _State()
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self.exported = 0
        if registry is not None:
            registry.register(_Counters(self))

    @property
    def dropped(self) -> dict[str, int]:
        """Records dropped so far, by reason (a copy)."""
        with self._lock:
            return dict(self._state.dropped)

    @property
    def queued(self) -> int:
        """Records handed to the processor whose export has not finished."""
        return self._state.queued

    def offer(self, record: CallRecord) -> bool:
        """Emit the call's row as a log record (queued for export); ``False`` when the queue is full."""
        logger = self._logger
        if logger is None:
            return True
        with self._lock:
            state = self._state
            if state.queued >= self.settings.queue_size:
                state.dropped["queue_full"] += 1
                return False
            state.queued += 1
        row = to_row(record, f"{self._prefix}-{next(self._ids):x}")
        logger.emit(
            LogRecord(
                timestamp=_ns(record.started_at),
                observed_timestamp=time.time_ns(),
                context=_context(record),
                severity_text="INFO",
                severity_number=SeverityNumber.INFO,
                attributes=log_attributes(row),
                event_name=EVENT_NAME,
            )
        )
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
        """Build the exporter and the provider (off the loop: a certificate may be read) and start."""
        if not self.enabled or self._provider is not None:
            return
        with self._lock:
            self._state.closed = False
        exporter = self._exporter
        settings = self.settings

        def build() -> tuple[LoggerProvider, Logger | None]:
            inner = exporter if exporter is not None else build_log_exporter(settings)
            provider = LoggerProvider(resource=build_resource(settings), shutdown_on_exit=False)
            provider.add_log_record_processor(
                BatchLogRecordProcessor(
                    _CountingExporter(inner, self),
                    schedule_delay_millis=settings.schedule_delay * 1000,
                    max_export_batch_size=settings.batch_size,
                    export_timeout_millis=settings.timeout * 1000,
                    max_queue_size=settings.queue_size,
                )
            )
            logger = provider.get_logger("llm-sidecar", __version__)
            # OTEL_SDK_DISABLED=true makes the SDK hand out a logger that drops everything.
            return provider, logger if isinstance(logger, Logger) else None

        self._provider, self._logger = await asyncio.to_thread(build)
        if self._logger is None:
            log.warning("usage logs: the OpenTelemetry SDK is disabled (OTEL_SDK_DISABLED): none are sent")
            return
        log.info("usage logs on: OTLP %s to %s", settings.protocol, loggable_endpoint(settings.endpoint))

    async def stop(self, timeout: float) -> None:
        """Export what is queued, waiting at most ``timeout`` seconds; records left over are counted."""
        provider, self._provider = self._provider, None
        self._logger = None
        if provider is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def shutdown() -> None:
            try:
                provider.shutdown()
            except Exception:
                log.exception("usage log processor shutdown failed")
            finally:
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    done.set_result(None)

        # A thread of its own: an export stuck on a collector that never answers must not
        # hold up the loop's shutdown.
        threading.Thread(target=shutdown, name="sidecar-usage-logs-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), timeout)
        except TimeoutError:
            log.warning("usage log export did not finish within %.1fs at shutdown", timeout)
        with self._lock:
            left = self._state.queued
            self._state.queued = 0
            self._state.closed = True
            self._state.dropped["shutdown"] += left
        if left:
            log.warning("%d usage log records were not exported at shutdown (the ledger has them)", left)
