"""Faults in the sinks: every observability and alerting destination broken at once, and
ledger rows the database refuses.

Already proved elsewhere, so not repeated here: an OTLP traces collector that is down or
hangs (``test_e2e_observability.py``), the same for usage logs (``test_usage_logs.py``),
one hanging and one failing notification channel next to a working one in a real process
(``test_e2e_alerting.py``), a hanging in-process sink whose drops are counted
(``test_hardening_client.py``), the ledger's directory unusable or its disk full
(``test_ledger.py``, ``test_ledger_crash.py``).

Here, against a real ``python -m sidecar run`` process:

* **everything broken at once**: the traces and usage-log collectors accept connections and
  never answer, one notification channel refuses connections and the other hangs, and an
  alert fires and keeps trying to notify them, while 240 calls (chat and messages, JSON and
  streams, eight tenants) go through. Every call answers 200 within 2 s; the event loop
  stays responsive (``/healthz`` on the admin port is timed every 20 ms throughout) and
  makes no blocking call (blockbuster is armed inside the sidecar once it listens, and
  proved armed); every lost span and usage record is counted
  (``exported + dropped + queued == calls``, ``llm_sink_dropped_total`` matching the
  ``queue_full`` drops), every notification ends ``failed`` or ``timeout`` and is counted;
  SIGTERM still exits 0 promptly; and the ledger holds every call exactly once.

And against the ledger itself (in-process, real SQLite files):

* **a row the database refuses** (an integer past 64 bits, text with a lone surrogate, a
  required value missing, a time no row can hold) is skipped, counted in
  ``llm_ledger_rows_rejected_total`` and logged with its ``call_id``, and every other row of
  its batch and after it is stored: no whole-batch retry, no spill of everything, no stop.
  The same holds for such rows met in the journal on replay and on the way to the journal
  while the database is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import logging
import shutil
import signal
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from hardening.support import (
    LAST_CHUNK,
    RawConn,
    RawUpstream,
    RssSampler,
    SidecarProcess,
    chat_json,
    chunk,
    metric,
    openai_upstream,
    response_head,
    sidecar_process,
    write_config,
)
from sidecar.ledger import DB_NAME, JOURNAL_NAME, Ledger, LedgerSettings, journal_line, to_row
from sidecar.metrics import Metrics, MetricsSink, iter_samples
from sidecar.mock_upstream import start_mock_upstream
from sidecar.model import CallRecord, Usage
from tests.harness import close_held, make_config, running_sidecar
from tests.test_ledger import rec

# -- everything broken at once, in a real process ----------------------------------------------

CALLS = 240
WORKERS = 8

# Arms blockbuster inside the sidecar process the moment it listens (start-up reads its
# files on the loop, which is fine), then proves it armed: a blocking call from a frame
# that belongs to the sidecar package must raise.
SITECUSTOMIZE = """
import logging
import os
import sys

if os.environ.get("SIDECAR_TEST_BLOCKBUSTER"):
    sys.path.insert(0, os.getcwd())

    class _Arm(logging.Handler):
        buster = None

        def emit(self, record):
            if _Arm.buster is None and record.getMessage().startswith("sidecar listening"):
                import sidecar
                from blockbuster import BlockBuster, BlockingError

                _Arm.buster = BlockBuster("sidecar")
                _Arm.buster.activate()
                probe = {}
                source = "import time\\ndef probe():\\n    time.sleep(0.001)\\n"
                exec(compile(source, sidecar.__file__, "exec"), probe)
                try:
                    probe["probe"]()
                    sys.stderr.write("blockbuster: NOT armed\\n")
                except BlockingError:
                    sys.stderr.write("blockbuster: armed\\n")

    logging.getLogger("sidecar.app").addHandler(_Arm())
"""

RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, group_by: [tenant], notify: [down, hang]}
rules:
  - name: any-spend
    kind: budget
    signal: tokens
    period: 1h
    limit: 1
    severity: page
"""


class Hold:
    """A TCP server that accepts, reads the request and never answers; notes each request line."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Hold:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self.lines.append((await reader.readline()).decode("latin-1").strip())
            while await reader.read(65536):  # read on, never answer
                pass

    def paths(self) -> set[str]:
        return {line.split(" ")[1] for line in self.lines if line.count(" ") >= 2}

    async def __aexit__(self, *exc: object) -> None:
        await close_held(self._server, self._writers)


class HealthProbe(threading.Thread):
    """Times ``GET /healthz`` on the admin port every 20 ms from a thread of its own (so the test's
    own event loop, busy with the traffic, does not enter the figures)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.times: list[float] = []
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        for _ in range(3000):  # bounded: 60 s at most
            if self.stopping.wait(0.02):
                return
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                status = conn.getresponse().status
                self.times.append(time.perf_counter() - started)
                if status != 200:
                    self.failures.append(f"status {status}")
            except OSError as exc:
                self.failures.append(type(exc).__name__)
            finally:
                conn.close()


def blockbuster_env(tmp_path: Path) -> dict[str, str]:
    """The environment that arms blockbuster inside a sidecar process (see :data:`SITECUSTOMIZE`)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {"PYTHONPATH": str(site), "SIDECAR_TEST_BLOCKBUSTER": "1"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def call_for(n: int) -> tuple[str, dict[str, Any]]:
    """The n-th call: chat or messages, JSON or stream, short answers."""
    stream = n % 2 == 1
    if n % 4 < 2:
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"call {n}"}],
        }
        body |= {"max_tokens": 16, "stream": stream}
        return "/v1/chat/completions", body
    body = {
        "model": "claude-haiku-4-5",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"call {n}"}],
    }
    return "/anthropic/v1/messages", body | {"stream": stream}


def ledger_request_ids(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT request_id FROM calls")]
    finally:
        conn.close()


async def test_every_sink_broken_at_once_never_slows_a_call_and_every_loss_is_counted(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    down = f"json://127.0.0.1:{closed_port()}/hook"
    runner, mock_port = await start_mock_upstream(seed=8, failure_rate=0.0, latency_scale=0.0)
    mock = f"http://127.0.0.1:{mock_port}"
    latencies: list[float] = []
    sent: list[str] = []
    try:
        async with Hold() as hold:
            otlp = f"http://127.0.0.1:{hold.port}"
            batching = "timeout: 3s, queue_size: 16, batch_size: 8, schedule_delay: 50ms"
            cfg = write_config(
                tmp_path / "sidecar.yaml",
                f"- {{name: openai, url: '{mock}', provider: openai, mount: /}}\n"
                f"- {{name: anthropic, url: '{mock}', provider: anthropic, mount: /anthropic}}\n",
                f"tracing: {{endpoint: '{otlp}/v1/traces', {batching}}}\n"
                f"usage_logs: {{endpoint: '{otlp}/v1/logs', {batching}}}\n"
                f"rules: {{files: ['{tmp_path / 'rules.yaml'}']}}\n"
                "notify:\n"
                "  group_wait: 0s\n"
                "  timeout: 1s\n"
                f"  channels: {{down: ['{down}'], hang: ['json://127.0.0.1:{hold.port}/hook']}}\n"
                "shutdown: {drain_timeout: 3s}\n",
            )
            sc = SidecarProcess("--config", str(cfg), env=blockbuster_env(tmp_path))
            await sc.start()
            try:
                probe = HealthProbe(sc.admin_port)
                probe.start()
                counter = iter(range(CALLS))

                async def worker(session: aiohttp.ClientSession, w: int) -> None:
                    for n in counter:  # shared: CALLS calls in all
                        path, body = call_for(n)
                        request_id = f"sink-fault-{n}"
                        sent.append(request_id)
                        headers = {"x-tenant-id": f"t{w}", "x-request-id": request_id}
                        started = time.perf_counter()
                        async with session.post(sc.url + path, json=body, headers=headers) as r:
                            data = await r.read()
                            assert r.status == 200, (r.status, data[:200])
                        latencies.append(time.perf_counter() - started)
                        if body["stream"]:
                            assert data.rstrip().endswith((b"data: [DONE]", b'"message_stop"}')), data[-80:]
                        await asyncio.sleep(0.12)  # ~60 calls/s: the faults outlast the traffic's start

                async with aiohttp.ClientSession() as session:
                    async with asyncio.timeout(60):
                        await asyncio.gather(*(worker(session, w) for w in range(WORKERS)))
                    # Every notification attempt ends failed (refused) or timeout (hung), and is counted.
                    async with asyncio.timeout(20):
                        while True:
                            scrape = await sc.scrape(session)
                            failed = metric(
                                scrape, "llm_notifications_total", channel="down", outcome="failed"
                            )
                            hung = metric(
                                scrape, "llm_notifications_total", channel="hang", outcome="timeout"
                            )
                            if failed >= 1 and hung >= 1:
                                break
                            await asyncio.sleep(0.2)
                    probe.stopping.set()
                    scrape = await sc.scrape(session)
                probe.join(5)

                # The calls: all counted, none failed, none slow.
                assert len(latencies) == CALLS
                assert metric(scrape, "llm_requests_total") == CALLS
                assert metric(scrape, "llm_requests_total", code="200") == CALLS
                assert metric(scrape, "llm_errors_total") == 0
                assert max(latencies) < 2.0, f"slowest call {max(latencies):.2f} s"

                # Traces and usage logs: nothing exported, every record either dropped (counted)
                # or still queued behind the hung export.
                for family in ("spans", "usage_logs"):
                    exported = metric(scrape, f"llm_{family}_exported_total")
                    dropped = metric(scrape, f"llm_{family}_dropped_total")
                    queued = metric(scrape, f"llm_{family}_queued")
                    full = metric(scrape, f"llm_{family}_dropped_total", reason="queue_full")
                    assert exported == 0, family
                    assert full > 0, family
                    assert exported + dropped + queued == CALLS, (family, exported, dropped, queued)
                    sink = "traces" if family == "spans" else "usage_logs"
                    assert metric(scrape, "llm_sink_dropped_total", sink=sink) == full, family
                assert {"/v1/traces", "/v1/logs", "/hook"} <= hold.paths(), hold.lines  # all really tried
                # The alert fired for every tenant and no notification got through.
                assert metric(scrape, "llm_alerts_firing", rule="any-spend") == WORKERS
                assert metric(scrape, "llm_notifications_total", outcome="sent") == 0
                # The ledger kept up: nothing spilled or lost.
                for name in (
                    "llm_ledger_spilled_total",
                    "llm_ledger_lost_total",
                    "llm_ledger_rows_rejected_total",
                ):
                    assert metric(scrape, name) == 0, name

                # The event loop answered throughout.
                assert probe.failures == [] and len(probe.times) >= 50, (probe.failures, len(probe.times))
                assert max(probe.times) < 0.5, f"/healthz took {max(probe.times) * 1000:.0f} ms"

                stop_started = time.monotonic()
                sc.signal(signal.SIGTERM)
                code = await sc.wait(30)
                stop_seconds = time.monotonic() - stop_started
            except BaseException:
                print("sidecar stderr:\n" + sc.log[-20000:])
                raise
            finally:
                await sc.stop()
    finally:
        await runner.cleanup()

    assert code == 0 and stop_seconds < 15, (code, stop_seconds)
    assert "blockbuster: armed" in sc.log
    assert "BlockingError" not in sc.log and sc.tracebacks() == [], sc.log[-5000:]
    ids = await asyncio.to_thread(ledger_request_ids, tmp_path / "data" / DB_NAME)
    assert len(ids) == CALLS and set(ids) == set(sent)  # every call, exactly once
    times = sorted(probe.times)
    p99 = times[int(len(times) * 0.99) - 1]
    print(
        f"\n[every sink broken] {CALLS} calls: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; /healthz during the faults ({len(times)} probes): "
        f"p50 {statistics.median(times) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {times[-1] * 1000:.1f} ms; SIGTERM to exit {stop_seconds:.1f} s"
    )


async def test_a_provider_key_file_is_never_read_on_the_event_loop(tmp_path: Path) -> None:
    """``api_key: {from_file}`` (a mounted Secret) is read off the loop, not per call on it: with
    blockbuster armed in the process, every call still answers 200 with the file's key upstream."""
    key_file = tmp_path / "openai-key"
    key_file.write_text("sk-from-the-secret-file\n")
    seen: list[str] = []

    async def script(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            seen.append(request.headers.get("authorization", ""))
            body = chat_json()
            await conn.send(response_head(200, [("Content-Length", str(len(body)))]) + body)

    async with RawUpstream(script) as up:
        upstream = openai_upstream(up.url, api_key=f"{{from_file: '{key_file}'}}")
        cfg = write_config(tmp_path / "sidecar.yaml", upstream)
        async with (
            sidecar_process("--config", str(cfg), env=blockbuster_env(tmp_path)) as sc,
            aiohttp.ClientSession() as session,
        ):
            for _ in range(5):
                async with session.post(sc.url + "/v1/chat/completions", json={"model": "gpt-4o"}) as r:
                    assert r.status == 200, await r.text()
    assert seen == ["Bearer sk-from-the-secret-file"] * 5
    assert "blockbuster: armed" in sc.log and "BlockingError" not in sc.log, sc.log[-3000:]


# -- ledger rows the database refuses --------------------------------------------------------------

FAST = LedgerSettings(flush_interval=0.02, batch_size=50)


def bad_records() -> dict[str, CallRecord]:
    """Records whose rows the database cannot store, by the reason the ledger gives."""
    return {
        "input_tokens does not fit in 64 bits": rec(-1, usage=Usage(input=2**64, output=1)),
        "model is not valid UTF-8 text": rec(-2, response_model="gpt-\ud800"),
        "request_id is missing": dataclasses.replace(rec(-3), request_id=None),  # type: ignore[arg-type]
        "no row for the record": rec(-4, started_at=float("nan")),
    }


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


def stored_ids(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(data_dir / DB_NAME)
    try:
        return [row[0] for row in conn.execute("SELECT request_id FROM calls ORDER BY id")]
    finally:
        conn.close()


def rejected_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sidecar.ledger" and "rejected (" in r.getMessage()
    ]


async def test_a_row_the_database_refuses_is_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "sidecar.ledger")
    registry = CollectorRegistry()
    ledger = Ledger(FAST, tmp_path, registry=registry)
    await ledger.start()
    bad = bad_records()
    good = 0
    for i in range(200):  # bad rows inside batches, between good ones
        ledger.offer(rec(i))
        good += 1
        if i % 50 == 25:
            for record in bad.values():
                ledger.offer(record)
    assert await ledger.flush(10)
    status = ledger.status()
    assert status.rejected == 4 * len(bad)
    assert (status.rows_written, status.spilled, status.lost, status.backlog) == (good, 0, 0, 0)
    assert status.write_errors == 0 and status.healthy, status
    assert registry.get_sample_value("llm_ledger_rows_rejected_total") == 4 * len(bad)
    # The ledger keeps writing after them.
    for i in range(200, 260):
        ledger.offer(rec(i))
    assert await ledger.flush(10)
    assert ledger.status().rows_written == good + 60
    await ledger.stop(5)
    assert stored_ids(tmp_path) == [f"req-{i}" for i in range(260)]
    assert not (tmp_path / JOURNAL_NAME).exists()  # nothing spilled
    lines = rejected_lines(caplog)
    assert len(lines) == 4 * len(bad)
    for reason in bad:
        assert sum(reason in line for line in lines) == 4, reason


async def test_a_refused_row_in_the_journal_is_rejected_on_replay_not_retried_forever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "sidecar.ledger")
    rows = [to_row(rec(i), f"j-{i}") for i in range(10)]
    foreign = [
        {**rows[0], "call_id": "j-bad-int", "input_tokens": 2**70},
        {**rows[0], "call_id": "j-bad-type", "tenant": ["acme"]},
        {**rows[0], "call_id": "j-bad-null", "status": None},
        {**rows[0], "call_id": "j-bad-nan", "duration_s": float("nan")},
    ]
    journal = [journal_line(r) for r in rows[:5] + foreign + rows[5:]]
    (tmp_path / JOURNAL_NAME).write_text("\n".join(journal) + "\n")
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    for i in range(10, 20):
        ledger.offer(rec(i))
    assert await ledger.flush(10)
    await ledger.stop(5)
    status = ledger.status()
    assert (status.replayed, status.rejected, status.write_errors) == (10, 4, 0), status
    assert sorted(stored_ids(tmp_path)) == sorted(f"req-{i}" for i in range(20))
    assert not (tmp_path / JOURNAL_NAME).exists() and not (tmp_path / (JOURNAL_NAME + ".replaying")).exists()
    assert {line.split()[2] for line in rejected_lines(caplog)} == {r["call_id"] for r in foreign}


async def test_refused_rows_while_the_database_is_down_never_stop_the_journal(tmp_path: Path) -> None:
    """On the way to the journal a row the database would refuse is rejected at once (a lone
    surrogate would otherwise break the journal's UTF-8 write and stop the spiller)."""
    blocker = tmp_path / DB_NAME
    blocker.mkdir()  # the database cannot open: every record goes to the journal
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    bad = bad_records()
    for i in range(100):
        ledger.offer(rec(i))
        if i == 50:
            for record in bad.values():
                ledger.offer(record)
    assert await ledger.flush(10)
    status = ledger.status()
    assert (status.spilled, status.rejected, status.lost, status.backlog) == (100, len(bad), 0, 0), status
    await asyncio.to_thread(shutil.rmtree, blocker)  # the database can open again: replay
    async with asyncio.timeout(15):
        while ledger.status().replayed < 100:
            await asyncio.sleep(0.05)
    await ledger.stop(5)
    assert sorted(stored_ids(tmp_path)) == sorted(f"req-{i}" for i in range(100))
    assert ledger.status().rejected == len(bad)


# -- found on the way: bugs in files this suite does not own (strict xfail until fixed) -------------

BOMB = 128 << 20  # decoded bytes of the compressed answer below (405 bytes on the wire as brotli)


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
async def test_a_compressed_answer_is_never_decoded_unbounded_in_memory(
    tmp_path: Path, content_type: str
) -> None:
    """The upstream is not trusted with the sidecar's memory: a decompression bomb (128 MiB of
    spaces in 405 bytes of brotli) must cost the sidecar no more than its own bounds
    (``MAX_PARSE_BYTES`` for a JSON copy, ``max_event_bytes`` for a stream), not the decoded size."""
    bomb = await asyncio.to_thread(brotli.compress, b" " * BOMB, quality=5)
    stream = content_type == "text/event-stream"

    async def script(conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            if b"bomb" not in request.body:  # the warm-up call
                body = chat_json()
                await conn.send(response_head(200, [("Content-Length", str(len(body)))]) + body)
                continue
            headers = [
                ("Content-Type", content_type),
                ("Content-Encoding", "br"),
                ("Transfer-Encoding", "chunked"),
            ]
            await conn.send(response_head(200, headers) + chunk(bomb))
            await asyncio.sleep(1.0)  # the decoded copy, if held, is measured while the answer stalls
            await conn.send(LAST_CHUNK)
            return

    async with RawUpstream(script) as up:
        cfg = write_config(tmp_path / "sidecar.yaml", openai_upstream(up.url))
        async with (
            sidecar_process("--config", str(cfg)) as sc,
            aiohttp.ClientSession(auto_decompress=False) as s,
        ):
            url = sc.url + "/v1/chat/completions"
            async with s.post(url, json={"model": "gpt-4o", "messages": []}) as r:
                assert r.status == 200 and await r.read() == chat_json()
            base = sc.rss()
            async with RssSampler(sc.pid, interval=0.005) as rss:
                body = {
                    "model": "gpt-4o",
                    "messages": [{"role": "user", "content": "bomb"}],
                    "stream": stream,
                }
                async with s.post(url, json=body) as r:
                    assert r.status == 200
                    async for _ in r.content.iter_any():  # read as it comes: the client is no bottleneck
                        pass
    growth = rss.peak - base
    print(f"\n[{content_type} brotli bomb] {len(bomb)} bytes on the wire: sidecar RSS +{growth >> 20} MiB")
    assert growth < 48 << 20, (
        f"the sidecar grew by {growth >> 20} MiB for {len(bomb)} bytes from the upstream"
    )


async def test_an_otlp_endpoint_with_a_secret_in_it_is_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Collectors that take a token in the URL (userinfo or a query parameter) must not have it
    written to the log: either the endpoint is refused like an upstream URL with credentials,
    or it is logged without its userinfo and query."""
    caplog.set_level(logging.INFO)
    endpoint = "http://otel:s3cret-in-userinfo@127.0.0.1:9/v1/{signal}?api-key=s3cret-in-query"
    extra = (
        f"tracing: {{endpoint: '{endpoint.format(signal='traces')}', timeout: 1s}}\n"
        f"usage_logs: {{endpoint: '{endpoint.format(signal='logs')}', timeout: 1s}}\n"
        "logs: {enabled: false}\n"
    )
    try:
        cfg = make_config(
            "- {name: openai, url: 'http://127.0.0.1:9', provider: openai}", extra, tmp=tmp_path
        )
    except Exception as exc:  # refusing such an endpoint is a fix too, if the message keeps the secret out
        assert "s3cret" not in str(exc)
        return
    async with running_sidecar(cfg):
        pass
    assert "s3cret" not in caplog.text


async def test_a_large_batch_is_handled_in_slices_that_let_the_loop_serve_calls() -> None:
    """The loop runs other work between two slices of a batch (metrics, call-log lines),
    and a slice holds about ``budget`` seconds of work, sized from what the last one cost."""
    from sidecar.sinks import FIRST_SLICE, MAX_SLICE, in_slices

    now = [0.0]
    order: list[object] = []

    async def other() -> None:
        for _ in range(3):
            order.append("other")
            await asyncio.sleep(0)

    async def consume(cost: float, count: int) -> list[int]:
        sizes = []
        async for part in in_slices([None] * count, budget=100e-6, clock=lambda: now[0]):  # type: ignore[list-item]
            sizes.append(len(part))
            order.append(len(part))
            now[0] += cost * len(part)  # the work done on the slice
        return sizes

    sizes, _ = await asyncio.gather(consume(10e-6, 45), other())
    assert sizes == [FIRST_SLICE, 10, 10, 10, 10, 1]  # 100 µs of 10 µs records: 10 a slice
    assert sum(sizes) == 45
    assert order[0] == FIRST_SLICE and order[1] == "other"  # the loop ran something right after the first
    assert await consume(1e-3, 6) == [FIRST_SLICE, 1, 1]  # dearer than the budget: one at a time
    assert await consume(0.0, 600) == [FIRST_SLICE, MAX_SLICE, MAX_SLICE, 84]  # free: capped


async def test_slices_grow_with_the_backlog_and_a_sink_near_its_bound_drains_without_yielding() -> None:
    """A fixed budget per turn of the loop is a fixed rate; past BACKLOG_KNEE records waiting
    a slice's budget grows in proportion, and at half the queue's bound the rest of the batch
    is handled before the loop runs anything else."""
    from sidecar.sinks import BACKLOG_KNEE, FIRST_SLICE, in_slices

    now = [0.0]
    order: list[object] = []

    async def other() -> None:
        for _ in range(50):
            order.append("other")
            await asyncio.sleep(0)

    async def consume(count: int, waiting: int, limit: int) -> list[int]:
        sizes = []
        slices = in_slices(
            [None] * count,  # type: ignore[list-item]
            budget=100e-6,
            clock=lambda: now[0],
            waiting=lambda: waiting,
            limit=limit,
        )
        async for part in slices:
            sizes.append(len(part))
            order.append(len(part))
            now[0] += 10e-6 * len(part)
        return sizes

    # Nothing else waiting: 100 µs of 10 µs records, as without a backlog.
    assert await consume(45, 0, 10_000) == [FIRST_SLICE, 10, 10, 10, 10, 1]
    # 4 * KNEE waiting besides the batch: ~4x the budget per slice (the rest of the batch counts too).
    sizes = await consume(200, 4 * BACKLOG_KNEE, 10_000)
    assert sizes[0] == FIRST_SLICE and all(size >= 40 for size in sizes[1:-1]), sizes
    assert sum(sizes) == 200
    # At half the bound: the first slice, then the whole rest, with no turn of the loop between.
    order.clear()
    sizes, _ = await asyncio.gather(consume(200, 5_000, 10_000), other())
    assert sizes == [FIRST_SLICE, 200 - FIRST_SLICE]
    assert order[:2] == [FIRST_SLICE, 200 - FIRST_SLICE]


async def test_the_metrics_sink_keeps_up_with_a_saturated_loop_and_drops_nothing() -> None:
    """Calls that keep the loop busy and finish faster than one slice a turn handles: the
    metrics sink's queue must not fill and drop records. With a fixed budget per turn it
    did, in the benchmark at 32 and 128 concurrent streams."""
    registry = CollectorRegistry()
    sink = MetricsSink(Metrics(registry), maxsize=300)
    await sink.start()
    turns, per_turn = 300, 30
    dropped = 0

    async def calls() -> None:  # the proxy's work: a few hundred µs a turn, 30 calls finished
        nonlocal dropped
        for turn in range(turns):
            until = time.perf_counter() + 300e-6
            while time.perf_counter() < until:
                pass
            for n in range(per_turn):
                dropped += not sink.offer(rec(turn * per_turn + n, tenant=f"t{n % 10}"))
            await asyncio.sleep(0)

    try:
        await asyncio.wait_for(asyncio.gather(calls(), calls()), 120)
        await asyncio.wait_for(sink.drained(), 60)
    finally:
        await sink.stop(5)
    assert dropped == 0
    counted = sum(v for _, v in iter_samples(registry, "llm_requests_total"))
    assert counted == 2 * turns * per_turn


async def test_the_test_collector_returns_only_once_its_peer_sinks_handled_their_records() -> None:
    """Tests read metrics right after ``Collect.wait_for``: it must wait for the other sinks
    too, or a metrics sink still in its last slice reads one call short (seen in CI:
    9,999 of 10,000 requests counted, none dropped)."""
    from sidecar.model import CallRecord as Record
    from sidecar.sinks import QueueSink
    from tests.harness import Collect

    release = asyncio.Event()
    handled: list[str] = []

    class Slow(QueueSink):
        name = "slow"

        async def handle(self, records: list[Record]) -> None:
            await release.wait()
            handled.extend(r.request_id for r in records)

    slow, collect = Slow(), Collect()
    collect.peers = [slow]
    await slow.start()
    await collect.start()
    try:
        for i in range(3):
            assert slow.offer(rec(i)) and collect.offer(rec(i))
        waiting = asyncio.create_task(collect.wait_for(3, timeout=10))
        await asyncio.sleep(0.05)
        assert len(collect.records) == 3 and not waiting.done()
        release.set()
        await asyncio.wait_for(waiting, 5)
        assert handled == ["req-0", "req-1", "req-2"]
    finally:
        await slow.stop(1)
        await collect.stop(1)


async def test_a_queue_sink_refuses_past_its_bound_and_hands_batches_in_order() -> None:
    """The sink's own queue (a deque, not an asyncio.Queue): bounded, batches of at most
    ``batch`` records in arrival order, room again once the worker took a batch, and a
    failing batch counted without stopping the worker."""
    from sidecar.model import CallRecord as Record
    from sidecar.sinks import QueueSink

    batches: list[list[str]] = []
    gate = asyncio.Event()

    class Gated(QueueSink):
        name = "gated"

        async def handle(self, records: list[Record]) -> None:
            await gate.wait()
            batches.append([r.request_id for r in records])
            if records[0].request_id == "req-3":
                raise RuntimeError("a bug in a sink")

    with pytest.raises(ValueError, match="at least 1"):
        Gated(maxsize=0)
    sink = Gated(maxsize=5, batch=3)
    assert [sink.offer(rec(i)) for i in range(6)] == [True] * 5 + [False]  # full before the worker runs
    assert sink.pending == 5
    await sink.start()
    try:
        await asyncio.sleep(0.01)  # the worker took the first batch and waits on the gate
        assert sink.pending == 2
        assert [sink.offer(rec(i)) for i in range(6, 10)] == [True, True, True, False]
        draining = asyncio.create_task(sink.drained())
        await asyncio.sleep(0.01)
        assert not draining.done()  # records are queued and a batch is in hand
        gate.set()
        await asyncio.wait_for(draining, 5)
        assert batches == [["req-0", "req-1", "req-2"], ["req-3", "req-4", "req-6"], ["req-7", "req-8"]]
        assert sink.failures == 1 and sink.pending == 0
        await asyncio.wait_for(sink.drained(), 1)  # nothing outstanding: at once
        assert sink.offer(rec(10))  # the worker, idle, wakes for the next record
        await asyncio.wait_for(sink.drained(), 5)
        assert batches[-1] == ["req-10"]
    finally:
        await sink.stop(1)
