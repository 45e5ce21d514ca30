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
from dataclasses import dataclass
from typing import Protocol

from sidecar.model import Usage
from sidecar.sse import Event, SSEDecoder

#: Generated text kept per response for local estimation (characters).
MAX_OUTPUT_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the sidecar needs to know about a client request before forwarding it.

    ``wants_usage`` is False only for an OpenAI chat/completions streaming request that
    did not ask for ``stream_options.include_usage`` (so no usage will be reported).
    """

    model: str | None
    stream: bool
    wants_usage: bool


#: The :class:`RequestInfo` of a body that is not a JSON object.
UNPARSED_REQUEST = RequestInfo(None, False, True)


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
    ``output_text`` is the generated text seen, capped at :data:`MAX_OUTPUT_CHARS`.
    ``malformed`` is True when JSON that could not be parsed was seen.
    """

    usage: Usage
    model: str | None
    response_id: str | None
    finish_reasons: tuple[str, ...]
    service_tier: str | None
    complete: bool
    output_text: str
    malformed: bool


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
    """

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
        self._text = TextCollector()

    def feed(self, data: bytes) -> bytes:
        """Observe the next decompressed bytes; return the bytes to forward (see class doc)."""
        if self._closed:
            return b"" if self.strip_usage_chunk else data
        events = self._decoder.feed(data)
        if not self.strip_usage_chunk:
            for event in events:
                self._observe(event, final=False)
            return data
        return b"".join([event.raw for event in events if self._observe(event, final=False)])

    def close(self) -> bytes:
        """End of stream: decode what is left; in strip mode return the held bytes.

        A cut trailing event is forwarded as received, never repaired, and a JSON error
        in it does not count as malformed (the stream was cut; ``complete`` says so).
        """
        if self._closed:
            return b""
        self._closed = True
        events = self._decoder.flush()
        kept = [event.raw for event in events if self._observe(event, final=True)]
        return b"".join(kept) if self.strip_usage_chunk else b""

    def result(self) -> ResponseInfo:
        """Everything observed so far (call after :meth:`close` for the final figures)."""
        return ResponseInfo(
            usage=self._usage,
            model=self._model,
            response_id=self._response_id,
            finish_reasons=tuple(self._finish[i] for i in sorted(self._finish)),
            service_tier=self._service_tier,
            complete=self._complete,
            output_text=self._text.value(),
            malformed=self._malformed,
        )

    def _observe(self, event: Event, final: bool) -> bool:
        """Handle one event; return False to strip it from the forwarded bytes."""
        raise NotImplementedError

    def _parse(self, data: str, final: bool) -> dict[str, object] | None:
        """The event's JSON object, or None (and ``malformed`` set) when it is not one."""
        value = loads(data)
        if isinstance(value, dict):
            return value
        if not final:
            self._malformed = True
        return None


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

    def value(self) -> str:
        """The text collected so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


# --- typed access to untrusted JSON -------------------------------------------------

_INVALID = object()


def loads(data: bytes | str) -> object:
    """``json.loads`` that returns a sentinel (never a dict) instead of raising."""
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
