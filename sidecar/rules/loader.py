"""Reading rule files from disk: the only part of ``sidecar.rules`` that opens files.

A path may be a file or a directory (its ``*.yaml`` and ``*.yml`` files, sorted).
Every file is parsed and the set checked as one (:func:`sidecar.rules.spec.load`), so
``rules check``, ``rules export`` and the sidecar's start and reload all report the
same problems. :func:`check_channels` adds what only the sidecar knows: the
notification channels its config defines.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from sidecar.errors import ConfigError, Problem
from sidecar.rules import spec
from sidecar.rules.model import RuleSet

__all__ = ["check_channels", "expand", "load_files", "load_or_raise"]


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files named by ``paths``: files as given, directories as their sorted YAML files."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            out.append(path)
    return out


def load_files(paths: Sequence[Path]) -> tuple[RuleSet, list[Problem]]:
    """Read and parse rule files as one set: the rules and every problem of every file."""
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    files = expand(paths)
    for path in files:
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problems.append(Problem(str(path), 1, 1, "", f"cannot read the rule file: {reason}"))
    for path in paths:
        if path.is_dir() and not any(f.parent == path for f in files):
            problems.append(Problem(str(path), 1, 1, "", "no *.yaml or *.yml rule files in this directory"))
    rules, found = spec.load(sources)
    return rules, problems + found


def load_or_raise(paths: Sequence[Path], channels: Collection[str] | None = None) -> RuleSet:
    """The rules of ``paths``; :class:`ConfigError` with every problem when there is any.

    With ``channels`` (the notification channels the config defines), a rule naming
    another channel is a problem too.
    """
    rules, problems = load_files(paths)
    if channels is not None:
        problems += check_channels(rules, channels)
    if problems:
        raise ConfigError(problems)
    return rules


def check_channels(rules: RuleSet, channels: Collection[str]) -> list[Problem]:
    """A problem for each rule naming a notification channel the config does not define."""
    problems: list[Problem] = []
    for rule in rules:
        for severity, names in rule.notify:
            for name in names:
                if name not in channels:
                    where = rule.location
                    known = ", ".join(sorted(channels)) or "none defined"
                    field = "notify" if severity == "*" else f"notify.{severity}"
                    problems.append(
                        Problem(
                            where.file,
                            where.line,
                            where.column,
                            f"{rule.name}.{field}",
                            f"unknown notification channel {name!r} (channels: {known})",
                        )
                    )
    return problems
