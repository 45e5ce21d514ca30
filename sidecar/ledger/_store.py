"""The ledger's SQLite database: WAL mode, batched idempotent inserts, chunked pruning.

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

from sidecar.ledger._schema import DDL, INSERT, SCHEMA_VERSION, Row

__all__ = ["LedgerSchemaError", "Store"]


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
            for statement in DDL:
                self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.close()
            raise

    def insert(self, rows: Sequence[Row]) -> int:
        """Insert rows in one transaction; returns how many were new (a known ``call_id`` is skipped)."""
        if not rows:
            return 0
        before = self.conn.total_changes
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(INSERT, rows)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return self.conn.total_changes - before

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
