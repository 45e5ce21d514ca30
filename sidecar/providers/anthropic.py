"""Adapter for the Anthropic Messages API (``POST /v1/messages``).

This module owns how Anthropic request and response JSON (and its SSE stream) map
onto :class:`~sidecar.providers.base.ResponseInfo` and :class:`~sidecar.model.Usage`.

Anthropic's ``input_tokens`` *excludes* cached tokens, so the normalised ``input`` is
``input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` (each where
reported). In a stream, ``message_start.message.usage`` gives input and cache counts;
``message_delta.usage`` is cumulative, so the last value of each field it carries
replaces the earlier one (never summed). ``message_start``'s ``output_tokens`` is a
placeholder: without a ``message_delta`` usage, output is not reported.

What counts as generated content (the first token): a ``content_block_delta`` whose
delta is ``text_delta`` or ``input_json_delta`` (even with an empty ``partial_json``:
it is a tool-call delta). ``message_start``, ``content_block_start``, ``ping``,
``error`` and thinking/signature deltas are not: the client has no answer text yet.
Thinking text is still added to ``output_text``, because thinking is billed as output.

Pure module: no I/O.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from sidecar.model import Usage
from sidecar.providers.base import (
    UNPARSED_REQUEST,
    UNPARSED_RESPONSE,
    KeyFinder,
    LazyText,
    PromptText,
    RequestInfo,
    ResponseInfo,
    StreamObserver,
    TextCollector,
    count,
    join_text,
    load_object,
    loads,
    lst,
    may_hide_keys,
    obj,
    output_cap,
    path,
    plain_data_event,
    string,
    to_json,
)
from sidecar.sse import Event

__all__ = ["MESSAGES", "MessagesShape", "MessagesStreamObserver", "messages_usage"]

#: Top-level usage fields, each a cumulative count (the 1h-TTL write is nested).
_USAGE_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
_WRITE_1H = "cache_creation.ephemeral_1h_input_tokens"


def _usage_fields(usage: dict[str, object], with_output: bool) -> dict[str, int]:
    """The reported counts of a ``usage`` object, flattened (absent ones left out)."""
    fields: dict[str, int] = {}
    for name in _USAGE_FIELDS:
        if name == "output_tokens" and not with_output:
            continue
        value = count(usage.get(name))
        if value is not None:
            fields[name] = value
    write_1h = count(path(usage, "cache_creation", "ephemeral_1h_input_tokens"))
    if write_1h is not None:
        fields[_WRITE_1H] = write_1h
    return fields


def messages_usage(fields: dict[str, int]) -> Usage:
    """Normalised usage from flattened Anthropic usage fields (see the module docstring)."""
    parts = [
        fields.get(name)
        for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    ]
    present = [part for part in parts if part is not None]
    return Usage(
        input=sum(present) if present else None,
        cached_input=fields.get("cache_read_input_tokens"),
        cache_write=fields.get("cache_creation_input_tokens"),
        cache_write_1h=fields.get(_WRITE_1H),
        output=fields.get("output_tokens"),
    )


def _add_block_text(parts: list[str], block: object) -> None:
    """Text of one content block (text, tool use, tool result, thinking) into ``parts``."""
    kind = path(block, "type")
    if kind == "text":
        parts.append(string(path(block, "text")) or "")
    elif kind in ("tool_use", "server_tool_use"):
        parts.append(string(path(block, "name")) or "")
        parts.append(to_json(path(block, "input")))
    elif kind == "tool_result":
        content = path(block, "content")
        if isinstance(content, str):
            parts.append(content)
        for inner in lst(content):
            _add_block_text(parts, inner)
    elif kind == "thinking":
        parts.append(string(path(block, "thinking")) or "")


def _message_text(message: dict[str, object], text: TextCollector) -> None:
    """Generated text of a message: its content blocks (thinking included: billed as output)."""
    parts: list[str] = []
    for block in lst(message.get("content")):
        _add_block_text(parts, block)
    text.add("".join(parts))


class MessagesShape:
    """``POST /v1/messages``: the Messages API (``/v1/messages/count_tokens`` is not it)."""

    provider: ClassVar[str] = "anthropic"
    operation: ClassVar[str] = "messages"
    path_suffix: ClassVar[str] = "/v1/messages"

    def parse_request(self, body: bytes) -> RequestInfo:
        """Model and stream flag; Anthropic streams always report usage."""
        request = load_object(body)
        if request is None:
            return UNPARSED_REQUEST
        return RequestInfo(
            string(request.get("model")), request.get("stream") is True, True, output_cap(request)
        )

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        """Nothing to inject: Anthropic streams always carry usage."""
        return None

    def prompt_text(self, body: bytes) -> PromptText:
        """System prompt, message content blocks and tool definitions."""
        request = load_object(body)
        if request is None:
            return PromptText("")
        parts: list[str] = []
        system = request.get("system")
        if isinstance(system, str):
            parts.append(system)
        for block in lst(system):
            _add_block_text(parts, block)
        for message in lst(request.get("messages")):
            content = path(message, "content")
            if isinstance(content, str):
                parts.append(content)
            for block in lst(content):
                _add_block_text(parts, block)
        if request.get("tools"):
            parts.append(to_json(request["tools"]))
        return PromptText(join_text(parts))

    def parse_response(self, body: bytes) -> ResponseInfo:
        """Usage, model, id, stop reason, service tier and text of a message."""
        message = load_object(body)
        if message is None:
            return UNPARSED_RESPONSE
        usage = obj(message.get("usage"))
        stop = string(message.get("stop_reason"))
        return ResponseInfo(
            usage=messages_usage(_usage_fields(usage, with_output=True)) if usage is not None else Usage(),
            model=string(message.get("model")),
            response_id=string(message.get("id")),
            finish_reasons=(stop,) if stop else (),
            service_tier=string(path(usage, "service_tier")),
            complete=True,
            text=LazyText(partial(_message_text, message)),
            malformed=False,
        )

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """An observer of a Messages event stream (there is no usage chunk to strip)."""
        return MessagesStreamObserver(strip_usage_chunk)


#: Events that carry nothing the observer needs: skipped without parsing.
_SKIP = frozenset({"ping", "content_block_start", "content_block_stop", "error"})
#: The bytes a plain content delta starts with (``event:`` line, then its one ``data:`` line).
_DELTA_LINE = b"event: content_block_delta\n"
#: What makes a content delta worth parsing once content was seen: anything that could
#: make it more than a delta (a ``usage``, a ``stop_reason``, a ``message...`` key or
#: type), or a key that a byte search cannot see.
_DELTA_NEEDS_PARSE = KeyFinder(
    rb'"(?:usage"|stop_reason"|message)', literals=(b'"usage"', b'"stop_reason"', b'"message')
)


def _messages_text(event: Event, text: TextCollector) -> None:
    """Generated text of a content delta: text, tool input JSON and thinking (billed as output)."""
    parsed = loads(event.data) if event.data else None
    if not isinstance(parsed, dict):
        return
    if (string(parsed.get("type")) or event.event) != "content_block_delta":
        return
    delta = obj(parsed.get("delta"))
    delta_type = path(delta, "type")
    if delta_type == "text_delta":
        text.add(string(path(delta, "text")) or "")
    elif delta_type == "input_json_delta":
        text.add(string(path(delta, "partial_json")) or "")
    elif delta_type == "thinking_delta":
        text.add(string(path(delta, "thinking")) or "")


class MessagesStreamObserver(StreamObserver):
    """Observer of a Messages event stream; ``message_stop`` ends it.

    Parsed: ``message_start``, ``message_delta``, content deltas until the first one
    with content, and any event whose name is missing or not one of the known ones.
    Later content deltas that are a plain ``event:`` + ``data:`` pair with nothing
    else of interest in their bytes are kept for the text only.
    """

    plain_prefix = _DELTA_LINE + b"data: {"
    needs_parse = _DELTA_NEEDS_PARSE

    def __init__(self, strip_usage_chunk: bool = False) -> None:
        super().__init__(strip_usage_chunk)
        self._fields: dict[str, int] = {}

    def _text_of(self, event: Event, text: TextCollector) -> None:
        _messages_text(event, text)

    def _observe(self, event: Event, final: bool) -> bool:
        if self.saw_content:
            raw = event.raw
            if (
                raw.startswith(_DELTA_LINE)
                and plain_data_event(raw, len(_DELTA_LINE))
                and _DELTA_NEEDS_PARSE.first(raw) < 0
                and not may_hide_keys(raw)
            ):
                self._keep(event)
                return True
        data = event.data
        kind = event.event
        if not data or kind in _SKIP:
            return True
        if kind == "message_stop":
            self._complete = True
            return True
        parsed = self._parse(data, final)
        if parsed is None:
            return True
        kind = string(parsed.get("type")) or kind
        if kind == "content_block_delta":
            if not self.saw_content:
                delta_type = path(parsed.get("delta"), "type")
                self.saw_content = delta_type == "text_delta" or delta_type == "input_json_delta"
            self._keep(event)
        elif kind == "message_start":
            message = obj(parsed.get("message"))
            if message is not None:
                self._model = string(message.get("model")) or self._model
                self._response_id = string(message.get("id")) or self._response_id
                self._take_usage(obj(message.get("usage")), with_output=False)
        elif kind == "message_delta":
            stop = string(path(parsed, "delta", "stop_reason"))
            if stop:
                self._finish = {0: stop}
            self._take_usage(obj(parsed.get("usage")), with_output=True)
        elif kind == "message_stop":
            self._complete = True
        return True

    def _take_usage(self, usage: dict[str, object] | None, with_output: bool) -> None:
        if usage is None:
            return
        self._fields.update(_usage_fields(usage, with_output))
        self._usage = messages_usage(self._fields)
        self._service_tier = string(usage.get("service_tier")) or self._service_tier


MESSAGES = MessagesShape()
