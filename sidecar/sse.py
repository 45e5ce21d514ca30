"""Incremental decoder for ``text/event-stream`` bodies (server-sent events).

This module owns the byte-level framing of SSE: it turns arbitrarily split chunks of
a stream into :class:`Event` objects, following the WHATWG HTML "event stream
interpretation" rules for fields (``event``, ``data``, ``id``, ``retry``, comments)
and line endings (LF, CRLF and lone CR, with a CR at the end of one chunk and its LF
at the start of the next treated as one line ending, as httpx's ``LineDecoder`` does).

Unlike a browser, the decoder accounts for every byte: each returned event carries the
exact bytes it was decoded from (``raw``), and concatenating ``raw`` of all events from
:meth:`SSEDecoder.feed` and :meth:`SSEDecoder.flush` gives back the input exactly.
For that reason it also returns blocks a browser would not dispatch (a comment-only
block, a block with no ``data`` field, surplus blank lines at the end of the stream);
those have ``data == ""``. Extra blank lines between events belong to the ``raw`` of
the event that follows them.

Memory is bounded by ``max_event_bytes``: a block larger than that is not decoded and
:attr:`SSEDecoder.oversized` is incremented. Its bytes still come back, in data-less
events, as soon as they arrive (so a forwarding caller passes them on and the decoder
never holds more than about one limit's worth of a block).

Pure module: standard library only, no I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Event", "SSEDecoder"]

# One line ending. At the very end of the buffer a lone "\r" matches even when the
# next chunk will start with "\n"; the decoder remembers that case (_pending_cr).
_EOL = re.compile(rb"\r\n|\r|\n")
_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded server-sent event.

    ``event`` is the value of the ``event:`` field (``None`` when absent), ``data`` the
    ``data:`` lines joined with ``"\\n"`` (one leading space after the colon removed),
    ``raw`` the exact bytes of the event as received, terminating blank line included.
    """

    event: str | None
    data: str
    raw: bytes


class SSEDecoder:
    """Turns a stream of byte chunks into :class:`Event` objects, one block at a time.

    ``feed`` returns the events completed by a chunk; ``flush`` returns what is left at
    the end of the stream. Work per chunk is one regular-expression search per line
    (no per-byte Python loop; each byte is searched once however the stream is split)
    and the pending block is the only state kept.
    """

    __slots__ = (
        "_buf",
        "_data",
        "_discarding",
        "_event",
        "_first_line",
        "_in_block",
        "_line_carry",
        "_max",
        "_pending_cr",
        "_pos",
        "_scan",
        "oversized",
    )

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes not yet handed out in an event
        self._pos = 0  # start of the first line in _buf not yet decoded
        self._scan = 0  # where to search for the next line ending (_buf[_pos:_scan] has none)
        self._pending_cr = False  # the last line ended with a "\r" at the end of the buffer
        self._in_block = False  # a non-blank line of the current block was seen
        self._line_carry = False  # bytes of the current line were already handed out (oversized)
        self._discarding = False  # the current block exceeded max_event_bytes
        self._first_line = True  # for the optional UTF-8 BOM at the start of the stream
        self._event: str | None = None
        self._data: list[bytes] = []
        #: Number of events discarded because they exceeded ``max_event_bytes``.
        self.oversized = 0

    def feed(self, chunk: bytes) -> list[Event]:
        """Add the next chunk of the stream; return the events it completed, in order."""
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        pos = self._pos
        if self._pending_cr:
            # The "\r" that ended the previous chunk and this "\n" are one line ending.
            self._pending_cr = False
            if buf[pos] == _LF:
                pos += 1
        events: list[Event] = []
        start = 0  # start of the current event's raw bytes in buf
        size = len(buf)
        search = _EOL.search
        # A long line arriving in many chunks is searched once, not once per chunk.
        scan = max(pos, self._scan)
        while (match := search(buf, scan)) is not None:
            eol, nxt = match.span()
            if nxt == size and buf[eol] == _CR and nxt - eol == 1:
                self._pending_cr = True
            if eol == pos and not self._line_carry:
                if self._in_block:
                    if not self._discarding and nxt - start > self._max:
                        self.oversized += 1  # arrived whole in one chunk: still not decoded
                        self._discarding = True
                    events.append(self._dispatch(bytes(buf[start:nxt])))
                    start = nxt
                # else: a blank line before any field; it travels with the next event.
            else:
                self._line_carry = False
                self._in_block = True
                if not self._discarding:
                    self._field(buf[pos:eol])
            pos = scan = nxt
        if self._discarding or size - start > self._max:
            if not self._discarding:
                self._discarding = True
                self.oversized += 1
                self._event = None
                self._data = []
            # Hand the bytes out now so that memory stays bounded; they are not decoded.
            events.append(Event(None, "", bytes(buf[start:])))
            self._line_carry = pos < size
            start = pos = size
        del buf[:start]
        self._pos = pos - start
        self._scan = size - start
        return events

    def flush(self) -> list[Event]:
        """End of stream: return the trailing event that had no blank line after it, if any.

        Its ``raw`` is all the remaining bytes. An unterminated last line is decoded as
        a field line, so a cut event may carry partial ``data``.
        """
        buf = self._buf
        if not buf:
            self._reset_block()
            return []
        if self._pos < len(buf) and not self._discarding:
            self._in_block = True
            self._field(buf[self._pos :])
        event = self._dispatch(bytes(buf))
        buf.clear()
        self._pos = self._scan = 0
        self._pending_cr = False
        self._line_carry = False
        self._reset_block()
        return [event]

    def _field(self, line: bytearray) -> None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if line.startswith(b"data"):
            if line.startswith(b"data: "):
                self._data.append(bytes(line[6:]))
                return
            if line.startswith(b"data:"):
                self._data.append(bytes(line[5:]))
                return
        colon = line.find(b":")
        if colon == 0:
            return  # comment
        if colon < 0:
            name, value = bytes(line), b""
        else:
            name = bytes(line[:colon])
            value = bytes(line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :])
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        # "id", "retry" and unknown fields carry nothing the sidecar uses.

    def _dispatch(self, raw: bytes) -> Event:
        if self._discarding:
            event = Event(None, "", raw)
        else:
            data = b"\n".join(self._data).decode("utf-8", "replace") if self._data else ""
            event = Event(self._event, data, raw)
        self._reset_block()
        return event

    def _reset_block(self) -> None:
        self._event = None
        self._data = []
        self._in_block = False
        self._discarding = False
