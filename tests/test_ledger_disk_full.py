"""Hardening: the ledger of a real sidecar process on a real full, and a read-only, filesystem.

``test_ledger_crash.py`` stands in for a full disk with ``RLIMIT_FSIZE``; here the data
directory is a small tmpfs the test mounts (root or ``CAP_SYS_ADMIN`` is required: without it
the tests fail, they are never skipped; every mount is undone, lazily if need be). The
sidecar runs as ``python -m sidecar run --config`` (logs off) in front of an aiohttp upstream
on 127.0.0.1 answering chat JSON with usage. Every call sends its own ``x-request-id``, so the
ledger database is checked for every call exactly once after a SIGTERM.

- Disk full: a filler file takes every free byte while calls flow. Each call still gets its
  200 within 2 s; the database and the journal both fail with ``ENOSPC``, so the ledger holds
  the records in memory (``llm_ledger_backlog``), ``/readyz`` answers 503 with the ledger's
  reason for as long as the disk is full, and the metrics account for every call (written +
  spilled + backlog + lost == calls; lost 0 below ``max_backlog``). Once the filler is
  deleted the held records go to the journal, the journal is replayed, ``/readyz`` is 200
  again and the database holds every call once. Past ``max_backlog`` the records that cannot
  be kept are counted as lost (and the rest of the ledger stays consistent).
- Read-only: Linux refuses ``mount -o remount,ro`` (``EBUSY``) while a process holds a file
  open for writing on the filesystem, and a running ledger always holds ``ledger.lock`` open,
  so a data directory cannot turn read-only under a running sidecar (the kernel's answer, not
  the sidecar's). The test starts the sidecar on a tmpfs mounted read-only (root ignores
  ``chmod``) and remounts it read-write while calls flow: calls are unaffected, the records
  wait in memory, and after ``remount,rw`` every call is in the database once.
- Three ledger bugs these faults found (fixed; each has its test below): held records waited
  up to 30 s after the disk had room when no new record woke the spiller; SIGTERM with an
  unwritable journal waited the whole ``drain_timeout`` (a lost wake-up); records lost at
  shutdown were not logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from hardening.support import (
    SidecarProcess,
    chat_json,
    metric,
    openai_upstream,
    sidecar_process,
    write_config,
)

FS_SIZE = 16 * 1024 * 1024  # room for the database, its WAL up to the auto-checkpoint, the journal
CALL_LIMIT = 2.0  # seconds: every proxied call, whatever the disk does
CONCURRENCY = 8
FILLER = "filler.bin"

# --- the filesystem -----------------------------------------------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


def _mount_tmpfs(path: Path, size: int, *, read_only: bool) -> None:
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    try:
        done = _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot run mount(8) to make the test's tmpfs: {exc}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"cannot mount a {size >> 20} MiB tmpfs at {path} (mount exited {done.returncode}: "
            f"{done.stderr.strip()}). This test makes a real full and read-only filesystem and "
            "needs root or CAP_SYS_ADMIN; it is not skipped on purpose.",
            pytrace=False,
        )
    assert _mounted(path), f"mount succeeded but {path} is not a mount point"


def _umount(path: Path) -> None:
    """Unmount, lazily if busy; fails the test if the mount is still there."""
    if not _mounted(path):
        return
    done = _run("umount", str(path))
    if done.returncode != 0 or _mounted(path):
        lazy = _run("umount", "-l", str(path))
        assert not _mounted(path), f"could not unmount {path}: {done.stderr} / {lazy.stderr}"


def _remount(path: Path, mode: str) -> None:
    done = _run("mount", "-o", f"remount,{mode}", str(path))
    assert done.returncode == 0, f"remount,{mode} of {path} failed: {done.stderr.strip()}"


@contextlib.contextmanager
def _tmpfs(path: Path, *, read_only: bool = False) -> Iterator[Path]:
    path.mkdir()
    try:
        _mount_tmpfs(path, FS_SIZE, read_only=read_only)
        yield path
    finally:
        _umount(path)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh read-write tmpfs of :data:`FS_SIZE` bytes (unmounted after the test)."""
    with _tmpfs(tmp_path / "data") as path:
        yield path


@pytest.fixture
def read_only_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mounted read-only (the test remounts it read-write)."""
    with _tmpfs(tmp_path / "data", read_only=True) as path:
        yield path


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem has not one byte left (ENOSPC at one byte)."""
    written = 0
    size = 1 << 20
    block = b"\xa5" * size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(10_000):
            try:
                written += os.write(fd, block[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if size == 1:
                    return written
                size = max(1, size // 16)
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: no ENOSPC after {written} bytes")


# --- the upstream, the calls, the readings -------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """An aiohttp upstream on 127.0.0.1 answering every chat call with JSON and usage."""

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=chat_json(prompt=12, completion=5), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}


async def _call(session: aiohttp.ClientSession, url: str, request_id: str) -> float:
    """One chat call through the sidecar; its duration. A 200 with usage, within :data:`CALL_LIMIT`."""
    started = time.monotonic()
    async with asyncio.timeout(CALL_LIMIT):
        async with session.post(
            url + "/v1/chat/completions", json=BODY, headers={"x-request-id": request_id}
        ) as response:
            data = await response.read()
    assert response.status == 200, (request_id, response.status, data[:300])
    assert json.loads(data)["usage"]["prompt_tokens"] == 12, data[:300]
    return time.monotonic() - started


async def _calls(session: aiohttp.ClientSession, url: str, ids: list[str], over: float = 0.0) -> list[float]:
    """Every call of ``ids``, :data:`CONCURRENCY` at a time, started evenly over ``over``
    seconds; their durations."""
    gate = asyncio.Semaphore(CONCURRENCY)
    start = time.monotonic()
    step = over / len(ids)

    async def one(n: int, request_id: str) -> float:
        await asyncio.sleep(max(0.0, start + n * step - time.monotonic()))
        async with gate:
            return await _call(session, url, request_id)

    return await asyncio.gather(*(one(n, i) for n, i in enumerate(ids)))


LEDGER = (
    "rows_written",
    "spilled",
    "replayed",
    "write_errors",
    "journal_errors",
    "rows_rejected",
    "lost",
)


async def _ledger(sc: SidecarProcess, session: aiohttp.ClientSession) -> dict[str, float]:
    """The ``llm_ledger_*`` readings (and the sinks' drops) of one scrape."""
    text = await sc.scrape(session)
    reading = {name: metric(text, f"llm_ledger_{name}_total") for name in LEDGER}
    reading["backlog"] = metric(text, "llm_ledger_backlog")
    reading["healthy"] = metric(text, "llm_ledger_healthy")
    reading["sink_dropped"] = metric(text, "llm_sink_dropped_total")
    return reading


def _accounted(r: dict[str, float]) -> float:
    """Records the ledger has an account of: in the database, the journal, memory, or lost."""
    return r["rows_written"] + r["spilled"] + r["backlog"] + r["lost"] + r["rows_rejected"]


async def _wait_ledger(
    sc: SidecarProcess,
    session: aiohttp.ClientSession,
    done: Callable[[dict[str, float]], bool],
    timeout: float = 10.0,
) -> dict[str, float]:
    """The first readings for which ``done`` holds (the last ones after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        reading = await _ledger(sc, session)
        if done(reading) or time.monotonic() > deadline:
            return reading
        await asyncio.sleep(0.05)


async def _wait_accounted(
    sc: SidecarProcess, session: aiohttp.ClientSession, calls: int, timeout: float = 10.0
) -> dict[str, float]:
    """The readings once every call's record reached the ledger (it is offered after the answer)."""
    return await _wait_ledger(sc, session, lambda r: _accounted(r) >= calls, timeout)


async def _readyz(sc: SidecarProcess, session: aiohttp.ClientSession) -> tuple[int, str]:
    async with session.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as response:
        body = await response.json()
        return response.status, str(body.get("reason", body.get("status")))


async def _wait_ready(
    sc: SidecarProcess, session: aiohttp.ClientSession, want: int, timeout: float
) -> tuple[int, str, float]:
    """Poll ``/readyz`` until it answers ``want``; (status, reason, seconds waited)."""
    started = time.monotonic()
    while True:
        status, reason = await _readyz(sc, session)
        waited = time.monotonic() - started
        if status == want or waited > timeout:
            return status, reason, waited
        await asyncio.sleep(0.05)


@dataclass
class Watch:
    """``/readyz`` and the ledger's backlog, sampled every 50 ms while a phase runs."""

    sc: SidecarProcess
    session: aiohttp.ClientSession
    ready: Counter[int] = field(default_factory=Counter)
    timeline: list[tuple[float, int, float]] = field(default_factory=list)
    backlog_peak: float = 0.0
    _task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for _ in range(2000):  # 100 s at most
            status, _ = await _readyz(self.sc, self.session)
            self.ready[status] += 1
            reading = await _ledger(self.sc, self.session)
            self.timeline.append((round(time.monotonic(), 2), status, reading["backlog"]))
            self.backlog_peak = max(self.backlog_peak, reading["backlog"])
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # a failed reading fails the test
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _config(tmp_path: Path, upstream_url: str, data_dir: Path, ledger: str = "", drain: str = "5s") -> Path:
    return write_config(
        tmp_path / "sidecar.yaml",
        openai_upstream(upstream_url),
        f"data_dir: {data_dir}\n"
        f"ledger: {{batch_size: 50, flush_interval: 50ms{ledger}}}\n"
        f"shutdown: {{drain_timeout: {drain}}}\n",
    )


async def _sigterm(sc: SidecarProcess) -> None:
    sc.signal(signal.SIGTERM)
    assert await sc.wait(30) == 0, sc.log[-3000:]
    assert sc.tracebacks() == [], sc.log[-3000:]


def _rows(data_dir: Path) -> Counter[str]:
    """Rows of the ledger database by ``request_id`` (the database passes its integrity check)."""
    conn = sqlite3.connect(f"file:{data_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return Counter(row[0] for row in conn.execute("SELECT request_id FROM calls"))
    finally:
        conn.close()


def _journal_left(data_dir: Path) -> int:
    return sum(
        (data_dir / name).stat().st_size
        for name in ("ledger.journal", "ledger.journal.replaying")
        if (data_dir / name).exists()
    )


def _assert_exactly_once(data_dir: Path, ids: list[str]) -> Counter[str]:
    rows = _rows(data_dir)
    twice = {i: n for i, n in rows.items() if n != 1}
    assert twice == {}, f"request ids not in the ledger exactly once: {list(twice.items())[:10]}"
    missing = [i for i in ids if i not in rows]
    assert missing == [], f"{len(missing)} calls missing from the ledger, e.g. {missing[:5]}"
    assert set(rows) == set(ids), f"unexpected rows: {sorted(set(rows) - set(ids))[:5]}"
    assert _journal_left(data_dir) == 0, "the journal was not replayed"
    return rows


def _report_once_each(
    data_dir: Path,
    ids: list[str],
    durations: list[float],
    started: float,
    figures: dict[str, object],
    label: str,
) -> None:
    """Every call in the ledger exactly once; the figures printed; no call slower than CALL_LIMIT."""
    rows = _assert_exactly_once(data_dir, ids)
    figures.update(
        calls=len(ids),
        rows=sum(rows.values()),
        slowest_call_s=round(max(durations), 3),
        wall_s=round(time.monotonic() - started, 1),
    )
    print(label, figures)
    assert max(durations) < CALL_LIMIT


def _require(condition: object, message: str) -> None:
    """A precondition of a test, reported apart from its assertions."""
    if not condition:
        pytest.fail(message, pytrace=False)


def _lines_after(sc: SidecarProcess, start: int, text: str) -> list[str]:
    return [line.rstrip() for line in sc.lines[start:] if text in line]


# --- the tests ----------------------------------------------------------------------------------

# SQLite names a full disk "database or disk is full", or "disk I/O error" when the write
# that failed was the WAL index's or a sync's: both are this fault.
FULL_REASONS = tuple(
    f"ledger: database unavailable ({what}): spilling to the journal"
    for what in ("database or disk is full", "disk I/O error")
)
ENOSPC_TEXT = "journal unwritable: [Errno 28] No space left on device"


async def _room_then_full(
    sc: SidecarProcess, s: aiohttp.ClientSession, data_dir: Path, figures: dict[str, object]
) -> tuple[list[str], list[float]]:
    """30 calls while there is room (rows go straight in), then a filler takes every free byte."""
    before = [f"before-{i}" for i in range(30)]
    durations = await _calls(s, sc.url, before)
    reading = await _wait_ledger(sc, s, lambda r: r["rows_written"] >= len(before))
    assert reading["rows_written"] == len(before) and reading["spilled"] == 0, reading
    assert await _readyz(sc, s) == (200, "ready")
    figures["filler_bytes"] = await asyncio.to_thread(_fill, data_dir / FILLER)
    assert os.statvfs(data_dir).f_bavail == 0
    return before, durations


async def test_full_disk_every_call_completes_and_the_ledger_loses_nothing(
    tmp_path: Path, small_fs: Path, upstream: str
) -> None:
    data_dir = small_fs
    cfg = _config(tmp_path, upstream, data_dir)
    figures: dict[str, object] = {}
    started = time.monotonic()
    async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
        before, durations = await _room_then_full(sc, s, data_dir, figures)

        full = [f"full-{i}" for i in range(300)]
        async with Watch(sc, s) as watch:
            durations += await _calls(s, sc.url, full, over=3.0)
            reading = await _wait_accounted(sc, s, len(before) + len(full))
            status, reason = await _readyz(sc, s)
        figures.update(full_reading=reading, full_ready=dict(watch.ready), backlog_peak=watch.backlog_peak)
        # Neither the database nor the journal takes a byte: every record waits in memory,
        # accounted for, and /readyz says why from the first failed write to the end.
        assert status == 503 and reason in tuple(f"{full}; {ENOSPC_TEXT}" for full in FULL_REASONS), reason
        assert _accounted(reading) == len(before) + len(full), reading
        assert reading["backlog"] == len(full) and reading["lost"] == 0, reading
        assert reading["write_errors"] >= 1 and reading["journal_errors"] >= 1, reading
        assert reading["healthy"] == 0 and reading["sink_dropped"] == 0, reading
        statuses = [code for _, code, _ in watch.timeline]
        assert 503 in statuses and 200 not in statuses[statuses.index(503) :], watch.timeline
        assert "ledger database" in sc.log and "unavailable, spilling to" in sc.log, "a silent failure"
        assert "unwritable, holding records in memory" in sc.log, "a silent failure"

        # Room again (calls keep coming): the held records go to the journal, the journal
        # is replayed, /readyz is 200 again.
        (data_dir / FILLER).unlink()
        after = [f"after-{i}" for i in range(50)]
        durations += await _calls(s, sc.url, after, over=0.5)
        # Normally by the writer's next retry (< 5 s); up to the spiller's 30 s backoff when no
        # record woke it (see test_held_records_are_written_once_the_disk_has_room_...).
        status, reason, recovery = await _wait_ready(sc, s, 200, timeout=35.0)
        assert status == 200, (status, reason)
        figures["recovery_s"] = round(recovery, 2)
        calls = len(before) + len(full) + len(after)
        reading = await _wait_ledger(sc, s, lambda r: r["rows_written"] + r["replayed"] >= calls, 15.0)
        figures["final_reading"] = reading
        assert _accounted(reading) == calls and reading["backlog"] == 0, reading
        assert reading["spilled"] >= len(full) and reading["replayed"] == reading["spilled"], reading
        assert reading["lost"] == 0 and reading["rows_written"] + reading["replayed"] == calls, reading

        await _sigterm(sc)
    _report_once_each(data_dir, before + full + after, durations, started, figures, "disk full:")


async def _past_max_backlog(
    tmp_path: Path, data_dir: Path, upstream: str
) -> tuple[SidecarProcess, dict[str, float], int, list[str]]:
    """Fill the disk, offer 300 records past ``max_backlog: 100``, SIGTERM with the disk still
    full; (the stopped sidecar, the readings before the SIGTERM, where its log was then,
    the calls made while there was room)."""
    cfg = _config(tmp_path, upstream, data_dir, ", max_backlog: 100", drain="2s")
    figures: dict[str, object] = {}
    async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
        before, durations = await _room_then_full(sc, s, data_dir, figures)
        full = [f"full-{i}" for i in range(300)]
        durations += await _calls(s, sc.url, full, over=1.5)
        reading = await _wait_accounted(sc, s, len(before) + len(full))
        assert max(durations) < CALL_LIMIT
        status, reason = await _readyz(sc, s)
        assert status == 503 and reason.startswith(FULL_REASONS), reason
        mark = len(sc.lines)
        await _sigterm(sc)
    figures.update(reading=reading, slowest_call_s=round(max(durations), 3))
    print("past max_backlog:", figures)
    return sc, reading, mark, before


async def test_past_max_backlog_every_lost_record_is_counted(
    tmp_path: Path, small_fs: Path, upstream: str
) -> None:
    """The disk stays full past ``max_backlog`` records and through SIGTERM: calls still
    complete; what cannot be kept is counted as lost, and the database stays consistent."""
    sc, reading, _, before = await _past_max_backlog(tmp_path, small_fs, upstream)
    assert _accounted(reading) == len(before) + 300, reading
    # The records of the batch that failed join the backlog past its bound.
    assert 100 <= reading["backlog"] <= 150 and reading["lost"] == 300 - reading["backlog"], reading
    assert "ledger lost 1 records so far: max_backlog records wait" in sc.log
    assert _rows(small_fs) == Counter(before)  # the rows written while there was room, once


async def test_records_lost_at_shutdown_are_reported(tmp_path: Path, small_fs: Path, upstream: str) -> None:
    sc, reading, mark, _ = await _past_max_backlog(tmp_path, small_fs, upstream)
    _require(reading["lost"] > 0 and reading["backlog"] >= 100, f"no loss at run time: {reading}")
    total = int(reading["lost"] + reading["backlog"])
    reports = _lines_after(sc, mark, "lost")
    assert any(str(total) in line for line in reports), (
        f"{int(reading['backlog'])} records lost at shutdown ({total} in all), "
        f"logged after SIGTERM: {reports}"
    )


async def test_read_only_data_directory_holds_records_until_it_is_writable(
    tmp_path: Path, read_only_fs: Path, upstream: str
) -> None:
    data_dir = read_only_fs
    cfg = _config(tmp_path, upstream, data_dir)
    figures: dict[str, object] = {}
    started = time.monotonic()
    async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
        status, reason = await _readyz(sc, s)
        assert (status, reason) == (
            503,
            f"ledger: data directory unusable: {data_dir}: Read-only file system",
        )

        held = [f"ro-{i}" for i in range(200)]
        async with Watch(sc, s) as watch:
            durations = await _calls(s, sc.url, held, over=2.0)
            reading = await _wait_accounted(sc, s, len(held))
        figures.update(ro_reading=reading, backlog_peak=watch.backlog_peak, ro_ready=dict(watch.ready))
        assert reading["backlog"] == len(held) and reading["lost"] == 0, reading
        assert _accounted(reading) == len(held) and reading["sink_dropped"] == 0, reading
        assert os.listdir(data_dir) == []  # nothing could be written
        assert set(watch.ready) == {503}, watch.ready
        assert "ledger data directory unusable" in sc.log, "a silent failure"

        _remount(data_dir, "rw")
        after = [f"rw-{i}" for i in range(50)]
        durations += await _calls(s, sc.url, after, over=0.5)
        status, reason, recovery = await _wait_ready(sc, s, 200, timeout=35.0)
        assert status == 200, (status, reason)
        figures["recovery_s"] = round(recovery, 2)
        calls = len(held) + len(after)
        reading = await _wait_ledger(sc, s, lambda r: r["rows_written"] + r["replayed"] >= calls, 15.0)
        figures["final_reading"] = reading
        assert _accounted(reading) == calls and reading["backlog"] == 0, reading
        assert reading["lost"] == 0 and reading["rows_written"] + reading["replayed"] == calls, reading
        await _sigterm(sc)
    _report_once_each(data_dir, held + after, durations, started, figures, "read-only:")


async def test_held_records_are_written_once_the_disk_has_room_without_new_traffic(
    tmp_path: Path, small_fs: Path, upstream: str
) -> None:
    data_dir = small_fs
    cfg = _config(tmp_path, upstream, data_dir)
    figures: dict[str, object] = {}
    async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
        before, _ = await _room_then_full(sc, s, data_dir, figures)
        full = [f"full-{i}" for i in range(100)]
        await _calls(s, sc.url, full, over=1.0)
        reading = await _wait_accounted(sc, s, len(before) + len(full))
        # Failed appends: the spiller sleeps its backoff (new records do not cut it short).
        _require(reading["backlog"] == len(full) and reading["journal_errors"] >= 1, f"{reading}")

        # Room again, and no call until the writer has reopened the database on its own.
        (data_dir / FILLER).unlink()
        freed = time.monotonic()
        reason = ""
        while time.monotonic() - freed < 20:
            _, reason = await _readyz(sc, s)
            if not reason.startswith(FULL_REASONS):
                break
            await asyncio.sleep(0.05)
        figures.update(db_back_s=round(time.monotonic() - freed, 2), reason=reason)
        # Either the journal is still in its backoff, or (the database's reopening woke the
        # spiller) the held records are already on their way: ready.
        _require(reason in (f"ledger: {ENOSPC_TEXT}", "ready"), f"the database did not come back: {reason}")
        after = [f"after-{i}" for i in range(10)]
        await _calls(s, sc.url, after)
        reading = await _wait_ledger(sc, s, lambda r: r["rows_written"] >= len(before) + len(after))
        _require(reading["rows_written"] == len(before) + len(after), f"no new rows: {reading}")

        reading = await _wait_ledger(sc, s, lambda r: r["backlog"] == 0, timeout=3.0)
        status, reason = await _readyz(sc, s)
        figures.update(reading_3s_later=reading, ready=(status, reason))
        print("held records once the disk has room:", figures)
        assert reading["backlog"] == 0, f"{reading['backlog']:.0f} records still only in memory: {reason}"
        assert status == 200, reason


async def test_sigterm_with_the_disk_full_exits_promptly(
    tmp_path: Path, small_fs: Path, upstream: str
) -> None:
    data_dir = small_fs
    cfg = _config(tmp_path, upstream, data_dir, drain="3s")
    figures: dict[str, object] = {}
    async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
        await _room_then_full(sc, s, data_dir, figures)
        stop = asyncio.Event()
        terminated = asyncio.Event()
        made = 0
        failed_early: list[str] = []

        async def traffic(worker: int) -> None:
            nonlocal made
            for n in range(5000):
                if stop.is_set():
                    return
                try:
                    await _call(s, sc.url, f"load-{worker}-{n}")
                except (aiohttp.ClientError, AssertionError, TimeoutError) as exc:
                    if not terminated.is_set():
                        failed_early.append(repr(exc))
                    return  # after the SIGTERM: the sidecar stopped listening
                made += 1

        # A backlog of ~1500 records makes every journal attempt long, and traffic keeps the
        # spiller attempting up to the SIGTERM: the attempt the shutdown lands in.
        workers = [asyncio.create_task(traffic(w)) for w in range(CONCURRENCY)]
        deadline = time.monotonic() + 15
        while made < 1500 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        reading = await _ledger(sc, s)
        _require(reading["backlog"] >= 1000, f"no backlog to hold: {reading}")
        _require(not failed_early, f"calls failed before the SIGTERM: {failed_early[:3]}")
        terminated.set()
        signalled = time.monotonic()
        sc.signal(signal.SIGTERM)
        code = await sc.wait(30)
        exited = time.monotonic() - signalled
        stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*workers)
    figures.update(calls=made, backlog=reading["backlog"], exit_s=round(exited, 2))
    print("SIGTERM with the disk full:", figures)
    _require(code == 0 and sc.tracebacks() == [], sc.log[-3000:])
    assert "did not finish writing" not in sc.log, f"the ledger stop timed out ({exited:.1f} s)"
    assert exited < 2.0
