"""The durable usage ledger: the finance system of record for every proxied call.

One row per finished call in ``data_dir/ledger.sqlite3`` (SQLite, WAL mode),
written in batches by a thread of the ledger's own; records that cannot go to
the database right away (queue full, database unavailable, disk full) go to the
append-only journal ``data_dir/ledger.journal`` and are replayed into the
database exactly once when it can take them again, and on start.

Layout (imports point down):

- :mod:`._schema` — the columns, the SQL, the pure record ↔ row mapping;
- :mod:`._settings` — the ``ledger`` config section;
- :mod:`._journal` — the journal file (append, rotate for replay, read);
- :mod:`._store` — the SQLite connection (open, insert, prune);
- :mod:`._query` — reading: rows in a range, grouped totals (``cost report``);
- :mod:`._sink` — :class:`Ledger`, the pipeline sink and its two threads.

See :mod:`sidecar.ledger._sink` for the guarantees (what a SIGKILL can lose, the
fsync policy, exactly-once replay).
"""

from __future__ import annotations

from sidecar.ledger._journal import Journal, journal_line, parse_journal_line
from sidecar.ledger._query import (
    GROUP_KEYS,
    REPORT_TOKEN_COLUMNS,
    Totals,
    aggregate,
    connect_readonly,
    read_rows,
    totals,
)
from sidecar.ledger._schema import (
    COLUMNS,
    SCHEMA_VERSION,
    TOKEN_COLUMNS,
    Row,
    decimal_text,
    iso_utc,
    row_to_record,
    to_row,
)
from sidecar.ledger._settings import LedgerSettings, parse_ledger
from sidecar.ledger._sink import DB_NAME, JOURNAL_NAME, LOCK_NAME, Ledger, LedgerLockedError, LedgerStatus
from sidecar.ledger._store import LedgerSchemaError, Store

__all__ = [
    "COLUMNS",
    "DB_NAME",
    "GROUP_KEYS",
    "JOURNAL_NAME",
    "LOCK_NAME",
    "REPORT_TOKEN_COLUMNS",
    "SCHEMA_VERSION",
    "TOKEN_COLUMNS",
    "Journal",
    "Ledger",
    "LedgerLockedError",
    "LedgerSchemaError",
    "LedgerSettings",
    "LedgerStatus",
    "Row",
    "Store",
    "Totals",
    "aggregate",
    "connect_readonly",
    "decimal_text",
    "iso_utc",
    "journal_line",
    "parse_journal_line",
    "parse_ledger",
    "read_rows",
    "row_to_record",
    "to_row",
    "totals",
]
