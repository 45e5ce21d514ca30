"""The ``ledger`` config section.

Pure module: the standard library and :mod:`sidecar.yamlspec` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from yaml.nodes import Node

from sidecar.yamlspec import Reader, join

__all__ = ["LedgerSettings", "parse_ledger"]


@dataclass(frozen=True)
class LedgerSettings:
    """How the usage ledger writes (durations in seconds).

    ``queue_size`` bounds the records waiting for the database in memory (past it
    they go to the journal); ``batch_size`` rows are written per transaction, at
    least every ``flush_interval`` seconds, which bounds what a SIGKILL can lose.
    ``retention`` (``None``: keep every row) is the age past which rows are pruned,
    checked every ``prune_interval``. ``synchronous`` is SQLite's ``full`` (each
    commit survives a power loss) or ``normal`` (survives a crash of the process;
    the last commits may be lost on power loss). ``journal_fsync`` syncs the
    journal after each append. ``max_backlog`` bounds the records held in memory
    while neither the database nor the journal can be written; past it they are
    counted as lost.
    """

    enabled: bool = True
    queue_size: int = 10_000
    batch_size: int = 500
    flush_interval: float = 0.2
    retention: float | None = None
    prune_interval: float = 3600.0
    synchronous: str = "full"
    journal_fsync: bool = True
    max_backlog: int = 100_000
    busy_timeout: float = 5.0


_KEYS = (
    "enabled",
    "queue_size",
    "batch_size",
    "flush_interval",
    "retention",
    "prune_interval",
    "synchronous",
    "journal_fsync",
    "max_backlog",
    "busy_timeout",
)


def parse_ledger(r: Reader, node: Node, path: str, ctx: object = None) -> LedgerSettings:
    """Parse the ``ledger`` section, e.g. ``ledger: {retention: 400d, queue_size: 10000}``.

    Every problem is recorded on ``r`` with its location and the value falls back
    to its default. ``retention: 0`` (or absent) keeps every row. ``ctx`` is
    accepted for the config loader's section signature.
    """
    d = LedgerSettings()
    m = r.mapping(node, path, _KEYS)
    if m is None:
        return d

    def at(key: str) -> tuple[Node | None, str]:
        return m.get(key), join(path, key)

    retention = r.duration(*at("retention"))
    if retention is not None and 0 < retention < 3600:
        r.problem(m.get("retention"), join(path, "retention"), "must be at least 1h (or 0 to keep every row)")
        retention = None
    return LedgerSettings(
        enabled=r.boolean(*at("enabled"), d.enabled),
        queue_size=r.integer(*at("queue_size"), d.queue_size, minimum=1),
        batch_size=r.integer(*at("batch_size"), d.batch_size, minimum=1),
        flush_interval=r.duration(*at("flush_interval"), d.flush_interval, positive=True),
        retention=retention or None,
        prune_interval=r.duration(*at("prune_interval"), d.prune_interval, minimum=1.0),
        synchronous=r.string(*at("synchronous"), d.synchronous, choices=("full", "normal")),
        journal_fsync=r.boolean(*at("journal_fsync"), d.journal_fsync),
        max_backlog=r.integer(*at("max_backlog"), d.max_backlog, minimum=1),
        busy_timeout=r.duration(*at("busy_timeout"), d.busy_timeout, positive=True),
    )
