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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import attrgetter, itemgetter
from typing import NamedTuple

from sidecar.model import CallRecord, Usage

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "TOKEN_COLUMNS",
    "Row",
    "Values",
    "decimal_text",
    "insert_for",
    "iso_utc",
    "row_problem",
    "row_to_record",
    "row_values",
    "to_row",
    "to_values",
    "values_problem",
]

#: A ledger row: column name → value (str, int, float or None).
Row = dict[str, object]

#: A ledger row as :data:`INSERT` binds it: the values in :data:`COLUMNS` order.
Values = tuple[object, ...]

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
#:
#: Indexed: ``call_id`` (unique; a process's ids share a prefix and count up) and ``epoch``
#: (calls come in time order). Not indexed: ``request_id``, usually 128 random bits, so each of a
#: batch's rows lands on another leaf page of its index, and every commit wrote those pages
#: again: the writer's cost per row grew with the table (SQLite alone, 500-row batches:
#: 8 µs per row over the first 50,000 rows, 18 µs at 200,000, where it stays near 5 µs
#: without that index). A call is found by its request id and its time (``epoch BETWEEN ?
#: AND ? AND request_id = ?``, through ``calls_epoch``). Ledgers written before lose the
#: index when the writer opens them (an older sidecar makes it again: the table is the same).
DDL: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS calls (\n  id INTEGER PRIMARY KEY,\n  "
    + ",\n  ".join(f"{column} {_TYPES.get(column, 'TEXT')}" for column in COLUMNS)
    + "\n)",
    "CREATE INDEX IF NOT EXISTS calls_epoch ON calls (epoch)",
    "DROP INDEX IF EXISTS calls_request_id",
)

#: Inserts one row given as :func:`row_values` (positional: binding every value by name
#: costs SQLite's binding more than the insert itself); a ``call_id`` already stored is
#: skipped (replay), any other violation raises.
_PARAMETERS = f"VALUES ({', '.join('?' for _ in COLUMNS)})"
INSERT = f"INSERT INTO calls ({', '.join(COLUMNS)}) {_PARAMETERS} ON CONFLICT (call_id) DO NOTHING"

# Column → (storage class, whether NULL is refused), from the DDL above.
_KINDS: dict[str, tuple[str, bool]] = {
    column: (_TYPES.get(column, "TEXT").split()[0], "NOT NULL" in _TYPES.get(column, ""))
    for column in COLUMNS
}
_CHECKS: tuple[tuple[str, str, bool], ...] = tuple((column, *_KINDS[column]) for column in COLUMNS)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_values = itemgetter(*COLUMNS)


def row_values(row: Mapping[str, object]) -> Values:
    """The row's values in :data:`COLUMNS` order, for :data:`INSERT` (a missing column is NULL)."""
    try:
        values: Values = _values(row)
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
    return values_problem(row_values(row))


def values_problem(values: Values) -> str | None:
    """:func:`row_problem` of a row given as its :func:`row_values`."""
    for (column, kind, required), value in zip(_CHECKS, values, strict=True):
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


# The quick screen of insert_for: per column, the storage class's exact Python type, and None
# where the column takes NULL. A row's types (a tuple of 36) are looked up in a memo: the rows
# of a sidecar come in a handful of shapes (which columns are NULL), each with its statement.
_EXACT: dict[str, type] = {"TEXT": str, "INTEGER": int, "REAL": float}
_FITS: tuple[frozenset[type], ...] = tuple(
    frozenset((_EXACT[kind],) if required else (_EXACT[kind], type(None))) for _, kind, required in _CHECKS
)
_REALS = itemgetter(*(i for i, (_, kind, _) in enumerate(_CHECKS) if kind == "REAL"))  # 3: a tuple
_isfinite = math.isfinite
_SHAPES_KEPT = 1024  # a bound on the memo, in case a journal holds rows of every shape JSON allows
_STATEMENTS_KEPT = 32  # shapes with a statement of their own (sqlite3 caches 128 per connection)


class _Plan(NamedTuple):
    statement: str
    params: Callable[[Values], Values]


_PLANS: dict[tuple[type, ...], _Plan | None] = {}
_statements = 0


def _plan(types: tuple[type, ...]) -> _Plan | None:
    """How rows of these types are inserted, or None if they need :func:`values_problem`."""
    global _statements
    if len(types) != len(_FITS) or not all(t in fits for t, fits in zip(types, _FITS, strict=True)):
        return None
    present = [i for i, t in enumerate(types) if t is not type(None)]  # the required ones at least
    if len(present) == len(types) or _statements >= _STATEMENTS_KEPT:
        return _Plan(INSERT, tuple)  # tuple() of a tuple is that tuple
    _statements += 1
    values = ", ".join("?" if t is not type(None) else "NULL" for t in types)
    return _Plan(INSERT.replace(_PARAMETERS, f"VALUES ({values})"), itemgetter(*present))


def insert_for(values: Values) -> tuple[str, Values] | None:
    """The statement and parameters that insert a row given as :func:`row_values`, when a
    quick screen passes it: every value of its column's exact type (``str``, ``int``,
    ``float``), every required one present, every ``REAL`` finite; else None (check it with
    :func:`values_problem`: an ``int`` epoch or a ``str`` subclass are fine).

    The statement is :data:`INSERT` with a literal ``NULL`` for each missing value (the same
    row, but Python's sqlite3 binds ``None`` through its adapter lookup, slower than the
    insert itself), or :data:`INSERT` with every value.

    Not the whole of :func:`values_problem`: a row that passes may still hold an integer
    past 64 bits or text that is not UTF-8. Only use it where something catches those:
    executing the statement does (binding raises ``OverflowError`` or
    ``UnicodeEncodeError``), and :meth:`~sidecar.ledger._store.Store.insert` then checks
    the whole batch with :func:`values_problem`.
    """
    types = tuple(map(type, values))
    try:
        plan = _PLANS[types]
    except KeyError:
        plan = _plan(types)
        if len(_PLANS) < _SHAPES_KEPT:
            _PLANS[types] = plan
    # filter(None, ...) drops None and 0.0 (both fine); NaN and infinities are truthy.
    if plan is None or not all(map(_isfinite, filter(None, _REALS(values)))):
        return None
    return plan.statement, plan.params(values)


# The last second formatted by iso_utc, and its text: calls arrive in time order, so
# one entry makes nearly every call a cache hit (one tuple, replaced whole: thread-safe).
_last_second: tuple[int, str] = (0, "1970-01-01T00:00:00")
_MILLIS: tuple[str, ...] = tuple(f".{ms:03d}Z" for ms in range(1000))  # cheaper than formatting


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
    return text + _MILLIS[micros // 1000]


def decimal_text(value: Decimal) -> str:
    """A decimal in plain notation, never scientific (``1E-7`` → ``0.0000001``)."""
    if type(value) is Decimal:
        # str() is format(value, "f") whenever it has no exponent, and a few times cheaper.
        text = str(value)
        if "E" not in text:
            return text
    return format(value, "f")


_token_counts = attrgetter(*TOKEN_COLUMNS)  # a Usage's counts in TOKEN_COLUMNS order


def to_values(record: CallRecord, call_id: str) -> Values:
    """The ledger row of one call (pure) as :data:`INSERT` binds it: values in :data:`COLUMNS` order."""
    usage = record.usage
    # Each token type: the reported count, else the estimate (CallRecord.token_counts()).
    tokens: list[object] = []
    estimated_tokens = 0
    for token_type, count, estimate in zip(
        TOKEN_COLUMNS, _token_counts(usage), _token_counts(record.estimated), strict=True
    ):
        if count is not None:
            tokens += (count, "reported")
        elif estimate is None:
            tokens += (None, None)
        else:
            tokens += (estimate, "estimated")
            if token_type == "input" or token_type == "output":
                estimated_tokens += estimate
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
    started = record.started_at
    return (
        call_id,
        iso_utc(started),
        started,
        record.request_id,
        record.trace_id,
        record.span_id,
        record.tenant,
        record.upstream,
        record.provider,
        record.operation,
        record.model,
        record.request_model,
        record.response_model,
        1 if record.stream else 0,
        record.status,
        record.error_type,
        input_,
        input_source,
        cached,
        cached_source,
        write,
        write_source,
        usage.cache_write_1h,
        output,
        output_source,
        reasoning,
        reasoning_source,
        estimated_tokens,
        decimal_text(cost) if cost is not None else None,
        record.price_model,
        record.price_version,
        record.service_tier,
        record.duration_s,
        record.ttft_s,
        record.route or None,
        record.variant or None,
    )


def to_row(record: CallRecord, call_id: str) -> Row:
    """The ledger row of one call (pure), its keys in :data:`COLUMNS` order."""
    return dict(zip(COLUMNS, to_values(record, call_id)))  # noqa: B905 - to_values has every column


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
