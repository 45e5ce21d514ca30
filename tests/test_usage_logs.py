"""Usage logs for fleets: every ledger row also goes out as an OpenTelemetry log record.

End to end: a real sidecar on 127.0.0.1 in front of the mock upstream, exporting usage
logs to an OTLP/HTTP receiver that decodes ``ExportLogsServiceRequest`` (opentelemetry-proto)
as a Collector would; the records are compared field by field with the ledger's rows
(tenant, model, token counts and sources, cost as exact decimal text...). A collector
that is down or hangs never delays a call, and the records it loses are counted. Plus
the gRPC transport and the settings. Every test fails if sidecar code blocks the event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp
import grpc  # type: ignore[import-untyped]
import pytest
from aiohttp import web
from blockbuster import blockbuster_ctx
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from sidecar.ledger import DB_NAME, Row, connect_readonly, read_rows
from sidecar.mock_upstream import start_mock_upstream
from sidecar.model import CallRecord, Usage
from sidecar.usagelogs import (
    EVENT_NAME,
    UsageLogsSection,
    UsageLogsSettings,
    UsageLogsSink,
    resolve_usage_logs,
)
from tests.harness import close_held, make_config, running_sidecar, sample


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


# -- an OTLP/HTTP collector --------------------------------------------------------------


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _attrs(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


def _records(
    requests: list[logs_service_pb2.ExportLogsServiceRequest],
) -> list[tuple[dict[str, Any], LogRecord]]:
    """``(resource attributes, log record)`` of every record received."""
    out: list[tuple[dict[str, Any], LogRecord]] = []
    for request in requests:
        for resource_logs in request.resource_logs:
            resource = _attrs(resource_logs.resource.attributes)
            for scope_logs in resource_logs.scope_logs:
                out.extend((resource, record) for record in scope_logs.log_records)
    return out


class Receiver:
    """``POST /v1/logs`` (decoded and kept) and ``POST /v1/traces`` (accepted) on 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.arrived = asyncio.Event()
        self.port = 0

    async def logs(self, request: web.Request) -> web.Response:
        message = logs_service_pb2.ExportLogsServiceRequest()
        message.ParseFromString(await request.read())
        self.requests.append(message)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.arrived.set()
        reply = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def traces(self, request: web.Request) -> web.Response:
        await request.read()
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], LogRecord]]:
        async with asyncio.timeout(timeout):
            while len(_records(self.requests)) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return _records(self.requests)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/logs", rec.logs)
    app.router.add_post("/v1/traces", rec.traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.port = int(runner.addresses[0][1])
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def mock_url() -> AsyncIterator[str]:
    runner, port = await start_mock_upstream(seed=7, failure_rate=0.0, latency_scale=0.0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _upstreams(url: str) -> str:
    return (
        f"- {{name: openai, url: '{url}', provider: openai, mount: /}}\n"
        f"- {{name: anthropic, url: '{url}', provider: anthropic, mount: /anthropic}}\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _ledger_rows(data_dir: Path) -> list[Row]:
    with contextlib.closing(connect_readonly(data_dir / DB_NAME)) as conn:
        return list(read_rows(conn))


#: (path, body, headers) of the calls: two tenants, three models, JSON and streams, a failure.
CALLS: list[tuple[str, dict[str, Any], dict[str, str]]] = [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}]}, {}),
    (
        "/v1/chat/completions",
        {
            "model": "gpt-4o",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "bb"}],
        },
        {},
    ),
    (
        "/anthropic/v1/messages",
        {"model": "claude-haiku-4-5", "max_tokens": 30, "messages": [{"role": "user", "content": "ccc"}]},
        {},
    ),
    (
        "/anthropic/v1/messages",
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 30,
            "stream": True,
            "messages": [{"role": "user", "content": "dddd"}],
        },
        {},
    ),
    (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "e"}]},
        {"x-mock-failure": "500"},
    ),
]


# -- end to end ------------------------------------------------------------------------------


async def test_every_call_is_one_log_record_with_the_ledger_fields(
    mock_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    cfg = make_config(
        _upstreams(mock_url),
        extra=(
            f"tracing: {{endpoint: 'http://127.0.0.1:{receiver.port}/v1/traces', service_name: fleet-a}}\n"
            "usage_logs:\n"
            f"  endpoint: http://127.0.0.1:{receiver.port}/v1/logs\n"
            "  headers: {x-team: finance}\n"
            "  schedule_delay: 50ms\n"
            "logs: {enabled: false}\n"
        ),
        tmp=tmp_path,
    )
    calls = [(f"req-{i}", "acme" if i % 2 else "beta", *call) for i, call in enumerate(CALLS * 2)]
    async with asyncio.timeout(20):
        async with running_sidecar(cfg) as (sc, _collect), aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{sc.proxy_port}"
            for request_id, tenant, path, body, headers in calls:
                hdrs = {"x-request-id": request_id, "x-tenant-id": tenant, **headers}
                async with s.post(base + path, json=body, headers=hdrs) as r:
                    await r.read()
            received = await receiver.wait_for(len(calls))
            # The exporter counts a batch once the collector's answer is back, a moment after
            # the receiver has the records: wait for the count rather than race it.
            while sample(sc, "llm_usage_logs_exported_total") < len(calls):
                await asyncio.sleep(0.02)
            assert sample(sc, "llm_usage_logs_exported_total") == len(calls)
        rows = await asyncio.to_thread(_ledger_rows, tmp_path)

    assert len(received) == len(rows) == len(calls)  # one record per call, no more
    by_request = {
        record_attrs["request_id"]: (resource, record, record_attrs)
        for resource, record in received
        for record_attrs in [_attrs(record.attributes)]
    }
    assert set(by_request) == {c[0] for c in calls}
    call_ids = set()
    for row in rows:
        resource, record, attrs = by_request[row["request_id"]]
        expected = {k: v for k, v in row.items() if v is not None and k != "call_id"}
        call_ids.add(attrs.pop("call_id"))
        assert attrs == expected  # the ledger's columns, names and values, NULLs left out
        assert record.event_name == EVENT_NAME and record.severity_text == "INFO"
        assert record.time_unix_nano == round(float(row["epoch"]) * 1_000_000) * 1000  # type: ignore[arg-type]
        assert record.trace_id.hex() == row["trace_id"] and record.span_id.hex() == row["span_id"]
        assert resource["service.name"] == "fleet-a"
    assert len(call_ids) == len(rows)  # unique per call
    # The figures finance reads: tenant, model, tokens by type, exact cost text.
    ok = [r for r in rows if r["error_type"] is None]
    assert len(ok) == 8 and {r["tenant"] for r in rows} == {"acme", "beta"}
    for row in ok:
        attrs = by_request[row["request_id"]][2]
        assert attrs["tenant"] == row["tenant"] and attrs["model"] == row["model"]
        assert attrs["input_tokens"] == row["input_tokens"] and attrs["input_tokens"] > 0
        assert attrs["output_tokens"] == row["output_tokens"] and attrs["output_tokens"] > 0
        assert isinstance(attrs["cost_usd"], str) and Decimal(attrs["cost_usd"]) > 0
        assert attrs["cost_usd"] == row["cost_usd"]
    failed = [r for r in rows if r["error_type"] is not None]
    assert {r["error_type"] for r in failed} == {"upstream_5xx"}
    assert all("cost_usd" not in by_request[r["request_id"]][2] for r in failed)
    assert receiver.headers[0]["x-team"] == "finance"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


@pytest.mark.parametrize("collector", ["down", "hanging"])
async def test_collector_trouble_never_delays_calls_and_drops_are_counted(
    collector: str, mock_url: str, tmp_path: Path
) -> None:
    connections: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # accept, read, never answer

    server: asyncio.Server | None = None
    if collector == "hanging":
        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        port = _free_port()  # nothing listens there
    cfg = make_config(
        _upstreams(mock_url),
        extra=(
            "usage_logs:\n"
            f"  endpoint: http://127.0.0.1:{port}/v1/logs\n"
            "  timeout: 3s\n"  # longer than the 2 s every call must stay under
            "  queue_size: 8\n"
            "  batch_size: 4\n"
            "  schedule_delay: 50ms\n"
            "shutdown: {drain_timeout: 1s}\n"
            "logs: {enabled: false}\n"
        ),
        tmp=tmp_path,
    )
    latencies: list[float] = []
    try:
        async with asyncio.timeout(30):
            async with running_sidecar(cfg) as (sc, _collect), aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{sc.proxy_port}"
                stop_at = time.monotonic() + 2.0

                async def worker(w: int) -> None:
                    n = 0
                    while time.monotonic() < stop_at:
                        n += 1
                        path, body, _ = CALLS[(w + n) % 4]
                        t0 = perf_counter()
                        async with s.post(base + path, json=body, headers={"x-tenant-id": f"t{w}"}) as r:
                            await r.read()
                            assert r.status == 200
                        latencies.append(perf_counter() - t0)
                        await asyncio.sleep(0.02)

                await asyncio.gather(*(worker(w) for w in range(4)))
                # Past the queue, records are dropped at once (and the pipeline counts them).
                assert sample(sc, "llm_usage_logs_dropped_total", reason="queue_full") > 0
                assert sample(sc, "llm_sink_dropped_total", sink="usage_logs") > 0
                if collector == "down":  # the exporter gives up on a refused connection
                    async with asyncio.timeout(10):
                        while sample(sc, "llm_usage_logs_dropped_total", reason="export_failed") == 0:
                            await asyncio.sleep(0.05)
                assert sample(sc, "llm_usage_logs_exported_total") == 0
                calls = len(latencies)
            lost = sample(sc, "llm_usage_logs_dropped_total")
            rows = await asyncio.to_thread(_ledger_rows, tmp_path)
    finally:
        await close_held(server, connections)
    print(f"\n[usage logs, collector {collector}] {calls} calls, slowest {max(latencies) * 1000:.0f} ms")
    assert calls >= 20
    assert max(latencies) < 2.0
    assert lost == calls  # every record is accounted for: none exported, all counted as dropped
    assert len(rows) == calls  # the local ledger still has every call


# -- the gRPC transport, the sink alone, the settings ------------------------------------------

RECORD = CallRecord(
    request_id="g-1",
    started_at=1735689600.5,
    tenant="acme",
    upstream="openai",
    provider="openai",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    stream=False,
    status=200,
    error_type=None,
    request_model="gpt-4o",
    response_model="gpt-4o-2024-08-06",
    duration_s=0.25,
    usage=Usage(input=100, cached_input=40, output=20),
    cost_usd=Decimal("0.000123456789"),
    price_version="v1",
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="00f067aa0ba902b7",
    trace_sampled=True,
)


class GrpcReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self) -> None:
        self.requests: list[logs_service_pb2.ExportLogsServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()


async def test_grpc_export() -> None:
    receiver = GrpcReceiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = UsageLogsSettings(
            enabled=True, protocol="grpc", endpoint=f"http://127.0.0.1:{port}", schedule_delay=0.05
        )
        sink = UsageLogsSink(settings)
        await sink.start()
        assert sink.offer(RECORD)
        await sink.stop(10.0)
        assert sink.exported == 1, sink.dropped
    finally:
        server.stop(None).wait()
    ((_, record),) = _records(receiver.requests)
    attrs = _attrs(record.attributes)
    assert attrs["cost_usd"] == "0.000123456789"
    assert (attrs["input_tokens"], attrs["cached_input_tokens"], attrs["output_tokens"]) == (100, 40, 20)
    assert attrs["input_tokens_source"] == "reported" and "reasoning_tokens" not in attrs
    assert attrs["time"] == "2025-01-01T00:00:00.500Z"
    assert record.trace_id.hex() == RECORD.trace_id and record.flags & 0xFF == 1


def test_settings() -> None:
    off, warnings = resolve_usage_logs(None, {})
    assert not off.enabled and warnings == []
    # The generic endpoint turns traces on, not usage logs: a collector may take one and not the other.
    assert not resolve_usage_logs(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})[0].enabled
    on, warnings = resolve_usage_logs(
        None,
        {
            "OTEL_LOGS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/",
            "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "x-a=1",
            "OTEL_BLRP_MAX_QUEUE_SIZE": "100",
            "OTEL_BLRP_SCHEDULE_DELAY": "250",
        },
        service_name="svc",
    )
    assert warnings == []
    assert (on.enabled, on.protocol, on.endpoint) == (True, "http/protobuf", "http://c:4318/v1/logs")
    assert (on.headers, on.queue_size, on.schedule_delay, on.service_name) == (
        (("x-a", "1"),),
        100,
        0.25,
        "svc",
    )
    grpc_on, _ = resolve_usage_logs(
        None,
        {
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:4317",
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    )
    assert (grpc_on.enabled, grpc_on.protocol, grpc_on.endpoint) == (True, "grpc", "http://c:4317")
    env = {"OTEL_LOGS_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert not resolve_usage_logs(None, env)[0].enabled
    assert resolve_usage_logs(UsageLogsSection(enabled=True), env)[0].enabled  # the file wins
    _, warnings = resolve_usage_logs(None, {"OTEL_LOGS_EXPORTER": "console", "OTEL_BLRP_MAX_QUEUE_SIZE": "x"})
    assert len(warnings) == 2, warnings

    cfg = make_config(
        "- {name: openai, url: 'http://127.0.0.1:9', provider: openai}\n",
        extra="usage_logs: {protocol: grpc, endpoint: 'http://c:4317', timeout: 2s, queue_size: 10}\n",
    )
    assert cfg.usage_logs == UsageLogsSection(
        protocol="grpc", endpoint="http://c:4317", timeout=2.0, queue_size=10
    )
    settings, _ = resolve_usage_logs(cfg.usage_logs, {})
    assert settings.enabled and settings.batch_size == 10  # capped at the queue size
