"""Hardening: a real sidecar in front of an upstream that misbehaves at the byte level.

Each test puts a :class:`~hardening.support.RawUpstream` (a TCP server scripted per
connection) behind a sidecar started with the test harness, and asserts what the client
got, the record and the metrics, that the sidecar let go of the upstream connection, and
that it still serves a normal call afterwards. Connection refused, 5xx, 429, malformed JSON
and a FIN cut mid-stream are proven in ``test_proxy.py``; not repeated here.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Iterator
from time import monotonic

import aiohttp
import pytest
from blockbuster import blockbuster_ctx

from hardening.support import (
    LAST_CHUNK,
    RawConn,
    RawUpstream,
    answer_json,
    answer_sse,
    chat_chunk,
    chat_json,
    chat_stream,
    chunk,
    response_head,
)
from sidecar.app import Sidecar
from tests.harness import Collect, make_config, running_sidecar, sample

SSE_HEAD = response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(autouse=True)
def no_blocking_calls_in_sidecar() -> Iterator[None]:
    """Fail any test in which sidecar code makes a blocking call on the event loop."""
    with blockbuster_ctx("sidecar"):
        yield


def upstream(url: str, **extra: str) -> str:
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"- {{name: openai, url: '{url}', provider: openai, mount: /{fields}}}\n"


async def exchange(
    session: aiohttp.ClientSession, sc: Sidecar, body: dict[str, object]
) -> tuple[int, bytes, BaseException | None]:
    """POST a chat call; the status, every byte received and how the body ended (None: cleanly)."""
    got = b""
    async with (
        asyncio.timeout(20),  # a body cut short under its Content-Length would hang the client
        session.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json=body) as r,
    ):
        try:
            async for piece in r.content.iter_any():
                got += piece
        except aiohttp.ClientPayloadError as exc:
            return r.status, got, exc
        return r.status, got, None


async def still_serves(
    session: aiohttp.ClientSession, sc: Sidecar, up: RawUpstream, collect: Collect
) -> None:
    """A normal call after the fault: answered, measured, nothing left in flight."""
    up.script = answer_json
    before = sample(sc, "llm_requests_total", code="200")
    seen = len(collect.records)
    status, body, ended = await exchange(session, sc, CHAT)
    assert (status, body, ended) == (200, chat_json(), None)
    records = await collect.wait_for(seen + 1)
    assert records[-1].usage.input == 12 and records[-1].error_type is None
    assert sample(sc, "llm_requests_total", code="200") == before + 1
    assert sample(sc, "llm_inflight_requests") == 0


async def test_upstream_accepts_and_never_answers() -> None:
    async def silent(conn: RawConn) -> None:
        await conn.read_request()
        await conn.wait_peer_closed(10)

    async with RawUpstream(silent) as up:
        cfg = make_config(upstream(up.url, timeouts="{connect: 1s, first_byte: 500ms, total: 5s}"))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            started = monotonic()
            status, body, _ = await exchange(s, sc, CHAT)
            assert 0.4 < monotonic() - started < 2.5
            assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (504, "timeout")
            assert sample(sc, "llm_errors_total", error_type="timeout") == 1
            assert sample(sc, "llm_requests_total", code="504") == 1
            # The sidecar hung up on the silent upstream rather than keeping its connection.
            async with asyncio.timeout(3):
                await up.conns[0].peer_closed.wait()
            await still_serves(s, sc, up, collect)


async def test_upstream_sends_headers_then_hangs() -> None:
    first = chat_chunk("Hello")

    async def headers_then_silence(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(SSE_HEAD + chunk(first))
        await conn.wait_peer_closed(10)

    async with RawUpstream(headers_then_silence) as up:
        cfg = make_config(upstream(up.url, timeouts="{connect: 1s, first_byte: 500ms, total: 10s}"))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, STREAM)
            # The client got what was sent, then an abrupt end: never a clean, invented one.
            assert status == 200 and body == first and ended is not None
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (200, "timeout")
            assert sample(sc, "llm_errors_total", error_type="timeout") == 1
            assert sample(sc, "llm_requests_total", code="200") == 1
            async with asyncio.timeout(3):
                await up.conns[0].peer_closed.wait()
            await still_serves(s, sc, up, collect)


async def test_upstream_resets_mid_stream() -> None:
    sent = b"".join(chat_chunk(w) for w in ("one ", "two ", "three "))

    async def reset(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(SSE_HEAD + chunk(sent))
        await asyncio.sleep(0.1)
        conn.reset()  # RST, not FIN

    async with RawUpstream(reset) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, STREAM)
            assert status == 200 and body == sent and ended is not None
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (200, "stream_interrupted")
            # Nothing was reported: what the client received is estimated, and labelled so.
            counts = {c.type: c for c in record.token_counts()}
            assert counts["output"].source == "estimated" and counts["output"].count > 0
            assert sample(sc, "llm_errors_total", error_type="stream_interrupted") == 1
            assert sample(sc, "llm_tokens_total", type="output", source="estimated") == counts["output"].count
            await still_serves(s, sc, up, collect)


async def test_upstream_drips_one_byte_per_second() -> None:
    """Each byte comes within ``first_byte``, so only ``total`` ends the call: a drip cannot hold it."""
    body = chat_json()
    stopped = asyncio.Event()

    async def drip(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        )
        try:
            for byte in body:
                await conn.send(bytes([byte]))
                await asyncio.sleep(1)
        finally:
            stopped.set()

    async with RawUpstream(drip) as up:
        cfg = make_config(upstream(up.url, timeouts="{connect: 1s, first_byte: 1500ms, total: 3s}"))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            started = monotonic()
            status, got, ended = await exchange(s, sc, CHAT)
            assert 2.8 < monotonic() - started < 4.5
            assert status == 200 and 2 <= len(got) <= 4 and body.startswith(got) and ended is not None
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (200, "timeout")
            assert sample(sc, "llm_errors_total", error_type="timeout") == 1
            # The sidecar closed the connection: the drip's next write fails and it stops.
            async with asyncio.timeout(5):
                await stopped.wait()
            await still_serves(s, sc, up, collect)


@pytest.mark.parametrize("variant", ["crlf", "comments", "lone_cr", "missing_blank_lines"])
async def test_malformed_sse_reaches_the_client_unchanged(variant: str) -> None:
    clean = chat_stream(words=4)
    wire = {
        "crlf": clean.replace(b"\n", b"\r\n"),
        "lone_cr": clean.replace(b"\n", b"\r"),
        "comments": b": hello\n\n" + clean.replace(b"\n\n", b"\n: keep-alive\n\n:\n\n"),
        "missing_blank_lines": clean.replace(b"\n\n", b"\n"),
    }[variant]

    async def serve(conn: RawConn) -> None:
        await answer_sse(conn, wire, piece=7)  # seams everywhere: inside CRLF pairs too

    async with RawUpstream(serve) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, STREAM)
            assert (status, body, ended) == (200, wire, None)
            (record,) = await collect.wait_for(1)
            if variant == "missing_blank_lines":
                # One event that never ends: its end, and the usage in it, were never seen.
                # The call is not passed off as clean: it is a stream cut short, estimated.
                assert record.usage.input is None and record.error_type == "stream_interrupted"
                assert record.estimated.input is not None
                assert sample(sc, "llm_errors_total", error_type="stream_interrupted") == 1
            else:
                assert (record.usage.input, record.usage.output) == (12, 4)
                assert not record.malformed and record.error_type is None
                assert sample(sc, "llm_tokens_total", type="output", source="reported") == 4
            await still_serves(s, sc, up, collect)


async def test_upstream_content_length_longer_than_the_body() -> None:
    async def short(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "application/json"), ("Content-Length", "1000")])
        )
        await conn.send(b'{"id":"x",' + b" " * 390)
        # FIN after 400 of the 1000 bytes announced

    async with RawUpstream(short) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, CHAT)
            assert status == 200 and len(body) == 400 and ended is not None
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (200, "stream_interrupted")
            assert sample(sc, "llm_errors_total", error_type="stream_interrupted") == 1
            await still_serves(s, sc, up, collect)


async def test_upstream_bytes_past_content_length_never_reach_another_call() -> None:
    """Bytes after the announced body (a second, smuggled response) are dropped with the connection."""
    smuggled = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"evil":1}'

    async def overlong(conn: RawConn) -> None:
        await conn.read_request()
        body = chat_json()
        head = response_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        await conn.send(head + body + smuggled)
        await answer_json(conn)  # a pooled connection would be asked again: answer properly

    async with RawUpstream(overlong) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            assert await exchange(s, sc, CHAT) == (200, chat_json(), None)
            await still_serves(s, sc, up, collect)
            assert len(up.conns) == 2  # the tainted connection was not reused


async def test_upstream_with_conflicting_framing_gets_a_clean_502() -> None:
    async def conflicting(conn: RawConn) -> None:
        await conn.read_request()
        head = response_head(
            200,
            [("Content-Type", "application/json"), ("Content-Length", "3"), ("Transfer-Encoding", "chunked")],
        )
        await conn.send(head + chunk(b"0123456789") + LAST_CHUNK)

    async with RawUpstream(conflicting) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, CHAT)
            assert status == 502 and ended is None
            assert json.loads(body)["error"]["code"] == "upstream_unreachable"
            (record,) = await collect.wait_for(1)
            assert record.status == 502 and record.error_type is not None
            assert sample(sc, "llm_requests_total", code="502") == 1
            await still_serves(s, sc, up, collect)


# --- found by the fuzzer (hardening/fuzz.py) ----------------------------------------------------

CORRUPT = b"\xff" * 4096  # no valid gzip, zlib or brotli stream starts or goes on like this


@pytest.mark.parametrize(
    ("encoding", "content_type"),
    [
        ("gzip", "application/json"),
        ("br", "application/json"),
        ("deflate", "application/json"),
        ("gzip", "text/event-stream"),
        ("br", "text/event-stream"),
    ],
)
async def test_a_corrupt_compressed_body_still_reaches_the_client_whole(
    encoding: str, content_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It used to be cut after the first piece with a clean end (gzip), or to raise (br)."""
    pieces = [CORRUPT] * 4

    async def corrupt(conn: RawConn) -> None:
        await conn.read_request()
        head = response_head(
            200,
            [
                ("Content-Type", content_type),
                ("Content-Encoding", encoding),
                ("Content-Length", "16384"),
                ("Connection", "close"),  # this script answers once
            ],
        )
        await conn.send(head)
        for piece in pieces:
            await conn.send(piece)
            await asyncio.sleep(0.02)  # one read each

    async with RawUpstream(corrupt) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession(auto_decompress=False) as s:
            status, body, ended = await exchange(s, sc, STREAM)
            assert (status, body, ended) == (200, b"".join(pieces), None)
            (record,) = await collect.wait_for(1)
            assert record.status == 200 and record.malformed and record.usage.input is None
            assert sample(sc, "llm_malformed_responses_total") == 1
            await still_serves(s, sc, up, collect)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_a_corrupt_stream_forwarded_decoded_ends_abruptly() -> None:
    """With the usage chunk stripped the client gets the stream decoded: a corrupt rest cannot
    be passed on as sent, so the response ends abruptly (it used to end cleanly, cut short)."""
    compressed = gzip.compress(chat_stream(words=200), mtime=0)
    half = len(compressed) // 2
    first, rest = compressed[:half], bytes(b ^ 0x55 for b in compressed[half:])
    checker = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert checker.decompress(first)  # the first half decodes to events...
    with pytest.raises(zlib.error):
        checker.decompress(rest)  # ...and the rest does not

    async def corrupt(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(
                200,
                [
                    ("Content-Type", "text/event-stream"),
                    ("Content-Encoding", "gzip"),
                    ("Transfer-Encoding", "chunked"),
                ],
            )
        )
        await conn.send(chunk(first))
        await asyncio.sleep(0.05)
        await conn.send(chunk(rest) + LAST_CHUNK)

    async with RawUpstream(corrupt) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, {**CHAT, "stream": True})  # usage injected
            assert status == 200 and body.startswith(b"data: ") and ended is not None
            assert b"[DONE]" not in body
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (200, "stream_interrupted")
            await still_serves(s, sc, up, collect)


async def test_absurd_token_counts_are_not_reported_and_the_ledger_survives() -> None:
    """A count past 2**63 once crashed the ledger's writer for good (and /readyz with it)."""
    body = chat_json().replace(b'"prompt_tokens":12', b'"prompt_tokens":18446744073709551617')

    async def absurd(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        )
        await conn.send(body)
        await answer_json(conn)  # then sane answers on the same connection

    async with RawUpstream(absurd) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            assert await exchange(s, sc, CHAT) == (200, body, None)
            (record,) = await collect.wait_for(1)
            assert record.usage.input is None and record.usage.output == 5
            assert record.estimated.input is not None  # counted locally instead, and labelled so
            await sc.ledger.flush()
            assert sc.ledger.healthy(), sc.ledger.status()
            async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as r:
                assert r.status == 200
            await still_serves(s, sc, up, collect)


async def test_an_upstream_101_is_never_relayed() -> None:
    """The sidecar never asks for an upgrade: a 101 would tell the client its connection
    switched protocols when it did not (it used to be relayed, and recorded as a success)."""

    async def switching(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(101, [("Upgrade", "websocket"), ("Connection", "upgrade")], "Switching")
        )
        await conn.wait_peer_closed(5)

    async with RawUpstream(switching) as up:
        cfg = make_config(upstream(up.url))
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            status, body, ended = await exchange(s, sc, CHAT)
            assert status == 502 and ended is None
            assert json.loads(body)["error"]["code"] == "upstream_invalid_response"
            (record,) = await collect.wait_for(1)
            assert (record.status, record.error_type) == (502, "connect_error")
            assert sample(sc, "llm_requests_total", code="101") == 0
            await still_serves(s, sc, up, collect)
