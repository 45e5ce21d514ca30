"""The ``keys`` subcommands of ``llm-sidecar``: make, hash and check virtual keys.

``sidecar.cli`` calls :func:`add_parser` with its subparsers; the ``keys`` parser sets
``func`` to :func:`run`, which returns the exit status. Results go to ``sys.stdout``,
problems to ``sys.stderr``, through ``write`` (never ``print``):

- ``keys new --tenant NAME [--name NAME] [--expires TIME] [--models a,b]``: a fresh
  key, shown once, and the entry for the keys file (its SHA-256, never the key).
- ``keys hash --tenant NAME [...]``: the entry for an existing key read from stdin
  (not echoed on a terminal), for moving keys already handed out under the sidecar.
  Only the entry goes to stdout, so ``... >> keys.yaml`` appends it.
- ``keys check FILE``: validate a keys file; every problem as ``file:line:col: field: message``.

Exit status: 0 done, 1 problems in a checked file, 2 wrong arguments.
"""

from __future__ import annotations

import argparse
import getpass
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError
from sidecar.gateway.keys import (
    VERSION,
    check_name,
    check_tenant,
    format_expires,
    hash_key,
    new_key,
    parse_expires,
    parse_keys_file,
)

__all__ = ["add_parser", "run"]

#: Below this many characters a key brought in with ``keys hash`` draws a warning.
MIN_KEY_LENGTH = 32


class UsageError(Exception):
    """Wrong arguments: the message goes to stderr and the exit status is 2."""


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys new``, ``keys hash`` and ``keys check``."""
    keys = subparsers.add_parser("keys", help="make, hash and check virtual keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def entry_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--tenant", required=True, metavar="NAME", help="the tenant the key's calls count under"
        )
        p.add_argument("--name", metavar="NAME", help="the key's name (default: TENANT-YYYYMMDD-xxxx)")
        p.add_argument(
            "--expires",
            metavar="TIME",
            help="RFC 3339 time (2025-12-31T23:59:59Z), date (= 00:00 UTC), or a duration from now (90d)",
        )
        p.add_argument(
            "--models", metavar="A,B", help="allowed models, comma-separated fnmatch globs (gpt-4o*)"
        )
        p.add_argument(
            "--trust-tenant-header",
            action="store_true",
            help="believe the caller's own tenant header (a backend serving many customers)",
        )

    new = keys_sub.add_parser("new", help="make a key: print it once, with its keys-file entry")
    entry_options(new)
    hashed = keys_sub.add_parser("hash", help="the keys-file entry for an existing key read from stdin")
    entry_options(hashed)
    check = keys_sub.add_parser("check", help="validate a keys file; print every problem")
    check.add_argument("file", metavar="FILE")
    keys.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run one ``keys`` subcommand; the exit status."""
    try:
        if args.keys_command == "new":
            return _new(args)
        if args.keys_command == "hash":
            return _hash(args)
        return _check(args)
    except UsageError as exc:
        _err(f"llm-sidecar keys {args.keys_command}: {exc}")
        return 2


# -- the entry ------------------------------------------------------------------------


def _default_name(tenant: str, now: float) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tenant).strip("-._")[:40] or "key"
    day = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
    return f"{slug}-{day}-{secrets.token_hex(2)}"


def _expires(text: str, now: float) -> float:
    try:
        when = now + parse_duration(text)
    except ValueError:
        try:
            when = parse_expires(text)
        except ValueError as exc:
            raise UsageError(f"--expires: {exc}, or a duration such as 90d") from None
    if when <= now:
        raise UsageError(f"--expires: {format_expires(when)} is already past")
    return when


def _entry_line(args: argparse.Namespace, digest: str, now: float) -> str:
    """The keys-file list item for ``digest`` (one line), checked by the real parser."""
    tenant: str = args.tenant
    if (why := check_tenant(tenant)) is not None:
        raise UsageError(f"--tenant: {why}")
    name: str = args.name if args.name is not None else _default_name(tenant, now)
    if (why := check_name(name)) is not None:
        raise UsageError(f"--name: {why}")
    entry: dict[str, object] = {"name": name, "tenant": tenant, "sha256": digest}
    if args.models is not None:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise UsageError("--models: name at least one model (leave it out to allow every model)")
        entry["models"] = models
    if args.expires is not None:
        entry["expires"] = format_expires(_expires(args.expires, now))
    if args.trust_tenant_header:
        entry["trust_tenant_header"] = True
    flow = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    line = f"  - {flow}"
    # The line must load as written: the parser, not this command, is the judge.
    try:
        parse_keys_file(f"version: {VERSION}\nkeys:\n{line}\n", "<entry>")
    except ConfigError as exc:  # pragma: no cover - the checks above mirror the parser's
        raise UsageError("; ".join(p.message for p in exc.problems)) from None
    return line


# -- subcommands ------------------------------------------------------------------------


def _new(args: argparse.Namespace) -> int:
    key, digest = new_key()
    line = _entry_line(args, digest, time.time())
    _out(f"New key for tenant {args.tenant}. It is shown only this once: the sidecar keeps only its hash.")
    _out("")
    _out(key)
    _out("")
    _out("Add this entry to the keys file, under keys: (it holds the key's SHA-256, not the key):")
    _out("")
    _out(line)
    return 0


def _read_key() -> str:
    text = getpass.getpass("key (not echoed): ") if sys.stdin.isatty() else sys.stdin.read()
    key = text.strip()
    if not key:
        raise UsageError("no key on stdin")
    if "\n" in key or "\r" in key:
        raise UsageError("one key per call: stdin holds more than one line")
    return key


def _hash(args: argparse.Namespace) -> int:
    key = _read_key()
    line = _entry_line(args, hash_key(key), time.time())
    if len(key) < MIN_KEY_LENGTH:
        _err(
            f"warning: the key has fewer than {MIN_KEY_LENGTH} characters and may be guessed; "
            "prefer keys from llm-sidecar keys new"
        )
    _err("Add this entry to the keys file, under keys:")
    _out(line)
    return 0


def _check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        _err(f"{path}:1:1: cannot read the keys file: {reason}")
        return 1
    try:
        parsed = parse_keys_file(text, str(path))
    except ConfigError as exc:
        for problem in exc.problems:
            _err(str(problem))
        return 1
    now = time.time()
    expired = sum(1 for e in parsed.entries if e.expires is not None and e.expires <= now)
    note = f", {expired} expired" if expired else ""
    _out(f"{path}: ok ({len(parsed.entries)} key{'' if len(parsed.entries) == 1 else 's'}{note})")
    return 0
