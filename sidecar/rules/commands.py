"""The ``rules`` and ``incidents`` subcommands of ``llm-sidecar``.

``sidecar.cli`` calls :func:`add_commands` with its subparsers; each subcommand sets
``func`` to a handler taking the parsed arguments and returning the exit status.
Output goes to ``sys.stdout`` (results) and ``sys.stderr`` (problems) through
``write``, never ``print``:

- ``rules check PATH...``: every problem as ``file:line:column: field: message``; exit 1 on any.
- ``rules export --format prometheus|prometheus-operator PATH... [--alertmanager]``.
- ``incidents list [--data-dir DIR] [--open] [--since T] [--format table|json]``.
- ``incidents mttr [--data-dir DIR] [--window 7d] [--by rule,severity]``.

Times are ISO 8601 (UTC unless an offset is given), windows Prometheus durations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.durations import parse_duration
from sidecar.errors import Problem
from sidecar.rules import export
from sidecar.rules.engine import describe_duration
from sidecar.rules.loader import expand, load_files

__all__ = ["add_commands", "parse_time"]

DEFAULT_DATA_DIR = Path("./sidecar-data")


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _problems(problems: list[Problem]) -> None:
    for problem in problems:
        _err(str(problem))


def parse_time(text: str) -> float:
    """An ISO 8601 time (UTC unless it has an offset) or a duration ago (``2h``) → epoch seconds."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: ISO 8601 (2025-01-31T12:00:00Z) or a duration ago (2h)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _duration_arg(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0s")
    return seconds


def _iso(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- rules ------------------------------------------------------------------------------


def _rules_check(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    rules, problems = load_files(paths)
    if problems:
        _problems(problems)
        _err(f"{len(problems)} problem(s) found")
        return 1
    files = expand(paths)
    _out(f"ok: {len(rules)} rule(s) in {len(files)} file(s)")
    return 0


def _rules_export(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    rules, problems = load_files(paths)
    if problems:
        _problems(problems)
        return 1
    sources = [str(p) for p in expand(paths)]
    if args.alertmanager:
        _out(export.export_alertmanager(rules, args.group_wait, args.repeat_interval, sources))
    elif args.format == "prometheus-operator":
        _out(export.export_operator(rules, sources, name=args.name, namespace=args.namespace))
    else:
        _out(export.export_prometheus(rules, sources))
    return 0


# -- incidents --------------------------------------------------------------------------


def _incidents_list(args: argparse.Namespace) -> int:
    from sidecar.incidents import IncidentStore

    store = IncidentStore(Path(args.data_dir))
    if not store.exists():
        _err(f"no incident store in {args.data_dir} (the sidecar creates it there)")
        return 1
    incidents = store.list(open_only=args.open, since=args.since)
    now = time.time()
    if args.format == "json":
        rows: list[dict[str, Any]] = [
            {
                "id": i.id,
                "rule": i.rule,
                "severity": i.severity,
                "labels": dict(i.labels),
                "start": _iso(i.start),
                "end": _iso(i.end) or None,
                "duration_seconds": round(i.duration(now), 3),
                "open": i.is_open,
                "peak": i.peak if i.peak == i.peak else None,  # NaN → null
                "acked_at": _iso(i.acked_at) or None,
                "acked_by": i.acked_by,
                "fires": i.fires,
            }
            for i in incidents
        ]
        _out(json.dumps(rows, indent=2))
        return 0
    header = ("ID", "RULE", "SEVERITY", "LABELS", "START", "END", "DURATION", "ACKED")
    table = [header]
    for i in incidents:
        labels = ",".join(f"{k}={v}" for k, v in i.labels) or "-"
        table.append(
            (
                i.id,
                i.rule,
                i.severity,
                labels,
                _iso(i.start),
                _iso(i.end) or "open",
                describe_duration(i.duration(now)),
                i.acked_by or "-",
            )
        )
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        _out("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    return 0


def _incidents_mttr(args: argparse.Namespace) -> int:
    from sidecar.incidents import IncidentStore
    from sidecar.rules.incidents import stats

    store = IncidentStore(Path(args.data_dir))
    if not store.exists():
        _err(f"no incident store in {args.data_dir} (the sidecar creates it there)")
        return 1
    by = [b.strip() for b in args.by.split(",") if b.strip()] if args.by else []
    for b in by:
        if b not in ("rule", "severity"):
            _err(f"--by takes rule and/or severity, not {b!r}")
            return 2
    now = time.time()
    since = now - args.window
    incidents = store.list(since=since)
    groups: dict[tuple[str, ...], list[Any]] = {}
    for inc in incidents:
        key = tuple(inc.rule if b == "rule" else inc.severity for b in by)
        groups.setdefault(key, []).append(inc)
    header = (*(b.upper() for b in by), "RESOLVED", "MTTR", "ACKED", "MTTA", "OPEN", "OLDEST OPEN")
    table = [header]
    for key in sorted(groups):
        s = stats(groups[key], since, now)
        table.append(
            (
                *key,
                str(s.resolved),
                describe_duration(s.mttr) if s.mttr is not None else "-",
                str(s.acked),
                describe_duration(s.mtta) if s.mtta is not None else "-",
                str(s.open),
                describe_duration(s.oldest_open_age) if s.oldest_open_age is not None else "-",
            )
        )
    if len(table) == 1:
        _out(f"no incidents in the last {describe_duration(args.window)}")
        return 0
    _out(f"incidents resolved in the last {describe_duration(args.window)} (open ones by age):")
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        _out("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    return 0


# -- wiring -----------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``rules check``, ``rules export``, ``incidents list`` and ``incidents mttr``."""
    rules = sub.add_parser("rules", help="check and export alert rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="COMMAND")

    check = rules_sub.add_parser("check", help="validate rule files; print every problem")
    check.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories of *.yaml files")
    check.set_defaults(func=_rules_check)

    exp = rules_sub.add_parser("export", help="write Prometheus rules (or Alertmanager routing) to stdout")
    exp.add_argument("paths", nargs="+", metavar="PATH", help="rule files or directories of *.yaml files")
    exp.add_argument("--format", choices=("prometheus", "prometheus-operator"), default="prometheus")
    exp.add_argument("--name", default="llm-sidecar-rules", help="PrometheusRule name (prometheus-operator)")
    exp.add_argument("--namespace", default=None, help="PrometheusRule namespace (prometheus-operator)")
    exp.add_argument(
        "--alertmanager",
        action="store_true",
        help="print an Alertmanager route/receivers/inhibit snippet for the notify channels instead",
    )
    exp.add_argument("--group-wait", type=_duration_arg, default=30.0, metavar="DURATION")
    exp.add_argument("--repeat-interval", type=_duration_arg, default=4 * 3600.0, metavar="DURATION")
    exp.set_defaults(func=_rules_export)

    incidents = sub.add_parser("incidents", help="list incidents and report MTTR/MTTA")
    inc_sub = incidents.add_subparsers(dest="incidents_command", required=True, metavar="COMMAND")

    lst = inc_sub.add_parser("list", help="list incidents, newest first")
    lst.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), metavar="DIR")
    lst.add_argument("--open", action="store_true", help="only incidents still open")
    lst.add_argument(
        "--since",
        type=parse_time,
        default=None,
        metavar="T",
        help="open at some point since T (ISO 8601 or 2h)",
    )
    lst.add_argument("--format", choices=("table", "json"), default="table")
    lst.set_defaults(func=_incidents_list)

    mttr = inc_sub.add_parser("mttr", help="mean time to resolve (and acknowledge) over a window")
    mttr.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), metavar="DIR")
    mttr.add_argument("--window", type=_duration_arg, default=7 * 86400.0, metavar="DURATION")
    mttr.add_argument("--by", default="", metavar="rule,severity", help="group by rule and/or severity")
    mttr.set_defaults(func=_incidents_mttr)
