"""End-to-end tests of the proxy: a real sidecar between a real aiohttp client and a real
upstream replaying recorded provider payloads. Exact token and cost figures per shape."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from blockbuster import blockbuster_ctx

from sidecar import pricing
from sidecar.sse import SSEDecoder
from sidecar.tokens import Estimator
from tests.harness import make_config, running_sidecar, sample
from tests.replay_upstream import ReplayUpstream

M = Decimal(1_000_000)


@pytest.fixture(autouse=True)
def no_blocking_calls_in_sidecar() -> Iterator[None]:
    """Fail any test in which sidecar code makes a blocking call on the event loop."""
    with blockbuster_ctx("sidecar"):
        yield


def fixture_bytes(fixtures_dir: Path, name: str) -> bytes:
    return (fixtures_dir / name).read_bytes()


def openai_upstream(url: str, **extra: str) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return f"- {{name: openai, url: '{url}', provider: openai, mount: /{', ' + fields if fields else ''}}}\n"


def anthropic_upstream(url: str) -> str:
    return f"- {{name: anthropic, url: '{url}', provider: anthropic, mount: /anthropic}}\n"


def price(model: str) -> pricing.Price:
    match = pricing.default_table().lookup(model)
    assert match is not None, model
    return match.price


def in_price(p: pricing.Price, field: str) -> Decimal:
    value = getattr(p, field)
    return value if value is not None else p.input


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        url, data=json.dumps(body), headers={"content-type": "application/json", **headers}
    ) as r:
        return r.status, dict(r.headers), await r.read()


# --- JSON responses -------------------------------------------------------------------


async def test_openai_chat_json_gzip_exact_usage_and_cost(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens.json", compressed=True)
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession(auto_decompress=False) as s:
        status, headers, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            **{"x-tenant-id": "acme", "accept-encoding": "gzip"},
        )
        (record,) = await collect.wait_for(1)
        assert status == 200
        # Forwarded byte for byte, still compressed, with its Content-Encoding.
        assert body == fixture_bytes(fixtures_dir, "openai_chat_nonstream_cached_tokens.json.gz")
        assert headers["Content-Encoding"] == "gzip"
        assert record.tenant == "acme" and record.provider == "openai" and record.operation == "chat"
        assert (
            record.usage.input,
            record.usage.cached_input,
            record.usage.output,
            record.usage.reasoning,
        ) == (
            1149,
            1024,
            353,
            0,
        )
        assert record.usage.cache_write is None
        assert record.error_type is None and record.status == 200
        p = price(record.model)
        expected = ((1149 - 1024) * p.input + 1024 * in_price(p, "cached_input") + 353 * p.output) / M
        assert record.cost_usd == expected
        labels = {"tenant": "acme", "upstream": "openai", "provider": "openai", "model": record.model}
        assert sample(sc, "llm_tokens_total", type="input", source="reported", **labels) == 1149
        assert sample(sc, "llm_tokens_total", type="cached_input", source="reported", **labels) == 1024
        assert sample(sc, "llm_tokens_total", type="output", source="reported", **labels) == 353
        assert sample(sc, "llm_requests_total", code="200", **labels) == 1
        assert sample(sc, "llm_cost_usd_total", **labels) == pytest.approx(float(expected), rel=1e-12)
    # The upstream got the client's Accept-Encoding and nothing added by the sidecar's client.
    (req,) = replay_upstream.requests
    assert req.headers.get("Accept-Encoding") == "gzip"
    assert "x-tenant-id" in req.headers


async def test_anthropic_json_cache_write_exact_cost(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    replay_upstream.serve("anthropic_messages_nonstream_cache_creation.json", compressed=False)
    cfg = make_config(anthropic_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/anthropic/v1/messages",
            {"model": "claude-3-5-sonnet-20240620", "max_tokens": 300, "messages": []},
            **{"x-tenant-id": "globex"},
        )
        (record,) = await collect.wait_for(1)
    assert status == 200
    assert body == fixture_bytes(fixtures_dir, "anthropic_messages_nonstream_cache_creation.json")
    u = record.usage
    # input_tokens (4) excludes the cache fields: input = 4 + 1163 written + 0 read.
    assert (u.input, u.cached_input, u.cache_write, u.output) == (1167, 0, 1163, 187)
    p = price(record.model)
    expected = (4 * p.input + 1163 * in_price(p, "cache_write") + 187 * p.output) / M
    assert record.cost_usd == expected
    assert replay_upstream.requests[0].path == "/v1/messages"


async def test_embeddings_model_differs_from_request(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("openai_embeddings_base64.json")
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, _ = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/embeddings",
            {"model": "text-embedding-ada-002", "input": "hi"},
        )
        (record,) = await collect.wait_for(1)
    assert status == 200
    assert record.request_model == "text-embedding-ada-002"
    assert record.model == "text-embedding-ada-002-v2"  # the answered model wins
    assert record.usage.input == 2 and record.usage.output is None
    assert record.tenant == "unknown"
    assert record.cost_usd is not None and record.cost_usd > 0


# --- streams -------------------------------------------------------------------------


async def test_responses_stream_awkward_chunks_exact_usage(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = fixture_bytes(fixtures_dir, "openai_responses_stream_web_search_reasoning_cached.sse")
    sizes = [1, 2, 3, 5, 7, 11, 13, 17, 4096] * 200
    replay_upstream.serve("openai_responses_stream_web_search_reasoning_cached.sse", chunk_sizes=sizes)
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/responses",
            {"model": "gpt-5", "input": "news", "stream": True},
        )
        (record,) = await collect.wait_for(1)
    assert status == 200 and body == raw
    u = record.usage
    assert (u.input, u.cached_input, u.output, u.reasoning) == (9463, 8320, 582, 512)
    assert record.stream and record.ttft_s is not None and record.ttft_s <= record.duration_s
    assert record.error_type is None
    assert sample(sc, "llm_time_to_first_token_seconds_count") == 1


async def test_include_usage_is_injected_and_usage_chunk_stripped(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = fixture_bytes(fixtures_dir, "openai_chat_stream_include_usage.sse")
    replay_upstream.serve("openai_chat_stream_include_usage.sse", chunk_sizes=[7] * 2000)
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, headers, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        (record,) = await collect.wait_for(1)
    assert status == 200
    sent = json.loads(replay_upstream.requests[0].body)
    assert sent["stream_options"] == {"include_usage": True}
    events = SSEDecoder().feed(raw)
    usage_events = [e for e in events if '"choices":[]' in e.data and '"usage":{' in e.data]
    assert len(usage_events) == 1
    assert body == raw.replace(usage_events[0].raw, b"")  # exactly the usage-only chunk is gone
    assert body.rstrip().endswith(b"data: [DONE]")
    assert "Content-Length" not in headers
    assert (record.usage.input, record.usage.output) == (16, 10)
    assert record.error_type is None


async def test_client_that_asked_for_usage_gets_the_stream_unchanged(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = fixture_bytes(fixtures_dir, "openai_chat_stream_tool_calls.sse")
    replay_upstream.serve("openai_chat_stream_tool_calls.sse")
    cfg = make_config(openai_upstream(replay_upstream.url))
    request = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "weather?"}],
    }
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        _, _, body = await post(s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", request)
        (record,) = await collect.wait_for(1)
    assert body == raw
    assert json.loads(replay_upstream.requests[0].body) == request  # body forwarded unchanged
    assert (record.usage.input, record.usage.output) == (54, 20)
    assert record.finish_reasons == ("tool_calls",)
    assert record.ttft_s is not None


async def test_anthropic_gzip_stream_forwarded_compressed(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    gz = fixture_bytes(fixtures_dir, "anthropic_messages_stream_tool_use.sse.gz")
    replay_upstream.serve("anthropic_messages_stream_tool_use.sse", compressed=True, chunk_sizes=[50] * 100)
    cfg = make_config(anthropic_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession(auto_decompress=False) as s:
        _, headers, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/anthropic/v1/messages",
            {"model": "claude-haiku-4-5", "stream": True, "max_tokens": 100, "messages": []},
            **{"accept-encoding": "gzip"},
        )
        (record,) = await collect.wait_for(1)
    assert body == gz and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == fixture_bytes(fixtures_dir, "anthropic_messages_stream_tool_use.sse")
    assert (record.usage.input, record.usage.output) == (543, 40)
    assert record.ttft_s is not None


async def test_anthropic_stream_cumulative_usage_not_summed(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("anthropic_messages_stream_text_cache_read.sse", chunk_sizes=[1] * 10000)
    cfg = make_config(anthropic_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/anthropic/v1/messages",
            {"model": "claude-3-5-sonnet-20241022", "stream": True, "max_tokens": 300, "messages": []},
        )
        (record,) = await collect.wait_for(1)
    u = record.usage
    assert (u.input, u.cached_input, u.cache_write, u.output) == (1169, 1165, 0, 221)


async def test_cut_stream_is_abrupt_for_client_and_estimated(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = fixture_bytes(fixtures_dir, "openai_chat_stream_no_usage.sse")
    cut = len(raw) // 2
    replay_upstream.serve("openai_chat_stream_no_usage.sse", cut_after=cut)
    cfg = make_config(openai_upstream(replay_upstream.url, inject_stream_usage="false"))
    prompt = "Tell me a story about a lighthouse keeper."
    got = b""
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(
                f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "stream": True,
                    "messages": [{"role": "user", "content": prompt}],
                },
            ) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        (record,) = await collect.wait_for(1)
    assert got == raw[:cut]  # what came, and no invented end
    assert b"[DONE]" not in got
    assert record.error_type == "stream_interrupted"
    assert record.usage.input is None and record.usage.output is None
    counts = {c.type: c for c in record.token_counts()}
    assert counts["input"].source == "estimated" and counts["output"].source == "estimated"
    estimator = Estimator()
    assert counts["input"].count == await asyncio.to_thread(estimator.count, prompt, "gpt-4o-mini")
    # The output estimate counts exactly the text the client received.
    text = ""
    for event in SSEDecoder().feed(raw[:cut]):
        if event.data.startswith("{"):
            for choice in json.loads(event.data)["choices"]:
                text += choice.get("delta", {}).get("content") or ""
    assert counts["output"].count == await asyncio.to_thread(estimator.count, text, "gpt-4o-mini")
    assert sample(sc, "llm_tokens_total", type="output", source="estimated") == counts["output"].count
    assert sample(sc, "llm_errors_total", error_type="stream_interrupted") == 1


async def test_client_abort_mid_stream(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("anthropic_messages_stream_text_cache_read.sse", chunk_delay=0.05)
    cfg = make_config(anthropic_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect):
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{sc.proxy_port}/anthropic/v1/messages",
                json={
                    "model": "claude-3-5-sonnet-20241022",
                    "stream": True,
                    "max_tokens": 300,
                    "messages": [],
                },
            ) as r,
        ):
            await r.content.readany()
            r.close()
        (record,) = await collect.wait_for(1)
        assert record.status == 499 and record.error_type == "client_abort"
        assert record.usage.input == 1169  # reported by message_start before the abort
        assert sample(sc, "llm_requests_total", code="499") == 1
        assert sample(sc, "llm_inflight_requests") == 0
    # The upstream stream was cancelled, not read to the end.
    assert replay_upstream.requests


async def test_upstream_down_gives_provider_shaped_502() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = make_config(
        openai_upstream(f"http://127.0.0.1:{port}") + anthropic_upstream(f"http://127.0.0.1:{port}")
    )
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, body = await post(
            s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "x"}
        )
        assert status == 502
        assert json.loads(body)["error"]["code"] == "upstream_unreachable"
        status, _, body = await post(
            s, f"http://127.0.0.1:{sc.proxy_port}/anthropic/v1/messages", {"model": "y"}
        )
        assert status == 502
        shaped = json.loads(body)
        assert shaped["type"] == "error" and shaped["error"]["type"] == "api_error"
        records = await collect.wait_for(2)
        assert {r.error_type for r in records} == {"connect_error"}
        assert sample(sc, "llm_errors_total", error_type="connect_error") == 2
        assert sample(sc, "llm_requests_total", code="502") == 2


async def test_upstream_timeout_gives_504(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens.json", hang=True)
    cfg = make_config(
        openai_upstream(replay_upstream.url, timeouts="{connect: 1s, first_byte: 300ms, total: 5s}")
    )
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, body = await post(
            s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "x"}
        )
        (record,) = await collect.wait_for(1)
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert record.error_type == "timeout"


@pytest.mark.parametrize(
    ("fixture", "status", "error_type"),
    [
        ("openai_error_404_model_not_found.json", 404, "upstream_4xx"),
        ("openai_error_400_unsupported_parameter.json", 400, "upstream_4xx"),
    ],
)
async def test_upstream_errors_pass_through(
    replay_upstream: ReplayUpstream, fixtures_dir: Path, fixture: str, status: int, error_type: str
) -> None:
    replay_upstream.serve(fixture, compressed=False)
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        got, _, body = await post(s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "x"})
        (record,) = await collect.wait_for(1)
    assert got == status and body == fixture_bytes(fixtures_dir, fixture)
    assert record.error_type == error_type
    assert record.token_counts() == []  # an error is not estimated: nothing was billed


async def test_rate_limited_and_5xx(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve_raw(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "3"})
    replay_upstream.serve_raw(503, b'{"error": {"message": "overloaded"}}')
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "3"
        async with s.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 503
        records = await collect.wait_for(2)
    assert [r.error_type for r in records] == ["rate_limited", "upstream_5xx"]


# --- tenants, limits, security --------------------------------------------------------


async def test_tenant_overflow_and_garbage(replay_upstream: ReplayUpstream) -> None:
    cfg = make_config(openai_upstream(replay_upstream.url), extra="tenants: {max_distinct: 3}\n")
    tenants = ["t1", "t2", "t3", "t4", "t5", "t1", "x" * 5000]
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        for tenant in tenants:
            replay_upstream.serve("openai_chat_nonstream_reasoning_gpt5nano.json", compressed=False)
            await post(
                s,
                f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
                {"model": "m"},
                **{"x-tenant-id": tenant},
            )
        records = await collect.wait_for(len(tenants))
        assert [r.tenant for r in records][:6] == tenants[:6]  # records keep the real tenant
        assert records[6].tenant == "__invalid__"
        assert sample(sc, "llm_requests_total", tenant="t1") == 2
        # t4, t5 and the garbage value arrive after the cap of three distinct tenants.
        assert sample(sc, "llm_requests_total", tenant="__overflow__") == 3
        assert sample(sc, "llm_tenant_overflow_total") == 3
        assert sample(sc, "llm_requests_total", tenant="t4") == 0


async def test_required_tenant_and_body_limit(replay_upstream: ReplayUpstream) -> None:
    cfg = make_config(
        openai_upstream(replay_upstream.url),
        extra="tenants: {required: true}\nlimits: {max_body_bytes: 1000}\n",
    )
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, body = await post(
            s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "m"}
        )
        assert status == 400 and "x-tenant-id" in json.loads(body)["error"]["message"]
        status, _, _ = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            {"model": "m", "pad": "x" * 2000},
            **{"x-tenant-id": "a"},
        )
        assert status == 413

        async def chunked() -> object:
            for _ in range(10):
                yield b"x" * 500

        async with s.post(
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            data=chunked(),
            headers={"x-tenant-id": "a"},
        ) as r:
            assert r.status == 413
        await collect.wait_for(3)
    assert replay_upstream.requests == []  # nothing reached the upstream


async def _raw_http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_never_an_open_proxy(replay_upstream: ReplayUpstream) -> None:
    cfg = make_config(openai_upstream(replay_upstream.url + "/base"))
    async with running_sidecar(cfg) as (sc, _collect):
        replay_upstream.serve_raw(200, b"{}")
        replay_upstream.serve_raw(200, b"{}")
        absolute = (
            b"GET http://evil.example:81/v1/models HTTP/1.1\r\nHost: evil.example\r\n"
            b"X-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n"
        )
        assert b" 200 " in (await _raw_http(sc.proxy_port, absolute)).split(b"\r\n")[0] + b" "
        spoofed = b"GET /v1/files HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
        assert b"200" in (await _raw_http(sc.proxy_port, spoofed)).split(b"\r\n")[0]
        for target in (b"/../admin", b"/v1/%2e%2e/%2e%2e/admin", b"/v1/%252e%252e/x"):
            reply = await _raw_http(
                sc.proxy_port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert reply.split(b"\r\n")[0].split()[1] == b"400", target
        reply = await _raw_http(
            sc.proxy_port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
        )
        assert reply.split(b"\r\n")[0].split()[1] in (b"400", b"405")
    upstream_host = replay_upstream.url.split("//")[1]
    assert [r.path for r in replay_upstream.requests] == ["/base/v1/models", "/base/v1/files"]
    assert all(r.headers["Host"] == upstream_host for r in replay_upstream.requests)


async def test_headers_forwarded_hop_by_hop_removed_and_key_injected(
    replay_upstream: ReplayUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-test-secret-123")
    replay_upstream.serve_raw(200, b"{}", {"x-upstream": "yes", "Keep-Alive": "timeout=5"})
    cfg = make_config(
        openai_upstream(
            replay_upstream.url,
            api_key="{header: authorization, scheme: Bearer, from_env: TEST_PROVIDER_KEY}",
        )
    )
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions?api-version=2024-10-21",
            data=b'{"model":"m"}',
            headers={
                "Authorization": "Bearer app-key",
                "OpenAI-Beta": "assistants=v2",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "content-type": "application/json",
            },
        ) as r:
            assert r.headers["x-upstream"] == "yes"
            assert "Keep-Alive" not in r.headers
        await collect.wait_for(1)
    (req,) = replay_upstream.requests
    assert req.path == "/v1/chat/completions?api-version=2024-10-21"
    assert req.headers["Authorization"] == "Bearer sk-test-secret-123"
    assert req.headers["OpenAI-Beta"] == "assistants=v2"
    assert "X-Secret-Hop" not in req.headers
    assert req.body == b'{"model":"m"}'


async def test_unknown_path_forwarded_and_counted_without_tokens(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve_raw(200, b'{"data": []}')
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{sc.proxy_port}/v1/models") as r:
            assert await r.read() == b'{"data": []}'
        (record,) = await collect.wait_for(1)
        assert record.operation == "other" and record.token_counts() == []
        assert sample(sc, "llm_requests_total", code="200") == 1
        assert sample(sc, "llm_unpriced_requests_total") == 0


async def test_unpriced_model_is_counted(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve_raw(
        200,
        json.dumps(
            {"model": "my-private-llm", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        ).encode(),
        {"Content-Type": "application/json"},
    )
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        await post(s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "my-private-llm"})
        (record,) = await collect.wait_for(1)
        assert record.cost_usd is None
        assert sample(sc, "llm_unpriced_requests_total", model="my-private-llm") == 1


async def test_metrics_endpoint_text_and_openmetrics(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens.json")
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        await post(s, f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", {"model": "gpt-4o-mini"})
        await collect.wait_for(1)
        await asyncio.sleep(0.05)
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r:
            text = await r.text()
            assert r.headers["Content-Type"].startswith("text/plain")
        assert "llm_requests_total{" in text and "llm_cost_usd_total{" in text
        async with s.get(
            f"http://127.0.0.1:{sc.admin_port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await r.text()).rstrip().endswith("# EOF")
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as r:
            assert r.status == 200
        # The proxy port does not serve the admin endpoints: /metrics there is forwarded upstream.
        replay_upstream.serve_raw(404, b"upstream says no")
        async with s.get(f"http://127.0.0.1:{sc.proxy_port}/metrics") as r:
            assert await r.read() == b"upstream says no"


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/v1/chat/completions", b'{"id": "x", "usage": {"prompt_tokens": 3', "application/json"),
        ("/v1/chat/completions", b"data: {not json}\n\ndata: [DONE]\n\n", "text/event-stream"),
        ("/anthropic/v1/messages", b'event: message_start\r\ndata: {"type\r\n\r\n', "text/event-stream"),
    ],
)
async def test_malformed_upstream_body_passes_unchanged_and_is_counted(
    replay_upstream: ReplayUpstream, path: str, body: bytes, content_type: str
) -> None:
    replay_upstream.serve_raw(200, body, {"Content-Type": content_type})
    cfg = make_config(openai_upstream(replay_upstream.url) + anthropic_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        status, _, got = await post(
            s, f"http://127.0.0.1:{sc.proxy_port}{path}", {"model": "gpt-4o-mini", "stream": True}
        )
        (record,) = await collect.wait_for(1)
        assert status == 200 and got == body
        assert record.malformed
        assert sample(sc, "llm_malformed_responses_total") == 1
        assert sample(sc, "llm_requests_total", code="200") == 1


@pytest.mark.parametrize("encoding", ["br", "deflate", "gzip"])
async def test_compressed_json_forwarded_byte_for_byte(
    replay_upstream: ReplayUpstream, fixtures_dir: Path, encoding: str
) -> None:
    import zlib

    import brotli

    plain = fixture_bytes(fixtures_dir, "openai_chat_nonstream_reasoning_gpt5nano.json")
    compressed = {
        "br": brotli.compress(plain),
        "deflate": zlib.compress(plain),
        "gzip": gzip.compress(plain),
    }[encoding]
    replay_upstream.serve_raw(
        200, compressed, {"Content-Type": "application/json", "Content-Encoding": encoding}
    )
    cfg = make_config(openai_upstream(replay_upstream.url))
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession(auto_decompress=False) as s:
        status, headers, body = await post(
            s,
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            {"model": "gpt-5-nano"},
            **{"accept-encoding": encoding},
        )
        (record,) = await collect.wait_for(1)
    assert status == 200 and body == compressed and headers["Content-Encoding"] == encoding
    u = record.usage
    assert (u.input, u.output, u.reasoning, u.cached_input) == (11, 202, 192, 0)
