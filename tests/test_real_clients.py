"""The official ``openai`` and ``anthropic`` SDKs, and ``curl``, unmodified, against a real sidecar.

One ``python -m sidecar run`` process serves the whole module, in front of the replaying
upstream (``tests/replay_upstream.py``: the recorded provider payloads, byte for byte, in
the order a test queues them). The clients only change their base URL. Each test uses a
tenant of its own, so its figures are read back from the sidecar's ``/metrics`` (admin
port) and its ledger rows (``ledger.sqlite3``, read-only while the sidecar runs) without
seeing another test's calls.

What is proved, for chat (JSON and streaming), the Responses API (JSON and streaming),
embeddings and Anthropic messages (JSON, streaming, gzip-compressed streaming):

* the SDK parses the answer as if it talked to the provider (ids, text, usage objects);
* the usage figures the SDK hands the application equal what the sidecar recorded, in
  ``llm_tokens_total`` (normalised types, all ``source="reported"``) and in the ledger;
* the SDKs' error handling and retries work on the sidecar's own answers: an upstream
  that is down gives 502 and one that does not answer gives 504, each retried
  ``max_retries`` times by the SDK and then raised as ``InternalServerError`` with the
  provider-shaped error body; an upstream 429 with ``Retry-After`` reaches the SDK
  unchanged, which waits and retries. Each attempt is one recorded call;
* a stream the upstream cuts short is never turned into a clean end: the SDK raises.

``curl`` does the same for plain HTTP users: a JSON call (the gzip bytes as the upstream
sent them, and decoded with ``--compressed``) and a stream read with ``-N``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio

from hardening.support import SidecarProcess, metric, series, write_config
from sidecar.ledger import DB_NAME, connect_readonly
from tests.replay_upstream import Fixture, ReplayUpstream, default_fixtures_dir, sse_events

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "sk-test-real-clients"
ANTHROPIC_KEY = "sk-ant-test-real-clients"
MESSAGES: Any = [{"role": "user", "content": "Say pong."}]
TOKEN_TYPES = ("input", "cached_input", "cache_write", "output", "reasoning")


def closed_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Env:
    sc: SidecarProcess
    up: ReplayUpstream
    session: aiohttp.ClientSession
    db: Path

    def openai(self, tenant: str, mount: str = "", max_retries: int = 0) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.sc.url}{mount}/v1",
            api_key=API_KEY,
            max_retries=max_retries,
            timeout=20.0,
            default_headers={"x-tenant-id": tenant},
        )

    def anthropic(
        self, tenant: str, mount: str = "/anthropic", max_retries: int = 0
    ) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            base_url=f"{self.sc.url}{mount}",
            api_key=ANTHROPIC_KEY,
            max_retries=max_retries,
            timeout=20.0,
            default_headers={"x-tenant-id": tenant},
        )

    async def recorded(self, tenant: str, calls: int) -> str:
        """A scrape once ``calls`` calls of ``tenant`` are counted (records arrive just after the answer)."""
        return await self.sc.scrape_when(self.session, "llm_requests_total", calls, tenant=tenant)

    async def ledger(self, tenant: str, calls: int) -> list[dict[str, Any]]:
        """The ledger rows of ``tenant`` once there are ``calls`` of them (the writer batches every 0.2 s)."""

        def read() -> list[dict[str, Any]]:
            conn = connect_readonly(self.db)
            try:
                conn.row_factory = sqlite3.Row
                cursor = conn.execute("SELECT * FROM calls WHERE tenant = ? ORDER BY id", (tenant,))
                return [dict(row) for row in cursor]
            except sqlite3.OperationalError:
                return []  # the schema is created by the writer's first transaction
            finally:
                conn.close()

        async with asyncio.timeout(10):
            while True:
                rows = await asyncio.to_thread(read) if self.db.exists() else []
                if len(rows) >= calls:
                    assert len(rows) == calls, rows
                    return rows
                await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    fixtures = default_fixtures_dir()
    if not fixtures.is_dir():
        pytest.fail(f"recorded fixtures not found at {fixtures} (set SIDECAR_FIXTURES)", pytrace=False)
    tmp = tmp_path_factory.mktemp("real-clients")
    down = f"http://127.0.0.1:{closed_port()}"
    async with ReplayUpstream(fixtures) as up:
        slow = "timeouts: {connect: 1s, first_byte: 400ms, total: 10s}"
        cfg = write_config(
            tmp / "sidecar.yaml",
            f"- {{name: openai, url: '{up.url}', provider: openai, mount: /}}\n"
            f"- {{name: anthropic, url: '{up.url}', provider: anthropic, mount: /anthropic}}\n"
            f"- {{name: down-openai, url: '{down}', provider: openai, mount: /down/openai}}\n"
            f"- {{name: down-anthropic, url: '{down}', provider: anthropic, mount: /down/anthropic}}\n"
            f"- {{name: slow-openai, url: '{up.url}', provider: openai, mount: /slow/openai, {slow}}}\n"
            f"- {{name: slow-anthropic, url: '{up.url}', provider: anthropic, mount: /slow/anthropic,"
            f" {slow}}}\n",
            "shutdown: {drain_timeout: 5s}\n",
        )
        sc = SidecarProcess("--config", str(cfg))
        await sc.start()
        try:
            async with aiohttp.ClientSession() as session:
                yield Env(sc, up, session, tmp / "data" / DB_NAME)
            sc.signal(signal.SIGTERM)
            assert await sc.wait(20) == 0
            assert sc.tracebacks() == [], sc.log
        except BaseException:
            print("sidecar stderr:\n" + sc.log[-20000:])
            raise
        finally:
            await sc.stop()


@pytest.fixture(autouse=True)
def nothing_left_queued(env: Env) -> Any:
    """Every response a test queued was asked for (no test leaks one into the next)."""
    yield
    assert env.up.pending == 0


# -- figures -------------------------------------------------------------------------------------


def tokens(scrape: str, tenant: str) -> dict[str, int]:
    """``llm_tokens_total`` of a tenant by type (reported only: an estimate here is a failure)."""
    assert metric(scrape, "llm_tokens_total", tenant=tenant, source="estimated") == 0
    types = {labels["type"] for labels in series(scrape, "llm_tokens_total") if labels["tenant"] == tenant}
    return {
        token_type: int(metric(scrape, "llm_tokens_total", tenant=tenant, type=token_type, source="reported"))
        for token_type in types
    }


def ledger_tokens(row: dict[str, Any]) -> dict[str, int]:
    """The token columns of a ledger row by type (non-NULL only), each marked reported."""
    out: dict[str, int] = {}
    for token_type in TOKEN_TYPES:
        column = f"{token_type}_tokens"
        if row[column] is not None:
            assert row[f"{column}_source"] == "reported", row
            out[token_type] = row[column]
    return out


def present(**counts: int | None) -> dict[str, int]:
    """The counts that were reported (``None``: not reported, so no series)."""
    return {k: v for k, v in counts.items() if v is not None}


def chat_figures(usage: Any) -> dict[str, int]:
    """Normalised types of an OpenAI Chat Completions ``usage`` object, as the SDK parsed it."""
    return present(
        input=usage.prompt_tokens,
        cached_input=usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None,
        output=usage.completion_tokens,
        reasoning=(
            usage.completion_tokens_details.reasoning_tokens if usage.completion_tokens_details else None
        ),
    )


def responses_figures(usage: Any) -> dict[str, int]:
    """Normalised types of a Responses API ``usage`` object."""
    return present(
        input=usage.input_tokens,
        cached_input=usage.input_tokens_details.cached_tokens,
        output=usage.output_tokens,
        reasoning=usage.output_tokens_details.reasoning_tokens,
    )


def anthropic_figures(usage: Any) -> dict[str, int]:
    """Normalised types of an Anthropic ``usage`` object (its ``input_tokens`` excludes the cache)."""
    read, write = usage.cache_read_input_tokens, usage.cache_creation_input_tokens
    return present(
        input=usage.input_tokens + (read or 0) + (write or 0),
        cached_input=read,
        cache_write=write,
        output=usage.output_tokens,
    )


async def check_figures(env: Env, tenant: str, expected: dict[str, int], calls: int = 1) -> dict[str, Any]:
    """Metrics and the ledger of ``tenant`` hold exactly ``expected``; returns the ledger row with tokens."""
    scrape = await env.recorded(tenant, calls)
    assert tokens(scrape, tenant) == expected
    rows = await env.ledger(tenant, calls)
    (row,) = [r for r in rows if r["status"] == 200]
    assert ledger_tokens(row) == expected
    assert row["cost_usd"] is not None and float(row["cost_usd"]) > 0, row
    return row


def stream_text(fx: Fixture, field: str) -> str:
    """The generated text a stream fixture carries (``field``: the JSON path of each delta)."""
    text = []
    for event in sse_events(fx.decoded):
        for line in event.decode().splitlines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if field == "chat":
                for choice in data.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
            elif field == "responses" and data.get("type") == "response.output_text.delta":
                text.append(data["delta"])
    return "".join(text)


# -- OpenAI: chat, Responses, embeddings ---------------------------------------------------------


async def test_openai_chat_json(env: Env) -> None:
    fx = env.up.serve("openai_chat_nonstream_cached_tokens.json")  # gzip on the wire
    async with env.openai("oa-chat-json") as client:
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    recorded = fx.json()
    assert answer.id == recorded["id"]
    assert answer.choices[0].message.content == recorded["choices"][0]["message"]["content"]
    assert answer.usage is not None
    expected = chat_figures(answer.usage)
    assert expected == {"input": 1149, "cached_input": 1024, "output": 353, "reasoning": 0}
    row = await check_figures(env, "oa-chat-json", expected)
    assert row["model"] == "gpt-4o-mini-2024-07-18" and row["request_model"] == "gpt-4o-mini"
    # What the upstream received: the SDK's body and headers, the app's own key.
    sent = env.up.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.json() == {"model": "gpt-4o-mini", "messages": MESSAGES}
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["x-stainless-lang"] == "python"


async def test_openai_chat_stream_with_usage(env: Env) -> None:
    fx = env.up.serve("openai_chat_stream_include_usage.sse")
    async with env.openai("oa-chat-stream") as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stream_text(fx, "chat") != ""
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    expected = chat_figures(usage)
    assert expected == {"input": 16, "cached_input": 0, "output": 10, "reasoning": 0}
    row = await check_figures(env, "oa-chat-stream", expected)
    assert row["stream"] == 1 and row["ttft_s"] is not None


async def test_openai_chat_stream_without_usage_gets_no_usage_chunk(env: Env) -> None:
    """The sidecar asks the upstream for usage and strips that chunk: the SDK sees none, the
    sidecar still records the reported figures."""
    fx = env.up.serve("openai_chat_stream_include_usage.sse")
    async with env.openai("oa-chat-stream-nousage") as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the "choices": [] usage chunk was removed
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == stream_text(fx, "chat")
    assert env.up.requests[-1].json()["stream_options"] == {"include_usage": True}
    await check_figures(
        env, "oa-chat-stream-nousage", {"input": 16, "cached_input": 0, "output": 10, "reasoning": 0}
    )


async def test_openai_responses_json(env: Env) -> None:
    fx = env.up.serve("openai_responses_nonstream_gpt55.json")
    async with env.openai("oa-responses-json") as client:
        response = await client.responses.create(model="gpt-5.5", input="ping")
    assert response.id == fx.json()["id"]
    assert response.output_text == "pong"
    assert response.usage is not None
    expected = responses_figures(response.usage)
    assert expected == {"input": 11, "cached_input": 0, "output": 5, "reasoning": 0}
    await check_figures(env, "oa-responses-json", expected)
    assert env.up.requests[-1].path == "/v1/responses"


async def test_openai_responses_stream(env: Env) -> None:
    fx = env.up.serve("openai_responses_stream_web_search_reasoning_cached.sse")
    async with env.openai("oa-responses-stream") as client:
        stream = await client.responses.create(model="gpt-5", input="weather?", stream=True)
        events = [event async for event in stream]
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1 and completed[0].response.usage is not None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == stream_text(fx, "responses") != ""
    expected = responses_figures(completed[0].response.usage)
    assert expected == {"input": 9463, "cached_input": 8320, "output": 582, "reasoning": 512}
    await check_figures(env, "oa-responses-stream", expected)


async def test_openai_embeddings(env: Env) -> None:
    fx = env.up.serve("openai_embeddings_base64")  # base64 vectors, gzip on the wire
    async with env.openai("oa-embeddings") as client:
        result = await client.embeddings.create(model="text-embedding-ada-002", input="ping")
    assert len(result.data[0].embedding) == 1536  # the SDK decoded the base64 vector
    assert result.model == fx.json()["model"] == "text-embedding-ada-002-v2"
    assert result.usage.prompt_tokens == 2
    await check_figures(env, "oa-embeddings", {"input": 2})  # embeddings report input only
    assert env.up.requests[-1].path == "/v1/embeddings"


# -- Anthropic messages ---------------------------------------------------------------------------


async def test_anthropic_messages_json(env: Env) -> None:
    fx = env.up.serve("anthropic_messages_nonstream_cache_creation.json")  # gzip on the wire
    async with env.anthropic("an-json") as client:
        message = await client.messages.create(
            model="claude-3-5-sonnet-20240620", max_tokens=300, messages=MESSAGES
        )
    assert message.id == fx.json()["id"]
    assert message.content[0].type == "text" and message.content[0].text == fx.json()["content"][0]["text"]
    expected = anthropic_figures(message.usage)
    assert expected == {"input": 4 + 1163, "cached_input": 0, "cache_write": 1163, "output": 187}
    await check_figures(env, "an-json", expected)
    sent = env.up.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["anthropic-version"]
    # The SDK's credential header (``x-api-key``, or ``Authorization: Bearer`` in SDK 2.x) arrives intact.
    assert ANTHROPIC_KEY in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "")[7:])


@pytest.mark.parametrize(
    ("fixture", "figures"),
    [
        # 2025-03 shape: message_delta carries output_tokens only; plain SSE.
        (
            "anthropic_messages_stream_text_cache_read.sse",
            {"input": 4 + 1165, "cached_input": 1165, "cache_write": 0, "output": 221},
        ),
        # 2026-04 shape, tool use, gzip-compressed SSE (usage read from a decoded copy).
        (
            "anthropic_messages_stream_tool_use.sse.gz",
            {"input": 543, "cached_input": 0, "cache_write": 0, "output": 40},
        ),
    ],
)
async def test_anthropic_messages_stream(env: Env, fixture: str, figures: dict[str, int]) -> None:
    tenant = "an-stream-" + ("gz" if fixture.endswith(".gz") else "plain")
    env.up.serve(fixture)
    async with (
        env.anthropic(tenant) as client,
        client.messages.stream(model="claude-haiku-4-5", max_tokens=300, messages=MESSAGES) as stream,
    ):
        message = await stream.get_final_message()
    assert message.stop_reason in ("end_turn", "tool_use")
    expected = anthropic_figures(message.usage)
    assert expected == figures
    row = await check_figures(env, tenant, expected)
    assert row["stream"] == 1


# -- the SDKs' error handling and retries on the sidecar's answers ------------------------------


OPENAI_429 = (
    b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}'
)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
async def test_upstream_429_with_retry_after_is_retried_by_the_sdk(env: Env, sdk: str) -> None:
    """The 429 and its ``Retry-After`` reach the SDK unchanged: it waits that long, retries and
    succeeds. Two upstream attempts, two recorded calls (one rate-limited), usage on the second."""
    tenant = f"{sdk}-429"
    before = len(env.up.requests)
    started = time.monotonic()
    if sdk == "openai":
        env.up.serve_raw(429, OPENAI_429, headers={"retry-after": "1"})
        env.up.serve("openai_chat_nonstream_reasoning_gpt5nano.json")
        async with env.openai(tenant, max_retries=2) as client:
            answer = await client.chat.completions.create(model="gpt-5-nano", messages=MESSAGES)
        assert answer.usage is not None
        expected = chat_figures(answer.usage)
        assert expected == {"input": 11, "cached_input": 0, "output": 202, "reasoning": 192}
    else:
        env.up.serve(
            "transcribed/anthropic_error_429_rate_limit.transcribed.json", headers={"retry-after": "1"}
        )
        env.up.serve("anthropic_messages_nonstream_cache_read.json")
        async with env.anthropic(tenant, max_retries=2) as client:
            message = await client.messages.create(
                model="claude-3-5-sonnet-20240620", max_tokens=300, messages=MESSAGES
            )
        expected = anthropic_figures(message.usage)
        assert expected == {"input": 4 + 1163, "cached_input": 1163, "cache_write": 0, "output": 202}
    elapsed = time.monotonic() - started
    assert len(env.up.requests) - before == 2  # the first attempt and one retry
    assert elapsed >= 1.0, f"the SDK retried after {elapsed:.2f}s, before Retry-After"
    await check_figures(env, tenant, expected, calls=2)
    scrape = await env.recorded(tenant, 2)
    assert metric(scrape, "llm_requests_total", tenant=tenant, code="429") == 1
    assert metric(scrape, "llm_requests_total", tenant=tenant, code="200") == 1
    assert metric(scrape, "llm_errors_total", tenant=tenant) == 1
    assert metric(scrape, "llm_errors_total", tenant=tenant, error_type="rate_limited") == 1
    rows = await env.ledger(tenant, 2)
    assert [(r["status"], r["error_type"]) for r in rows] == [(429, "rate_limited"), (200, None)]
    assert (
        rows[0]["input_tokens"] is None and rows[0]["cost_usd"] is None
    )  # nothing billed, nothing estimated


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", ["down", "slow"])
async def test_sidecar_502_and_504_are_retried_then_raised(env: Env, sdk: str, fault: str) -> None:
    """Upstream down → the sidecar's 502; upstream silent → its 504 after ``first_byte``.
    The SDK retries each ``max_retries`` times, then raises ``InternalServerError`` carrying
    the sidecar's provider-shaped error body. Every attempt is one recorded failed call."""
    tenant = f"{sdk}-{fault}"
    retries = 2 if fault == "down" else 1  # a 504 costs first_byte per attempt: keep it short
    attempts = retries + 1
    before = len(env.up.requests)
    for _ in range(attempts if fault == "slow" else 0):
        env.up.serve_raw(200, b"", hang=True)  # accepts the request, never answers
    mount = f"/{fault}/{sdk}"
    status = 502 if fault == "down" else 504
    if sdk == "openai":
        async with env.openai(tenant, mount=mount, max_retries=retries) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert caught.value.status_code == status
        body: Any = caught.value.body
        assert body["type"] == "server_error"
        assert body["code"] == ("upstream_unreachable" if fault == "down" else "upstream_timeout")
    else:
        async with env.anthropic(tenant, mount=mount, max_retries=retries) as client:
            with pytest.raises(anthropic.InternalServerError) as caught_a:
                await client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=MESSAGES)
        assert caught_a.value.status_code == status
        body = caught_a.value.body
        assert body["type"] == "error"
        assert body["error"]["type"] == ("api_error" if fault == "down" else "timeout_error")
    # The silent upstream saw every attempt; the down one none (nothing listens there).
    assert len(env.up.requests) - before == (attempts if fault == "slow" else 0)
    scrape = await env.recorded(tenant, attempts)
    error_type = "connect_error" if fault == "down" else "timeout"
    assert metric(scrape, "llm_requests_total", tenant=tenant) == attempts
    assert metric(scrape, "llm_requests_total", tenant=tenant, code=str(status)) == attempts
    assert metric(scrape, "llm_errors_total", tenant=tenant, error_type=error_type) == attempts
    assert metric(scrape, "llm_tokens_total", tenant=tenant) == 0
    rows = await env.ledger(tenant, attempts)
    assert {(r["status"], r["error_type"], r["upstream"]) for r in rows} == {
        (status, error_type, f"{fault}-{sdk}")
    }


async def test_a_stream_cut_by_the_upstream_raises_in_the_sdk(env: Env) -> None:
    """Never a clean end: the SDK gets the events sent so far, then an error, and does not
    silently retry a stream it already began to hand out."""
    fx = env.up.fixture("openai_chat_stream_include_usage.sse")
    cut = len(fx.body) // 2
    env.up.serve("openai_chat_stream_include_usage.sse", cut_after=cut)
    got: list[Any] = []
    async with env.openai("oa-cut", max_retries=2) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                got.append(chunk)
    assert 0 < len(got) < len(sse_events(fx.body)) - 1
    assert all(c.usage is None for c in got)
    scrape = await env.recorded("oa-cut", 1)
    assert metric(scrape, "llm_errors_total", tenant="oa-cut", error_type="stream_interrupted") == 1
    (row,) = await env.ledger("oa-cut", 1)
    assert row["error_type"] == "stream_interrupted"
    assert (
        row["input_tokens_source"] == "estimated"
    )  # no usage was reported: counted locally, and labelled so


# -- curl ------------------------------------------------------------------------------------------


async def curl(*args: str, data: bytes) -> bytes:
    """Run curl with ``data`` on stdin; its stdout (fails the test on a non-zero exit)."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.fail("curl is not installed (.ci/run installs it)", pytrace=False)
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-sS",
        "--max-time",
        "20",
        "-H",
        "content-type: application/json",
        "--data-binary",
        "@-",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(data)
    assert proc.returncode == 0, err.decode()
    return out


async def test_curl_json(env: Env) -> None:
    url = f"{env.sc.url}/v1/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    fx = env.up.serve("openai_chat_nonstream_cached_tokens.json")
    raw = await curl("-H", "x-tenant-id: curl-json", url, data=body)
    assert fx.compressed and raw == fx.body  # the upstream's gzip bytes, untouched
    env.up.serve("openai_chat_nonstream_cached_tokens.json")
    decoded = await curl("--compressed", "-H", "x-tenant-id: curl-json", url, data=body)
    assert decoded == fx.decoded
    usage = json.loads(decoded)["usage"]
    scrape = await env.recorded("curl-json", 2)
    assert tokens(scrape, "curl-json") == {
        "input": 2 * usage["prompt_tokens"],
        "cached_input": 2 * usage["prompt_tokens_details"]["cached_tokens"],
        "output": 2 * usage["completion_tokens"],
        "reasoning": 0,
    }
    assert len(await env.ledger("curl-json", 2)) == 2


async def test_curl_stream(env: Env) -> None:
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    fx = env.up.serve("openai_chat_stream_include_usage.sse", chunk_sizes=[97])  # seams inside events
    out = await curl(
        "-N",
        "-H",
        "x-tenant-id: curl-stream",
        f"{env.sc.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
    )
    assert out == fx.body  # byte for byte, usage chunk and [DONE] included
    assert env.up.requests[-1].json() == body  # it asked for usage itself: nothing injected
    await check_figures(env, "curl-stream", {"input": 16, "cached_input": 0, "output": 10, "reasoning": 0})
