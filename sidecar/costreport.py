"""The ``cost report`` and ``cost export`` commands: the ledger, for finance.

``llm-sidecar cost report [--data-dir DIR] [--from T] [--to T] [--tz ZONE]
[--by tenant,model,provider,upstream,day,month] [--format table|csv|json]``
prints requests, tokens and cost grouped by the keys given (default
``tenant,model``), with a ``TOTAL`` row. ``T`` is an ISO 8601 date or date-time,
UTC unless it carries an offset; the range is half-open, ``[from, to)``, on the
time each call started; ``day`` and ``month`` are taken in ``--tz`` (an IANA
zone, default UTC). ``cost_usd`` has 6 decimal places (rounded half up) in the
table and the CSV and its full precision in JSON (a number with every digit); the
TOTAL row sums the exact costs, so it may differ from the sum of the rounded ones
in the last place.

CSV columns: the group keys in the order given, then
``requests,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,
reasoning_tokens,estimated_tokens,cost_usd``; the last row's first key is
``TOTAL``. It opens in a spreadsheet as is: RFC 4180 quoting and CRLF line ends,
and a text cell that a spreadsheet would run as a formula (one starting with
``= + - @``: tenant names come from a client header) is prefixed with ``'``.

``llm-sidecar cost export [--data-dir DIR] [--from T] [--to T] --format csv|jsonl``
writes the ledger's rows, one per call, with the ledger's column names in both
formats (``stream`` as true/false; ``cost_usd`` exact; empty / null where there is
no value), streamed, for loading into a warehouse.

Both read the database read-only (safe while the sidecar runs). Rows still in the
journal (waiting for the database) are not included; a note on stderr says so.

Output goes through ``sys.stdout.write`` (printing is the CLI's job; these
handlers are what the CLI calls).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sidecar.ledger import (
    COLUMNS,
    DB_NAME,
    GROUP_KEYS,
    JOURNAL_NAME,
    REPORT_TOKEN_COLUMNS,
    Row,
    Totals,
    aggregate,
    connect_readonly,
    iso_utc,
    read_rows,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "REPORT_COLUMNS",
    "add_commands",
    "export_command",
    "format_report",
    "parse_by",
    "parse_time",
    "report_command",
    "write_export",
]

DEFAULT_DATA_DIR = Path("sidecar-data")
#: The value columns of a report, after the group keys.
REPORT_COLUMNS: tuple[str, ...] = ("requests", *REPORT_TOKEN_COLUMNS, "cost_usd")
_CENTS6 = Decimal("0.000001")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# -- arguments ---------------------------------------------------------------------------


def parse_time(text: str) -> float:
    """An ISO 8601 date or date-time as epoch seconds; UTC unless it carries an offset."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected an ISO 8601 date or date-time, e.g. 2025-01-31 or "
            "2025-01-31T12:00:00+02:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_zone(text: str) -> ZoneInfo:
    """An IANA time zone name (``UTC``, ``Europe/Paris``)."""
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown time zone {text!r} (an IANA name, e.g. Europe/Paris)"
        ) from None


def parse_by(text: str) -> tuple[str, ...]:
    """A comma-separated list of group keys, each at most once."""
    keys = tuple(key.strip() for key in text.split(",") if key.strip())
    unknown = [key for key in keys if key not in GROUP_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"cannot group by {', '.join(unknown)} (choose from {', '.join(GROUP_KEYS)})"
        )
    if not keys:
        raise argparse.ArgumentTypeError(f"give at least one key ({', '.join(GROUP_KEYS)})")
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError("each key may appear once")
    return keys


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cost report`` and ``cost export`` to the CLI; each sets ``func=handler(args) -> int``."""
    cost = sub.add_parser("cost", help="cost and usage from the ledger")
    cost_sub = cost.add_subparsers(dest="cost_command", required=True, metavar="{report,export}")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help="the sidecar's data directory (./sidecar-data)",
        )
        parser.add_argument(
            "--from", dest="start", type=parse_time, help="first time included (ISO 8601, UTC)"
        )
        parser.add_argument("--to", dest="end", type=parse_time, help="first time excluded (ISO 8601, UTC)")

    report = cost_sub.add_parser("report", help="cost and tokens grouped by tenant, model, day, ...")
    common(report)
    report.add_argument("--tz", type=parse_zone, default=ZoneInfo("UTC"), help="zone of day and month (UTC)")
    report.add_argument(
        "--by",
        type=parse_by,
        default=("tenant", "model"),
        help=f"group keys, comma-separated: {','.join(GROUP_KEYS)}",
    )
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(func=report_command)

    export = cost_sub.add_parser("export", help="the ledger's rows, one per call, as CSV or JSON lines")
    common(export)
    export.add_argument("--format", choices=("csv", "jsonl"), required=True)
    export.set_defaults(func=export_command)


# -- pure formatting ---------------------------------------------------------------------


def _cost6(value: Decimal) -> str:
    return format(value.quantize(_CENTS6, rounding=ROUND_HALF_UP), "f")


def _safe_cell(text: str) -> str:
    return "'" + text if text.startswith(_FORMULA_START) else text


def _values(totals: Totals) -> list[str]:
    return [
        str(totals.requests),
        *(str(totals.tokens[c]) for c in REPORT_TOKEN_COLUMNS),
        _cost6(totals.cost_usd),
    ]


def _csv(groups: Sequence[Totals], total: Totals, by: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*by, *REPORT_COLUMNS])
    for group in groups:
        writer.writerow([*(_safe_cell(key) for key in group.keys), *_values(group)])
    writer.writerow(["TOTAL", *([""] * (len(by) - 1)), *_values(total)])
    return out.getvalue()


def _table(groups: Sequence[Totals], total: Totals, by: Sequence[str]) -> str:
    header = [*by, *REPORT_COLUMNS]
    body = [[*group.keys, *_values(group)] for group in groups]
    last = ["TOTAL", *([""] * (len(by) - 1)), *_values(total)]
    widths = [max(len(row[i]) for row in [header, *body, last]) for i in range(len(header))]
    keys = len(by)

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(w) if i < keys else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip() + "\n"

    rule = "  ".join("-" * w for w in widths) + "\n"
    return line(header) + rule + "".join(line(row) for row in body) + rule + line(last)


def _json_value(value: object) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    return json.dumps(value, ensure_ascii=False)


def _json_object(fields: Mapping[str, object], indent: str = "") -> str:
    inner = indent + "  "
    items = [f"{inner}{json.dumps(key)}: {_json_value(value)}" for key, value in fields.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


def _json_fields(totals: Totals) -> dict[str, object]:
    fields: dict[str, object] = {"requests": totals.requests}
    fields.update({column: totals.tokens[column] for column in REPORT_TOKEN_COLUMNS})
    fields["cost_usd"] = totals.cost_usd
    fields["unpriced_requests"] = totals.unpriced
    return fields


def _json(
    groups: Sequence[Totals],
    total: Totals,
    by: Sequence[str],
    start: float | None,
    end: float | None,
    tz: str,
) -> str:
    rows = [
        _json_object({**dict(zip(by, group.keys, strict=True)), **_json_fields(group)}, "    ")
        for group in groups
    ]
    head = {
        "from": iso_utc(start) if start is not None else None,
        "to": iso_utc(end) if end is not None else None,
        "tz": tz,
        "by": list(by),
    }
    parts = [f"  {json.dumps(key)}: {_json_value(value)}" for key, value in head.items()]
    parts.append('  "rows": [' + ("\n    " + ",\n    ".join(rows) + "\n  ]" if rows else "]"))
    parts.append(f'  "total": {_json_object(_json_fields(total), "  ")}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def format_report(
    rows: Iterable[Mapping[str, object]],
    by: Sequence[str],
    fmt: str,
    tz: ZoneInfo,
    start: float | None = None,
    end: float | None = None,
) -> str:
    """The report text for rows already limited to the time range (pure)."""
    groups, total = aggregate(rows, by, tz)
    if fmt == "csv":
        return _csv(groups, total, by)
    if fmt == "json":
        return _json(groups, total, by, start, end, str(tz))
    return _table(groups, total, by)


def _export_cell(column: str, value: object) -> str:
    if value is None:
        return ""
    if column == "stream":
        return "true" if value else "false"
    return str(value)


def _export_json(row: Row) -> str:
    items: list[str] = []
    for column in COLUMNS:
        value = row.get(column)
        if column == "stream":
            text = "true" if value else "false"
        elif column == "cost_usd" and isinstance(value, str):
            text = value  # the exact decimal, as a JSON number
        else:
            text = json.dumps(value, ensure_ascii=False)
        items.append(f"{json.dumps(column)}:{text}")
    return "{" + ",".join(items) + "}\n"


def write_export(rows: Iterable[Row], fmt: str, out: TextIO) -> int:
    """Write rows as CSV (with a header) or JSON lines; returns how many rows were written."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_export_cell(column, row.get(column)) for column in COLUMNS])
            count += 1
    else:
        for row in rows:
            out.write(_export_json(row))
            count += 1
    return count


# -- the commands ------------------------------------------------------------------------


def _open(data_dir: Path) -> sqlite3.Connection | None:
    db_path = data_dir / DB_NAME
    try:
        return connect_readonly(db_path)
    except FileNotFoundError:
        sys.stderr.write(f"llm-sidecar cost: no ledger at {db_path} (is --data-dir right?)\n")
    except sqlite3.Error as exc:
        sys.stderr.write(f"llm-sidecar cost: cannot read {db_path}: {exc}\n")
    return None


def _journal_note(data_dir: Path) -> None:
    waiting = 0
    for name in (JOURNAL_NAME, JOURNAL_NAME + ".replaying"):
        try:
            with open(data_dir / name, "rb") as file:
                waiting += sum(1 for line in file if line.strip())
        except OSError:
            continue
    if waiting:
        sys.stderr.write(
            f"llm-sidecar cost: note: {waiting} rows wait in {data_dir / JOURNAL_NAME} and are not included "
            "(the sidecar replays them into the database when it can)\n"
        )


def _check_range(args: argparse.Namespace) -> bool:
    if args.start is not None and args.end is not None and args.start >= args.end:
        sys.stderr.write("llm-sidecar cost: --from must be before --to (the range is [from, to))\n")
        return False
    return True


def _quiet_broken_pipe() -> int:
    # The reader went away (``| head``): stop quietly, and keep Python's exit flush quiet too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def report_command(args: argparse.Namespace) -> int:
    """``cost report``: grouped cost and tokens."""
    if not _check_range(args):
        return 2
    conn = _open(args.data_dir)
    if conn is None:
        return 1
    try:
        text = format_report(
            read_rows(conn, args.start, args.end), args.by, args.format, args.tz, args.start, args.end
        )
    except sqlite3.Error as exc:
        sys.stderr.write(f"llm-sidecar cost: cannot read the ledger: {exc}\n")
        return 1
    finally:
        conn.close()
    _journal_note(args.data_dir)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``cost export``: the raw rows, streamed."""
    if not _check_range(args):
        return 2
    conn = _open(args.data_dir)
    if conn is None:
        return 1
    try:
        write_export(read_rows(conn, args.start, args.end), args.format, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except sqlite3.Error as exc:
        sys.stderr.write(f"llm-sidecar cost: cannot read the ledger: {exc}\n")
        return 1
    finally:
        conn.close()
    _journal_note(args.data_dir)
    return 0
