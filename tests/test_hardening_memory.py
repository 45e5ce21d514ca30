"""Hardening: the sidecar's memory stays bounded whatever passes through it.

Each test runs the sidecar as its own process (``python -m sidecar run``) and samples its
resident memory from ``/proc`` every 10 ms while a fault plays out: 100 MiB responses, a
client that stops reading, SSE events of many MiB. The baseline is taken after a warm-up
call that also loads the tokenizer (it is lazy and takes ~75 MiB the first time), so the
figures are what the traffic itself costs.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from hardening.support import (
    LAST_CHUNK,
    RawConn,
    RawUpstream,
    RssSampler,
    SidecarProcess,
    chat_chunk,
    chunk,
    metric,
    openai_upstream,
    response_head,
    sidecar_process,
    usage_chunk,
    write_config,
)

MiB = 1024 * 1024
STREAM = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}, "messages": []}
#: A 64 KiB run of chat events, the unit every big stream is made of.
EVENTS = chat_chunk("lorem ipsum " * 20) * (64 * 1024 // len(chat_chunk("lorem ipsum " * 20)))


def report(name: str, value: float) -> None:
    """Print a measured figure (shown with ``pytest -s``; the report quotes them)."""
    sys.stdout.write(f"\n[hardening] {name}: {value:.1f} MiB\n")


async def settle(sc: SidecarProcess) -> int:
    """Wait until the sidecar's RSS holds still for half a second; returns it."""
    last = sc.rss()
    for _ in range(40):
        await asyncio.sleep(0.5)
        now = sc.rss()
        if abs(now - last) < MiB // 2:
            return now
        last = now
    return last


@asynccontextmanager
async def measured_sidecar(tmp_path: Path, up: RawUpstream) -> AsyncIterator[SidecarProcess]:
    """A sidecar process in front of ``up``, warmed up (tokenizer loaded) and settled."""
    cfg = write_config(tmp_path / "sidecar.yaml", openai_upstream(up.url))
    async with sidecar_process("--config", str(cfg)) as sc:
        script = up.script

        async def no_usage(conn: RawConn) -> None:
            await conn.read_request()
            body = b"".join(chat_chunk(f"w{i} ") for i in range(50)) + b"data: [DONE]\n\n"
            await conn.send(
                response_head(
                    200, [("Content-Type", "text/event-stream"), ("Content-Length", str(len(body)))]
                )
            )
            await conn.send(body)

        up.script = no_usage
        async with aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/v1/chat/completions", json={**STREAM, "stream_options": None}) as r:
                await r.read()
            async with asyncio.timeout(20):  # the estimate of that call loads the tokenizer
                while metric(await sc.scrape(s), "llm_tokens_total", source="estimated") == 0:
                    await asyncio.sleep(0.1)
        up.script = script
        await settle(sc)
        yield sc


def big_stream(total: int, digest: list[str]) -> RawUpstream:
    """An upstream that streams ``total`` bytes of chat events as fast as the sidecar takes them."""

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        )
        hashed = hashlib.sha256()
        while conn.sent < total:
            await conn.send(chunk(EVENTS))
            hashed.update(EVENTS)
        tail = usage_chunk(12, 34) + b"data: [DONE]\n\n"
        hashed.update(tail)
        await conn.send(chunk(tail) + LAST_CHUNK)
        digest.append(hashed.hexdigest())

    return RawUpstream(serve)


async def read_all(response: aiohttp.ClientResponse) -> tuple[int, str]:
    hashed, size = hashlib.sha256(), 0
    async for piece in response.content.iter_any():
        hashed.update(piece)
        size += len(piece)
    return size, hashed.hexdigest()


async def test_a_100_mib_stream_passes_through_in_bounded_memory(tmp_path: Path) -> None:
    digest: list[str] = []
    async with big_stream(100 * MiB, digest) as up, measured_sidecar(tmp_path, up) as sc:
        base = sc.rss()
        async with (
            RssSampler(sc.pid) as rss,
            aiohttp.ClientSession() as s,
            s.post(sc.url + "/v1/chat/completions", json=STREAM) as r,
        ):
            size, got = await read_all(r)
        assert size >= 100 * MiB and [got] == digest  # every byte, in order
        report("RSS growth, 100 MiB SSE stream (peak)", (rss.peak - base) / MiB)
        assert rss.peak - base < 24 * MiB
        async with aiohttp.ClientSession() as s:
            text = await sc.scrape_when(s, "llm_requests_total", 2, code="200")
        assert metric(text, "llm_requests_total", code="200") == 2
        assert metric(text, "llm_tokens_total", type="output", source="reported") == 34
        assert metric(text, "llm_inflight_requests") == 0


async def test_a_100_mib_json_body_passes_through_in_bounded_memory(tmp_path: Path) -> None:
    """A JSON answer is copied for usage parsing up to 16 MiB only; the rest just passes."""
    size = 100 * MiB

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "application/json"), ("Content-Length", str(size))])
        )
        piece = b" " * (1024 * 1024)
        for _ in range(size // len(piece)):
            await conn.send(piece)

    async with RawUpstream(serve) as up, measured_sidecar(tmp_path, up) as sc:
        base = sc.rss()
        async with RssSampler(sc.pid) as rss, aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/v1/chat/completions", json={"model": "gpt-4o"}) as r:
                got, _ = await read_all(r)
            assert got == size
        report("RSS growth, 100 MiB JSON body (peak)", (rss.peak - base) / MiB)
        assert rss.peak - base < 40 * MiB
        async with aiohttp.ClientSession() as s:
            text = await sc.scrape_when(s, "llm_requests_total", 2, code="200")
        assert metric(text, "llm_requests_total", code="200") == 2
        assert metric(text, "llm_inflight_requests") == 0


async def test_a_slow_reader_gets_backpressure_not_a_buffer(tmp_path: Path) -> None:
    """A client that stops reading pauses the upstream: the sidecar holds no more than socket buffers."""
    digest: list[str] = []
    async with big_stream(100 * MiB, digest) as up, measured_sidecar(tmp_path, up) as sc:
        base = sc.rss()
        async with (
            RssSampler(sc.pid) as rss,
            aiohttp.ClientSession() as s,
            s.post(sc.url + "/v1/chat/completions", json=STREAM) as r,
        ):
            await asyncio.sleep(3)  # reads nothing
            paused_at = up.conns[-1].sent
            await asyncio.sleep(1)
            assert up.conns[-1].sent == paused_at  # the upstream is paused, not drained into memory
            report("upstream bytes sent while the client read nothing", paused_at / MiB)
            assert paused_at < 32 * MiB
            stalled_peak = rss.peak
            hashed, size = hashlib.sha256(), 0
            for _ in range(40):  # then very slowly: 64 KiB every 25 ms
                piece = await r.content.read(64 * 1024)
                hashed.update(piece)
                size += len(piece)
                await asyncio.sleep(0.025)
            async for piece in r.content.iter_any():  # and then all of it
                hashed.update(piece)
                size += len(piece)
        assert size >= 100 * MiB and [hashed.hexdigest()] == digest
        report("RSS growth while the client read nothing (peak)", (stalled_peak - base) / MiB)
        report("RSS growth, slow reader of a 100 MiB stream (peak)", (rss.peak - base) / MiB)
        assert stalled_peak - base < 16 * MiB and rss.peak - base < 24 * MiB


async def test_huge_sse_events_keep_memory_bounded(tmp_path: Path) -> None:
    """Single events of 6 MiB (decoded) and 40 MiB (over the decoder's limit: passed on, not decoded)."""
    events = [
        chat_chunk("a"),
        b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (6 * MiB) + b'"}}]}\n\n',
        b"data: " + b"y" * (40 * MiB) + b"\n\n",
        b": " + b"z" * (10 * MiB) + b"\n\n",  # a 10 MiB comment
        usage_chunk(12, 3),
        b"data: [DONE]\n\n",
    ]
    body = b"".join(events)

    async def serve(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(
            response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        )
        for i in range(0, len(body), 256 * 1024):
            await conn.send(chunk(body[i : i + 256 * 1024]))
        await conn.send(LAST_CHUNK)

    async with RawUpstream(serve) as up, measured_sidecar(tmp_path, up) as sc:
        base = sc.rss()
        async with RssSampler(sc.pid) as rss, aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/v1/chat/completions", json=STREAM) as r:
                size, got = await read_all(r)
            assert (size, got) == (len(body), hashlib.sha256(body).hexdigest())
            text = await sc.scrape_when(s, "llm_requests_total", 2, code="200")
        report("RSS growth, 56 MiB of huge SSE events (peak)", (rss.peak - base) / MiB)
        assert rss.peak - base < 64 * MiB
        # The usage after the giants is still read: the decoder recovered at the next event.
        assert metric(text, "llm_tokens_total", type="output", source="reported") == 3
        assert metric(text, "llm_requests_total", code="200") == 2
