"""Bytes a protocol receives for one reader: the buffer under the server's request bodies
and the upstream client's response bodies.

Pieces are kept in arrival order and taken all at once; one reader waits on a future;
past a high-water mark the owner stops reading its transport until the reader has taken
what waits. Standard library only.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["PieceBuffer"]


class PieceBuffer:
    """Base of a body reader: subclasses feed with :meth:`_append`, read with :meth:`_take`
    and resume their transport in :meth:`_resume`."""

    __slots__ = ("_error", "_paused", "_pieces", "_size", "_waiter", "done")

    def __init__(self) -> None:
        self._pieces: deque[bytes] = deque()
        self._size = 0  # bytes waiting in _pieces
        self._paused = False  # the owner stopped reading because of this buffer
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.done = False  # the whole body has arrived

    def _append(self, data: bytes, high_water: int) -> bool:
        """Keep ``data`` and wake the reader; True when the owner should pause reading now."""
        self._pieces.append(data)
        self._size += len(data)
        pause = self._size > high_water and not self._paused
        if pause:
            self._paused = True
        self._wake()
        return pause

    def _take(self) -> bytes:
        """Everything waiting, as one piece (call only when something waits)."""
        pieces = self._pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            self._resume()
        return data

    def _resume(self) -> None:
        """Start reading the transport again (the buffer was drained after a pause)."""

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
