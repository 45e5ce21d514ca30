"""Opt-in prompt and completion capture on spans, redacted before anything leaves the process.

End to end: a real sidecar on 127.0.0.1 in front of the replaying upstream, exporting
spans to an OTLP/HTTP receiver that decodes ``ExportTraceServiceRequest`` as a
Collector would. With capture off (the default) neither the prompt nor the completion
appears anywhere in what the receiver gets; with it on, the span carries
``gen_ai.input.messages`` / ``gen_ai.system_instructions`` / ``gen_ai.output.messages``
(GenAI conventions v1.41, JSON strings) with the e-mail address, card number and API
key of the prompt replaced. Plus the pure parts: truncation, provider shapes, the
bounded redaction window, and the config keys. Every test fails if sidecar code blocks
the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from blockbuster import blockbuster_ctx
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar import tracing
from sidecar.calllog import to_log_line
from sidecar.errors import ConfigError
from sidecar.ledger import to_row
from sidecar.model import CallRecord, CapturedContent, Usage
from sidecar.redact import Redactor
from sidecar.tracing import (
    CONTENT_TRUNCATED,
    INPUT_MESSAGES,
    OUTPUT_MESSAGES,
    SYSTEM_INSTRUCTIONS,
    TracingSettings,
    TracingSink,
    content_attributes,
)
from tests.harness import make_config, running_sidecar
from tests.replay_upstream import ReplayUpstream

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
KEY = "sk-proj-AbCdEf0123456789XyZ"
EMPLOYEE = "EMP-123456"  # caught by a configured pattern only
SECRETS = (EMAIL, CARD, KEY, EMPLOYEE)
PROMPT = f"PROMPT-MARKER-7f3a: mail {EMAIL}, card {CARD}, key {KEY}, badge {EMPLOYEE}. Summarise."
SYSTEM = f"SYSTEM-MARKER-91c2: you answer {EMAIL} only"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNSAMPLED = "00-5bf92f3577b34da6a3ce929d0e0e4737-00f067aa0ba902b7-00"


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
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attrs(span: Span) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in span.attributes}


class Receiver:
    """``POST /v1/traces`` on 127.0.0.1: keeps the raw bodies and the decoded spans."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.arrived = asyncio.Event()
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.bodies.append(body)
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.arrived.set()
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def wait_for(self, count: int, timeout: float = 10.0) -> dict[str, dict[str, Any]]:
        """The spans' attributes by ``sidecar.request_id`` once ``count`` have arrived."""
        async with asyncio.timeout(timeout):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return {str(_attrs(span)["sidecar.request_id"]): _attrs(span) for span in self.spans}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.port = int(runner.addresses[0][1])
    try:
        yield rec
    finally:
        await runner.cleanup()


def _config(upstream: str, receiver: Receiver, tmp: Path, tracing_extra: str = "") -> Any:
    return make_config(
        f"- {{name: openai, url: '{upstream}', provider: openai, mount: /}}\n"
        f"- {{name: anthropic, url: '{upstream}', provider: anthropic, mount: /anthropic}}\n",
        extra=(
            "tracing:\n"
            f"  endpoint: http://127.0.0.1:{receiver.port}/v1/traces\n"
            "  schedule_delay: 50ms\n" + tracing_extra + "logs: {enabled: false}\n"
        ),
        tmp=tmp,
    )


async def _three_calls(base: str, s: aiohttp.ClientSession) -> None:
    """A JSON chat call, a streamed chat call and a streamed Anthropic call with a system prompt."""
    headers = {"traceparent": TRACEPARENT, "x-tenant-id": "acme"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    async with s.post(
        base + "/v1/chat/completions", json=chat, headers={**headers, "x-request-id": "json"}
    ) as r:
        assert r.status == 200
        await r.read()
    stream = {**chat, "model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    async with s.post(
        base + "/v1/chat/completions", json=stream, headers={**headers, "x-request-id": "stream"}
    ) as r:
        assert r.status == 200
        await r.read()
    messages = {
        "model": "claude-3-5-sonnet-20240620",
        "max_tokens": 64,
        "stream": True,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
    }
    async with s.post(
        base + "/anthropic/v1/messages", json=messages, headers={**headers, "x-request-id": "anthropic"}
    ) as r:
        assert r.status == 200
        await r.read()


def _serve_three(upstream: ReplayUpstream) -> None:
    upstream.serve("openai_chat_nonstream_cached_tokens.json")
    upstream.serve("openai_chat_stream_include_usage.sse")
    upstream.serve("anthropic_messages_stream_text_cache_read.sse")


# -- end to end ------------------------------------------------------------------------------


async def test_off_by_default_no_prompt_or_completion_on_spans(
    replay_upstream: ReplayUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    _serve_three(replay_upstream)
    cfg = _config(replay_upstream.url, receiver, tmp_path)
    async with asyncio.timeout(20):
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            assert not sc.tracing.capture_content
            await _three_calls(f"http://127.0.0.1:{sc.proxy_port}", s)
            records = {r.request_id: r for r in await collect.wait_for(3)}
            spans = await receiver.wait_for(3)

    assert set(spans) == {"json", "stream", "anthropic"}
    assert all(record.content is None for record in records.values())  # nothing kept in memory either
    completion = "Open-Source Library OpenLLMetry"  # the JSON fixture's answer
    raw = b"".join(receiver.bodies)
    for text in (*SECRETS, "PROMPT-MARKER-7f3a", "SYSTEM-MARKER-91c2", completion, "concise summ"):
        assert text.encode() not in raw, text
    for attrs in spans.values():
        assert not {INPUT_MESSAGES, OUTPUT_MESSAGES, SYSTEM_INSTRUCTIONS, CONTENT_TRUNCATED} & set(attrs)
        for value in attrs.values():
            assert "PROMPT-MARKER" not in str(value) and completion not in str(value)


async def test_opt_in_records_redacted_prompt_and_completion(
    replay_upstream: ReplayUpstream,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Where the content attributes are built: never on the event loop's thread.
    threads: list[str] = []
    real = tracing.content_attributes

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tracing, "content_attributes", spy)
    _serve_three(replay_upstream)
    cfg = _config(
        replay_upstream.url,
        receiver,
        tmp_path,
        "  capture_content: true\n  redaction:\n    patterns: {employee_id: 'EMP-[0-9]{6}'}\n",
    )
    async with asyncio.timeout(20):
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            loop_thread = threading.current_thread().name
            await _three_calls(f"http://127.0.0.1:{sc.proxy_port}", s)
            records = {r.request_id: r for r in await collect.wait_for(3)}
            spans = await receiver.wait_for(3)

    assert threads and loop_thread not in threads
    # Not one secret left the process, in any attribute of any span.
    raw = b"".join(receiver.bodies)
    for secret in SECRETS:
        assert secret.encode() not in raw, secret
    assert b"PROMPT-MARKER-7f3a" in raw

    redacted = (
        "PROMPT-MARKER-7f3a: mail [REDACTED:email], card [REDACTED:card], key [REDACTED:openai_key], "
        "badge [REDACTED:employee_id]. Summarise."
    )
    for request_id in ("json", "stream", "anthropic"):
        attrs = spans[request_id]
        record = records[request_id]
        assert record.content is not None
        messages = json.loads(attrs[INPUT_MESSAGES])
        assert messages == [{"role": "user", "parts": [{"type": "text", "content": redacted}]}]
        output = json.loads(attrs[OUTPUT_MESSAGES])
        assert len(output) == 1 and output[0]["role"] == "assistant"
        assert output[0]["parts"] == [{"type": "text", "content": record.content.output_text}]
        assert output[0]["finish_reason"] == record.finish_reasons[0]
        assert record.content.output_text  # the completion is there, whole (short of the limit)
        assert CONTENT_TRUNCATED not in attrs
    assert (
        "Open-Source Library OpenLLMetry"
        in json.loads(spans["json"][OUTPUT_MESSAGES])[0]["parts"][0]["content"]
    )
    system = json.loads(spans["anthropic"][SYSTEM_INSTRUCTIONS])
    assert system == [{"type": "text", "content": "SYSTEM-MARKER-91c2: you answer [REDACTED:email] only"}]
    assert SYSTEM_INSTRUCTIONS not in spans["json"]

    # The ledger row and the call log line of a record carrying content ignore it.
    for record in records.values():
        row = json.dumps(to_row(record, "call-1"))
        line = to_log_line(record)
        assert "PROMPT-MARKER" not in row and "PROMPT-MARKER" not in line
        assert "PROMPT-MARKER" not in repr(record)


async def test_unsampled_calls_keep_no_content(
    replay_upstream: ReplayUpstream, receiver: Receiver, tmp_path: Path
) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens.json")
    cfg = _config(replay_upstream.url, receiver, tmp_path, "  capture_content: true\n")
    async with asyncio.timeout(20):
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
            async with s.post(
                f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
                json=chat,
                headers={"traceparent": UNSAMPLED},
            ) as r:
                assert r.status == 200
                await r.read()
            (record,) = await collect.wait_for(1)
    assert not record.trace_sampled and record.content is None
    assert receiver.spans == []


# -- the pure parts --------------------------------------------------------------------------

BASE = CallRecord(
    request_id="r1",
    started_at=1735689600.0,
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
    response_model="gpt-4o",
    duration_s=0.5,
    usage=Usage(input=10, output=3),
    finish_reasons=("stop",),
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="b7ad6b7169203331",
    trace_sampled=True,
)


def _loads(value: object) -> Any:
    """An attribute holding JSON, decoded."""
    assert isinstance(value, str)
    return json.loads(value)


def _with(request: dict[str, Any] | bytes, output: str = "", **changes: Any) -> CallRecord:
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    return dataclasses.replace(BASE, content=CapturedContent(body, output), **changes)


def test_truncation_keeps_the_newest_messages_and_valid_json() -> None:
    history = [{"role": "user", "content": f"old message {i} " + "x" * 50} for i in range(20)]
    history.append({"role": "user", "content": f"newest {KEY} " + "y" * 100})
    attrs = content_attributes(_with({"messages": history}, "z" * 500), Redactor(), 120)
    messages = _loads(attrs[INPUT_MESSAGES])
    newest = messages[-1]["parts"][0]["content"]
    assert newest.startswith("newest [REDACTED:openai_key] yyy") and len(newest) <= 120
    assert KEY not in str(attrs[INPUT_MESSAGES])
    total = sum(len(p["content"]) for m in messages for p in m["parts"])
    assert total <= 120 and len(messages) < len(history)
    assert _loads(attrs[OUTPUT_MESSAGES])[0]["parts"][0]["content"] == "z" * 120
    assert attrs[CONTENT_TRUNCATED] is True


def test_a_cut_never_leaves_part_of_a_secret() -> None:
    redactor = Redactor()
    # The card straddles the cut: it is redacted whole before the text is cut.
    text = "a" * 95 + " 4111 1111 1111 1111 tail"
    kept, cut = redactor.redact_prefix(text, 100)
    assert cut and "4111" not in kept and kept.endswith(" [RED")
    # A megabyte of text is redacted only as far as it is kept (bounded cost)...
    huge = "word " * 200_000 + EMAIL
    kept, cut = redactor.redact_prefix(huge, 50)
    assert cut and len(kept) == 50
    # ... and a secret straddling the end of that window is never kept in part.
    tail = "b" * (50 + 2 * 4096 - 10) + EMAIL + "c" * 10_000
    kept, _ = redactor.redact_prefix(tail, 50 + 2 * 4096)
    assert "jane" not in kept and "@" not in kept


def test_provider_shapes() -> None:
    tools = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {}}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "function": {"name": "lookup", "arguments": f'{{"q": "{EMAIL}"}}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "found"},
        ]
    }
    messages = _loads(content_attributes(_with(tools), Redactor(), 1000)[INPUT_MESSAGES])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[1]["parts"] == [{"type": "text", "content": "hi"}, {"type": "image_url"}]
    call = messages[2]["parts"][0]
    assert call["type"] == "tool_call" and call["name"] == "lookup" and call["id"] == "c1"
    assert EMAIL not in call["arguments"] and "[REDACTED:email]" in call["arguments"]
    assert messages[3]["parts"] == [{"type": "tool_call_response", "response": "found", "id": "c1"}]

    responses = {"instructions": "be brief", "input": [{"role": "user", "content": "hello"}]}
    attrs = content_attributes(_with(responses, operation="responses"), Redactor(), 1000)
    assert _loads(attrs[SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "be brief"}]
    assert _loads(attrs[INPUT_MESSAGES]) == [
        {"role": "user", "parts": [{"type": "text", "content": "hello"}]}
    ]

    legacy = content_attributes(
        _with({"prompt": ["one", "two"]}, operation="text_completion"), Redactor(), 1000
    )
    assert _loads(legacy[INPUT_MESSAGES])[0]["parts"] == [
        {"type": "text", "content": "one"},
        {"type": "text", "content": "two"},
    ]
    # No content attributes for embeddings; none from a body that is not JSON (e.g. gzip).
    assert content_attributes(_with({"input": "x"}, "y", operation="embeddings"), Redactor(), 10) == {}
    assert INPUT_MESSAGES not in content_attributes(_with(b"\x1f\x8b\x08garbage", "out"), Redactor(), 10)


async def test_sink_adds_redacted_content_and_bounds_memory() -> None:
    exporter = InMemorySpanExporter()
    settings = TracingSettings(capture_content=True, capture_max_length=64)
    sink = TracingSink(settings, exporter=exporter)
    await sink.start()
    big = _with({"messages": [{"role": "user", "content": PROMPT}]}, "answer", request_id="with-content")
    assert sink.offer(big)
    # More content waiting than the sink will hold: that span goes out without it, counted.
    huge = dataclasses.replace(
        big,
        request_id="too-big",
        span_id="1111111111111111",
        content=CapturedContent(b"{}", "x" * (65 << 20)),
    )
    assert sink.offer(huge)
    await sink.stop(5.0)
    spans = {str((s.attributes or {})["sidecar.request_id"]): s for s in exporter.get_finished_spans()}
    attrs = dict(spans["with-content"].attributes or {})
    assert EMAIL not in str(attrs[INPUT_MESSAGES]) and "[REDACTED:email]" in str(attrs[INPUT_MESSAGES])
    assert attrs[CONTENT_TRUNCATED] is True  # the prompt is longer than 64 characters
    assert INPUT_MESSAGES not in (spans["too-big"].attributes or {})
    assert sink.content_dropped == {"memory": 1, "error": 0}


def test_config_keys() -> None:
    cfg = make_config(
        "- {name: openai, url: 'http://127.0.0.1:9', provider: openai}\n",
        extra=(
            "tracing:\n  capture_content: true\n  capture_max_length: 100\n"
            "  redaction: {defaults: false, patterns: {ticket: 'T-[0-9]+'}}\n"
        ),
    )
    assert cfg.tracing is not None
    settings, _ = tracing.resolve_tracing(cfg.tracing, {})
    assert settings.capture_content and settings.capture_max_length == 100
    assert not settings.redaction.use_defaults and settings.redaction.patterns == (("ticket", "T-[0-9]+"),)
    assert not tracing.resolve_tracing(None, {})[0].capture_content  # off unless opted in
    with pytest.raises(ConfigError) as info:
        make_config(
            "- {name: openai, url: 'http://127.0.0.1:9', provider: openai}\n",
            extra="tracing:\n  capture_max_length: 0\n  redaction: {headers: [x-a], patterns: {bad: '('}}\n",
        )
    assert sorted(p.field for p in info.value.problems) == [
        "tracing.capture_max_length",
        "tracing.redaction.headers",
        "tracing.redaction.patterns.bad",
    ]
