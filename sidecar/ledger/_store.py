"""The ledger's SQLite database: WAL mode, batched idempotent inserts, chunked pruning.

A row SQLite would refuse (see :func:`~sidecar.ledger._schema.row_problem`, and any
constraint it still breaks) is left out of its batch and reported back with the
reason; the other rows of the batch are stored. Only a failure of the database
itself (cannot open, disk full, I/O error) fails a whole :meth:`Store.insert`.

Checking every value of every row in Python cost more than SQLite's own work, so a
batch is first screened with :func:`~sidecar.ledger._schema.insert_for` (types,
missing values, finite numbers: a memo lookup per row, which also picks a statement
with the row's NULLs written in, cheaper than binding ``None``) and inserted in order,
one ``executemany`` per run of rows of the same statement. The two problems the screen
leaves out, an integer past 64 bits and text that is not UTF-8, make SQLite's binding
raise; then the transaction is rolled back and the batch checked value by value
(:func:`~sidecar.ledger._schema.values_problem`) and inserted again: the rows stored
and the reasons given are the same either way.

The work on a batch (screening, binding, SQLite's own inserts) takes milliseconds on the
core the event loop shares; ``pace`` (a :class:`sidecar.threads.Pacer` of the writer
thread) is called between two rows, so that every ~100 µs the thread can step aside for
an event loop waiting for the core, and a call does not wait for the whole batch (see
:mod:`sidecar.threads`).

Used from the ledger's writer thread only (one connection, one thread); readers
(``cost report``, :func:`sidecar.ledger.totals`) open their own read-only
connections, which WAL lets run alongside the writer.

Blocking I/O: never call from the event loop.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple

from sidecar.ledger._schema import (
    DDL,
    INSERT,
    MIGRATIONS,
    SCHEMA_VERSION,
    Row,
    Values,
    insert_for,
    row_values,
    values_problem,
)
from sidecar.threads import no_pace

__all__ = ["PRUNE_STEP", "Inserted", "LedgerSchemaError", "Rejected", "Store"]

# What binding or storing one row can raise when the row, not the database, is at fault.
_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
    OverflowError,
    UnicodeEncodeError,
)


class Rejected(NamedTuple):
    """A row the database refused: its ``call_id`` (or ``"?"``) and why."""

    call_id: str
    reason: str


class Inserted(NamedTuple):
    """The outcome of :meth:`Store.insert`: how many rows were new, and those refused."""

    new: int
    rejected: tuple[Rejected, ...] = ()


def _call_id(values: Values) -> str:
    call_id = values[0]  # COLUMNS[0]
    return call_id if isinstance(call_id, str) else "?"


_Statement = tuple[str, Values]  # an INSERT and its parameters

#: Rows one ``DELETE`` of :meth:`Store.prune` removes (a few hundred microseconds of work).
PRUNE_STEP = 50


def _parameters(run: Iterable[_Statement], pace: Callable[[], None]) -> Iterator[Values]:
    """The parameters of a run of statements, for ``executemany``, which pulls them one row
    at a time: ``pace`` is called between two rows."""
    for _, values in run:
        pace()
        yield values


def _screen(
    rows: Sequence[Values], exact: bool, pace: Callable[[], None] = no_pace
) -> tuple[list[_Statement], list[Rejected]]:
    """The statements inserting the rows, and the rows refused; ``exact``: check every value,
    else only the rows :func:`insert_for` does not pass (what it leaves out, binding raises on)."""
    good: list[_Statement] = []
    rejected: list[Rejected] = []
    for values in rows:
        pace()
        if not exact:
            statement = insert_for(values)
            if statement is not None:
                good.append(statement)
                continue
        problem = values_problem(values)
        if problem is None:
            good.append((INSERT, values))
        else:
            rejected.append(Rejected(_call_id(values), problem))
    return good, rejected


class LedgerSchemaError(sqlite3.DatabaseError):
    """The database was written by a newer sidecar (a higher schema version)."""


class Store:
    """An open ledger database. Raises ``sqlite3.Error`` (or ``OSError``) when it cannot open.

    ``pace`` is called between two rows of an insert and between two chunks of a prune.
    """

    def __init__(
        self,
        path: Path,
        synchronous: str = "full",
        busy_timeout: float = 5.0,
        pace: Callable[[], None] = no_pace,
    ) -> None:
        self.path = path
        self.pace = pace
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode})")
            self.conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise LedgerSchemaError(
                    f"{path} has ledger schema {version}; this sidecar reads up to {SCHEMA_VERSION}"
                )
            self.conn.execute("BEGIN IMMEDIATE")
            table = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='calls'")
            if table.fetchone() is not None:  # an older ledger: bring its table up to date first
                for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS[target]:
                        self.conn.execute(statement)
            for statement in DDL:
                self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.close()
            raise

    def insert(self, rows: Sequence[Row]) -> Inserted:
        """Insert rows in one transaction: how many were new (a known ``call_id`` is skipped)
        and which were refused (left out, the others stored).

        Raises ``sqlite3.Error`` or ``OSError`` only when the database itself fails; then
        nothing of the batch is stored.
        """
        pace = self.pace
        values: list[Values] = []
        for row in rows:
            pace()
            values.append(row_values(row))
        return self.insert_values(values)

    def insert_values(self, rows: Sequence[Values]) -> Inserted:
        """:meth:`insert` of rows given as :func:`~sidecar.ledger._schema.row_values` (or
        :func:`~sidecar.ledger._schema.to_values`), in the same order."""
        good, rejected = _screen(rows, exact=False, pace=self.pace)
        if not good:
            return Inserted(0, tuple(rejected))
        try:
            return self._insert_all(good, rejected)
        except _ROW_ERRORS:
            pass  # a value the screen leaves to binding: check every value, then insert again
        good, rejected = _screen(rows, exact=True, pace=self.pace)
        if not good:
            return Inserted(0, tuple(rejected))
        try:
            return self._insert_all(good, rejected)
        except _ROW_ERRORS:
            # Something the checks did not foresee: find the row, one statement at a time.
            return self._insert_each(good, rejected)

    def _insert_all(self, statements: Sequence[_Statement], rejected: list[Rejected]) -> Inserted:
        """The statements in order in one transaction, an ``executemany`` per run of the same
        statement; rolled back on any error, which is raised."""
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for statement, run in itertools.groupby(statements, itemgetter(0)):
                self.conn.executemany(statement, _parameters(run, self.pace))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return Inserted(self.conn.total_changes - before, tuple(rejected))

    def _insert_each(self, statements: Sequence[_Statement], rejected: list[Rejected]) -> Inserted:
        """The slow path: a statement per row in one transaction, refused rows left out.

        A failed statement is undone on its own; the transaction goes on.
        """
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for statement, values in statements:
                self.pace()
                try:
                    self.conn.execute(statement, values)
                except _ROW_ERRORS as exc:
                    rejected.append(Rejected(_call_id(values), f"{type(exc).__name__}: {exc}"))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return Inserted(self.conn.total_changes - before, tuple(rejected))

    def prune(self, cutoff: float, limit: int = 5000) -> int:
        """Delete up to ``limit`` of the oldest rows that started before ``cutoff``; returns how many.

        One transaction, deleting :data:`PRUNE_STEP` rows per statement with ``pace`` called
        between two statements.
        """
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            left = limit
            while left > 0:
                self.pace()
                step = min(left, PRUNE_STEP)
                start = self.conn.total_changes
                self.conn.execute(
                    "DELETE FROM calls WHERE id IN "
                    "(SELECT id FROM calls WHERE epoch < ? ORDER BY epoch LIMIT ?)",
                    (cutoff, step),
                )
                left -= step
                if self.conn.total_changes - start < step:
                    break  # nothing older is left
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return self.conn.total_changes - before

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close the connection (the last one out checkpoints the WAL into the database)."""
        self.conn.close()
