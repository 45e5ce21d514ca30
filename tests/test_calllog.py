"""Structured call logs: the exact line, level and sampling, and a stream that blocks."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from sidecar.calllog import CallLogSink, LogSettings, keep, level_of, parse_logs, to_log_line
from sidecar.errors import ConfigError
from sidecar.model import CallRecord, Usage
from sidecar.yamlspec import Reader

BASE = CallRecord(
    request_id="req-1",
    started_at=1735689600.0,
    finished_at=1735689601.25,
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
    ttft_s=0.3,
    overhead_s=0.0004,
    usage=Usage(input=100, cached_input=40, output=20),
    estimated=Usage(reasoning=5),
    cost_usd=Decimal("0.00045"),
    price_version="abc123",
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
)


def rec(**changes: object) -> CallRecord:
    return dataclasses.replace(BASE, **changes)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


def test_log_line_fields() -> None:
    line = to_log_line(BASE)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2025-01-01T00:00:01.250Z",
        "level": "info",
        "event": "llm_call",
        "request_id": "req-1",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "tenant": "acme",
        "upstream": "openai",
        "provider": "openai",
        "operation": "chat",
        "model": "gpt-4o-2024-08-06",
        "request_model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06",
        "method": "POST",
        "stream": True,
        "status": 200,
        "error_type": None,
        "duration_s": 1.25,
        "ttft_s": 0.3,
        "overhead_s": 0.0004,
        "tokens": {
            "input": {"count": 100, "source": "reported"},
            "cached_input": {"count": 40, "source": "reported"},
            "output": {"count": 20, "source": "reported"},
            "reasoning": {"count": 5, "source": "estimated"},
        },
        "tokens_source": "mixed",
        "cost_usd": 0.00045,
        "price_version": "abc123",
    }


def test_unpriced_unreported_call() -> None:
    data = json.loads(to_log_line(rec(usage=Usage(), estimated=Usage(), cost_usd=None, provider="")))
    assert data["tokens"] == {}
    assert data["tokens_source"] is None
    assert data["cost_usd"] is None
    assert data["provider"] is None


def test_levels() -> None:
    assert level_of(BASE) == "info"
    assert level_of(rec(error_type="rate_limited", status=429)) == "warning"
    assert level_of(rec(error_type="client_abort", status=499)) == "warning"
    assert level_of(rec(error_type="upstream_5xx", status=503)) == "error"
    assert level_of(rec(error_type="timeout", status=504)) == "error"


def test_sampling_keeps_errors_and_a_fraction_of_successes() -> None:
    settings = LogSettings(sample_success=0.25)
    kept = sum(keep(rec(request_id=f"r{i}"), settings) for i in range(4000))
    assert 800 < kept < 1200
    assert keep(rec(request_id="r1"), settings) == keep(rec(request_id="r1"), settings)  # deterministic
    assert all(keep(rec(request_id=f"r{i}", error_type="upstream_5xx"), settings) for i in range(200))
    assert not keep(BASE, LogSettings(sample_success=0.0))
    assert keep(rec(error_type="upstream_4xx"), LogSettings(sample_success=0.0))


def test_level_threshold() -> None:
    settings = LogSettings(level="warning")
    assert not keep(BASE, settings)
    assert keep(rec(error_type="upstream_4xx"), settings)
    assert not keep(rec(error_type="upstream_4xx"), LogSettings(level="error"))
    assert keep(rec(error_type="connect_error"), LogSettings(level="error"))


async def test_sink_writes_lines_and_counts() -> None:
    out = io.StringIO()
    registry = CollectorRegistry()
    sink = CallLogSink(LogSettings(sample_success=0.0), out, registry)
    await sink.start()
    assert sink.offer(BASE)  # sampled out: accepted, not written
    assert sink.offer(rec(request_id="e1", error_type="upstream_5xx", status=502))
    assert sink.offer(rec(request_id="e2", error_type="upstream_4xx", status=400))
    await sink.stop(5.0)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["e1", "e2"]
    assert [json.loads(line)["level"] for line in lines] == ["error", "warning"]
    assert registry.get_sample_value("llm_calllog_lines_total") == 2
    assert registry.get_sample_value("llm_calllog_sampled_out_total") == 1


async def test_blocked_stream_never_slows_offer() -> None:
    """A pipe nobody reads fills up: the writer thread blocks, offer() stays instant and refuses."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w", encoding="utf-8")
    sink = CallLogSink(LogSettings(queue_size=100), stream)
    await sink.start()
    try:
        refused = 0
        started = time.perf_counter()
        for i in range(3000):
            refused += not sink.offer(rec(request_id=f"r{i}-" + "x" * 200))
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the worker hand batches to the blocked thread
        elapsed = time.perf_counter() - started
        assert refused > 0, "the pipe should have filled, and the queue with it"
        assert elapsed < 0.5, elapsed
    finally:
        drained = await asyncio.to_thread(_drain, read_fd)  # unblock the writer
        await sink.stop(5.0)
        stream.close()
        os.close(read_fd)
    assert drained > 65536
    assert sink.lines_written == 3000 - refused


def _drain(fd: int) -> int:
    """Read the pipe until nothing has come for 0.3 s."""
    os.set_blocking(fd, False)
    total = 0
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.3:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            chunk = b""
        if chunk:
            total += len(chunk)
            idle_since = time.monotonic()
        else:
            time.sleep(0.01)
    return total


def _parse(text: str) -> LogSettings:
    r = Reader("c.yaml")
    node = r.compose(text)
    assert node is not None
    settings = parse_logs(r, node, "logs")
    r.raise_for_problems()
    return settings


def test_parse_section() -> None:
    assert _parse("{level: warning, sample_success: 0.1, stream: stderr}") == LogSettings(
        stream="stderr", level="warning", sample_success=0.1
    )
    with pytest.raises(ConfigError) as info:
        _parse("{level: loud, sample_success: 2, queue_size: 0}")
    fields = sorted(p.field for p in info.value.problems)
    assert fields == ["logs.level", "logs.queue_size", "logs.sample_success"]


def test_gateway_fields_appear_only_on_calls_the_gateway_touched() -> None:
    import dataclasses
    import json

    from sidecar.calllog import to_log_line
    from sidecar.model import UpstreamAttempt

    plain = json.loads(to_log_line(BASE))
    assert not {"route", "variant", "throttled", "attempts"} & set(plain)
    routed = dataclasses.replace(
        BASE,
        route="chat",
        variant="candidate",
        attempts=(UpstreamAttempt("a", "5xx", 0.0, 0.1), UpstreamAttempt("b", "success", 0.1, 0.2)),
    )
    line = json.loads(to_log_line(routed))
    assert (line["route"], line["variant"], line["attempts"]) == ("chat", "candidate", ["a:5xx", "b:success"])
    assert json.loads(to_log_line(dataclasses.replace(BASE, throttled="rpm")))["throttled"] == "rpm"
