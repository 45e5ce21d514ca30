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


def reference_line(record: CallRecord) -> str:
    """The line as ``json.dumps`` of a dict writes it: what to_log_line's field-by-field text must equal."""
    from sidecar.calllog import _tokens
    from sidecar.ledger import iso_utc

    def seconds(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    tokens, source = _tokens(record)
    line: dict[str, object] = {
        "time": iso_utc(record.finished_at or record.started_at + record.duration_s),
        "level": level_of(record),
        "event": "llm_call",
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "tenant": record.tenant,
        "upstream": record.upstream,
        "provider": record.provider or None,
        "operation": record.operation,
        "model": record.model,
        "request_model": record.request_model,
        "response_model": record.response_model,
        "method": record.method,
        "stream": record.stream,
        "status": record.status,
        "error_type": record.error_type,
        "duration_s": seconds(record.duration_s),
        "ttft_s": seconds(record.ttft_s),
        "overhead_s": seconds(record.overhead_s),
        "tokens": tokens,
        "tokens_source": source,
        "cost_usd": float(record.cost_usd) if record.cost_usd is not None else None,
        "price_version": record.price_version or None,
    }
    if record.route:
        line["route"] = record.route
        if record.variant:
            line["variant"] = record.variant
    if record.throttled:
        line["throttled"] = record.throttled
    if len(record.attempts) > 1:
        line["attempts"] = [f"{a.upstream}:{a.outcome}" for a in record.attempts]
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tenant": 'ac"me\\\n\t\x00\x1f\u2028é日本', "request_id": "ünï\x7f", "response_model": 'ø"m'},
        {"request_model": None, "response_model": None, "provider": "", "trace_id": None, "span_id": None},
        {"ttft_s": None, "overhead_s": 1e-9, "duration_s": 123456.7891234567, "cost_usd": None},
        {"duration_s": float("nan"), "ttft_s": float("inf"), "overhead_s": float("-inf")},
        {"cost_usd": Decimal("1E-12"), "usage": Usage(), "estimated": Usage(), "price_version": ""},
        {"cost_usd": Decimal("12345678901234567890.123"), "usage": Usage(input=0, output=0)},
        {"error_type": "upstream_5xx", "status": 502, "stream": False},
        {"error_type": "client_abort", "status": 499, "throttled": "rpm"},
        {"route": "r", "variant": "canary", "attempts": ()},
        {"route": "r", "variant": ""},
        {"finished_at": 0.0, "started_at": 1735689600.9999996},
    ],
)
def test_log_line_is_what_json_dumps_writes(changes: dict[str, object]) -> None:
    from sidecar.model import UpstreamAttempt

    record = rec(**changes)
    assert to_log_line(record) == reference_line(record)
    attempts = (UpstreamAttempt("a", "5xx", 0.0, 0.1), UpstreamAttempt('b"é', "success", 0.1, 0.2))
    with_attempts = dataclasses.replace(record, attempts=attempts)
    assert to_log_line(with_attempts) == reference_line(with_attempts)
