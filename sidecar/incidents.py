"""The durable incident store: SQLite in the sidecar's data directory (``incidents.sqlite3``).

Incidents are decided by the pure :class:`sidecar.rules.incidents.IncidentBook`; this
module only keeps them across restarts and answers the ``incidents`` commands. It
uses the standard library's ``sqlite3`` with one short-lived connection per call,
in WAL mode so the CLI can read while the sidecar writes. Every call blocks: the
sidecar runs them with ``asyncio.to_thread`` (see :class:`sidecar.alerting.AlertingSink`),
never on the event loop.

Schema version 1 (``PRAGMA user_version``)::

    incidents(id TEXT PRIMARY KEY, rule, severity, labels (JSON [[name, value], ...]),
              start REAL, end REAL NULL, peak REAL NULL, acked_at REAL NULL,
              acked_by TEXT NULL, fires INTEGER)
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sidecar.rules.incidents import Incident

__all__ = ["FILENAME", "IncidentStore"]

FILENAME = "incidents.sqlite3"
_SCHEMA_VERSION = 1
_COLUMNS = "id, rule, severity, labels, start, end, peak, acked_at, acked_by, fires"


class IncidentStore:
    """Incidents in ``data_dir/incidents.sqlite3``; created on first write."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILENAME

    def exists(self) -> bool:
        """True when the database file is there (the CLI does not create one)."""
        return self.path.is_file()

    @contextlib.contextmanager
    def _connect(self, create: bool = False) -> Iterator[sqlite3.Connection]:
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                with conn:
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS incidents ("
                        " id TEXT PRIMARY KEY, rule TEXT NOT NULL, severity TEXT NOT NULL,"
                        " labels TEXT NOT NULL, start REAL NOT NULL, end REAL, peak REAL,"
                        " acked_at REAL, acked_by TEXT, fires INTEGER NOT NULL DEFAULT 1)"
                    )
                    conn.execute("CREATE INDEX IF NOT EXISTS incidents_end ON incidents (end)")
                    conn.execute("CREATE INDEX IF NOT EXISTS incidents_start ON incidents (start)")
                    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            yield conn
        finally:
            conn.close()

    def save(self, incidents: Iterable[Incident]) -> None:
        """Insert or replace incidents (the book's latest state of each)."""
        rows = [
            (
                i.id,
                i.rule,
                i.severity,
                json.dumps([list(pair) for pair in i.labels]),  # in group_by order, as alerts key them
                i.start,
                i.end,
                None if math.isnan(i.peak) or math.isinf(i.peak) else i.peak,
                i.acked_at,
                i.acked_by,
                i.fires,
            )
            for i in incidents
        ]
        if not rows:
            return
        with self._connect(create=True) as conn, conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO incidents ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )

    def ack(self, incident_id: str, by: str, at: float) -> bool:
        """Record the first acknowledgement of an incident in the store; ``False`` when unknown."""
        if not self.exists():
            return False
        with self._connect() as conn, conn:
            cur = conn.execute(
                "UPDATE incidents SET acked_at = ?, acked_by = ? WHERE id = ? AND acked_at IS NULL",
                (at, by, incident_id),
            )
            if cur.rowcount:
                return True
            return conn.execute("SELECT 1 FROM incidents WHERE id = ?", (incident_id,)).fetchone() is not None

    def list(self, open_only: bool = False, since: float | None = None) -> builtins.list[Incident]:
        """Incidents, newest first: open ones only, or those open at some time since ``since``."""
        if not self.exists():
            return []
        where: list[str] = []
        params: list[float] = []
        if open_only:
            where.append("end IS NULL")
        if since is not None:
            where.append("(end IS NULL OR end >= ?)")
            params.append(since)
        sql = f"SELECT {_COLUMNS} FROM incidents"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start DESC, id"
        with self._connect() as conn:
            return [_row(r) for r in conn.execute(sql, params).fetchall()]

    def recent(self, since: float) -> builtins.list[Incident]:
        """Open incidents and those that ended after ``since`` (to seed the book at start)."""
        return self.list(since=since)


def _row(row: tuple[Any, ...]) -> Incident:
    (inc_id, rule, severity, labels, start, end, peak, acked_at, acked_by, fires) = row
    return Incident(
        id=str(inc_id),
        rule=str(rule),
        severity=str(severity),
        labels=tuple((str(k), str(v)) for k, v in json.loads(labels)),
        start=float(start),
        end=None if end is None else float(end),
        peak=math.nan if peak is None else float(peak),
        acked_at=None if acked_at is None else float(acked_at),
        acked_by=None if acked_by is None else str(acked_by),
        fires=int(fires),
    )
