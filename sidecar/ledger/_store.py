"""The ledger's SQLite database: WAL mode, batched idempotent inserts, chunked pruning.

A row SQLite would refuse (see :func:`~sidecar.ledger._schema.row_problem`, and any
constraint it still breaks) is left out of its batch and reported back with the
reason; the other rows of the batch are stored. Only a failure of the database
itself (cannot open, disk full, I/O error) fails a whole :meth:`Store.insert`.

Used from the ledger's writer thread only (one connection, one thread); readers
(``cost report``, :func:`sidecar.ledger.totals`) open their own read-only
connections, which WAL lets run alongside the writer.

Blocking I/O: never call from the event loop.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from sidecar.ledger._schema import DDL, INSERT, MIGRATIONS, SCHEMA_VERSION, Row, row_problem, row_values

__all__ = ["Inserted", "LedgerSchemaError", "Rejected", "Store"]

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


def _call_id(row: Row) -> str:
    call_id = row.get("call_id")
    return call_id if isinstance(call_id, str) else "?"


class LedgerSchemaError(sqlite3.DatabaseError):
    """The database was written by a newer sidecar (a higher schema version)."""


class Store:
    """An open ledger database. Raises ``sqlite3.Error`` (or ``OSError``) when it cannot open."""

    def __init__(self, path: Path, synchronous: str = "full", busy_timeout: float = 5.0) -> None:
        self.path = path
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
        good: list[Row] = []
        rejected: list[Rejected] = []
        for row in rows:
            problem = row_problem(row)
            if problem is None:
                good.append(row)
            else:
                rejected.append(Rejected(_call_id(row), problem))
        if not good:
            return Inserted(0, tuple(rejected))
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(INSERT, [row_values(row) for row in good])
            self.conn.execute("COMMIT")
        except _ROW_ERRORS:
            # Something the checks did not foresee: find the row, one statement at a time.
            self._rollback()
            return self._insert_each(good, rejected)
        except BaseException:
            self._rollback()
            raise
        return Inserted(self.conn.total_changes - before, tuple(rejected))

    def _insert_each(self, rows: Sequence[Row], rejected: list[Rejected]) -> Inserted:
        """The slow path: a statement per row in one transaction, refused rows left out.

        A failed statement is undone on its own; the transaction goes on.
        """
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for row in rows:
                try:
                    self.conn.execute(INSERT, row_values(row))
                except _ROW_ERRORS as exc:
                    rejected.append(Rejected(_call_id(row), f"{type(exc).__name__}: {exc}"))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return Inserted(self.conn.total_changes - before, tuple(rejected))

    def prune(self, cutoff: float, limit: int = 5000) -> int:
        """Delete up to ``limit`` of the oldest rows that started before ``cutoff``; returns how many."""
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE epoch < ? ORDER BY epoch LIMIT ?)",
                (cutoff, limit),
            )
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
