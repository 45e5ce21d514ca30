"""The contract every provider adapter implements, and the helpers they share.

This module owns the types that cross the adapter boundary (:class:`RequestInfo`,
:class:`ResponseInfo`, :class:`PromptText`, the :class:`Shape` protocol) and the
:class:`StreamObserver` base class, which runs the SSE decoder, forwards or strips
events and leaves the per-provider meaning of each event to a subclass.

JSON from clients and upstreams is untrusted: the helpers here read it with type
checks instead of indexing, so that parsing never raises on an unexpected shape.

Pure module: standard library and :mod:`sidecar.model` / :mod:`sidecar.sse` only, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from sidecar.model import Usage
from sidecar.sse import Event, SSEDecoder

#: Generated text kept per response for local estimation (characters).
MAX_OUTPUT_CHARS = 1_000_000
#: Bytes of a stream's content events kept per response to rebuild its text lazily.
#: Past this, the text of later events is extracted as they arrive (see
#: :class:`StreamObserver`), so memory per stream stays bounded.
MAX_KEPT_BYTES = 256 * 1024
#: Bytes a forwarded stream's observer gathers, once content was seen, before it reads them
#: (see :meth:`StreamObserver.feed`); :meth:`StreamObserver.close` reads the rest.
DEFERRED_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the sidecar needs to know about a client request before forwarding it.

    ``wants_usage`` is False only for an OpenAI chat/completions streaming request that
    did not ask for ``stream_options.include_usage`` (so no usage will be reported).
    ``max_tokens`` is the request's output cap (see :func:`output_cap`), for the token rate
    limits' up-front charge, so the body is parsed once.
    """

    model: str | None
    stream: bool
    wants_usage: bool
    max_tokens: int | None = None


#: The :class:`RequestInfo` of a body that is not a JSON object.
UNPARSED_REQUEST = RequestInfo(None, False, True)

#: Request keys that cap the output, in the order they are looked up: OpenAI chat's current
#: and legacy names, the Responses API's, and Anthropic's ``max_tokens``.
OUTPUT_CAP_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def output_cap(request: dict[str, object]) -> int | None:
    """The request's output cap: the first of :data:`OUTPUT_CAP_KEYS` that is a positive integer."""
    for key in OUTPUT_CAP_KEYS:
        value = request.get(key)
        if type(value) is int and value > 0:
            return value
    return None


@dataclass(frozen=True, slots=True)
class PromptText:
    """Prompt content to estimate input tokens from when the upstream reports none.

    ``text`` is every piece of prompt text joined with newlines (messages, system
    prompt, tool definitions as JSON, ...); ``token_ids`` counts prompt tokens that the
    client sent as token-id arrays (they need no tokenizer).
    """

    text: str
    token_ids: int = 0


@dataclass(frozen=True, slots=True)
class ResponseInfo:
    """What the upstream reported about one response (stream or JSON body).

    ``usage`` holds reported counts only (``None`` where not reported). ``complete``
    is True when a stream's terminal event was seen (for a JSON body: when it parsed).
    ``text`` is the generated text seen, capped at :data:`MAX_OUTPUT_CHARS`, or (for a
    stream) a function that builds it from the events kept: the text is needed only
    when the upstream reported no output tokens, so it is built then, by whoever needs
    it (the estimator thread), never on the request path. :attr:`output_text` gives
    it either way. ``malformed`` is True when JSON that could not be parsed was seen.
    """

    usage: Usage
    model: str | None
    response_id: str | None
    finish_reasons: tuple[str, ...]
    service_tier: str | None
    complete: bool
    text: str | Callable[[], str]
    malformed: bool

    @property
    def output_text(self) -> str:
        """The generated text (built on first use for a stream; blocking work, so off the loop)."""
        text = self.text
        return text if isinstance(text, str) else text()


#: The :class:`ResponseInfo` of a body that is not a JSON object.
UNPARSED_RESPONSE = ResponseInfo(Usage(), None, None, (), None, False, "", True)


class StreamObserver:
    """Watches one streamed response: usage, model, content timing, optional stripping.

    Feed it the decompressed body bytes in arrival order. With ``strip_usage_chunk``
    False, :meth:`feed` returns its argument unchanged (the proxy forwards the upstream
    bytes itself). With it True, :meth:`feed` returns the raw bytes of the complete
    events it has seen, minus any event the subclass marks as a usage-only chunk, and
    holds an incomplete trailing event until it completes or :meth:`close` is called.

    :attr:`saw_content` turns True at the first event carrying generated content (the
    proxy reads it after each :meth:`feed` to time the first token).

    Work per event on the request path is kept to what the record needs. A subclass
    parses the JSON of the events that can carry usage, a finish reason, the model or
    the first content, and of any event it cannot classify from its raw bytes; once
    content was seen, a content event that is one well-formed ``data:`` line with
    nothing else of interest (checked with a few byte searches) is not parsed at all,
    and a chunk that brings many events at once (a whole stream, when the sidecar is
    busy) has its runs of such events kept whole, without being cut into events.
    The generated text is not extracted on the way either: content events are kept
    (:meth:`_keep`, up to :data:`MAX_KEPT_BYTES` per stream, their text extracted as
    they arrive past that) and :meth:`_text_of` runs over them when
    :attr:`ResponseInfo.output_text` is first read. An event that is not parsed is not
    checked for JSON errors beyond its shape, so ``malformed`` reports the events that
    were parsed.
    """

    #: The bytes that open every content-only event this stream's observer skips unparsed
    #: (``data: {`` for chat chunks), for the chunk fast path of :meth:`feed`; ``None``: none.
    plain_prefix: bytes | None = None
    #: Finds, in an event's bytes, a key that makes it worth parsing (with ``plain_prefix``).
    needs_parse: KeyFinder | None = None

    def __init__(self, strip_usage_chunk: bool = False) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        #: True from the first event that carries generated content on.
        self.saw_content = False
        self._decoder = SSEDecoder()
        self._closed = False
        self._usage = Usage()
        self._model: str | None = None
        self._response_id: str | None = None
        self._finish: dict[int, str] = {}
        self._service_tier: str | None = None
        self._complete = False
        self._malformed = False
        self._kept: list[Event | bytes] = []  # content events (or runs of them), in order, for the text
        self._kept_bytes = 0
        self._late: TextCollector | None = None  # text of content events past MAX_KEPT_BYTES
        self._deferred: list[bytes] = []  # bytes fed since content was seen, not read yet
        self._deferred_bytes = 0

    def feed(self, data: bytes) -> bytes:
        """Observe the next decompressed bytes; return the bytes to forward (see class doc).

        A stream forwarded as it is (``strip_usage_chunk`` False) is only read for the
        record, and after the first content nothing of it is wanted before the end (the
        proxy reads :attr:`saw_content` to time the first token; usage, the finish reasons
        and the text come with :meth:`result`). So from then on the bytes fed are gathered
        and read :data:`DEFERRED_BYTES` at a time, and the rest by :meth:`close`: a stream
        that trickles in one event per piece is read in a few large pieces, which costs
        about a tenth less than reading each piece (``python -m bench.observers``).
        """
        if self._closed:
            return b"" if self.strip_usage_chunk else data
        if not self.strip_usage_chunk:
            if self.saw_content:
                self._deferred.append(data if type(data) is bytes else bytes(data))
                self._deferred_bytes += len(data)
                if self._deferred_bytes >= DEFERRED_BYTES:
                    self._read_deferred()
                return data
            self._read(data)
            return data
        events = self._decoder.feed(data)
        observe = self._observe
        return b"".join([event.raw for event in events if observe(event, False)])

    def _read_deferred(self) -> None:
        """Read the bytes gathered since content was seen (see :meth:`feed`)."""
        if not self._deferred:
            return
        data = b"".join(self._deferred)  # one piece: that piece itself, not a copy
        self._deferred = []
        self._deferred_bytes = 0
        self._read(data)

    def _read(self, data: bytes) -> None:
        """Observe bytes of a stream forwarded as it is."""
        if self.saw_content and self._plain_run(data):
            self._keep(data)  # a run of content events: kept whole, unparsed
        elif data.find(b"\n\n") < len(data) - 2:
            self._watch(data)  # several events (or part of one)
        else:
            observe = self._observe
            for event in self._decoder.feed(data):
                observe(event, False)

    def _watch(self, data: bytes) -> None:
        """Observe the next bytes of a stream forwarded as it is.

        From an event boundary, and with no CR about, events end at ``\n\n``: they are
        taken one at a time (each through the decoder's one-event fast path) until the
        first content, and from then on a run of plain content events
        (:meth:`_plain_events`) is kept whole, neither cut into events nor parsed, with
        the events between runs taken one at a time. A chunk that arrives with many
        events (a whole stream, when the sidecar is busy) is thus parsed only where it
        matters. Anything else goes to the decoder as it is.
        """
        decoder = self._decoder
        observe = self._observe
        size = len(data)
        pos = 0
        if decoder.idle() and _CR not in data:
            stop = -1  # where the next event worth parsing may start (-1: not looked for yet)
            while pos < size:
                if self.saw_content and self.plain_prefix is not None:
                    if stop < pos:
                        stop = self._worth_parsing(data, pos)
                    end = self._plain_events(data, pos, stop)
                    if end > pos:
                        self._keep(data if end - pos == size else data[pos:end])
                        pos = end
                        continue
                if data[pos] == _LF:
                    break  # blank lines before an event: the decoder's business
                end = data.find(b"\n\n", pos)
                if end < 0:
                    break
                end += 2
                for event in decoder.feed(data if end - pos == size else data[pos:end]):
                    observe(event, False)
                pos = end
        if pos < size:
            for event in decoder.feed(data[pos:] if pos else data):
                observe(event, False)

    def _worth_parsing(self, data: bytes, start: int) -> int:
        """Where, from ``start``, the first key :attr:`needs_parse` finds, or the first JSON
        escape that could hide one, begins; ``len(data)`` when there is none."""
        finder = self.needs_parse
        if finder is None:
            return start  # nothing tells plain events apart: parse them all
        stop = finder.first(data, start)
        if stop < 0:
            stop = len(data)
        if _BACKSLASH in data:
            escape = _ASCII_ESCAPE.search(data, start, stop)
            if escape is not None:
                stop = escape.start()
        return stop

    def _plain_events(self, data: bytes, pos: int, stop: int) -> int:
        """The end of the run of plain content events that starts at ``pos`` (``pos``: none).

        A plain event is :attr:`plain_prefix`, the rest of one JSON object on that line,
        and the blank line (``plain_data_event``): ``data`` holds no CR, each event ends
        at the first ``\n\n`` after its start, with ``}`` before it and no other line
        break but the prefix's own. Only events that end by ``stop`` (see
        :meth:`_worth_parsing`) are taken: they are the events the subclass's
        :meth:`_observe` would each keep unparsed.
        """
        prefix = self.plain_prefix
        assert prefix is not None
        lines = prefix.count(b"\n") + 2
        startswith = data.startswith
        if not startswith(prefix, pos):
            return pos
        find = data.find
        count = data.count
        # At once, the events up to the last one that opens before ``stop``: k of them when
        # there are k ends "}" + blank line + prefix, and the run holds k * lines line
        # breaks, no more (an event that does not open with the prefix, or has a line break
        # of its own, would add some: see _plain_run).
        boundary = data.rfind(b"\n\n" + prefix, pos, stop)
        if boundary > pos:
            end = boundary + 2
            events = count(b"}\n\n" + prefix, pos, end + len(prefix))
            if events and count(b"\n", pos, end) == events * lines:
                pos = end
        # Then one at a time (what is left before ``stop``, or all of it when a run holds
        # another kind of event).
        while startswith(prefix, pos):
            end = find(b"\n\n", pos) + 2
            if end < 2 or end > stop or data[end - 3] != _CLOSE_BRACE or count(b"\n", pos, end) != lines:
                break
            pos = end
        return pos

    def close(self) -> bytes:
        """End of stream: decode what is left; in strip mode return the held bytes.

        A cut trailing event is forwarded as received, never repaired, and a JSON error
        in it does not count as malformed (the stream was cut; ``complete`` says so).
        """
        if self._closed:
            return b""
        self._read_deferred()
        self._closed = True
        events = self._decoder.flush()
        kept = [event.raw for event in events if self._observe(event, final=True)]
        return b"".join(kept) if self.strip_usage_chunk else b""

    def result(self) -> ResponseInfo:
        """Everything observed so far (call after :meth:`close` for the final figures)."""
        self._read_deferred()
        late = self._late.value() if self._late is not None else ""
        text: str | Callable[[], str] = late
        if self._kept:
            text = LazyText(partial(_fill_from_events, tuple(self._kept), self._text_of, late))
        return ResponseInfo(
            usage=self._usage,
            model=self._model,
            response_id=self._response_id,
            finish_reasons=tuple(self._finish[i] for i in sorted(self._finish)),
            service_tier=self._service_tier,
            complete=self._complete,
            text=text,
            malformed=self._malformed,
        )

    def _observe(self, event: Event, final: bool) -> bool:
        """Handle one event; return False to strip it from the forwarded bytes."""
        raise NotImplementedError

    def _text_of(self, event: Event, text: TextCollector) -> None:
        """Add the generated text of one kept event to ``text`` (never raises)."""
        raise NotImplementedError

    def _plain_run(self, data: bytes) -> bool:
        """Whether ``data`` is one or more whole content-only events that need no parsing.

        The chunk fast path: after the first content, a chunk that starts on an event
        boundary (nothing pending in the decoder) and is nothing but events each made of
        :attr:`plain_prefix`, one JSON object on the rest of its line and the blank line,
        with no key :attr:`needs_parse` finds and no escape that could hide one, is the
        run of events the subclass would each skip unparsed (see :meth:`_observe`); it is
        then kept whole, without being cut into events. The structure is proved by two
        counts: with ``k`` ends ``}`` + blank line + prefix in the chunk, the first event
        and the ``k`` after those ends open with the prefix, and each of these ``k + 1``
        events holds at least the prefix's line breaks and its blank line's. The chunk
        holds exactly that many line breaks only when it has no other event and no other
        line break: ``k + 1`` events, each the prefix, the rest of one line and the blank
        line.
        """
        prefix = self.plain_prefix
        finder = self.needs_parse
        if (
            prefix is None
            or finder is None
            or not data.startswith(prefix)
            or not data.endswith(b"}\n\n")
            or _CR in data
            or not self._decoder.idle()
        ):
            return False
        lines = prefix.count(b"\n") + 2
        newlines = data.count(b"\n")
        if newlines != lines and newlines != (data.count(b"}\n\n" + prefix) + 1) * lines:
            return False
        return finder.first(data) < 0 and not may_hide_keys(data)

    def _keep(self, event: Event | bytes) -> None:
        """Keep a content event (or a run of whole ones, as bytes) for the text; one that would
        take the kept bytes past :data:`MAX_KEPT_BYTES`, and every one after it, has its text
        extracted now (so the kept ones always come first in the text)."""
        size = len(event.raw) if isinstance(event, Event) else len(event)
        if self._late is None and self._kept_bytes + size <= MAX_KEPT_BYTES:
            self._kept.append(event)
            self._kept_bytes += size
            return
        if self._late is None:
            self._late = TextCollector()
        if not self._late.full:
            for one in _events_of(event):
                self._text_of(one, self._late)

    def _parse(self, data: str, final: bool) -> dict[str, object] | None:
        """The event's JSON object, or None (and ``malformed`` set) when it is not one."""
        value = loads(data)
        if isinstance(value, dict):
            return value
        if not final:
            self._malformed = True
        return None


class LazyText:
    """Generated text built on first call, then cached: the :attr:`ResponseInfo.text` of a
    response whose text was not extracted on the request path.

    ``fill`` adds the text to a :class:`TextCollector` (which caps it). Whoever needs the
    text calls it (the token estimator, in its thread), so parsing for it costs the
    request path nothing. Equal to another text with the same value, built or not.
    """

    __slots__ = ("_fill", "_value")

    def __init__(self, fill: Callable[[TextCollector], None]) -> None:
        self._fill = fill
        self._value: str | None = None

    def __call__(self) -> str:
        value = self._value
        if value is None:
            text = TextCollector()
            self._fill(text)
            value = self._value = text.value()
        return value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyText):
            return self() == other()
        if isinstance(other, str):
            return self() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self())

    def __repr__(self) -> str:
        return "LazyText(built)" if self._value is not None else "LazyText(not built)"


def _events_of(kept: Event | bytes) -> list[Event] | tuple[Event]:
    """The events of a kept item: itself, or those of a run of whole events kept as bytes."""
    if isinstance(kept, Event):
        return (kept,)
    return SSEDecoder().feed(kept)


def _fill_from_events(
    events: tuple[Event | bytes, ...],
    text_of: Callable[[Event, TextCollector], None],
    late: str,
    text: TextCollector,
) -> None:
    """A stream's text: its kept events' text, then what was extracted past the budget."""
    for kept in events:
        for event in _events_of(kept):
            if text.full:
                break
            text_of(event, text)
    text.add(late)


def plain_data_event(raw: bytes, offset: int = 0) -> bool:
    """Whether ``raw[offset:]`` is exactly one ``data: {...}`` line and its blank line.

    The cheap test that lets an observer classify an event from its bytes: one line,
    so the bytes after a key in it are the JSON value's (no line break and no other
    field line in between: the ``event:`` line before ``offset``, if any, is the only
    other one), no CR, and a payload that starts with ``{`` and ends with ``}``.
    """
    return (
        raw.startswith(b"data: {", offset)
        and raw.endswith(b"}\n\n")
        and raw.find(b"\n", offset) == len(raw) - 2
        and _CR not in raw
    )


_CR = 0x0D
_LF = 0x0A
_CLOSE_BRACE = 0x7D
_BACKSLASH = 0x5C


class KeyFinder:
    """Finds the first of a few keys in an event's bytes.

    ``whole`` is one pattern for all the keys, searched in short data (one event). In
    long data (a run of events) each key is searched apart: ``re`` scans in C for the
    literal a pattern opens with and tries the rest only where it occurs, but ``whole``
    usually opens with an alternation (``"(?:usage|finish_reason)"``) and is tried at
    every quote, so a search per key costs less, and ``bytes.find`` of a plain
    ``literal`` less again. The keys searched apart may find more than ``whole`` (a key
    that ends the same way), never less: a key found costs a parse, a key missed a wrong
    record.
    """

    __slots__ = ("literals", "patterns", "whole")

    #: Below this many bytes, one search for all keys costs less than a call per key.
    SHORT = 1024

    def __init__(
        self, whole: bytes, patterns: tuple[bytes, ...] = (), literals: tuple[bytes, ...] = ()
    ) -> None:
        self.whole = re.compile(whole)
        self.patterns = tuple(re.compile(pattern) for pattern in patterns)
        self.literals = literals

    def first(self, data: bytes, start: int = 0) -> int:
        """Where the earliest key at or after ``start`` begins; -1 when there is none.

        Once one key is found, the others are searched only before it: a match that
        begins before it and runs past it has no line break in it, so it lies in the
        same event, and the event found is the same.
        """
        if len(data) - start < self.SHORT:
            match = self.whole.search(data, start)
            return match.start() if match is not None else -1
        first = -1
        for literal in self.literals:
            found = data.find(literal, start) if first < 0 else data.find(literal, start, first)
            if found >= 0:
                first = found
        for pattern in self.patterns:
            match = pattern.search(data, start) if first < 0 else pattern.search(data, start, first)
            if match is not None:
                first = match.start()
        return first


# A JSON escape of a printable ASCII character ("\u0075sage" is "usage").
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7]")


def may_hide_keys(raw: bytes) -> bool:
    """Whether ``raw`` holds a JSON escape of a printable ASCII character.

    Keys written with such escapes cannot be found by a byte search, so an event that
    holds one is parsed rather than classified from its bytes.
    """
    return _BACKSLASH in raw and _ASCII_ESCAPE.search(raw) is not None


class Shape(Protocol):
    """One provider API shape (an endpoint family with one request/response format).

    Every method is pure and never raises on malformed input.
    """

    @property
    def provider(self) -> str:
        """``"openai"`` or ``"anthropic"``."""
        ...

    @property
    def operation(self) -> str:
        """``"chat"``, ``"text_completion"``, ``"responses"``, ``"embeddings"`` or ``"messages"``."""
        ...

    @property
    def path_suffix(self) -> str:
        """The end of the request path that identifies the shape (see :func:`detect`)."""
        ...

    def parse_request(self, body: bytes) -> RequestInfo:
        """Model, stream flag and whether usage will be reported; malformed → defaults."""
        ...

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        """The request asking for stream usage, or None when nothing needs to change."""
        ...

    def prompt_text(self, body: bytes) -> PromptText:
        """The prompt text of a request, for local estimation of input tokens."""
        ...

    def parse_response(self, body: bytes) -> ResponseInfo:
        """What a non-streaming (decompressed) JSON response body reports."""
        ...

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """A new observer for one streamed response of this shape."""
        ...


class TextCollector:
    """Accumulates generated text up to :data:`MAX_OUTPUT_CHARS` characters."""

    __slots__ = ("_left", "_parts")

    def __init__(self, limit: int = MAX_OUTPUT_CHARS) -> None:
        self._parts: list[str] = []
        self._left = limit

    def add(self, text: str) -> None:
        """Append ``text``, cut at the limit."""
        if text and self._left > 0:
            piece = text[: self._left]
            self._parts.append(piece)
            self._left -= len(piece)

    @property
    def full(self) -> bool:
        """True when the limit is reached (more text would be cut off)."""
        return self._left <= 0

    def value(self) -> str:
        """The text collected so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


# --- typed access to untrusted JSON -------------------------------------------------

_INVALID = object()


#: The C scanner under ``json.loads``, which clears its key memo after every call.
_scan: Callable[[str, int], tuple[object, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads(data: bytes | str) -> object:
    """``json.loads`` that returns a sentinel (never a dict) instead of raising.

    A value with nothing but JSON whitespace after it goes straight to the C scanner,
    without ``json.loads``'s Python layers (its encoding detection, ``decode`` and
    ``raw_decode``): a string that starts with the value (an event's data, as a rule), and
    bytes that start with ``{`` and a byte other than NUL, which ``json.loads`` would
    decode as UTF-8 (a request or response body, as a rule, OpenAI's pretty-printed ones
    with their final newline included). Anything else (other bytes, blanks before the
    value, no value at all, more after it) takes ``json.loads``, with its errors.
    """
    text = data
    if not isinstance(text, str):
        if text[:1] != b"{" or text[1:2] == b"\x00":
            return _json_loads(data)
        try:
            text = text.decode("utf-8", "surrogatepass")  # what json.loads does with it
        except UnicodeDecodeError:
            return _INVALID
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # no value at the start: a blank, a BOM, nothing
        pass
    except (ValueError, RecursionError):
        return _INVALID
    else:
        if end == len(text) or not text[end:].strip(_JSON_WHITESPACE):
            return value
    return _json_loads(data)


#: What ``json.loads`` skips around a value (its ``WHITESPACE`` pattern).
_JSON_WHITESPACE = " \t\n\r"


def _json_loads(data: bytes | str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _INVALID


def load_object(body: bytes) -> dict[str, object] | None:
    """The body as a JSON object, or None when it is not one."""
    value = loads(body)
    return value if isinstance(value, dict) else None


def obj(value: object) -> dict[str, object] | None:
    """``value`` if it is a JSON object, else None."""
    return value if isinstance(value, dict) else None


def lst(value: object) -> list[object]:
    """``value`` if it is a JSON array, else an empty list."""
    return value if isinstance(value, list) else []


def string(value: object) -> str | None:
    """``value`` if it is a string, else None."""
    return value if isinstance(value, str) else None


def count(value: object) -> int | None:
    """``value`` if it is a non-negative integer token count (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def path(value: object, *keys: str) -> object:
    """``value[k1][k2]...`` through JSON objects, None where a level is missing."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def to_json(value: object) -> str:
    """Compact JSON of a parsed value (used to estimate tokens of tool definitions)."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):
        return ""


def join_text(parts: list[str]) -> str:
    """Prompt pieces joined with newlines, empty pieces left out."""
    return "\n".join(part for part in parts if part)
