"""Hardening: clients that misbehave, against a real sidecar on real sockets.

Clients that go away before, during and after the upstream's answer; bodies too big, too
slow or not JSON; garbage and far too many tenant ids; and a sink that hangs while calls
flow. Each test asserts what the client got, the record and the metrics, and that the
sidecar serves a normal call afterwards. (A slow *reader* is in ``test_hardening_memory.py``:
it needs the sidecar's own memory, so a separate process.)
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Iterator
from time import monotonic

import aiohttp
import pytest
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from hardening.support import RawConn, RawUpstream, answer_json, chat_chunk, chat_json, chunk, response_head
from sidecar.app import Sidecar
from sidecar.metrics import iter_samples
from sidecar.model import CallRecord
from sidecar.sinks import QueueSink
from sidecar.threads import LOAD
from tests.harness import Collect, make_config, running_sidecar, sample

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
SSE_HEAD = response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])


@pytest.fixture(autouse=True)
def no_blocking_calls_in_sidecar() -> Iterator[None]:
    """Fail any test in which sidecar code makes a blocking call on the event loop."""
    with blockbuster_ctx("sidecar"):
        yield


def upstream(url: str, **extra: str) -> str:
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"- {{name: openai, url: '{url}', provider: openai, mount: /{fields}}}\n"


def request_bytes(body: bytes, headers: str = "", length: int | None = None) -> bytes:
    """A raw POST /v1/chat/completions with ``body`` (``length`` overrides Content-Length)."""
    size = len(body) if length is None else length
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n{headers}\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One ``Content-Length`` framed response from a raw connection (5 s at most)."""
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def still_serves(
    session: aiohttp.ClientSession, sc: Sidecar, up: RawUpstream, collect: Collect
) -> None:
    """A normal call after the fault: answered, measured, nothing left in flight."""
    up.script = answer_json
    seen = len(collect.records)
    async with session.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200 and await r.read() == chat_json()
    records = await collect.wait_for(seen + 1)
    assert records[-1].status == 200 and records[-1].usage.input == 12
    assert sample(sc, "llm_inflight_requests") == 0
    assert LOAD.calls == 0  # the loop's load, as the background threads' pacers read it


def assert_client_abort(sc: Sidecar, record: CallRecord) -> None:
    assert (record.status, record.error_type) == (499, "client_abort")
    assert sample(sc, "llm_requests_total", code="499") == 1
    assert sample(sc, "llm_errors_total", error_type="client_abort") == 1
    assert sample(sc, "llm_inflight_requests") == 0
    assert LOAD.calls == 0


# --- clients that go away -----------------------------------------------------------------


async def test_client_disconnects_before_the_upstream_answers() -> None:
    async def slow(conn: RawConn) -> None:
        await conn.read_request()
        await conn.wait_peer_closed(10)

    async with (
        RawUpstream(slow) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(request_bytes(json.dumps(CHAT).encode()))
        await up.wait_accepted()
        assert sample(sc, "llm_inflight_requests") == 1
        assert LOAD.calls == 1
        writer.close()
        (record,) = await collect.wait_for(1)
        assert_client_abort(sc, record)
        async with asyncio.timeout(3):  # the upstream call was cancelled: its connection closed
            await up.conns[0].peer_closed.wait()
        await still_serves(s, sc, up, collect)


async def test_client_disconnects_while_sending_its_body() -> None:
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(request_bytes(b'{"model": "gpt-4o", "mess', length=1000))
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        (record,) = await collect.wait_for(1)
        assert_client_abort(sc, record)
        assert up.conns == []  # the upstream was never called with half a body
        await still_serves(s, sc, up, collect)


async def test_client_disconnects_mid_stream() -> None:
    stopped = asyncio.Event()

    async def endless(conn: RawConn) -> None:
        await conn.read_request()
        await conn.send(SSE_HEAD)
        try:
            while True:  # ends when the sidecar closes the connection (the write fails)
                await conn.send(chunk(chat_chunk("word ")))
                await asyncio.sleep(0.01)
        finally:
            stopped.set()

    async with (
        RawUpstream(endless) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        body = {**CHAT, "stream": True}
        async with s.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json=body) as r:
            got = b""
            while got.count(b"\n\n") < 3:
                got += await r.content.readany()
            r.close()
        (record,) = await collect.wait_for(1)
        assert_client_abort(sc, record)
        # What was used so far is estimated from the text the client received.
        assert record.estimated.output is not None and record.estimated.output >= 3
        async with asyncio.timeout(3):
            await stopped.wait()
        await still_serves(s, sc, up, collect)


async def test_client_disconnects_after_the_answer() -> None:
    """An answer already handed over is a success, recorded once; a late hang-up changes nothing."""
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(request_bytes(json.dumps(CHAT).encode()))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        writer.transport.abort()  # RST, with the body possibly unread
        (record,) = await collect.wait_for(1)
        assert (record.status, record.error_type, record.usage.input) == (200, None, 12)
        await asyncio.sleep(0.2)
        assert len(collect.records) == 1  # finished once
        assert sample(sc, "llm_requests_total") == 1 and sample(sc, "llm_inflight_requests") == 0
        await still_serves(s, sc, up, collect)


# --- bodies ----------------------------------------------------------------------------------


async def test_body_slower_than_the_read_timeout_gets_408() -> None:
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        assert sc.proxy is not None
        sc.proxy.body_read_timeout = 0.5
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        started = monotonic()
        writer.write(request_bytes(b'{"model": ', length=100))
        status, headers, answer = await read_response(reader)
        assert 0.4 < monotonic() - started < 2
        assert status == 408 and headers["connection"] == "close"  # the rest is never read as a request
        assert json.loads(answer)["error"]["code"] == "request_timeout"
        writer.close()
        (record,) = await collect.wait_for(1)
        assert record.status == 408 and sample(sc, "llm_requests_total", code="408") == 1
        assert up.conns == []

        # A body that keeps coming, however slowly in total, is read: the timeout is between pieces.
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        body = json.dumps(CHAT).encode()
        writer.write(request_bytes(b"", length=len(body)))
        for i in range(0, len(body), 10):
            writer.write(body[i : i + 10])
            await asyncio.sleep(0.2)
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
        await collect.wait_for(2)
        assert up.conns[0].requests[0].body == body
        await still_serves(s, sc, up, collect)


async def test_oversized_body_is_refused_before_it_is_sent() -> None:
    async with RawUpstream(answer_json) as up:
        cfg = make_config(upstream(up.url), extra="limits: {max_body_bytes: 1048576}\n")
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
            writer.write(request_bytes(b"", length=100 * 1024 * 1024))  # announces 100 MiB, sends none
            answer = await asyncio.wait_for(reader.read(65536), 5)
            assert answer.startswith(b"HTTP/1.1 413")
            writer.close()
            (record,) = await collect.wait_for(1)
            assert record.status == 413 and sample(sc, "llm_requests_total", code="413") == 1
            assert up.conns == []
            await still_serves(s, sc, up, collect)


MALFORMED_BODIES = {
    "not json": b"{not json",
    "invalid utf-8": b'{"model": "\xff\xfe"}',
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "array": b'[{"model": "gpt-4o"}]',
    "wrong types": b'{"model": {"a": 1}, "stream": "yes", "messages": 5, "stream_options": 7}',
    "lone surrogate model": b'{"model": "\\ud800", "messages": []}',
    "megabyte model name": b'{"model": "' + b"m" * 1_000_000 + b'", "messages": []}',
    "empty": b"",
}


async def test_malformed_json_bodies_are_forwarded_unchanged_and_break_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        for name, body in MALFORMED_BODIES.items():
            async with s.post(
                f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r:
                assert r.status == 200, name
        received = [req.body for conn in up.conns for req in conn.requests]
        assert received == list(MALFORMED_BODIES.values())  # byte for byte, nothing injected
        records = await collect.wait_for(len(MALFORMED_BODIES))
        assert all(r.status == 200 and r.error_type is None for r in records)
        models = {r.request_model for r in records}
        assert "\ufffd" in models or "?" in models  # the surrogate never reaches a sink as-is
        assert max(len(m or "") for m in models) <= 256  # nor a megabyte of model name
        assert sample(sc, "llm_requests_total", code="200") == len(MALFORMED_BODIES)
        await sc.ledger.flush()
        # One bad string once crashed the ledger's writer: the sidecar then went unready for good.
        assert sc.ledger.healthy(), sc.ledger.status()
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as r:
            assert r.status == 200
        await still_serves(s, sc, up, collect)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_compressed_request_body_is_forwarded_as_sent() -> None:
    body = gzip.compress(json.dumps(CHAT).encode(), mtime=0)
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        async with s.post(
            f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as r:
            assert r.status == 200
        (request,) = up.conns[0].requests
        assert request.headers["content-encoding"] == "gzip"
        assert request.body == body  # not decompressed on the way (it used to be, header kept)
        await collect.wait_for(1)
        await still_serves(s, sc, up, collect)


# --- tenants ----------------------------------------------------------------------------------


async def test_garbage_tenant_ids_never_become_labels() -> None:
    garbage = ["x" * 8000, "caf\xe9", "tab\tinside", "obs\x85text", "  ", ""]
    async with (
        RawUpstream(answer_json) as up,
        running_sidecar(make_config(upstream(up.url))) as (sc, collect),
        aiohttp.ClientSession() as s,
    ):
        for tenant in garbage:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
            header = f"X-Tenant-Id: {tenant}\r\nConnection: close\r\n".encode("latin-1")
            writer.write(request_bytes(json.dumps(CHAT).encode(), header.decode("latin-1")))
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200"), tenant[:20]
            writer.close()
        # 10 KB is past the HTTP parser's 8 KiB line limit: refused before the proxy sees it.
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.proxy_port)
        writer.write(request_bytes(b"{}", f"X-Tenant-Id: {'t' * 10240}\r\n"))
        assert (await asyncio.wait_for(reader.read(), 5))[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400")
        writer.close()
        records = await collect.wait_for(len(garbage))
        assert [r.tenant for r in records] == ["__invalid__"] * 4 + ["unknown"] * 2
        labels = {labels["tenant"] for labels, _ in iter_samples(sc.registry, "llm_requests_total")}
        assert labels == {"__invalid__", "unknown"}
        await still_serves(s, sc, up, collect)


async def test_ten_thousand_distinct_tenants_keep_the_series_bounded() -> None:
    calls, cap = 10_000, 100
    async with RawUpstream(answer_json) as up:
        cfg = make_config(
            upstream(up.url), extra=f"tenants: {{max_distinct: {cap}}}\nlogs: {{enabled: false}}\n"
        )
        async with (
            running_sidecar(cfg) as (sc, collect),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as s,
        ):
            url = f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions"
            statuses: list[int] = []

            async def worker(first: int) -> None:
                for i in range(first, calls, 20):
                    async with s.post(url, json=CHAT, headers={"X-Tenant-Id": f"tenant-{i}"}) as r:
                        await r.read()
                        statuses.append(r.status)

            await asyncio.gather(*(worker(i) for i in range(20)))
            assert statuses == [200] * calls
            await collect.wait_for(calls, timeout=30)
            tenants = {labels["tenant"] for labels, _ in iter_samples(sc.registry, "llm_requests_total")}
            assert len(tenants) == cap + 1 and "__overflow__" in tenants
            assert sample(sc, "llm_requests_total") == calls  # every call counted, none lost
            assert sample(sc, "llm_tenant_overflow_total") == calls - cap
            assert sample(sc, "llm_requests_total", tenant="__overflow__") == calls - cap
            series = sum(1 for _ in iter_samples(sc.registry, "llm_request_duration_seconds_count"))
            assert series == cap + 1
            assert sample(sc, "llm_sink_dropped_total") == 0
            await still_serves(s, sc, up, collect)


# --- sinks -----------------------------------------------------------------------------------


class HangingSink(QueueSink):
    """A sink whose every batch hangs (a collector that accepts and never answers)."""

    name = "hanging"

    def __init__(self) -> None:
        super().__init__(maxsize=10)
        self.accepted = 0

    def offer(self, record: CallRecord) -> bool:
        accepted = super().offer(record)
        self.accepted += accepted
        return accepted

    async def handle(self, records: list[CallRecord]) -> None:
        await asyncio.sleep(3600)


async def test_a_hanging_sink_never_slows_a_call_and_every_drop_is_counted() -> None:
    calls = 400
    async with RawUpstream(answer_json) as up:
        cfg = make_config(upstream(up.url), extra="shutdown: {drain_timeout: 1s}\nlogs: {enabled: false}\n")
        hanging, collect = HangingSink(), Collect()
        sc = Sidecar(cfg, registry=CollectorRegistry(), extra_sinks=[hanging, collect])
        await sc.start()
        try:
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions"
                slowest = 0.0

                async def worker(n: int) -> None:
                    nonlocal slowest
                    for _ in range(n):
                        started = monotonic()
                        async with s.post(url, json=CHAT) as r:
                            assert r.status == 200 and await r.read() == chat_json()
                        slowest = max(slowest, monotonic() - started)

                await asyncio.gather(*(worker(calls // 10) for _ in range(10)))
                assert slowest < 2.0
                await collect.wait_for(calls)
                assert sample(sc, "llm_requests_total") == calls  # the metrics sink lost nothing
                assert 10 <= hanging.accepted <= 2 * 10 + 1
                assert sample(sc, "llm_sink_dropped_total", sink="hanging") == calls - hanging.accepted
                assert sample(sc, "llm_sink_dropped_total", sink="metrics") == 0
                assert sample(sc, "llm_sink_dropped_total", sink="ledger") == 0
                await still_serves(s, sc, up, collect)
        finally:
            started = monotonic()
            await sc.stop()
            assert monotonic() - started < 5  # the hung sink is given up on, not waited for
