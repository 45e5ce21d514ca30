"""Requests the load generators send and the responses the mock upstream pre-renders.

Two API shapes, alternated request by request: OpenAI chat completions
(``/v1/chat/completions``) and Anthropic messages (``/anthropic/v1/messages``; the sidecar
mounts its Anthropic upstream at ``/anthropic``, the floor and the upstream ignore the
prefix). Each shape exists as plain JSON and as a server-sent-event stream of
:data:`STREAM_CHUNKS` content chunks plus the usage the provider reports.
Streaming requests ask for usage themselves (``stream_options.include_usage``), as a
well-configured client does, so no target has to rewrite the body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

STREAM_CHUNKS = 20
TENANTS = 10
OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-20250514"
#: Request header asking the mock upstream to hold a stream open after its first event.
HOLD_HEADER = "x-bench-hold-ms"

_PROMPT = "Summarise the benefits of measuring every LLM call in one short paragraph."
_WORDS = [f" word{i}" for i in range(STREAM_CHUNKS)]
_TEXT = "".join(_WORDS).strip()


@dataclass(frozen=True)
class Request:
    """One HTTP request as sent by a load generator (``Host`` is added per target)."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def render(self, host: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
        """The request's bytes on the wire (HTTP/1.1, keep-alive)."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in (*self.headers, *extra)]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _openai_request(stream: bool, tenant: str) -> Request:
    body: dict[str, object] = {
        "model": OPENAI_MODEL,
        "messages": [{"role": "user", "content": _PROMPT}],
        "max_tokens": 64,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    headers = (
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sk-bench-not-a-real-key"),
        ("x-tenant-id", tenant),
    )
    return Request("POST", "/v1/chat/completions", headers, json.dumps(body).encode())


def _anthropic_request(stream: bool, tenant: str) -> Request:
    body: dict[str, object] = {
        "model": ANTHROPIC_MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": _PROMPT}],
    }
    if stream:
        body["stream"] = True
    headers = (
        ("Content-Type", "application/json"),
        ("x-api-key", "sk-ant-bench-not-a-real-key"),
        ("anthropic-version", "2023-06-01"),
        ("x-tenant-id", tenant),
    )
    return Request("POST", "/anthropic/v1/messages", headers, json.dumps(body).encode())


def requests(stream: bool, tenants: int = TENANTS) -> list[Request]:
    """The request mix of one shape: OpenAI and Anthropic alternately, tenants in turn."""
    out: list[Request] = []
    for i in range(2 * tenants):
        tenant = f"tenant-{i // 2:03d}"
        out.append(_openai_request(stream, tenant) if i % 2 == 0 else _anthropic_request(stream, tenant))
    return out


# --- responses ---------------------------------------------------------------------------


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def openai_json() -> bytes:
    """A chat completion with usage."""
    return _compact(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1766084435,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 18,
                "completion_tokens": STREAM_CHUNKS,
                "total_tokens": 18 + STREAM_CHUNKS,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_bench",
        }
    ).encode()


def openai_events() -> list[bytes]:
    """A chat completion stream: role chunk with the first word, the other words, a
    finish chunk, the usage chunk and ``[DONE]`` (one ``data:`` event each)."""
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1766084435,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }

    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {_compact({**base, 'choices': [choice], 'usage': None})}\n\n".encode()

    events = [chunk({"role": "assistant", "content": _WORDS[0]})]
    events += [chunk({"content": w}) for w in _WORDS[1:]]
    events.append(chunk({}, "stop"))
    usage = {
        "prompt_tokens": 18,
        "completion_tokens": STREAM_CHUNKS,
        "total_tokens": 18 + STREAM_CHUNKS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    events.append(f"data: {_compact({**base, 'choices': [], 'usage': usage})}\n\n".encode())
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_json() -> bytes:
    """A message with usage."""
    return _compact(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": _TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 18,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": STREAM_CHUNKS,
            },
        }
    ).encode()


def anthropic_events() -> list[bytes]:
    """A message stream: ``message_start`` (input usage), a text block of the words,
    ``message_delta`` (output usage) and ``message_stop``."""

    def event(name: str, data: dict[str, object]) -> bytes:
        return f"event: {name}\ndata: {_compact(data)}\n\n".encode()

    start: dict[str, object] = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 18,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        },
    }
    events = [
        event("message_start", {"type": "message_start", "message": start})
        + event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    ]
    for w in _WORDS:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}
        events.append(event("content_block_delta", delta))
    events.append(
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        + event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": STREAM_CHUNKS},
            },
        )
        + event("message_stop", {"type": "message_stop"})
    )
    return events
