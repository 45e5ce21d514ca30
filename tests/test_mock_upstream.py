"""The mock upstream answers in the providers' shapes with self-consistent, deterministic usage."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from sidecar.mock_upstream import FAILURE_KINDS, MOCK_STATS, create_mock_app, start_mock_upstream


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    raw: bytes  # as on the wire
    body: bytes  # gzip removed

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[tuple[str | None, dict[str, Any] | str]]:
        """SSE events as (event name, parsed data or the raw data text)."""
        out: list[tuple[str | None, dict[str, Any] | str]] = []
        text = self.body.decode()
        assert text.endswith("\n\n"), "a complete stream ends with a blank line"
        for block in text.split("\n\n")[:-1]:
            name, data = None, []
            for line in block.split("\n"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
            joined = "\n".join(data)
            out.append((name, joined if joined == "[DONE]" else json.loads(joined)))
        return out


class Mock:
    """A running mock upstream and a client session that does not decode gzip."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None, gz: bool = False
    ) -> Reply:
        hdrs = {"Accept-Encoding": "gzip" if gz else "identity", **(headers or {})}
        async with self.session.post(self.base + path, data=json.dumps(body).encode(), headers=hdrs) as resp:
            raw = await resp.read()
            decoded = gzip.decompress(raw) if resp.headers.get("Content-Encoding") == "gzip" else raw
            return Reply(resp.status, resp.headers, raw, decoded)


@asynccontextmanager
async def running_mock(
    seed: int = 3, failure_rate: float = 0.0, latency_scale: float = 0.0, gzip_streams: bool = False
) -> AsyncIterator[Mock]:
    runner, port = await start_mock_upstream(
        seed=seed, failure_rate=failure_rate, latency_scale=latency_scale, gzip_streams=gzip_streams
    )
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            yield Mock(f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    async with running_mock() as m:
        yield m


def chat(
    model: str = "gpt-4o", stream: bool = False, include_usage: bool = False, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Summarise the quarterly latency report for the tenants."}],
        **extra,
    }
    if stream:
        body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def anthropic(stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "Write a short note on prompt caching."}],
        **extra,
    }
    if stream:
        body["stream"] = True
    return body


# -- OpenAI Chat Completions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "resolved"),
    [
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("gpt-5-mini", "gpt-5-mini-2025-08-07"),
        ("o4-mini", "o4-mini-2025-04-16"),
        ("my-own-model", "my-own-model"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
    ],
)
async def test_chat_stream_usage_equals_json_usage(mock: Mock, model: str, resolved: str) -> None:
    plain = await mock.post("/openai/v1/chat/completions", chat(model))
    assert plain.status == 200 and plain.headers["Content-Type"] == "application/json"
    doc = plain.json()
    usage = doc["usage"]
    text = doc["choices"][0]["message"]["content"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(text.split()) == usage["completion_tokens"] - reasoning
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"]
    if model.startswith(("o", "gpt-5")):
        assert reasoning > 0
    else:
        assert reasoning == 0
    assert doc["model"] == resolved

    streamed = await mock.post("/openai/v1/chat/completions", chat(model, stream=True, include_usage=True))
    assert streamed.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    events = streamed.events()
    assert events[-1] == (None, "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(isinstance(c, dict) for c in chunks)
    chunk_dicts = [c for c in chunks if isinstance(c, dict)]
    *body_chunks, final = chunk_dicts
    assert final["choices"] == [] and final["usage"] == usage
    assert all("usage" in c and c["usage"] is None for c in body_chunks)
    assert all(c["model"] == doc["model"] and c["object"] == "chat.completion.chunk" for c in chunk_dicts)
    assert len({c["id"] for c in chunk_dicts}) == 1
    assert body_chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    deltas = [c["choices"][0]["delta"].get("content") for c in body_chunks[1:-1]]
    assert "".join(d or "" for d in deltas) == text  # same answer as the JSON one
    assert len(deltas) == usage["completion_tokens"] - reasoning  # one word per chunk
    assert body_chunks[-1]["choices"][0]["delta"] == {}
    assert body_chunks[-1]["choices"][0]["finish_reason"] == doc["choices"][0]["finish_reason"]


async def test_chat_stream_without_include_usage_has_no_usage_key(mock: Mock) -> None:
    streamed = await mock.post("/v1/chat/completions", chat(stream=True))
    events = streamed.events()
    assert events[-1] == (None, "[DONE]")
    chunks = [data for _, data in events[:-1] if isinstance(data, dict)]
    assert len(chunks) == len(events) - 1
    assert all("usage" not in c and "obfuscation" in c for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage-only chunk


async def test_cap_truncates_with_finish_reason_length(mock: Mock) -> None:
    doc = (await mock.post("/v1/chat/completions", chat(max_tokens=3))).json()
    assert doc["usage"]["completion_tokens"] == 3
    assert doc["choices"][0]["finish_reason"] == "length"
    assert len(doc["choices"][0]["message"]["content"].split()) == 3
    capped = (await mock.post("/v1/chat/completions", chat("gpt-5-mini", max_completion_tokens=40))).json()
    details = capped["usage"]["completion_tokens_details"]
    assert capped["usage"]["completion_tokens"] == 40 and 0 < details["reasoning_tokens"] < 40
    assert len(capped["choices"][0]["message"]["content"].split()) == 40 - details["reasoning_tokens"]


async def test_usage_is_deterministic_per_seed_and_request(mock: Mock) -> None:
    first = (await mock.post("/v1/chat/completions", chat())).json()
    again = (await mock.post("/v1/chat/completions", chat())).json()
    assert first["usage"] == again["usage"]
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    assert first["id"] != again["id"]
    prompts = set()
    outputs = set()
    cached = 0
    for i in range(30):
        body = chat(messages=[{"role": "user", "content": "question number " + "x" * (i * 10)}])
        usage = (await mock.post("/v1/chat/completions", body)).json()["usage"]
        prompts.add(usage["prompt_tokens"])
        outputs.add(usage["completion_tokens"])
        cached += usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert len(prompts) > 20  # prompt tokens grow with the request
    assert len(outputs) > 5
    assert 0 < cached < 30  # sometimes cached
    async with running_mock(seed=4) as other:
        different = (await other.post("/v1/chat/completions", chat())).json()
    assert different["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert different["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]


# -- OpenAI legacy Completions, Responses, Embeddings -------------------------------


async def test_completions_json_and_stream(mock: Mock) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say something", "max_tokens": 30}
    doc = (await mock.post("/v1/completions", body)).json()
    assert doc["object"] == "text_completion"
    usage = doc["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert len(doc["choices"][0]["text"].split()) == usage["completion_tokens"] <= 30
    events = (
        await mock.post(
            "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    ).events()
    assert events[-1] == (None, "[DONE]")
    chunks = [d for _, d in events[:-1] if isinstance(d, dict)]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == doc["choices"][0]["text"]


async def test_responses_json_and_stream(mock: Mock) -> None:
    body = {"model": "gpt-5-mini", "input": "Explain burn rates.", "reasoning": {"effort": "low"}}
    doc = (await mock.post("/v1/responses", body)).json()
    assert doc["object"] == "response" and doc["status"] == "completed"
    assert doc["model"] == "gpt-5-mini-2025-08-07"
    usage = doc["usage"]
    assert set(usage) == {
        "input_tokens",
        "input_tokens_details",
        "output_tokens",
        "output_tokens_details",
        "total_tokens",
    }
    reasoning = usage["output_tokens_details"]["reasoning_tokens"]
    assert reasoning > 0
    assert [item["type"] for item in doc["output"]] == ["reasoning", "message"]
    text = doc["output"][1]["content"][0]["text"]
    assert len(text.split()) == usage["output_tokens"] - reasoning

    events = (await mock.post("/v1/responses", {**body, "stream": True})).events()
    names = [name for name, _ in events]
    data = [d for _, d in events if isinstance(d, dict)]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    assert all(name == d["type"] for name, d in zip(names, data, strict=True))
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[0]["response"]["usage"] is None
    assert data[-1]["response"]["usage"] == usage
    deltas = [d["delta"] for d in data if d["type"] == "response.output_text.delta"]
    assert "".join(deltas) == text and len(deltas) == len(text.split())
    assert names.index("response.output_text.delta") > names.index("response.content_part.added")


async def test_responses_cap_gives_incomplete(mock: Mock) -> None:
    body = {"model": "gpt-4o-mini", "input": "Tell a long story.", "max_output_tokens": 16}
    doc = (await mock.post("/v1/responses", body)).json()
    assert doc["status"] == "incomplete" and doc["incomplete_details"] == {"reason": "max_output_tokens"}
    assert doc["usage"]["output_tokens"] == 16
    events = (await mock.post("/v1/responses", {**body, "stream": True})).events()
    name, last = events[-1]
    assert name == "response.incomplete" and isinstance(last, dict)
    assert last["response"]["usage"] == doc["usage"]


async def test_embeddings_float_and_base64(mock: Mock) -> None:
    body = {"model": "text-embedding-3-small", "input": ["first text to embed", "second"]}
    reply = await mock.post("/v1/embeddings", body)
    doc = reply.json()
    assert reply.headers["openai-model"] == "text-embedding-3-small"
    assert [d["index"] for d in doc["data"]] == [0, 1]
    assert len(doc["data"][0]["embedding"]) == 1536
    assert doc["usage"] == {"prompt_tokens": 4 + 1, "total_tokens": 5}
    doc = (await mock.post("/v1/embeddings", {**body, "encoding_format": "base64", "dimensions": 256})).json()
    vector = base64.b64decode(doc["data"][1]["embedding"])
    assert len(vector) == 256 * 4
    bad = await mock.post("/v1/embeddings", {**body, "dimensions": 5000})
    assert bad.status == 400 and bad.json()["error"]["type"] == "invalid_request_error"


# -- Anthropic Messages --------------------------------------------------------------


async def test_anthropic_stream_usage_equals_json_usage(mock: Mock) -> None:
    reply = await mock.post("/anthropic/v1/messages", anthropic())
    assert reply.headers["request-id"].startswith("req_")
    doc = reply.json()
    usage = doc["usage"]
    assert doc["model"] == "claude-haiku-4-5-20251001" and doc["type"] == "message"
    assert len(doc["content"][0]["text"].split()) == usage["output_tokens"]

    events = (await mock.post("/anthropic/v1/messages", anthropic(stream=True))).events()
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    data = [d for _, d in events if isinstance(d, dict)]
    assert all(d["type"] == name for name, d in zip(names, data, strict=True))
    start = data[0]["message"]["usage"]
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        assert start[key] == usage[key] == data[-2]["usage"][key]
    assert data[-2]["usage"]["output_tokens"] == usage["output_tokens"]  # cumulative, not a delta
    assert data[-2]["delta"]["stop_reason"] == doc["stop_reason"]
    text = "".join(d["delta"]["text"] for d in data[3:-3])
    assert text == doc["content"][0]["text"]
    assert len(data[3:-3]) == usage["output_tokens"]


async def test_anthropic_cache_fields_sometimes_non_zero(mock: Mock) -> None:
    reads = writes = 0
    for i in range(30):
        body = anthropic(system="You are terse. " * (i + 1))
        usage = (await mock.post("/v1/messages", body)).json()["usage"]
        assert usage["input_tokens"] >= 1
        reads += usage["cache_read_input_tokens"] > 0
        writes += usage["cache_creation_input_tokens"] > 0
        assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == usage["cache_creation_input_tokens"]
    assert 0 < reads < 30 and 0 < writes < 30


async def test_anthropic_max_tokens_stop_reason(mock: Mock) -> None:
    doc = (await mock.post("/v1/messages", anthropic(max_tokens=2))).json()
    assert doc["stop_reason"] == "max_tokens" and doc["usage"]["output_tokens"] == 2


# -- routing, validation, compression -------------------------------------------------


async def test_any_prefix_and_unknown_paths(mock: Mock) -> None:
    assert (await mock.post("/a/b/c/v1/chat/completions", chat())).status == 200
    missing = await mock.post("/openai/v2/nothing", {})
    assert missing.status == 404 and missing.json()["error"]["code"] == "unknown_url"
    missing = await mock.post("/anthropic/v1/nothing", {})
    assert missing.status == 404 and missing.json()["type"] == "error"
    async with mock.session.get(
        mock.base + "/openai/v1/models", headers={"Accept-Encoding": "identity"}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["object"] == "list"


async def test_malformed_requests_get_400(mock: Mock) -> None:
    async with mock.session.post(mock.base + "/v1/chat/completions", data=b"{not json") as resp:
        assert resp.status == 400
    assert (await mock.post("/v1/chat/completions", {"messages": []})).status == 400
    no_max = await mock.post("/v1/messages", {"model": "claude-haiku-4-5", "messages": []})
    assert no_max.status == 400 and no_max.json()["error"]["type"] == "invalid_request_error"
    forced = await mock.post("/v1/chat/completions", chat(), headers={"x-mock-failure": "cut"})
    assert forced.status == 400  # a cut needs a stream


async def test_gzip_when_accepted(mock: Mock) -> None:
    plain = await mock.post("/v1/chat/completions", chat())
    packed = await mock.post("/v1/chat/completions", chat(), gz=True)
    assert "Content-Encoding" not in plain.headers
    assert packed.headers["Content-Encoding"] == "gzip"
    assert packed.raw[:2] == b"\x1f\x8b" and packed.raw != packed.body
    assert packed.json()["usage"] == plain.json()["usage"]
    stream = await mock.post("/v1/messages", anthropic(stream=True), gz=True)
    assert "Content-Encoding" not in stream.headers  # SSE stays plain unless gzip_streams
    error = await mock.post("/v1/messages", anthropic(), {"x-mock-failure": "529"}, gz=True)
    assert error.headers["Content-Encoding"] == "gzip" and error.json()["error"]["type"] == "overloaded_error"


async def test_gzip_streams_option_compresses_anthropic_sse() -> None:
    async with running_mock(gzip_streams=True) as m:
        stream = await m.post("/v1/messages", anthropic(stream=True), gz=True)
        assert stream.headers["Content-Encoding"] == "gzip"
        assert stream.events()[-1][0] == "message_stop"
        openai = await m.post("/v1/chat/completions", chat(stream=True), gz=True)
        assert "Content-Encoding" not in openai.headers


# -- failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "status", "error_type"),
    [
        ("/v1/chat/completions", "500", 500, "server_error"),
        ("/v1/chat/completions", "503", 503, "server_error"),
        ("/v1/chat/completions", "429", 429, "requests"),
        ("/v1/messages", "500", 500, "api_error"),
        ("/v1/messages", "529", 529, "overloaded_error"),
        ("/v1/messages", "429", 429, "rate_limit_error"),
    ],
)
async def test_forced_status_failures(mock: Mock, path: str, kind: str, status: int, error_type: str) -> None:
    body = anthropic() if path == "/v1/messages" else chat()
    reply = await mock.post(path, body, {"x-mock-failure": kind})
    assert reply.status == status
    doc = reply.json()
    if path == "/v1/messages":
        assert doc["type"] == "error" and doc["error"]["type"] == error_type
        assert doc["request_id"].startswith("req_")
        assert reply.headers["x-should-retry"] == "true"
    else:
        assert doc["error"]["type"] == error_type and set(doc["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
        assert reply.headers["x-request-id"].startswith("req_")
    if status == 429:
        assert 1 <= int(reply.headers["Retry-After"]) <= 5


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"])
async def test_forced_stream_cut(mock: Mock, path: str) -> None:
    if path == "/v1/messages":
        body = anthropic(stream=True)
    elif path == "/v1/chat/completions":
        body = chat(stream=True, include_usage=True)
    elif path == "/v1/completions":
        body = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 50, "stream": True}
    else:
        body = {"model": "gpt-4o", "input": "hi", "stream": True}
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with mock.session.post(
            mock.base + path, data=json.dumps(body), headers={"x-mock-failure": "cut"}
        ) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                got += data
    assert got == b"" or got.endswith(b"\n\n")  # whole events, then the connection closed
    for marker in (b"[DONE]", b"message_stop", b"response.completed", b"message_delta"):
        assert marker not in got
    # the server is still fine afterwards
    assert (await mock.post(path, {**body, "stream": False})).status == 200


async def test_forced_anthropic_sse_error(mock: Mock) -> None:
    reply = await mock.post("/v1/messages", anthropic(stream=True), {"x-mock-failure": "sse_error"})
    assert reply.status == 200
    events = reply.events()
    name, data = events[-1]
    assert name == "error" and isinstance(data, dict) and data["error"]["type"] == "overloaded_error"
    assert "message_stop" not in [n for n, _ in events]


async def test_random_failures_are_seeded_and_cover_every_kind() -> None:
    async def run(seed: int) -> tuple[list[str], Counter[str]]:
        outcomes: list[str] = []
        async with running_mock(seed=seed, failure_rate=0.5) as m:
            for i in range(80):
                anth = i % 2 == 1
                path = "/v1/messages" if anth else "/v1/chat/completions"
                body = anthropic(stream=True) if anth else chat(stream=True)
                try:
                    reply = await m.post(path, body)
                except aiohttp.ClientPayloadError:
                    outcomes.append(f"{path}:cut")
                    continue
                if reply.status != 200:
                    outcomes.append(f"{path}:{reply.status}")
                elif b"event: error" in reply.body:
                    outcomes.append(f"{path}:sse_error")
                else:
                    outcomes.append(f"{path}:ok")
        return outcomes, Counter(outcomes)

    first, counts = await run(11)
    again, _ = await run(11)
    assert first == again  # same seed, same sequence of failures
    other, _ = await run(12)
    assert other != first
    expected = {f"/v1/chat/completions:{k}" for k in FAILURE_KINDS["openai"]}
    expected |= {f"/v1/messages:{k}" for k in FAILURE_KINDS["anthropic"]}
    assert expected <= set(counts)
    failed = sum(n for key, n in counts.items() if not key.endswith(":ok"))
    assert 20 <= failed <= 60  # about half


async def test_no_failures_when_rate_is_zero() -> None:
    app = create_mock_app(failure_rate=0.0, latency_scale=0.0)
    assert app[MOCK_STATS].requests == Counter()
    async with running_mock(failure_rate=0.0) as m:
        for _ in range(20):
            assert (await m.post("/v1/chat/completions", chat(stream=True))).status == 200
    with pytest.raises(ValueError, match="failure_rate"):
        create_mock_app(failure_rate=1.5)


async def test_stats_count_requests_and_failures() -> None:
    app = create_mock_app(latency_scale=0.0)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            m = Mock(f"http://127.0.0.1:{port}", session)
            await m.post("/v1/chat/completions", chat(), {"x-mock-failure": "429"})
            await m.post(
                "/v1/embeddings",
                {"model": "text-embedding-3-small", "input": "x"},
                {"x-mock-failure": "none"},
            )
    finally:
        await runner.cleanup()
    stats = app[MOCK_STATS]
    assert stats.requests == Counter({"chat": 1, "embeddings": 1})
    assert stats.failures == Counter({"429": 1})


# -- timing and robustness -----------------------------------------------------------


async def test_latency_is_realistic_and_scaled() -> None:
    async with running_mock(latency_scale=1.0) as m:
        started = time.monotonic()
        await m.post("/v1/chat/completions", chat(max_tokens=5))
        assert 0.1 <= time.monotonic() - started < 1.5
        started = time.monotonic()
        async with m.session.post(
            m.base + "/v1/chat/completions", json=chat(stream=True, max_tokens=6)
        ) as resp:
            await resp.content.readany()
            ttft = time.monotonic() - started
            await resp.read()
            total = time.monotonic() - started
        assert 0.03 <= ttft < 1.0
        assert total - ttft >= 5 * 0.005  # gaps between the remaining chunks
    async with running_mock(latency_scale=0.0) as m:
        started = time.monotonic()
        for _ in range(10):
            await m.post("/v1/chat/completions", chat(stream=True))
        assert time.monotonic() - started < 1.0


async def test_client_hanging_up_mid_stream_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with running_mock(latency_scale=0.2) as m:
        for path, body in (
            ("/v1/chat/completions", chat(stream=True)),
            ("/v1/messages", anthropic(stream=True)),
        ):
            async with m.session.post(m.base + path, json=body) as resp:
                await resp.content.readany()
                resp.close()
        await asyncio.sleep(0.1)  # let the server notice
        assert (await m.post("/v1/chat/completions", chat())).status == 200
    assert [r for r in caplog.records if r.name.startswith("aiohttp")] == []
