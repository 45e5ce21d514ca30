"""Reading the ledger: rows in a half-open time range, and totals grouped by keys.

:func:`aggregate` is pure (rows in, totals out) and does the arithmetic in exact
``Decimal``; :func:`read_rows` and :func:`totals` open the database read-only
(blocking: call them from a thread or the CLI, never the event loop).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

from sidecar.ledger._schema import COLUMNS, TOKEN_COLUMNS, Row

__all__ = [
    "GROUP_KEYS",
    "REPORT_TOKEN_COLUMNS",
    "Totals",
    "aggregate",
    "connect_readonly",
    "read_rows",
    "totals",
]

#: Keys a report may group by; ``day`` and ``month`` are taken in the report's time zone.
GROUP_KEYS: tuple[str, ...] = ("tenant", "model", "provider", "upstream", "day", "month")
#: The token columns of a report, in order.
REPORT_TOKEN_COLUMNS: tuple[str, ...] = (*TOKEN_COLUMNS.values(), "estimated_tokens")


@dataclass
class Totals:
    """Sums over the rows of one group (or of all rows: ``keys`` is then empty).

    ``tokens`` maps each token column of :data:`REPORT_TOKEN_COLUMNS` to its sum;
    ``tokens_by_source`` maps ``(token type, source)`` to its sum, the shape of
    ``llm_tokens_total{type, source}``; ``cost_usd`` is exact; ``unpriced`` counts
    rows with token counts but no cost.
    """

    keys: tuple[str, ...] = ()
    requests: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REPORT_TOKEN_COLUMNS, 0))
    tokens_by_source: dict[tuple[str, str], int] = field(default_factory=dict)
    cost_usd: Decimal = field(default_factory=Decimal)
    unpriced: int = 0

    def add(self, row: Mapping[str, object]) -> None:
        """Add one row."""
        self.requests += 1
        counted = False
        for column in REPORT_TOKEN_COLUMNS:
            value = row.get(column)
            if isinstance(value, int):
                self.tokens[column] += value
                counted = counted or column != "estimated_tokens"
        for token_type, column in TOKEN_COLUMNS.items():
            value, source = row.get(column), row.get(f"{column}_source")
            if isinstance(value, int) and isinstance(source, str):
                key = (token_type, source)
                self.tokens_by_source[key] = self.tokens_by_source.get(key, 0) + value
        cost = row.get("cost_usd")
        if isinstance(cost, str):
            self.cost_usd += Decimal(cost)
        elif counted:
            self.unpriced += 1


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A read-only connection; raises ``FileNotFoundError`` when there is no ledger there."""
    if not db_path.is_file():
        raise FileNotFoundError(f"no ledger at {db_path}")
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def read_rows(
    conn: sqlite3.Connection, start: float | None = None, end: float | None = None
) -> Iterator[Row]:
    """Rows with ``start <= epoch < end`` (either bound may be omitted), oldest first."""
    where: list[str] = []
    params: list[float] = []
    if start is not None:
        where.append("epoch >= ?")
        params.append(start)
    if end is not None:
        where.append("epoch < ?")
        params.append(end)
    sql = f"SELECT {', '.join(COLUMNS)} FROM calls"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY epoch, id"
    cursor = conn.execute(sql, params)
    try:
        while batch := cursor.fetchmany(1000):
            for item in batch:
                yield dict(zip(COLUMNS, tuple(item), strict=True))
    finally:
        cursor.close()


def _key(row: Mapping[str, object], by: Sequence[str], tz: tzinfo) -> tuple[str, ...]:
    out: list[str] = []
    local: datetime | None = None
    for key in by:
        if key in ("day", "month"):
            if local is None:
                epoch = row.get("epoch")
                local = datetime.fromtimestamp(float(epoch) if isinstance(epoch, int | float) else 0.0, tz)
            out.append(local.strftime("%Y-%m-%d" if key == "day" else "%Y-%m"))
        else:
            value = row.get(key)
            out.append("" if value is None else str(value))
    return tuple(out)


def aggregate(
    rows: Iterable[Mapping[str, object]], by: Sequence[str], tz: tzinfo
) -> tuple[list[Totals], Totals]:
    """Totals per group of ``by`` keys (sorted by key) and the grand total (pure)."""
    unknown = [key for key in by if key not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)} (keys: {', '.join(GROUP_KEYS)})")
    groups: dict[tuple[str, ...], Totals] = {}
    total = Totals()
    for row in rows:
        key = _key(row, by, tz)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Totals(keys=key)
        group.add(row)
        total.add(row)
    return [groups[key] for key in sorted(groups)], total


def totals(
    db_path: Path,
    start: float | None = None,
    end: float | None = None,
    by: Sequence[str] = ("tenant", "model"),
    tz: tzinfo | str = "UTC",
) -> tuple[list[Totals], Totals]:
    """The reconciliation helper: grouped totals of the rows with ``start <= epoch < end``."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    conn = connect_readonly(db_path)
    try:
        return aggregate(read_rows(conn, start, end), by, zone)
    finally:
        conn.close()
