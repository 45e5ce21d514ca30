"""The ledger sink: every finished call becomes a row, and none is dropped on the way.

Two threads of its own do all the I/O, so :meth:`Ledger.offer` (on the event loop)
only appends to a list under a lock:

- the **writer** takes up to ``batch_size`` records from the in-memory queue at
  least every ``flush_interval`` seconds and inserts them in one SQLite
  transaction; when the database fails it hands the batch to the journal, marks
  the ledger unhealthy and retries opening the database with a backoff (0.5 s
  doubling to 30 s); when the database works again it replays the journal.
  It also prunes rows past the retention, a few thousand per transaction;
- the **spiller** appends records to the journal: those that found the queue full,
  all of them while the database is down, and failed batches.

Both pace themselves (:class:`sidecar.threads.Pacer`): between two rows they check the
clock, and after ~100 µs of work they let the event loop have the core if it waits for
it, so a call never waits for a whole batch; they stop pausing when their queue holds
more than a batch, so they never fall behind for it.

:meth:`Ledger.offer` never refuses a record. Memory is bounded by ``queue_size``
for the database path; the journal path holds records only until the spiller has
written them, and up to ``max_backlog`` while the journal itself cannot be
written (then records are counted as lost: the disk is gone).

What a kill can lose: SIGTERM (:meth:`Ledger.stop`) writes everything. SIGKILL
loses the records still in memory: at most those that arrived within the last
``flush_interval`` (0.2 s by default) plus the batch being written, and, while the
database is down, what the spiller had not appended yet (it appends at once).
Committed rows and appended journal lines survive a process kill; fsync (SQLite
``synchronous=FULL``, ``journal_fsync``) extends that to a power loss.

Exactly once: each record gets a ``call_id`` when it is offered; a row is inserted
with ``ON CONFLICT (call_id) DO NOTHING``, so replaying a journal line whose row is
already in the database (a replay cut short, a batch that both committed and
spilled) inserts nothing.

A row the database would refuse (a value SQLite cannot store: an integer past 64
bits, text that is not UTF-8, a required value missing; or a constraint it breaks)
is one bad record, not a database failure: it is left out, counted
(``llm_ledger_rows_rejected_total``) and logged with its ``call_id`` and the reason,
and the rest of its batch is stored. It never makes the ledger retry the batch,
spill everything to the journal or stop writing; a journal line holding such a row
is rejected the same way on replay.

One sidecar per data directory: :meth:`Ledger.start` takes an exclusive lock on
``ledger.lock`` and fails when another process holds it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.errors import SidecarError
from sidecar.ledger._journal import Journal, journal_line
from sidecar.ledger._query import Totals, connect_readonly, read_rows, totals
from sidecar.ledger._schema import Row, Values, row_problem, row_to_record, to_row, to_values
from sidecar.ledger._settings import LedgerSettings
from sidecar.ledger._store import Rejected, Store
from sidecar.model import CallRecord
from sidecar.threads import Pacer, background, no_pace

__all__ = ["DB_NAME", "JOURNAL_NAME", "LOCK_NAME", "Ledger", "LedgerLockedError", "LedgerStatus"]

log = logging.getLogger("sidecar.ledger")

DB_NAME = "ledger.sqlite3"
JOURNAL_NAME = "ledger.journal"
LOCK_NAME = "ledger.lock"

_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
_PRUNE_CHUNK = 5000
_REPLAY_EVERY = 5.0
_REJECTS_LOGGED = 100  # rejected rows logged one by one; past that, one line per 1000

_Entry = tuple[str, CallRecord]


class LedgerLockedError(SidecarError):
    """Another process holds the data directory's ledger lock."""


@dataclass(frozen=True)
class LedgerStatus:
    """A snapshot of the ledger's state and counters (for ``/readyz`` and metrics).

    ``backlog`` is the records in memory not yet in the database or the journal.
    """

    healthy: bool
    reason: str
    accepted: int
    rows_written: int
    batches_written: int
    spilled: int
    replayed: int
    replay_duplicates: int
    journal_bad_lines: int
    write_errors: int
    journal_errors: int
    pruned: int
    lost: int
    backlog: int
    journal_pending: bool
    rejected: int = 0


class _Collector(Collector):
    """``llm_ledger_*`` metrics, read from the ledger's counters at scrape time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        s = self.ledger.status()
        counters = (
            ("llm_ledger_rows_written", "Rows written to the ledger database from the queue", s.rows_written),
            (
                "llm_ledger_spilled",
                "Records appended to the ledger journal (queue full or database down)",
                s.spilled,
            ),
            ("llm_ledger_replayed", "Journal rows inserted into the ledger database on replay", s.replayed),
            (
                "llm_ledger_write_errors",
                "Failed ledger database writes (each batch went to the journal)",
                s.write_errors,
            ),
            ("llm_ledger_journal_errors", "Failed appends to the ledger journal", s.journal_errors),
            ("llm_ledger_pruned", "Rows deleted from the ledger by the retention", s.pruned),
            (
                "llm_ledger_rows_rejected",
                "Records the ledger database refused (a value it cannot store); left out and logged",
                s.rejected,
            ),
            (
                "llm_ledger_lost",
                "Records lost because neither the database nor the journal could take them",
                s.lost,
            ),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)
        yield GaugeMetricFamily(
            "llm_ledger_backlog", "Ledger records in memory, not yet durable", value=s.backlog
        )
        yield GaugeMetricFamily(
            "llm_ledger_healthy", "1 when the ledger database is writable", value=int(s.healthy)
        )


class Ledger:
    """The durable usage ledger in ``data_dir`` (``ledger.sqlite3``, ``ledger.journal``).

    ``clock`` gives wall-clock seconds (for the retention cut-off); ``registry``
    (optional) gets the ``llm_ledger_*`` metrics.
    """

    name = "ledger"

    def __init__(
        self,
        settings: LedgerSettings,
        data_dir: Path,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / DB_NAME
        self.journal = Journal(self.data_dir / JOURNAL_NAME, fsync=settings.journal_fsync)
        self.clock = clock
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()

        self._lock = threading.Lock()
        self._writer_wake = threading.Condition(self._lock)
        self._spiller_wake = threading.Condition(self._lock)
        self._spill_now = False  # wake the spiller from its backoff (the database is back)
        self._queue: deque[_Entry] = deque()
        self._overflow: deque[_Entry] = deque()
        self._in_flight: Sequence[_Entry] = ()
        self._db_ok = True  # until the first failure: records go to the queue
        self._locked = False
        self._stopping = False
        self._writer_drained = False
        self._spiller_done = False
        self._wake_now = False
        self._journal_pending = False
        self._threads: list[threading.Thread] = []
        self._done: concurrent.futures.Future[None] | None = None
        self._lock_fd: int | None = None
        # Each thread's pacer (see sidecar.threads): every ~100 µs of work on a batch the thread
        # steps aside if the loop waits for the core, so a call never waits for a whole batch.
        self._writer_pace = Pacer(behind=lambda: len(self._queue) >= settings.batch_size)
        self._spiller_pace = Pacer(behind=lambda: len(self._overflow) >= settings.batch_size)

        self._db_error: str | None = None
        self._journal_error: str | None = None
        self._dir_error: str | None = None
        self._lost_logged = 0
        self.accepted = 0
        self.rows_written = 0
        self.batches_written = 0
        self.spilled = 0
        self.replayed = 0
        self.replay_duplicates = 0
        self.journal_bad_lines = 0
        self.write_errors = 0
        self.journal_errors = 0
        self.pruned = 0
        self.lost = 0
        self.rejected = 0
        self._settled = 0  # records now in the database or the journal (or lost)
        if registry is not None:
            registry.register(_Collector(self))

    # -- the request path ---------------------------------------------------------------
    def offer(self, record: CallRecord) -> bool:
        """Take the record; never refuses it and never waits (a list append under a lock)."""
        entry = (f"{self._prefix}-{next(self._ids):x}", record)
        with self._lock:
            self.accepted += 1
            if self._spiller_done:
                self._lose(1, "the ledger has stopped")
                return True
            if self._db_ok and not self._writer_drained and len(self._queue) < self.settings.queue_size:
                self._queue.append(entry)
                if len(self._queue) >= self.settings.batch_size:
                    self._writer_wake.notify()
                return True
            if len(self._overflow) >= self.settings.max_backlog:
                self._lose(1, "max_backlog records wait for the journal (unwritable or too slow)")
                return True
            self._overflow.append(entry)
            self._spiller_wake.notify()
        return True

    def _lose(self, count: int, why: str, always: bool = False) -> None:
        """Count lost records (lock held); logs the first and then every 1000th (``always``: this
        one too, for losses at shutdown, when the counter can no longer be scraped)."""
        self.lost += count
        self._settled += count
        if always or self.lost - self._lost_logged >= 1000 or self._lost_logged == 0:
            self._lost_logged = self.lost
            log.error("ledger lost %d records so far: %s", self.lost, why)

    # -- state ------------------------------------------------------------------------
    def healthy(self) -> bool:
        """Whether the database takes rows (``False`` while spilling to the journal or worse)."""
        return self.status().healthy

    def status(self) -> LedgerStatus:
        """The ledger's state and counters."""
        with self._lock:
            if not self._threads:
                reason = "not started"
            elif self._dir_error:
                reason = f"data directory unusable: {self._dir_error}"
            elif self._db_error:
                reason = f"database unavailable ({self._db_error}): spilling to the journal"
            elif self._journal_error:
                reason = f"journal unwritable: {self._journal_error}"
            else:
                reason = ""
            if self._journal_error and reason and not reason.startswith("journal"):
                reason += f"; journal unwritable: {self._journal_error}"
            return LedgerStatus(
                healthy=not reason,
                reason=reason or "ok",
                accepted=self.accepted,
                rows_written=self.rows_written,
                batches_written=self.batches_written,
                spilled=self.spilled,
                replayed=self.replayed,
                replay_duplicates=self.replay_duplicates,
                journal_bad_lines=self.journal_bad_lines,
                write_errors=self.write_errors,
                journal_errors=self.journal_errors,
                pruned=self.pruned,
                lost=self.lost,
                backlog=self.accepted - self._settled,
                journal_pending=self._journal_pending,
                rejected=self.rejected,
            )

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the data directory's lock and start the writer and spiller threads.

        Raises :class:`LedgerLockedError` when another process uses the directory. A
        directory that cannot be created or written is not fatal: the ledger reports
        itself unhealthy, keeps records in memory and retries.
        """
        if self._threads:
            return
        await asyncio.to_thread(self._take_lock)
        self._done = concurrent.futures.Future()
        writer = threading.Thread(target=self._writer_main, name="sidecar-ledger-writer", daemon=True)
        spiller = threading.Thread(target=self._spiller_main, name="sidecar-ledger-spiller", daemon=True)
        self._threads = [writer, spiller]
        writer.start()
        spiller.start()

    def _take_lock(self) -> None:
        """Create the data directory and lock it (blocking I/O: run in a thread)."""
        if self._locked:
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            with self._lock:
                self._dir_error = f"{self.data_dir}: {exc.strerror or exc}"
            log.error("ledger data directory unusable, retrying: %s", self._dir_error)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(
                f"{self.data_dir} is used by another sidecar process ({LOCK_NAME} is locked); "
                "give each sidecar its own data directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            with self._lock:
                self._dir_error = f"cannot lock {LOCK_NAME}: {exc.strerror or exc}"
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        with self._lock:
            self._locked = True
            self._dir_error = None
            self._spiller_wake.notify()

    async def stop(self, timeout: float) -> None:
        """Write every record to the database or the journal (up to ``timeout`` seconds), then stop.

        Records still in memory when the time is up are appended to the journal
        directly as a last resort.
        """
        if not self._threads or self._done is None:
            return
        with self._lock:
            self._stopping = True
            self._writer_wake.notify()
            self._spiller_wake.notify()
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._done), timeout)
        except TimeoutError:
            log.error("ledger did not finish writing within %.1fs: journaling what is left", timeout)
            await asyncio.to_thread(self._last_resort)
        self._threads = []
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self._locked = False
        self.journal.close()

    def _last_resort(self) -> None:
        """Append everything still in memory to the journal (the writer may be stuck in SQLite)."""
        with self._lock:
            entries = [*self._in_flight, *self._queue, *self._overflow]
            self._queue.clear()
            self._overflow.clear()
            self._writer_drained = True
        if not entries:
            return
        lines, rejected = self._journal_lines(entries)
        self._reject(rejected, settle=True)
        if not lines:
            return
        try:
            self.journal.append(lines)
        except OSError as exc:
            with self._lock:
                self._lose(len(lines), f"journal unwritable at shutdown: {exc}", always=True)
            return
        with self._lock:
            self.spilled += len(lines)
            self._settled += len(lines)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record offered so far is in the database or the journal."""
        with self._lock:
            target = self.accepted
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._settled >= target:
                    return True
                self._wake_now = True
                self._writer_wake.notify()
            await asyncio.sleep(0.01)
        return False

    # -- reading --------------------------------------------------------------------------
    async def totals(
        self,
        start: float | None = None,
        end: float | None = None,
        by: Sequence[str] = ("tenant", "model"),
        tz: tzinfo | str = "UTC",
    ) -> tuple[list[Totals], Totals]:
        """Grouped totals of the rows in ``[start, end)`` (what is in the database: :meth:`flush` first)."""
        return await asyncio.to_thread(totals, self.db_path, start, end, by, tz)

    async def recent(self, since: float) -> list[CallRecord]:
        """Records of the calls that started at or after ``since`` (to refill rule windows)."""

        def read() -> list[CallRecord]:
            try:
                conn = connect_readonly(self.db_path)
            except FileNotFoundError:
                return []
            try:
                return [row_to_record(row) for row in read_rows(conn, since)]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []  # a new ledger whose writer has not created its schema yet: no rows
                raise
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    # -- the writer thread -------------------------------------------------------------------
    def _writer_main(self) -> None:
        background()
        try:
            self._writer_loop()
        except BaseException:  # pragma: no cover - a bug: keep the records, say so loudly
            log.exception("ledger writer crashed: records go to the journal from now on")
            with self._lock:
                self._db_ok = False
                self._db_error = "writer crashed"
                self._overflow.extend(self._in_flight)  # a replay skips what did commit
                self._in_flight = ()
                self._overflow.extend(self._queue)
                self._queue.clear()
                self._writer_drained = True
                self._spiller_wake.notify()
        finally:
            spiller = self._threads[1] if len(self._threads) > 1 else None
            if spiller is not None:
                spiller.join()
            if self._done is not None and not self._done.done():
                self._done.set_result(None)

    def _writer_loop(self) -> None:
        settings = self.settings
        backoff = _BACKOFF_MIN
        next_open = 0.0
        next_prune = 0.0
        next_replay = 0.0
        pruning = False
        store = self._open()
        if store is not None:
            store = self._replay(store)
        else:
            next_open = time.monotonic() + backoff
        while True:
            with self._lock:
                if not self._stopping and not pruning:
                    self._writer_wake.wait_for(
                        lambda: self._stopping or self._wake_now or len(self._queue) >= settings.batch_size,
                        timeout=settings.flush_interval,
                    )
                self._wake_now = False
                self._writer_pace.restart()
                count = min(len(self._queue), settings.batch_size)
                batch = [self._queue.popleft() for _ in range(count)]
                self._in_flight = batch
                stopping = self._stopping

            now = time.monotonic()
            if store is None and now >= next_open:
                store = self._open()
                if store is None:
                    next_open = now + backoff
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                else:
                    backoff = _BACKOFF_MIN
                    store = self._replay(store)
            if batch:
                store = self._write(store, batch)
            with self._lock:
                self._in_flight = ()

            # Fold spilled rows in when idle, and every few seconds under sustained load.
            if store is not None and (not batch or now >= next_replay):
                next_replay = now + _REPLAY_EVERY
                pending = self.journal.pending()
                self._journal_pending = pending
                if pending:
                    store = self._replay(store)
            if store is not None and settings.retention and (pruning or now >= next_prune):
                next_prune = now + settings.prune_interval
                pruned = self._prune(store)
                pruning = pruned >= _PRUNE_CHUNK  # more to do: one chunk per round, batches go between
            if store is None and next_open <= now:
                # The database failed in this round (a write or a replay): reopening it at once
                # could succeed (an open may need no new space) and report it healthy while every
                # write still fails, so the next try waits for the backoff like a failed open.
                next_open = now + backoff
                backoff = min(backoff * 2, _BACKOFF_MAX)

            if stopping:
                with self._lock:
                    if not self._queue:
                        # From here on, records go to the spiller (offer() sees this flag).
                        self._writer_drained = True
                        self._spiller_wake.notify()
                        break

        # Let the spiller finish, then fold the journal into the database.
        if len(self._threads) > 1:
            self._threads[1].join()
        if store is None and self._locked and self.journal.pending():
            # The database failed in the last rounds and the backoff has not reopened it: one more
            # try, so rows spilled while it was down are in the database when the sidecar stops
            # rather than at its next start (if it still fails, they wait in the journal).
            store = self._open()
        if store is not None:
            store = self._replay(store)
            if store is not None:
                store.close()
        self._journal_pending = self.journal.pending() if self._locked else False

    def _open(self) -> Store | None:
        if not self._locked:
            self._take_lock_quietly()
            if not self._locked:
                self._db_down("the data directory is not usable")
                return None
        try:
            store = Store(
                self.db_path, self.settings.synchronous, self.settings.busy_timeout, pace=self._writer_pace
            )
        except (sqlite3.Error, OSError) as exc:
            self._db_down(str(exc))
            return None
        with self._lock:
            was_down = self._db_error is not None
            self._db_ok = True
            self._db_error = None
            if self._overflow:
                # Records held while neither the database nor the journal took them: the
                # spiller may be sleeping a long backoff; there is room again, so now.
                self._spill_now = True
                self._spiller_wake.notify()
        if was_down:
            log.warning("ledger database %s is writable again", self.db_path)
        return store

    def _take_lock_quietly(self) -> None:
        try:
            self._take_lock()
        except LedgerLockedError as exc:
            with self._lock:
                self._dir_error = str(exc)

    def _db_down(self, error: str) -> None:
        """Mark the database unusable and route records to the journal."""
        with self._lock:
            first = self._db_error is None
            self._db_ok = False
            self._db_error = error
            self._overflow.extend(self._queue)
            self._queue.clear()
            self._spiller_wake.notify()
        if first:
            log.error(
                "ledger database %s unavailable, spilling to %s: %s", self.db_path, self.journal.path, error
            )

    def _write(self, store: Store | None, batch: list[_Entry]) -> Store | None:
        if store is None:
            self._spill(batch)
            return None
        rows: list[Values] = []
        rejected: list[Rejected] = []
        pace = self._writer_pace
        for call_id, record in batch:
            pace()
            try:
                rows.append(to_values(record, call_id))
            except Exception as exc:  # to_values is pure: a record it cannot map (an absurd time)
                rejected.append(Rejected(call_id, f"no row for the record ({type(exc).__name__}: {exc})"))
        try:
            inserted = store.insert_values(rows)
        except (sqlite3.Error, OSError) as exc:
            with self._lock:
                self.write_errors += 1
            store.close()
            self._db_down(str(exc))
            self._spill(batch)
            return None
        self._reject([*rejected, *inserted.rejected], settle=True)
        with self._lock:
            self.rows_written += inserted.new
            self.batches_written += 1
            self._settled += len(rows) - len(inserted.rejected)
        return store

    def _reject(self, rejected: Sequence[Rejected], settle: bool = False) -> None:
        """Count and log rows the database refused (``settle``: they were records still owed)."""
        if not rejected:
            return
        with self._lock:
            first = self.rejected
            self.rejected += len(rejected)
            if settle:
                self._settled += len(rejected)
        for n, (call_id, reason) in enumerate(rejected, first + 1):
            if n <= _REJECTS_LOGGED or n % 1000 == 0:
                log.error(
                    "ledger row %s rejected (%s); the other rows are stored (%d rejected so far)",
                    call_id,
                    reason,
                    n,
                )

    def _journal_lines(
        self, entries: Sequence[_Entry], pace: Callable[[], None] = no_pace
    ) -> tuple[list[str], list[Rejected]]:
        """Journal lines of the entries, leaving out (and returning) rows the database would refuse."""
        lines: list[str] = []
        rejected: list[Rejected] = []
        for call_id, record in entries:
            pace()
            try:
                row = to_row(record, call_id)
            except Exception as exc:  # to_row is pure: a record it cannot map (an absurd time)
                rejected.append(Rejected(call_id, f"no row for the record ({type(exc).__name__}: {exc})"))
                continue
            problem = row_problem(row)
            if problem is not None:
                rejected.append(Rejected(call_id, problem))
                continue
            lines.append(journal_line(row))
        return lines, rejected

    def _spill(self, entries: Iterable[_Entry]) -> None:
        with self._lock:
            self._overflow.extend(entries)
            self._spiller_wake.notify()

    def _replay(self, store: Store) -> Store | None:
        """Insert the journal's rows (at most two files per call); ``None`` if the database failed."""
        for _ in range(2):
            try:
                path = self.journal.begin_replay()
            except OSError as exc:
                log.error("cannot move the ledger journal aside for replay: %s", exc)
                return store
            if path is None:
                self._journal_pending = False
                return store
            inserted = duplicates = bad = 0
            rejected: list[Rejected] = []
            try:
                chunk: list[Row] = []
                for row in Journal.read(path):
                    self._writer_pace()
                    if row is None:
                        bad += 1
                        continue
                    chunk.append(row)
                    if len(chunk) >= 1000:
                        done = store.insert(chunk)
                        rejected.extend(done.rejected)
                        inserted += done.new
                        duplicates += len(chunk) - done.new - len(done.rejected)
                        chunk = []
                done = store.insert(chunk)
                rejected.extend(done.rejected)
                inserted += done.new
                duplicates += len(chunk) - done.new - len(done.rejected)
            except (sqlite3.Error, OSError) as exc:
                with self._lock:
                    self.write_errors += 1
                    self.replayed += inserted
                store.close()
                self._db_down(f"replaying the journal: {exc}")
                return None
            try:
                self.journal.finish_replay(path)
            except OSError as exc:
                log.error(
                    "replayed %s but cannot delete it (a later replay inserts nothing twice): %s", path, exc
                )
            with self._lock:
                self.replayed += inserted
                self.replay_duplicates += duplicates
                self.journal_bad_lines += bad
            self._reject(rejected)  # settled when they were journaled
            log.info(
                "ledger journal replayed: %d rows inserted, %d already present, %d rejected, "
                "%d unreadable lines",
                inserted,
                duplicates,
                len(rejected),
                bad,
            )
        return store

    def _prune(self, store: Store) -> int:
        retention = self.settings.retention
        assert retention is not None
        try:
            deleted = store.prune(self.clock() - retention, _PRUNE_CHUNK)
        except (sqlite3.Error, OSError) as exc:
            log.warning("ledger retention pruning failed (will retry): %s", exc)
            return 0
        with self._lock:
            self.pruned += deleted
        return deleted

    # -- the spiller thread ------------------------------------------------------------------
    def _spiller_main(self) -> None:
        background()
        try:
            self._spiller_loop()
        finally:
            with self._lock:
                self._spiller_done = True
                if self._overflow:
                    self._lose(
                        len(self._overflow), "the journal could not be written before shutdown", always=True
                    )
                    self._overflow.clear()

    def _spiller_loop(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            with self._lock:
                self._spiller_wake.wait_for(
                    lambda: (
                        (bool(self._overflow) and self._locked) or (self._stopping and self._writer_drained)
                    )
                )
                finished = self._stopping and self._writer_drained
                if not self._locked:
                    return  # finishing without a usable data directory: what is left is lost
                entries = list(self._overflow)
                self._overflow.clear()
            if not entries:
                return
            self._spiller_pace.restart()
            lines, rejected = self._journal_lines(entries, self._spiller_pace)
            if rejected:
                self._reject(rejected, settle=True)
                rejected_ids = {call_id for call_id, _ in rejected}
                entries = [entry for entry in entries if entry[0] not in rejected_ids]
                if not entries:
                    continue
            try:
                self.journal.append(lines)
            except OSError as exc:
                with self._lock:
                    self.journal_errors += 1
                    first = self._journal_error is None
                    self._journal_error = str(exc)
                    self._overflow.extendleft(reversed(entries))
                    # Read again, not the flag from before the write: stop() and the writer's
                    # last batch may have come while the append was failing.
                    if finished or (self._stopping and self._writer_drained):
                        return
                    # Sleep the backoff: new records do not cut it short (each retry rewrites the
                    # whole backlog); shutdown does, and so does the database coming back.
                    self._spill_now = False
                    self._spiller_wake.wait_for(
                        lambda: (self._stopping and self._writer_drained) or self._spill_now, timeout=backoff
                    )
                if first:
                    log.error(
                        "ledger journal %s unwritable, holding records in memory: %s", self.journal.path, exc
                    )
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            self._journal_pending = True
            with self._lock:
                self.spilled += len(entries)
                self._settled += len(entries)
                recovered = self._journal_error is not None
                self._journal_error = None
            if recovered:
                log.warning("ledger journal %s is writable again", self.journal.path)
