"""The ledger's row: its columns, the SQL schema, and the pure record ↔ row mapping.

One row per finished call. ``call_id`` is the ledger's own key, unique per call
and assigned when the ledger first receives the record; a row replayed from the
journal keeps it, so inserting it twice is a no-op (``INSERT OR IGNORE``): that
is what makes replay exactly-once. ``request_id`` is not unique: it may come from
the client's ``x-request-id`` header, which clients reuse (retries) or forge.

Token columns hold the count the upstream reported where it reported one, else
the local estimate, else ``NULL``; each ``*_source`` column says which
(``reported`` / ``estimated``). ``estimated_tokens`` is the input plus output
tokens that were estimated. ``cost_usd`` is the exact decimal as text (``NULL``
when the model has no price); ``time``/``epoch`` are when the call started.

Pure module: standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from sidecar.model import CallRecord, Usage

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "TOKEN_COLUMNS",
    "Row",
    "decimal_text",
    "iso_utc",
    "row_to_record",
    "to_row",
]

#: A ledger row: column name → value (str, int, float or None).
Row = dict[str, object]

#: Bumped when the table changes; a ledger written by a newer sidecar is refused.
SCHEMA_VERSION = 1

#: Normalised token type (:data:`sidecar.model.TOKEN_TYPES`) → its column.
TOKEN_COLUMNS: dict[str, str] = {
    "input": "input_tokens",
    "cached_input": "cached_input_tokens",
    "cache_write": "cache_write_tokens",
    "output": "output_tokens",
    "reasoning": "reasoning_tokens",
}

#: Every column, in table (and export) order.
COLUMNS: tuple[str, ...] = (
    "call_id",
    "time",
    "epoch",
    "request_id",
    "trace_id",
    "span_id",
    "tenant",
    "upstream",
    "provider",
    "operation",
    "model",
    "request_model",
    "response_model",
    "stream",
    "status",
    "error_type",
    "input_tokens",
    "input_tokens_source",
    "cached_input_tokens",
    "cached_input_tokens_source",
    "cache_write_tokens",
    "cache_write_tokens_source",
    "cache_write_1h_tokens",
    "output_tokens",
    "output_tokens_source",
    "reasoning_tokens",
    "reasoning_tokens_source",
    "estimated_tokens",
    "cost_usd",
    "price_model",
    "price_version",
    "service_tier",
    "duration_s",
    "ttft_s",
)

_TYPES: dict[str, str] = {
    "call_id": "TEXT NOT NULL UNIQUE",
    "time": "TEXT NOT NULL",
    "epoch": "REAL NOT NULL",
    "request_id": "TEXT NOT NULL",
    "tenant": "TEXT NOT NULL",
    "upstream": "TEXT NOT NULL",
    "provider": "TEXT NOT NULL",
    "operation": "TEXT NOT NULL",
    "model": "TEXT NOT NULL",
    "stream": "INTEGER NOT NULL",
    "status": "INTEGER NOT NULL",
    "estimated_tokens": "INTEGER NOT NULL",
    "price_version": "TEXT NOT NULL",
    "duration_s": "REAL NOT NULL",
    "ttft_s": "REAL",
    "cache_write_1h_tokens": "INTEGER",
    **{column: "INTEGER" for column in TOKEN_COLUMNS.values()},
}

#: The table and its indexes (idempotent).
DDL: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS calls (\n  id INTEGER PRIMARY KEY,\n  "
    + ",\n  ".join(f"{column} {_TYPES.get(column, 'TEXT')}" for column in COLUMNS)
    + "\n)",
    "CREATE INDEX IF NOT EXISTS calls_epoch ON calls (epoch)",
    "CREATE INDEX IF NOT EXISTS calls_request_id ON calls (request_id)",
)

INSERT = f"INSERT OR IGNORE INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)})"


def iso_utc(epoch: float) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z``: ``2025-01-31T12:00:00.250Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def decimal_text(value: Decimal) -> str:
    """A decimal in plain notation, never scientific (``1E-7`` → ``0.0000001``)."""
    return format(value, "f")


def to_row(record: CallRecord, call_id: str) -> Row:
    """The ledger row of one call (pure)."""
    row: Row = {
        "call_id": call_id,
        "time": iso_utc(record.started_at),
        "epoch": record.started_at,
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "span_id": record.span_id,
        "tenant": record.tenant,
        "upstream": record.upstream,
        "provider": record.provider,
        "operation": record.operation,
        "model": record.model,
        "request_model": record.request_model,
        "response_model": record.response_model,
        "stream": 1 if record.stream else 0,
        "status": record.status,
        "error_type": record.error_type,
    }
    estimated = 0
    for column in TOKEN_COLUMNS.values():
        row[column] = None
        row[f"{column}_source"] = None
    for count in record.token_counts():
        column = TOKEN_COLUMNS[count.type]
        row[column] = count.count
        row[f"{column}_source"] = count.source
        if count.source == "estimated" and count.type in ("input", "output"):
            estimated += count.count
    row["cache_write_1h_tokens"] = record.usage.cache_write_1h
    row["estimated_tokens"] = estimated
    row["cost_usd"] = decimal_text(record.cost_usd) if record.cost_usd is not None else None
    row["price_model"] = record.price_model
    row["price_version"] = record.price_version
    row["service_tier"] = record.service_tier
    row["duration_s"] = record.duration_s
    row["ttft_s"] = record.ttft_s
    return {column: row[column] for column in COLUMNS}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _float(value: object, default: float = 0.0) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def row_to_record(row: Mapping[str, object]) -> CallRecord:
    """A :class:`CallRecord` rebuilt from a row (for refilling rule windows after a restart).

    Fields the ledger does not keep (method, path, finish reasons, ...) are left at
    their defaults.
    """
    reported: dict[str, int | None] = {}
    estimated: dict[str, int | None] = {}
    for token_type, column in TOKEN_COLUMNS.items():
        count = _int(row.get(column))
        source = row.get(f"{column}_source")
        if count is None:
            continue
        (estimated if source == "estimated" else reported)[token_type] = count
    reported["cache_write_1h"] = _int(row.get("cache_write_1h_tokens"))
    cost: Decimal | None = None
    cost_text = _text(row.get("cost_usd"))
    if cost_text is not None:
        try:
            cost = Decimal(cost_text)
        except InvalidOperation:
            cost = None
    started = _float(row.get("epoch"))
    duration = _float(row.get("duration_s"))
    ttft = row.get("ttft_s")
    return CallRecord(
        request_id=_text(row.get("request_id")) or "",
        started_at=started,
        finished_at=started + duration,
        tenant=_text(row.get("tenant")) or "",
        upstream=_text(row.get("upstream")) or "",
        provider=_text(row.get("provider")) or "",
        operation=_text(row.get("operation")) or "other",
        method="",
        path="",
        stream=bool(row.get("stream")),
        status=_int(row.get("status")) or 0,
        error_type=_text(row.get("error_type")),
        request_model=_text(row.get("request_model")),
        response_model=_text(row.get("response_model")),
        duration_s=duration,
        ttft_s=_float(ttft) if ttft is not None else None,
        usage=Usage(**reported),
        estimated=Usage(**estimated),
        cost_usd=cost,
        price_model=_text(row.get("price_model")),
        price_version=_text(row.get("price_version")) or "",
        service_tier=_text(row.get("service_tier")),
        trace_id=_text(row.get("trace_id")),
        span_id=_text(row.get("span_id")),
    )
