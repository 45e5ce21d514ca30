"""Value types shared by the gateway modules. Pure: standard library and yamlspec only."""

from __future__ import annotations

from dataclasses import dataclass

from yaml.nodes import Node

from sidecar.yamlspec import Reader, join

__all__ = ["LIMIT_KEYS", "Limits", "parse_limits"]

#: The keys of a limits mapping, as written in the config and the keys file.
LIMIT_KEYS = ("rpm", "tpm", "concurrency")


@dataclass(frozen=True, slots=True)
class Limits:
    """Requests per minute, tokens per minute and concurrent calls; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def empty(self) -> bool:
        """True when no limit is set."""
        return self.rpm is None and self.tpm is None and self.concurrency is None


def parse_limits(r: Reader, node: Node, path: str) -> Limits:
    """Read ``{rpm: 600, tpm: 100000, concurrency: 8}`` (every key optional, each >= 1)."""
    m = r.mapping(node, path, LIMIT_KEYS, what="a mapping of limits (rpm, tpm, concurrency)")
    if m is None:
        return Limits()
    return Limits(
        rpm=r.integer(m.get("rpm"), join(path, "rpm"), minimum=1),
        tpm=r.integer(m.get("tpm"), join(path, "tpm"), minimum=1),
        concurrency=r.integer(m.get("concurrency"), join(path, "concurrency"), minimum=1),
    )
