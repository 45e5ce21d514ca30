"""Adapters for the OpenAI API shapes: chat, legacy completions, Responses, embeddings.

This module owns how OpenAI request and response JSON (and its SSE streams) map onto
:class:`~sidecar.providers.base.RequestInfo`, :class:`~sidecar.providers.base.ResponseInfo`
and :class:`~sidecar.model.Usage`; the field table is in the package docstring.
Azure OpenAI and OpenAI-compatible servers use the same shapes.

What counts as generated content (the first token, for time to first token):
chat ``choices[].delta.content`` (non-empty), ``delta.tool_calls``, ``delta.refusal``
(non-empty) and the legacy ``delta.function_call``; completions ``choices[].text``
(non-empty); Responses ``response.output_text.delta`` and ``response.refusal.delta``
(non-empty), ``response.function_call_arguments.delta`` and
``response.custom_tool_call_input.delta``. Role-only chunks, lifecycle events and
reasoning-summary deltas are not content: the client sees no answer from them.

Pure module: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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

__all__ = [
    "CHAT",
    "EMBEDDINGS",
    "RESPONSES",
    "TEXT_COMPLETION",
    "ChatShape",
    "EmbeddingsShape",
    "ResponsesShape",
    "TextCompletionShape",
]

_WHITESPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_INCLUDE_USAGE_MEMBER = b'"stream_options":{"include_usage":true},'


def chat_usage(usage: dict[str, object]) -> Usage:
    """Usage of a chat or legacy completions ``usage`` object (cache writes are not reported)."""
    return Usage(
        input=count(usage.get("prompt_tokens")),
        cached_input=count(path(usage, "prompt_tokens_details", "cached_tokens")),
        output=count(usage.get("completion_tokens")),
        reasoning=count(path(usage, "completion_tokens_details", "reasoning_tokens")),
    )


def responses_usage(usage: dict[str, object]) -> Usage:
    """Usage of a Responses API ``usage`` object."""
    return Usage(
        input=count(usage.get("input_tokens")),
        cached_input=count(path(usage, "input_tokens_details", "cached_tokens")),
        output=count(usage.get("output_tokens")),
        reasoning=count(path(usage, "output_tokens_details", "reasoning_tokens")),
    )


def _add_tool_call(text: TextCollector, call: object) -> None:
    function = obj(path(call, "function")) or obj(call)
    if function is not None:
        text.add(string(function.get("name")) or "")
        text.add(string(function.get("arguments")) or "")


def _int_key(value: object, default: int) -> int:
    index = count(value)
    return default if index is None else index


class _OpenAIShape:
    """Behaviour shared by every OpenAI shape: the request's model and stream flag."""

    provider: ClassVar[str] = "openai"
    operation: ClassVar[str] = ""
    path_suffix: ClassVar[str] = ""
    #: Whether a streaming request reports usage only with ``stream_options.include_usage``.
    usage_opt_in: ClassVar[bool] = False

    def parse_request(self, body: bytes) -> RequestInfo:
        """Model, stream flag and whether a stream will carry usage."""
        request = load_object(body)
        if request is None:
            return UNPARSED_REQUEST
        stream = request.get("stream") is True
        wants_usage = True
        if stream and self.usage_opt_in:
            wants_usage = path(request, "stream_options", "include_usage") is True
        return RequestInfo(string(request.get("model")), stream, wants_usage, output_cap(request))

    def inject_stream_usage(self, body: bytes) -> bytes | None:
        """The streaming request with ``stream_options.include_usage`` set, else None.

        When ``stream_options`` is absent the member is spliced in after the opening
        brace and every other byte stays as the client sent it; otherwise the body is
        re-serialised with the other ``stream_options`` keys kept.
        """
        if not self.usage_opt_in:
            return None
        request = load_object(body)
        if request is None or request.get("stream") is not True:
            return None
        options = request.get("stream_options")
        if "stream_options" not in request:
            head = len(_BOM) if body.startswith(_BOM) else 0
            brace = head + len(body[head:]) - len(body[head:].lstrip(_WHITESPACE))
            if body[brace : brace + 1] == b"{":
                # The object has a "stream" member, so a comma after ours is always right.
                return body[: brace + 1] + _INCLUDE_USAGE_MEMBER + body[brace + 1 :]
        elif options is not None and not isinstance(options, dict):
            return None  # an invalid value: the upstream's error is the client's to see
        elif isinstance(options, dict) and options.get("include_usage") is True:
            return None
        request["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        try:
            return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
            return json.dumps(request, separators=(",", ":")).encode("ascii")


class ChatShape(_OpenAIShape):
    """``POST .../chat/completions``: the Chat Completions API."""

    operation: ClassVar[str] = "chat"
    path_suffix: ClassVar[str] = "/chat/completions"
    usage_opt_in: ClassVar[bool] = True

    def prompt_text(self, body: bytes) -> PromptText:
        """Message text (string content and text parts), tool calls, tool definitions."""
        request = load_object(body)
        if request is None:
            return PromptText("")
        parts: list[str] = []
        for message in lst(request.get("messages")):
            content = path(message, "content")
            if isinstance(content, str):
                parts.append(content)
            for part in lst(content):
                parts.append(string(path(part, "text")) or string(path(part, "refusal")) or "")
            for call in lst(path(message, "tool_calls")):
                parts.append(string(path(call, "function", "name")) or "")
                parts.append(string(path(call, "function", "arguments")) or "")
            function_call = obj(path(message, "function_call"))
            if function_call is not None:
                parts.append(string(function_call.get("name")) or "")
                parts.append(string(function_call.get("arguments")) or "")
        for key in ("tools", "functions"):
            if request.get(key):
                parts.append(to_json(request[key]))
        return PromptText(join_text(parts))

    def parse_response(self, body: bytes) -> ResponseInfo:
        """Usage, model, id, finish reasons, service tier and text of a chat completion."""
        response = load_object(body)
        if response is None:
            return UNPARSED_RESPONSE
        return _info(response, chat_usage, _chat_message_text, _choice_finish(response))

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """An observer of a ``chat.completion.chunk`` stream."""
        return ChatStreamObserver(strip_usage_chunk, legacy=False)


class TextCompletionShape(_OpenAIShape):
    """``POST .../completions`` (not ``chat/completions``): the legacy Completions API."""

    operation: ClassVar[str] = "text_completion"
    path_suffix: ClassVar[str] = "/completions"
    usage_opt_in: ClassVar[bool] = True

    def prompt_text(self, body: bytes) -> PromptText:
        """``prompt`` (a string, strings, or token ids) and ``suffix``."""
        request = load_object(body)
        if request is None:
            return PromptText("")
        text, ids = _strings_and_ids(request.get("prompt"))
        suffix = string(request.get("suffix"))
        if suffix:
            text.append(suffix)
        return PromptText(join_text(text), ids)

    def parse_response(self, body: bytes) -> ResponseInfo:
        """Usage, model, id, finish reasons and text of a completion."""
        response = load_object(body)
        if response is None:
            return UNPARSED_RESPONSE
        return _info(response, chat_usage, _choice_text, _choice_finish(response))

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """An observer of a ``text_completion`` stream."""
        return ChatStreamObserver(strip_usage_chunk, legacy=True)


class ResponsesShape(_OpenAIShape):
    """``POST .../responses``: the Responses API."""

    operation: ClassVar[str] = "responses"
    path_suffix: ClassVar[str] = "/responses"

    def prompt_text(self, body: bytes) -> PromptText:
        """``instructions``, ``input`` (string or items) and tool definitions."""
        request = load_object(body)
        if request is None:
            return PromptText("")
        parts = [string(request.get("instructions")) or ""]
        items = request.get("input")
        if isinstance(items, str):
            parts.append(items)
        for item in lst(items):
            content = path(item, "content")
            if isinstance(content, str):
                parts.append(content)
            for part in lst(content):
                parts.append(string(path(part, "text")) or string(path(part, "refusal")) or "")
            for key in ("name", "arguments", "input", "output"):
                value = path(item, key)
                if isinstance(value, str):
                    parts.append(value)
        if request.get("tools"):
            parts.append(to_json(request["tools"]))
        return PromptText(join_text(parts))

    def parse_response(self, body: bytes) -> ResponseInfo:
        """Usage, model, id, status, service tier and output text of a response."""
        response = load_object(body)
        if response is None:
            return UNPARSED_RESPONSE
        return _info(response, responses_usage, _output_text, _responses_finish(response))

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """An observer of a Responses event stream."""
        return ResponsesStreamObserver(strip_usage_chunk)


class EmbeddingsShape(_OpenAIShape):
    """``POST .../embeddings``: the Embeddings API (input tokens only)."""

    operation: ClassVar[str] = "embeddings"
    path_suffix: ClassVar[str] = "/embeddings"

    def prompt_text(self, body: bytes) -> PromptText:
        """``input`` strings; token-id arrays are counted directly."""
        request = load_object(body)
        if request is None:
            return PromptText("")
        text, ids = _strings_and_ids(request.get("input"))
        return PromptText(join_text(text), ids)

    def parse_response(self, body: bytes) -> ResponseInfo:
        """Input usage and model (embeddings report no output and carry no id)."""
        response = load_object(body)
        if response is None:
            return UNPARSED_RESPONSE
        usage = obj(response.get("usage"))
        return ResponseInfo(
            usage=Usage(input=count(usage.get("prompt_tokens"))) if usage is not None else Usage(),
            model=string(response.get("model")),
            response_id=string(response.get("id")),
            finish_reasons=(),
            service_tier=None,
            complete=True,
            text="",
            malformed=False,
        )

    def stream_observer(self, strip_usage_chunk: bool) -> StreamObserver:
        """Embeddings do not stream; this observer only passes events through."""
        return PassThroughObserver(strip_usage_chunk)


def _strings_and_ids(value: object) -> tuple[list[str], int]:
    """Strings and the number of token ids in a ``prompt``/``input`` value."""
    if isinstance(value, str):
        return [value], 0
    texts: list[str] = []
    ids = 0
    for item in lst(value):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, int):
            ids += 1
        elif isinstance(item, list):
            ids += sum(1 for token in item if isinstance(token, int))
    return texts, ids


def _responses_finish(response: dict[str, object]) -> dict[int, str]:
    """Responses have no finish reason: the incomplete reason, else the status."""
    reason = string(path(response, "incomplete_details", "reason")) or string(response.get("status"))
    return {0: reason} if reason else {}


def _choice_finish(response: dict[str, object]) -> dict[int, str]:
    """Finish reasons of a chat or completions response, by choice index."""
    finish: dict[int, str] = {}
    for position, choice in enumerate(lst(response.get("choices"))):
        reason = string(path(choice, "finish_reason"))
        if reason:
            finish[_int_key(path(choice, "index"), position)] = reason
    return finish


def _choices_text(choices: object, part: str, text: TextCollector) -> None:
    """Generated text of each choice's ``part`` (``message``, or ``delta`` in a stream chunk):
    content, refusal and tool calls."""
    for choice in lst(choices):
        message = obj(path(choice, part))
        if message is None:
            continue
        text.add(string(message.get("content")) or "")
        text.add(string(message.get("refusal")) or "")
        for call in lst(message.get("tool_calls")):
            _add_tool_call(text, call)
        if message.get("function_call") is not None:
            _add_tool_call(text, message.get("function_call"))


def _chat_message_text(response: dict[str, object], text: TextCollector) -> None:
    """Generated text of a chat completion: content, refusal and tool calls of each choice."""
    _choices_text(response.get("choices"), "message", text)


def _choice_text(response: dict[str, object], text: TextCollector) -> None:
    """Generated text of a legacy completion."""
    for choice in lst(response.get("choices")):
        text.add(string(path(choice, "text")) or "")


def _output_text(response: dict[str, object], text: TextCollector) -> None:
    """Generated text of a Responses API response: content parts and tool calls."""
    for item in lst(response.get("output")):
        for part in lst(path(item, "content")):
            text.add(string(path(part, "text")) or string(path(part, "refusal")) or "")
        if path(item, "type") in ("function_call", "custom_tool_call"):
            text.add(string(path(item, "name")) or "")
            text.add(string(path(item, "arguments")) or string(path(item, "input")) or "")


def _info(
    response: dict[str, object],
    usage_of: Callable[[dict[str, object]], Usage],
    text_of: Callable[[dict[str, object], TextCollector], None],
    finish: dict[int, str],
) -> ResponseInfo:
    """A JSON response's info; its text is extracted only when read (see LazyText)."""
    usage = obj(response.get("usage"))
    return ResponseInfo(
        usage=usage_of(usage) if usage is not None else Usage(),
        model=string(response.get("model")),
        response_id=string(response.get("id")),
        finish_reasons=tuple(finish[i] for i in sorted(finish)),
        service_tier=string(response.get("service_tier")),
        complete=True,
        text=LazyText(partial(text_of, response)),
        malformed=False,
    )


class PassThroughObserver(StreamObserver):
    """Decodes events and records nothing (for shapes that do not stream)."""

    def _observe(self, event: Event, final: bool) -> bool:
        return True

    def _text_of(self, event: Event, text: TextCollector) -> None:
        return None


#: What makes a chat chunk worth parsing once content was seen: a ``usage`` or a
#: ``finish_reason`` that is not ``null`` (or a key that a byte search cannot see: an
#: ASCII escape, see may_hide_keys). Searched apart, each key's pattern opens with a
#: literal, the end of the key (see KeyFinder). The possessive blanks keep
#: ``"usage": null`` from matching with a blank left out.
_CHAT_NEEDS_PARSE = KeyFinder(
    rb'"(?:usage|finish_reason)"[ \t]*+:[ \t]*+(?!null)',
    patterns=(rb'usage"[ \t]*+:[ \t]*+(?!null)', rb'_reason"[ \t]*+:[ \t]*+(?!null)'),
)


def _chat_text(event: Event, text: TextCollector) -> None:
    """Generated text of a chat chunk: content, refusal and tool-call deltas."""
    chunk = loads(event.data) if event.data else None
    if isinstance(chunk, dict):
        _choices_text(chunk.get("choices"), "delta", text)


def _completion_text(event: Event, text: TextCollector) -> None:
    """Generated text of a legacy completions chunk."""
    chunk = loads(event.data) if event.data else None
    if not isinstance(chunk, dict):
        return
    for choice in lst(chunk.get("choices")):
        text.add(string(path(choice, "text")) or "")


class ChatStreamObserver(StreamObserver):
    """Observer of chat (``legacy=False``) or legacy completions (``legacy=True``) chunks.

    Usage comes from the chunk whose ``usage`` is an object (the final ``choices: []``
    chunk, later ones win); ``"usage": null`` means nothing. ``data: [DONE]`` ends it.

    Parsed: every chunk until the first one with content (model, id and service tier
    come from there), then only chunks whose bytes show a ``usage`` or
    ``finish_reason`` that is not ``null`` (they also refresh model, id and tier), and
    any chunk that is not one plain ``data: {...}`` line. The others are content
    deltas: kept for the text, not parsed.
    """

    plain_prefix = b"data: {"
    needs_parse = _CHAT_NEEDS_PARSE

    def __init__(self, strip_usage_chunk: bool, legacy: bool) -> None:
        super().__init__(strip_usage_chunk)
        self._legacy = legacy
        self._text_fn = _completion_text if legacy else _chat_text

    def _text_of(self, event: Event, text: TextCollector) -> None:
        self._text_fn(event, text)

    def _observe(self, event: Event, final: bool) -> bool:
        if self.saw_content:
            # A content delta with nothing else: skipped unparsed. One data line, so the
            # bytes after a key are the JSON after it (no line break can hide a value).
            raw = event.raw
            if plain_data_event(raw) and _CHAT_NEEDS_PARSE.first(raw) < 0 and not may_hide_keys(raw):
                self._keep(event)
                return True
        data = event.data
        if not data:
            return True
        if data == "[DONE]":
            self._complete = True
            return True
        chunk = self._parse(data, final)
        if chunk is None:
            return True
        model = string(chunk.get("model"))
        if model:
            self._model = model
        response_id = string(chunk.get("id"))
        if response_id:
            self._response_id = response_id
        tier = string(chunk.get("service_tier"))
        if tier:
            self._service_tier = tier
        choices = chunk.get("choices")
        usage = obj(chunk.get("usage"))
        if usage is not None:
            self._usage = chat_usage(usage)
            if self.strip_usage_chunk and choices == []:
                return False
        for position, choice in enumerate(lst(choices)):
            reason = string(path(choice, "finish_reason"))
            if reason:
                self._finish[_int_key(path(choice, "index"), position)] = reason
            if not self.saw_content and self._has_content(choice):
                self.saw_content = True
        self._keep(event)
        return True

    def _has_content(self, choice: object) -> bool:
        if self._legacy:
            return bool(string(path(choice, "text")))
        delta = obj(path(choice, "delta"))
        if delta is None:
            return False
        return bool(
            string(delta.get("content"))
            or string(delta.get("refusal"))
            or lst(delta.get("tool_calls"))
            or delta.get("function_call") is not None
        )


#: Responses stream events whose ``delta`` is generated content.
_CONTENT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
    }
)
#: The ``event:`` lines of those events, as they open an event's bytes.
_CONTENT_DELTA_LINES = tuple(f"event: {kind}\n".encode() for kind in sorted(_CONTENT_DELTAS))
#: Text deltas: content only when the delta is not empty.
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta"})
#: Events that end a Responses stream and carry the final response object.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _responses_text(event: Event, text: TextCollector) -> None:
    """Generated text of a Responses content delta."""
    parsed = loads(event.data) if event.data else None
    if not isinstance(parsed, dict):
        return
    kind = event.event or string(parsed.get("type"))
    if kind in _CONTENT_DELTAS:
        text.add(string(parsed.get("delta")) or "")


class ResponsesStreamObserver(StreamObserver):
    """Observer of a Responses API event stream.

    Only the events that matter are parsed: ``response.created`` (id and model, in
    case the stream is cut), content deltas until the first one with content, and the
    terminal ``response.completed`` / ``response.incomplete`` / ``response.failed``,
    whose response object gives usage, model and service tier (``response.created``
    carries the *requested* tier). Later content deltas are kept for the text only.
    """

    def _text_of(self, event: Event, text: TextCollector) -> None:
        _responses_text(event, text)

    def _observe(self, event: Event, final: bool) -> bool:
        raw = event.raw
        if self.saw_content and raw.startswith(_CONTENT_DELTA_LINES):
            line = raw.find(b"\n") + 1
            if plain_data_event(raw, line) and not may_hide_keys(raw):
                self._keep(event)
                return True
        data = event.data
        if not data:
            return True
        kind = event.event
        parsed: dict[str, object] | None = None
        if kind is None:
            parsed = self._parse(data, final)
            if parsed is None:
                return True
            kind = string(parsed.get("type"))
        if kind in _CONTENT_DELTAS:
            parsed = parsed or self._parse(data, final)
            delta = string(parsed.get("delta")) if parsed is not None else None
            # A tool-call delta is content even when empty; a text delta only when not.
            if delta is not None and (delta or kind not in _TEXT_DELTAS):
                self.saw_content = True
            self._keep(event)
        elif kind in _TERMINAL:
            parsed = parsed or self._parse(data, final)
            response = obj(parsed.get("response")) if parsed is not None else None
            if response is not None:
                self._complete = True
                self._take(response, final=True)
        elif kind == "response.created":
            parsed = parsed or self._parse(data, final)
            response = obj(parsed.get("response")) if parsed is not None else None
            if response is not None:
                self._take(response, final=False)
        return True

    def _take(self, response: dict[str, object], final: bool) -> None:
        self._model = string(response.get("model")) or self._model
        self._response_id = string(response.get("id")) or self._response_id
        if final:
            usage = obj(response.get("usage"))
            if usage is not None:
                self._usage = responses_usage(usage)
            self._service_tier = string(response.get("service_tier")) or self._service_tier
            self._finish = _responses_finish(response)


CHAT = ChatShape()
TEXT_COMPLETION = TextCompletionShape()
RESPONSES = ResponsesShape()
EMBEDDINGS = EmbeddingsShape()
