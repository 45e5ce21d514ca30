"""The replay server sends the recorded bytes exactly, in the chunks asked for, and fails on cue."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path

import aiohttp
import pytest

from tests.replay_upstream import DEFAULT_BODY, ReplayUpstream, load_fixture, sse_events


def raw_session(timeout: float = 5.0) -> aiohttp.ClientSession:
    """A client that hands back the bytes on the wire (no gzip decoding)."""
    return aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=timeout))


async def http_chunks(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The body as the HTTP chunks the server wrote (TCP splits within a chunk merged)."""
    chunks: list[bytes] = []
    current = b""
    async for data, end_of_chunk in resp.content.iter_chunks():
        current += data
        if end_of_chunk:
            chunks.append(current)
            current = b""
    if current:
        chunks.append(current)
    return chunks


def all_fixtures(directory: Path) -> list[str]:
    """Every fixture stem that has a body (meta files for headers only are skipped)."""
    stems = []
    for meta in sorted(directory.rglob("*.meta.json")):
        stem = str(meta.relative_to(directory)).removesuffix(".meta.json")
        if any((directory / (stem + ext)).is_file() for ext in (".json", ".sse", ".json.gz", ".sse.gz")):
            stems.append(stem)
    return stems


def test_every_fixture_is_found(fixtures_dir: Path) -> None:
    stems = all_fixtures(fixtures_dir)
    assert len(stems) >= 20
    assert "transcribed/anthropic_error_529_overloaded.transcribed" in stems


@pytest.mark.parametrize("compressed", [None, False, True])
async def test_serves_every_fixture_byte_for_byte(
    replay_upstream: ReplayUpstream, fixtures_dir: Path, compressed: bool | None
) -> None:
    stems = all_fixtures(fixtures_dir)
    async with raw_session() as session:
        for stem in stems:  # one server, responses queued and consumed in order
            fx = replay_upstream.serve(stem, compressed=compressed)
            async with session.post(replay_upstream.url + "/v1/x", data=b"{}") as resp:
                body = await resp.read()
                assert resp.status == fx.status == fx.meta.get("status_code", 200), stem
                assert body == fx.body, stem
                if fx.compressed:
                    assert resp.headers["Content-Encoding"] == "gzip"
                    assert gzip.decompress(body) == fx.decoded
                else:
                    assert "Content-Encoding" not in resp.headers
                    assert body == fx.decoded
    assert replay_upstream.pending == 0
    assert len(replay_upstream.requests) == len(stems)


async def test_default_is_as_recorded_gzip(replay_upstream: ReplayUpstream, fixtures_dir: Path) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens.json")
    meta = json.loads((fixtures_dir / "openai_chat_nonstream_cached_tokens.meta.json").read_text())
    async with raw_session() as session, session.post(replay_upstream.url + "/v1/chat/completions") as resp:
        body = await resp.read()
        assert body == (fixtures_dir / "openai_chat_nonstream_cached_tokens.json.gz").read_bytes()
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["x-request-id"] == meta["response_headers"]["x-request-id"]
        assert resp.headers["openai-processing-ms"] == meta["response_headers"]["openai-processing-ms"]
        assert resp.headers["Transfer-Encoding"] == "chunked"  # framing as recorded
        assert "Set-Cookie" not in resp.headers  # redacted placeholders are not replayed


async def test_plain_and_explicit_gz_names(replay_upstream: ReplayUpstream, fixtures_dir: Path) -> None:
    replay_upstream.serve("anthropic_messages_nonstream_cache_read", compressed=False)
    replay_upstream.serve("anthropic_messages_nonstream_cache_read.json.gz")
    replay_upstream.serve("openai_chat_stream_include_usage", compressed=True)  # no .gz recorded
    async with raw_session() as session:
        async with session.post(replay_upstream.url + "/v1/messages") as resp:
            assert (
                await resp.read()
                == (fixtures_dir / "anthropic_messages_nonstream_cache_read.json").read_bytes()
            )
            assert "Content-Encoding" not in resp.headers
            assert resp.headers["anthropic-ratelimit-requests-limit"]
        async with session.post(replay_upstream.url + "/v1/messages") as resp:
            gz = (fixtures_dir / "anthropic_messages_nonstream_cache_read.json.gz").read_bytes()
            assert await resp.read() == gz
        async with session.post(replay_upstream.url + "/v1/chat/completions") as resp:
            raw = (fixtures_dir / "openai_chat_stream_include_usage.sse").read_bytes()
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert gzip.decompress(await resp.read()) == raw


async def test_recorded_content_length_is_kept(replay_upstream: ReplayUpstream, fixtures_dir: Path) -> None:
    replay_upstream.serve("openai_error_400_unsupported_parameter")
    async with raw_session() as session, session.post(replay_upstream.url + "/v1/chat/completions") as resp:
        assert resp.status == 400
        assert resp.headers["Content-Length"] == "196"
        assert "Transfer-Encoding" not in resp.headers
        assert (
            await resp.read() == (fixtures_dir / "openai_error_400_unsupported_parameter.json").read_bytes()
        )


async def test_transcribed_529(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("transcribed/anthropic_error_529_overloaded.transcribed.json")
    async with raw_session() as session, session.post(replay_upstream.url + "/v1/messages") as resp:
        assert resp.status == 529
        assert resp.headers["Content-Type"] == "application/json"
        assert (await resp.json())["error"]["type"] == "overloaded_error"


async def test_sse_default_is_one_event_per_chunk(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = (fixtures_dir / "anthropic_messages_stream_text_cache_read.sse").read_bytes()
    replay_upstream.serve("anthropic_messages_stream_text_cache_read.sse", chunk_delay=0.001)
    async with raw_session() as session, session.post(replay_upstream.url + "/v1/messages") as resp:
        chunks = await http_chunks(resp)
    assert b"".join(chunks) == raw
    assert chunks == sse_events(raw)
    assert all(c.endswith(b"\n\n") for c in chunks)
    assert chunks[0].startswith(b"event: message_start\n")


async def test_chunk_sizes_are_honoured_and_repeat(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = (fixtures_dir / "openai_chat_stream_include_usage.sse").read_bytes()
    gz = (fixtures_dir / "anthropic_messages_stream_tool_use.sse.gz").read_bytes()
    replay_upstream.serve("openai_chat_stream_include_usage.sse", chunk_sizes=[1, 3, 7])
    replay_upstream.serve("anthropic_messages_stream_tool_use", chunk_sizes=[50])
    async with raw_session() as session:
        async with session.post(replay_upstream.url + "/a") as resp:
            chunks = await http_chunks(resp)
            assert "Content-Length" not in resp.headers
        assert b"".join(chunks) == raw
        expected = [[1, 3, 7][i % 3] for i in range(len(chunks))]
        assert [len(c) for c in chunks[:-1]] == expected[:-1]
        assert 0 < len(chunks[-1]) <= expected[-1]
        async with session.post(replay_upstream.url + "/b") as resp:
            chunks = await http_chunks(resp)
            assert resp.headers["Content-Encoding"] == "gzip"
        assert b"".join(chunks) == gz
        assert all(len(c) == 50 for c in chunks[:-1])


async def test_cut_after_aborts_without_terminating_chunk(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = (fixtures_dir / "openai_chat_stream_no_usage.sse").read_bytes()
    cut = len(raw) // 2 + 3  # inside an event
    replay_upstream.serve("openai_chat_stream_no_usage.sse", cut_after=cut)
    replay_upstream.serve("openai_chat_stream_no_usage.sse")  # a fresh connection still works after
    got = b""
    async with raw_session() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(replay_upstream.url + "/v1/chat/completions") as resp:
                assert resp.status == 200
                async for data in resp.content.iter_any():
                    got += data
        assert got == raw[:cut]
        async with session.post(replay_upstream.url + "/v1/chat/completions") as resp:
            assert await resp.read() == raw


async def test_cut_after_zero_and_on_content_length_body(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("openai_chat_stream_no_usage.sse", cut_after=0)
    replay_upstream.serve("openai_error_400_unsupported_parameter", cut_after=10)
    async with raw_session() as session:
        for _ in range(2):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.post(replay_upstream.url + "/x") as resp:
                    await resp.read()


async def test_hang_never_answers(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("openai_chat_nonstream_cached_tokens", hang=True)
    started = time.monotonic()
    async with raw_session(timeout=0.3) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(replay_upstream.url + "/v1/chat/completions", json={"a": 1}) as resp:
                await resp.read()
    assert 0.25 <= time.monotonic() - started < 2
    (req,) = replay_upstream.requests  # it arrived and was recorded
    assert req.json() == {"a": 1}


async def test_stall_after_sends_a_prefix_then_nothing(
    replay_upstream: ReplayUpstream, fixtures_dir: Path
) -> None:
    raw = (fixtures_dir / "openai_chat_stream_include_usage.sse").read_bytes()
    replay_upstream.serve("openai_chat_stream_include_usage.sse", stall_after=100)
    got = b""
    timeout = aiohttp.ClientTimeout(total=5, sock_read=0.3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(replay_upstream.url + "/v1/chat/completions") as resp:
                async for data in resp.content.iter_any():
                    got += data
    assert got == raw[:100]


async def test_close_releases_a_hanging_response(fixtures_dir: Path) -> None:
    upstream = ReplayUpstream(fixtures_dir)
    await upstream.start()
    upstream.serve("openai_chat_nonstream_cached_tokens", hang=True)
    async with raw_session() as session:
        task = asyncio.create_task(session.post(upstream.url + "/x"))
        await upstream.wait_for_requests(1)
        started = time.monotonic()
        await upstream.close()
        assert time.monotonic() - started < 1.5  # not the runner's shutdown timeout
        with pytest.raises(aiohttp.ClientError):
            await task
    await upstream.close()  # idempotent


async def test_delays(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve("anthropic_messages_stream_thinking.sse", compressed=False, first_byte_delay=0.15)
    replay_upstream.serve("openai_responses_stream_gpt55.sse", chunk_delay=0.02)  # 9 events: 8 gaps
    async with raw_session() as session:
        started = time.monotonic()
        async with session.post(replay_upstream.url + "/x") as resp:
            assert time.monotonic() - started >= 0.14
            await resp.read()
        started = time.monotonic()
        async with session.post(replay_upstream.url + "/x") as resp:
            await resp.read()
        assert time.monotonic() - started >= 0.15


async def test_requests_are_recorded_in_order(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve_raw(201, b'{"n":1}', {"x-upstream": "yes"})
    replay_upstream.serve_raw(200, b"data: x\n\n", {"Content-Type": "text/event-stream"}, chunk_sizes=[4])
    async with aiohttp.ClientSession() as session:
        async with session.post(
            replay_upstream.url + "/openai/v1/chat/completions?api-version=1",
            data=b'{"model":"m"}',
            headers={"Authorization": "Bearer k", "X-Tenant-Id": "acme"},
        ) as resp:
            assert resp.status == 201 and resp.headers["x-upstream"] == "yes"
            assert resp.headers["Content-Length"] == "7"
            assert await resp.read() == b'{"n":1}'
        async with session.get(replay_upstream.url + "/v1/models") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert await resp.read() == b"data: x\n\n"
        async with session.delete(replay_upstream.url + "/nothing/queued") as resp:
            assert resp.status == 200
            assert await resp.read() == DEFAULT_BODY
    first, second, third = replay_upstream.requests
    assert (first.method, first.path, first.body) == (
        "POST",
        "/openai/v1/chat/completions?api-version=1",
        b'{"model":"m"}',
    )
    assert first.json() == {"model": "m"}
    assert first.headers["authorization"] == "Bearer k" and first.headers["x-tenant-id"] == "acme"
    assert (second.method, second.path, second.body) == ("GET", "/v1/models", b"")
    assert third.method == "DELETE"


async def test_status_and_header_overrides(replay_upstream: ReplayUpstream) -> None:
    replay_upstream.serve(
        "openai_chat_nonstream_reasoning_gpt5nano",
        status=500,
        headers={"x-request-id": "mine", "retry-after": "2"},
    )
    async with raw_session() as session, session.post(replay_upstream.url + "/x") as resp:
        assert resp.status == 500
        assert resp.headers.getall("x-request-id") == ["mine"]
        assert resp.headers["retry-after"] == "2"


def test_bad_arguments_fail_at_queue_time(fixtures_dir: Path) -> None:
    upstream = ReplayUpstream(fixtures_dir)
    with pytest.raises(FileNotFoundError):
        upstream.serve("no_such_fixture")
    with pytest.raises(ValueError, match="outside the body"):
        upstream.serve("openai_error_400_unsupported_parameter", cut_after=10_000)
    with pytest.raises(ValueError, match="positive"):
        upstream.serve("openai_error_400_unsupported_parameter", chunk_sizes=[0])
    with pytest.raises(RuntimeError, match="not started"):
        _ = upstream.url


def test_load_fixture_meta(fixtures_dir: Path) -> None:
    fx = load_fixture(fixtures_dir, "anthropic_messages_stream_thinking")
    assert fx.compressed and fx.is_sse and fx.status == 200
    assert gzip.decompress(fx.body) == fx.decoded
    assert fx.headers["Content-Encoding"] == "gzip"
    assert "Transfer-Encoding" not in fx.headers and "Connection" not in fx.headers
    assert load_fixture(fixtures_dir, "openai_embeddings_base64.json").json()["usage"]["prompt_tokens"] == 2


def test_sse_events_split() -> None:
    assert sse_events(b"a: 1\n\nb: 2\r\n\r\nrest") == [b"a: 1\n\n", b"b: 2\r\n\r\n", b"rest"]
    assert sse_events(b"") == []
