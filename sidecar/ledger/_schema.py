"""The ledger's row: its columns, the SQL schema, and the pure record ↔ row mapping.

One row per finished call. ``call_id`` is the ledger's own key, unique per call
and assigned when the ledger first receives the record; a row replayed from the
journal keeps it, so inserting it twice is a no-op (``ON CONFLICT (call_id) DO
NOTHING``): that is what makes replay exactly-once. Only that conflict is ignored:
a row breaking any other rule is refused loudly, never dropped in silence
(:func:`row_problem` says why before SQLite is asked). ``request_id`` is not unique: it may come from
the client's ``x-request-id`` header, which clients reuse (retries) or forge.

Token columns hold the count the upstream reported where it reported one, else
the local estimate, else ``NULL``; each ``*_source`` column says which
(``reported`` / ``estimated``). ``estimated_tokens`` is the input plus output
tokens that were estimated. ``cost_usd`` is the exact decimal as text (``NULL``
when the model has no price); ``time``/``epoch`` are when the call started.

Pure module: standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import itemgetter

from sidecar.model import CallRecord, Usage

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TOKEN_COLUMNS",
    "Row",
    "decimal_text",
    "iso_utc",
    "row_problem",
    "row_to_record",
    "row_values",
    "to_row",
]

#: A ledger row: column name → value (str, int, float or None).
Row = dict[str, object]

#: Bumped when the table changes; a ledger written by a newer sidecar is refused.
SCHEMA_VERSION = 2

#: What turns a ledger of schema ``N - 1`` into schema ``N`` (run in one transaction).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE calls ADD COLUMN route TEXT", "ALTER TABLE calls ADD COLUMN variant TEXT"),
}

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
    # Schema 2: the gateway route that planned the call and the model version that served it
    # ("primary" | "candidate" on a route with a canary); NULL when none.
    "route",
    "variant",
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

#: Inserts one row given as :func:`row_values` (positional: binding 34 values by name
#: costs SQLite's binding more than the insert itself); a ``call_id`` already stored is
#: skipped (replay), any other violation raises.
INSERT = (
    f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    " ON CONFLICT (call_id) DO NOTHING"
)

# Column → (storage class, whether NULL is refused), from the DDL above.
_KINDS: dict[str, tuple[str, bool]] = {
    column: (_TYPES.get(column, "TEXT").split()[0], "NOT NULL" in _TYPES.get(column, ""))
    for column in COLUMNS
}
_CHECKS: tuple[tuple[str, str, bool], ...] = tuple((column, *_KINDS[column]) for column in COLUMNS)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_values = itemgetter(*COLUMNS)


def row_values(row: Mapping[str, object]) -> tuple[object, ...]:
    """The row's values in :data:`COLUMNS` order, for :data:`INSERT` (a missing column is NULL)."""
    try:
        values: tuple[object, ...] = _values(row)
    except KeyError:
        return tuple(row.get(column) for column in COLUMNS)
    return values


def _utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON "\ud800" escape
        return False
    return True


def row_problem(row: Mapping[str, object]) -> str | None:
    """Why SQLite would refuse ``row`` (or store something else than was given), else None.

    Checked per column against the schema: a required value missing, a value of the
    wrong type (a JSON journal line can hold anything), an integer past 64 bits, a
    number that is not finite (SQLite stores NaN as NULL), text that is not valid
    UTF-8. The message names the column, never the value (rows are not secret, but a
    log line should stay short).
    """
    get = row.get
    for column, kind, required in _CHECKS:
        value = get(column)
        if value is None:
            if required:
                return f"{column} is missing"
            continue
        # The usual values, accepted at a glance; anything else gets the full check below.
        if type(value) is str:
            if kind == "TEXT" and (value.isascii() or _utf8(value)):
                continue
        elif type(value) is int:
            if kind != "TEXT" and _INT64_MIN <= value <= _INT64_MAX:
                continue
        elif type(value) is float and kind == "REAL" and math.isfinite(value):
            continue
        problem = _value_problem(column, kind, value)
        if problem is not None:
            return problem
    return None


def _value_problem(column: str, kind: str, value: object) -> str | None:
    if kind == "INTEGER":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{column} is not an integer ({type(value).__name__})"
        if not _INT64_MIN <= value <= _INT64_MAX:
            return f"{column} does not fit in 64 bits"
    elif kind == "REAL":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return f"{column} is not a number ({type(value).__name__})"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{column} is not a finite number"
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            return f"{column} does not fit in 64 bits"
    elif not isinstance(value, str):
        return f"{column} is not text ({type(value).__name__})"
    elif not _utf8(value):
        return f"{column} is not valid UTF-8 text"
    return None


# The last second formatted by iso_utc, and its text: calls arrive in time order, so
# one entry makes nearly every call a cache hit (one tuple, replaced whole: thread-safe).
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")


def iso_utc(epoch: float) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z``: ``2025-01-31T12:00:00.250Z``.

    The same text as ``datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")``
    (microseconds rounded half-even, as ``datetime`` does, then truncated to milliseconds),
    with the date and time of day computed once per second.
    """
    global _last_second
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    elif micros < 0:
        second -= 1
        micros += 1_000_000
    cached, text = _last_second
    if cached != second:
        text = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds").removesuffix("+00:00")
        _last_second = (second, text)
    return f"{text}.{micros // 1000:03d}Z"


def decimal_text(value: Decimal) -> str:
    """A decimal in plain notation, never scientific (``1E-7`` → ``0.0000001``)."""
    return format(value, "f")


def to_row(record: CallRecord, call_id: str) -> Row:
    """The ledger row of one call (pure), its keys in :data:`COLUMNS` order."""
    usage = record.usage
    estimated = record.estimated
    # Each token type: the reported count, else the estimate (CallRecord.token_counts()).
    tokens: list[object] = []
    estimated_tokens = 0
    for token_type in TOKEN_COLUMNS:
        count = getattr(usage, token_type)
        if count is not None:
            tokens += (count, "reported")
            continue
        count = getattr(estimated, token_type)
        if count is None:
            tokens += (None, None)
            continue
        tokens += (count, "estimated")
        if token_type == "input" or token_type == "output":
            estimated_tokens += count
    (
        input_,
        input_source,
        cached,
        cached_source,
        write,
        write_source,
        output,
        output_source,
        reasoning,
        reasoning_source,
    ) = tokens
    cost = record.cost_usd
    return {
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
        "input_tokens": input_,
        "input_tokens_source": input_source,
        "cached_input_tokens": cached,
        "cached_input_tokens_source": cached_source,
        "cache_write_tokens": write,
        "cache_write_tokens_source": write_source,
        "cache_write_1h_tokens": usage.cache_write_1h,
        "output_tokens": output,
        "output_tokens_source": output_source,
        "reasoning_tokens": reasoning,
        "reasoning_tokens_source": reasoning_source,
        "estimated_tokens": estimated_tokens,
        "cost_usd": decimal_text(cost) if cost is not None else None,
        "price_model": record.price_model,
        "price_version": record.price_version,
        "service_tier": record.service_tier,
        "duration_s": record.duration_s,
        "ttft_s": record.ttft_s,
        "route": record.route or None,
        "variant": record.variant or None,
    }


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
        route=_text(row.get("route")) or "",
        variant=_text(row.get("variant")) or "",
    )
