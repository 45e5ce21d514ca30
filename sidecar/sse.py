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

Framing and decoding are separate steps, because a caller usually needs the fields of
only a few events: :meth:`SSEDecoder.feed` only finds where each event ends (one
``bytes.find`` per event in a stream without CRs, no per-line Python work), and an
event's fields are decoded from its ``raw`` the first time :attr:`Event.event` or
:attr:`Event.data` is read. A caller that can tell from ``raw`` alone that an event
carries nothing it needs never pays for decoding it.

Memory is bounded by ``max_event_bytes``: a block larger than that is not decoded and
:attr:`SSEDecoder.oversized` is incremented. Its bytes still come back, in data-less
events, as soon as they arrive (so a forwarding caller passes them on and the decoder
never holds more than about one limit's worth of a block).

Pure module: standard library only, no I/O, no clock.
"""

from __future__ import annotations

import re

__all__ = ["Event", "SSEDecoder"]

# One line ending. At the very end of the buffer a lone "\r" matches even when the next
# chunk will start with "\n"; an event whose blank line ends that way waits for the next
# chunk (see _end_of_event), so "\r" + "\n" is one line ending, as the WHATWG rules ask.
_EOL = re.compile(rb"\r\n|\r|\n")
# Blank lines before an event's first field line.
_LEADING = re.compile(rb"[\r\n]*")
# The longest event end ("\r\n\r\n") minus one: how far back a search resumes in the next chunk.
_RESUME = 3
_CR = 0x0D
_LF = 0x0A
_BOM = b"\xef\xbb\xbf"
# Event._todo: what is left to do before its fields can be read.
_DECODED = 0
_DECODE = 1
_BOM_DECODE = 2


class Event:
    """One server-sent event.

    ``raw`` is the exact bytes of the event as received, terminating blank line
    included. ``event`` is the value of the ``event:`` field (``None`` when absent),
    ``data`` the ``data:`` lines joined with ``"\\n"`` (one leading space after the
    colon removed); both are decoded from ``raw`` on first access.
    """

    __slots__ = ("_data", "_event", "_todo", "raw")

    def __init__(self, raw: bytes, decode: bool = True, bom: bool = False) -> None:
        self.raw = raw
        if decode:
            # Fields are decoded on first access (dropping a UTF-8 BOM when the event
            # starts the stream).
            self._todo = _BOM_DECODE if bom else _DECODE
        else:  # a data-less event (oversized, or only blank lines)
            self._todo = _DECODED
            self._event: str | None = None
            self._data = ""

    @property
    def event(self) -> str | None:
        """The ``event:`` field (the last one wins), or None."""
        if self._todo:
            self._decode()
        return self._event

    @property
    def data(self) -> str:
        """The ``data:`` lines joined with newlines (invalid UTF-8 replaced), or ``""``."""
        if self._todo:
            self._decode()
        return self._data

    def __repr__(self) -> str:
        return f"Event(event={self.event!r}, data={self.data!r}, raw={self.raw!r})"

    def _decode(self) -> None:
        raw = self.raw
        if self._todo == _DECODE and raw.endswith(b"\n\n") and _CR not in raw:
            # The usual event, one "data: " line, with or without an "event: " line before it.
            start = 0
            kind: str | None = None
            if raw.startswith(b"event: "):
                start = raw.find(b"\n") + 1
                kind = raw[7 : start - 1].decode("utf-8", "replace")
            if raw.startswith(b"data: ", start) and raw.find(b"\n", start) == len(raw) - 2:
                self._event = kind
                self._data = raw[start + 6 : -2].decode("utf-8", "replace")
                self._todo = _DECODED
                return
        lines = _EOL.split(raw) if _CR in raw else raw.split(b"\n")
        event: str | None = None
        data: list[bytes] = []
        bom = self._todo == _BOM_DECODE
        for line in lines:
            if not line:
                continue  # a blank line: before the first field, or the terminating one
            if bom:
                bom = False
                if line.startswith(_BOM):
                    line = line[len(_BOM) :]
            if line.startswith(b"data"):
                if line.startswith(b"data: "):
                    data.append(line[6:])
                    continue
                if line.startswith(b"data:"):
                    data.append(line[5:])
                    continue
            colon = line.find(b":")
            if colon == 0:
                continue  # comment
            if colon < 0:
                name, value = line, b""
            else:
                name = line[:colon]
                value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode("utf-8", "replace")
            # "id", "retry" and unknown fields carry nothing the sidecar uses.
        self._event = event
        self._data = b"\n".join(data).decode("utf-8", "replace") if data else ""
        self._todo = _DECODED


def _end_of_event(data: bytes | bytearray, scan: int, crlf: bool) -> int:
    """The end of the first blank line that follows a line ending at or after ``scan``, or -1.

    For data holding a CR. If ``scan`` is at the LF of a CRLF pair, the LF is taken as a
    line ending of its own; that only matters when a line ending follows it, and then
    the event ends at the same place either way.
    """
    search = _EOL.search
    match = _EOL.match
    size = len(data)
    while (found := search(data, scan)) is not None:
        scan = found.end()
        blank = match(data, scan)
        if blank is not None:
            end = blank.end()
            if crlf and end == size and data[end - 1] == _CR:
                # A CRLF stream whose blank line ends in a CR at the very end of what arrived:
                # its LF is most likely the next chunk's first byte, and it belongs to this
                # event. Wait for it (or for flush), so the events, and the bytes a client
                # gets, do not depend on where the stream was split. A stream of lone CRs
                # (``crlf`` False) is never held back.
                return -1
            return end
    return -1


class SSEDecoder:
    """Turns a stream of byte chunks into :class:`Event` objects, one block at a time.

    ``feed`` returns the events completed by a chunk; ``flush`` returns what is left at
    the end of the stream. Finding an event's end is one ``bytes.find`` for streams
    without a CR (a regular-expression search per line for those with one), and each
    byte is searched about once however the stream is split: a search resumes where the
    last one stopped. A chunk holding whole events is cut into them without being copied
    into the buffer; only an incomplete trailing event is kept. Fields are decoded
    lazily (see :class:`Event`).
    """

    __slots__ = ("_buf", "_cr", "_crlf", "_discarding", "_first", "_lead", "_max", "_scan", "oversized")

    def __init__(self, max_event_bytes: int = 8 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes not yet handed out in an event
        self._cr = False  # _buf may hold a "\r" (then line endings need the slow search)
        self._crlf = False  # the stream has used CRLF line endings
        self._lead = -1  # end of the pending event's leading blank lines in _buf (-1: not known)
        self._scan = 0  # where to resume searching for the pending event's end
        self._discarding = False  # the pending block exceeded max_event_bytes
        self._first = True  # no event with a field line yet (for the optional UTF-8 BOM)
        #: Number of events discarded because they exceeded ``max_event_bytes``.
        self.oversized = 0

    def idle(self) -> bool:
        """Whether the next chunk starts on an event boundary (nothing is pending)."""
        return not self._buf and not self._discarding

    def feed(self, chunk: bytes) -> list[Event]:
        """Add the next chunk of the stream; return the events it completed, in order."""
        if not chunk:
            return []
        buf = self._buf
        cr = _CR in chunk
        if not (buf or cr or self._discarding) and chunk[0] != _LF:
            # The usual case: the chunk is exactly one whole event, nothing pending.
            size = len(chunk)
            if chunk.find(b"\n\n") == size - 2 >= 0 and size <= self._max:
                event = Event(chunk, bom=self._first)
                self._first = False
                return [event]
        data: bytes | bytearray
        if buf:
            buf += chunk
            data = buf
            cr = cr or self._cr
        else:
            data = chunk  # the usual case: nothing pending, cut the chunk itself
        size = len(data)
        events: list[Event] = []
        start = 0  # start of the pending event's raw bytes in data
        scan = self._scan
        lead = self._lead
        while start < size:
            if lead < 0 and not self._discarding:
                first = data[start]
                lead = start
                if first in (_LF, _CR):
                    leading = _LEADING.match(data, start)
                    lead = leading.end() if leading is not None else start
                if lead == size:  # only blank lines so far: they travel with the next event
                    lead = -1
                    break
                scan = lead
            if cr:
                if not self._crlf and b"\r\n" in data:
                    self._crlf = True
                end = _end_of_event(data, scan, self._crlf)
                if end < 0:
                    break
            else:
                end = data.find(b"\n\n", scan)
                if end < 0:
                    break
                end += 2
            if type(data) is bytes:
                raw = data if start == 0 and end == size else data[start:end]
            else:
                raw = bytes(data[start:end])
            if self._discarding:
                events.append(Event(raw, decode=False))
                self._discarding = False
            elif end - start > self._max:
                self.oversized += 1  # arrived whole: still not decoded
                events.append(Event(raw, decode=False))
            else:
                events.append(Event(raw, bom=self._first))
            self._first = False
            start = scan = end
            lead = -1
        if start < size:
            if lead < 0 and not self._discarding:
                if size - start > self._max:
                    # Nothing but blank lines, more than the limit: hand them out as they are.
                    events.append(Event(bytes(data[start:]), decode=False))
                    start = size
            elif self._discarding or size - start > self._max:
                if not self._discarding:
                    self._discarding = True
                    self.oversized += 1
                # Hand the bytes out now so that memory stays bounded; they are not decoded.
                # The last few stay: with the next chunk they may end the block.
                keep = size - _RESUME
                if keep > start:
                    events.append(Event(bytes(data[start:keep]), decode=False))
                    start = keep
                scan = start
                lead = -1
            else:
                if scan < size - _RESUME:
                    scan = size - _RESUME
        if data is buf:
            del buf[:start]
        elif start < size:
            buf += data[start:]
        self._cr = cr and bool(buf)
        self._scan = scan - start if scan > start else 0
        self._lead = lead - start if lead >= 0 else -1
        return events

    def flush(self) -> list[Event]:
        """End of stream: return the trailing event that had no blank line after it, if any.

        Its ``raw`` is all the remaining bytes. An unterminated last line is decoded as
        a field line, so a cut event may carry partial ``data``.
        """
        buf = self._buf
        discarding = self._discarding
        self._lead = -1
        self._scan = 0
        self._discarding = False
        self._cr = False
        if not buf:
            return []
        raw = bytes(buf)
        buf.clear()
        if discarding:
            return [Event(raw, decode=False)]
        event = Event(raw, bom=self._first)
        self._first = False
        return [event]
