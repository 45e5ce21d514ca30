"""The exception hierarchy of the sidecar.

::

    SidecarError
    ├── ConfigError          invalid config, pricing or rule files; carries every Problem
    └── ProxyError           a failure inside the sidecar while forwarding a call

This module is pure: it imports nothing outside the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in a file, with its location (1-based line and column)."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SidecarError(Exception):
    """Base class of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """A config, pricing or rule file is invalid; ``problems`` lists all that was found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid configuration")


class ProxyError(SidecarError):
    """A failure inside the sidecar while forwarding a call (not the upstream's fault)."""
