"""The ledger's append-only journal: rows that could not go to the database yet.

A JSON line per row (``{"v": 1, "row": {...}}``), appended with ``O_APPEND`` in
whole lines. Replay renames the file to ``<name>.replaying`` (so new appends start
a fresh file), inserts its rows (a row already in the database is skipped by its
``call_id``), and only then deletes it; a crash at any point leaves either file in
place to be replayed again on the next start, which inserts nothing twice.

Durability (the fsync policy): with ``fsync=True`` every append is followed by
``fsync`` of the file, and a new or renamed file by ``fsync`` of the directory, so
a spilled row survives a power loss as soon as :meth:`Journal.append` returns.
With ``fsync=False`` it survives a crash of the process (the data is in the
kernel's page cache) but not necessarily of the machine.

A line cut short by a kill in the middle of a write is skipped on replay (and
counted); the next append starts on a new line so it never glues onto a torn one.

Blocking file I/O: called from the ledger's threads only, never the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from sidecar.ledger._schema import COLUMNS, Row

__all__ = ["Journal", "journal_line", "parse_journal_line"]

_VERSION = 1


def journal_line(row: Row) -> str:
    """One journal line for a row (no newline)."""
    return json.dumps({"v": _VERSION, "row": row}, ensure_ascii=False, separators=(",", ":"))


def parse_journal_line(line: str) -> Row | None:
    """The row of a journal line, or ``None`` for a torn or foreign line."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("v") != _VERSION or not isinstance(data.get("row"), dict):
        return None
    row: dict[str, object] = data["row"]
    if not isinstance(row.get("call_id"), str) or not isinstance(row.get("epoch"), int | float):
        return None
    return {column: row.get(column) for column in COLUMNS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """``data_dir/ledger.journal`` and, during a replay, ``ledger.journal.replaying``.

    Thread-safe: one lock guards the file descriptor, appends and the rename.
    """

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.replaying_path = path.with_name(path.name + ".replaying")
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None

    def _open(self) -> int:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":
                        os.write(fd, b"\n")  # never append onto a torn line
            if created and self.fsync:
                _fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        return fd

    def append(self, lines: Sequence[str]) -> None:
        """Append lines (whole, in one write where the OS allows); raises ``OSError`` on failure."""
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = self._open()
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                if self.fsync:
                    os.fsync(self._fd)
            except OSError:
                self._close_locked()
                raise

    def _close_locked(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the file (a later append reopens it)."""
        with self._lock:
            self._close_locked()

    def pending(self) -> bool:
        """Whether rows wait for replay (either file is present and not empty)."""
        for path in (self.replaying_path, self.path):
            with contextlib.suppress(OSError):
                if path.stat().st_size > 0:
                    return True
        return False

    def begin_replay(self) -> Path | None:
        """The file to replay next: a replay left unfinished, else the journal moved aside."""
        with self._lock:
            if self.replaying_path.exists():
                return self.replaying_path
            try:
                if self.path.stat().st_size == 0:
                    return None
            except FileNotFoundError:
                return None
            self._close_locked()
            os.replace(self.path, self.replaying_path)
            if self.fsync:
                _fsync_dir(self.path.parent)
            return self.replaying_path

    def finish_replay(self, path: Path) -> None:
        """Delete a replayed file (its rows are in the database)."""
        with self._lock:
            path.unlink(missing_ok=True)
            if self.fsync:
                _fsync_dir(path.parent)

    @staticmethod
    def read(path: Path) -> Iterator[Row | None]:
        """The rows of a journal file in order; ``None`` for each unreadable line."""
        with open(path, encoding="utf-8", errors="replace") as file:
            for line in file:
                if line.strip():
                    yield parse_journal_line(line)
