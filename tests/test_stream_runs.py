"""The stream observers' chunk fast path: a run of whole content-only events kept unparsed.

Under load an upstream's events arrive several to a read. A run of content deltas that
need no parsing is kept whole (not cut into events); everything the observer reports
must be what it reports when the same events arrive one by one, and a run holding
anything that needs parsing must take the slow path.

After the first content an observer gathers what it is fed and reads it in bulk
(``DEFERRED_BYTES``); the tests of how one piece is read set that to 0, so each piece is
read as it comes, and the last tests check the gathering itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sidecar.providers import SHAPES, Shape, base
from sidecar.providers.base import DEFERRED_BYTES, ResponseInfo

CHAT = SHAPES[("openai", "chat")]
MESSAGES = SHAPES[("anthropic", "messages")]


def chat_event(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


CHAT_USAGE = b'data: {"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}}\n\n'
CHAT_HEAD = chat_event({"role": "assistant", "content": "Hello"})
CHAT_WORDS = [chat_event({"content": f" w{i}"}) for i in range(6)]
CHAT_TAIL = [chat_event({}, finish="stop"), CHAT_USAGE, b"data: [DONE]\n\n"]


def messages_event(kind: str, payload: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **payload}).encode() + b"\n\n"


def text_delta(text: str) -> bytes:
    return messages_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


MSG_HEAD = [
    messages_event(
        "message_start",
        {"message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 11, "output_tokens": 1}}},
    ),
    messages_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    text_delta("Hi"),
]
MSG_WORDS = [text_delta(f" w{i}") for i in range(6)]
MSG_TAIL = [
    messages_event("content_block_stop", {"index": 0}),
    messages_event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 8}}),
    messages_event("message_stop", {}),
]


@pytest.fixture(autouse=True)
def each_piece_read_as_it_comes(request: pytest.FixtureRequest) -> Iterator[None]:
    if "gathered" in request.node.name:
        yield
        return
    saved = base.DEFERRED_BYTES
    base.DEFERRED_BYTES = 0
    try:
        yield
    finally:
        base.DEFERRED_BYTES = saved


def run(shape: Shape, chunks: list[bytes]) -> tuple[bytes, ResponseInfo, list[object]]:
    """What the client gets, what is reported, and what was kept for the text."""
    observer = shape.stream_observer(False)
    out = b"".join(observer.feed(chunk) for chunk in chunks) + observer.close()
    return out, observer.result(), list(observer._kept)


@pytest.mark.parametrize(
    ("shape", "head", "words", "tail"),
    [(CHAT, [CHAT_HEAD], CHAT_WORDS, CHAT_TAIL), (MESSAGES, MSG_HEAD, MSG_WORDS, MSG_TAIL)],
    ids=["chat", "messages"],
)
def test_a_run_of_content_events_is_kept_whole_and_reports_the_same(
    shape: Shape, head: list[bytes], words: list[bytes], tail: list[bytes]
) -> None:
    events = [*head, *words, *tail]
    expected_out, expected, _ = run(shape, events)

    coalesced = [*head, b"".join(words[:4]), b"".join(words[4:]), *tail]
    out, info, kept = run(shape, coalesced)
    assert out == expected_out == b"".join(events)
    assert info == expected  # usage, model, id, finish reasons, completeness and the text
    assert info.output_text == expected.output_text and " w5" in info.output_text
    assert b"".join(words[:4]) in kept  # the fast path was taken: the run kept as one piece


def spliced(event: bytes) -> list[bytes]:
    """The chat stream with ``event`` in the middle of a run of content events."""
    return [CHAT_HEAD, b"".join([CHAT_WORDS[0], event, CHAT_WORDS[1]]), *CHAT_TAIL]


@pytest.mark.parametrize(
    "odd",
    [
        chat_event({}, finish="length"),  # a finish reason inside the run
        b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n',  # usage inside it
        b'data: {"choices":[],"\\u0075sage":{"prompt_tokens":1,"completion_tokens":3}}\n\n',  # escaped key
        # one event in two data lines
        b'data: {"choices":[{"index":0,"delta":{"content":"a"},\ndata: "finish_reason":"stop"}]}\n\n',
        b": a comment\n\n",
        b"event: other\ndata: {}\n\n",
        b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\r\n\r\n',  # CRLF
    ],
    ids=["finish", "usage", "escaped-key", "two-lines", "comment", "named-event", "crlf"],
)
def test_a_run_holding_anything_to_parse_takes_the_slow_path(odd: bytes) -> None:
    chunks = spliced(odd)
    per_event = [CHAT_HEAD, CHAT_WORDS[0], odd, CHAT_WORDS[1], *CHAT_TAIL]
    out, info, kept = run(CHAT, chunks)
    expected_out, expected, _ = run(CHAT, per_event)
    assert out == expected_out
    assert info == expected
    assert chunks[1] not in kept


LONG_WORDS = [chat_event({"content": f" long{i}"}) for i in range(16)]


@pytest.mark.parametrize(
    "odd",
    [
        chat_event({}, finish="length"),
        b'data: {"choices":[],"usage" : {"prompt_tokens":1,"completion_tokens":2}}\n\n',  # blanks
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":\t"stop"}],"usage": null}\n\n',
        b'data: {"choices":[],"\\u0075sage":{"prompt_tokens":1,"completion_tokens":3}}\n\n',
        b"event: other\ndata: {}\n\n",
    ],
    ids=["finish", "spaced-usage", "tabbed-finish", "escaped-key", "named-event"],
)
def test_a_long_run_searches_key_by_key_and_still_finds_what_to_parse(odd: bytes) -> None:
    """Past KeyFinder.SHORT bytes the keys are searched one by one: the same events are parsed."""
    from sidecar.providers.base import KeyFinder

    run_bytes = b"".join([*LONG_WORDS[:8], odd, *LONG_WORDS[8:]])
    assert len(run_bytes) > 2 * KeyFinder.SHORT
    out, info, kept = run(CHAT, [CHAT_HEAD, run_bytes, *CHAT_TAIL])
    expected_out, expected, _ = run(CHAT, [CHAT_HEAD, *LONG_WORDS[:8], odd, *LONG_WORDS[8:], *CHAT_TAIL])
    assert out == expected_out
    assert info == expected
    assert info.usage == expected.usage and info.finish_reasons == expected.finish_reasons
    assert b"".join(LONG_WORDS[:8]) in kept  # the run before the odd event was still kept whole


def test_a_run_after_a_partial_event_takes_the_slow_path() -> None:
    """A chunk that completes an event left pending by the previous one is not a run."""
    first, second = CHAT_WORDS[0][:20], CHAT_WORDS[0][20:] + CHAT_WORDS[1]
    chunks = [CHAT_HEAD, first, second, *CHAT_TAIL]
    out, info, kept = run(CHAT, chunks)
    expected_out, expected, _ = run(CHAT, [CHAT_HEAD, CHAT_WORDS[0], CHAT_WORDS[1], *CHAT_TAIL])
    assert out == expected_out and info == expected
    assert not any(isinstance(k, bytes) for k in kept)


def test_the_text_of_runs_past_the_kept_budget_is_extracted_as_they_arrive() -> None:
    """Past MAX_KEPT_BYTES a run's text is taken at once (memory per stream stays bounded)."""
    from sidecar.providers.base import MAX_KEPT_BYTES

    run_bytes = b"".join(CHAT_WORDS)
    runs = MAX_KEPT_BYTES // len(run_bytes) + 20
    chunks = [CHAT_HEAD, *[run_bytes] * runs, *CHAT_TAIL]
    _, info, kept = run(CHAT, chunks)
    kept_bytes = sum(len(k) for k in kept if isinstance(k, bytes))
    assert MAX_KEPT_BYTES - len(run_bytes) < kept_bytes <= MAX_KEPT_BYTES
    words = "".join(f" w{i}" for i in range(6))
    assert info.output_text == "Hello" + words * runs


def test_kept_events_and_runs_past_the_budget_keep_the_text_in_order() -> None:
    """Events kept one by one (a CRLF stream is parsed per event) and runs, across the budget:
    what is kept stays under it, and the text is whole and in arrival order."""
    from sidecar.providers.base import MAX_KEPT_BYTES

    crlf = [event.replace(b"\n", b"\r\n") for event in CHAT_WORDS]
    run_bytes = b"".join(CHAT_WORDS)
    rounds = MAX_KEPT_BYTES // (len(run_bytes) + len(b"".join(crlf))) + 10
    chunks = [CHAT_HEAD]
    for _ in range(rounds):
        chunks += [*crlf, run_bytes]
    _, info, kept = run(CHAT, [*chunks, *CHAT_TAIL])
    kept_bytes = sum(len(k) if isinstance(k, bytes) else len(k.raw) for k in kept)  # type: ignore[attr-defined]
    assert kept_bytes <= MAX_KEPT_BYTES
    assert any(isinstance(k, bytes) for k in kept) and any(not isinstance(k, bytes) for k in kept)
    words = "".join(f" w{i}" for i in range(6))
    assert info.output_text == "Hello" + words * 2 * rounds


# -- gathered after the first content ----------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "head", "words", "tail"),
    [(CHAT, [CHAT_HEAD], CHAT_WORDS, CHAT_TAIL), (MESSAGES, MSG_HEAD, MSG_WORDS, MSG_TAIL)],
    ids=["chat", "messages"],
)
def test_pieces_after_the_first_content_are_gathered_and_read_at_close_with_the_same_result(
    shape: Shape, head: list[bytes], words: list[bytes], tail: list[bytes]
) -> None:
    events = [*head, *words, *tail]
    observer = shape.stream_observer(False)
    for event in head:
        assert observer.feed(event) == event
    assert observer.saw_content  # the first token is timed from the piece that brought it
    for event in [*words, *tail]:
        assert observer.feed(event) == event  # forwarded unchanged, at once
    assert observer._deferred == [*words, *tail]  # nothing read yet: no usage so far
    assert observer._usage.is_empty() or shape is MESSAGES  # (Anthropic reports input at the start)
    assert observer.close() == b""
    info = observer.result()
    saved = base.DEFERRED_BYTES
    base.DEFERRED_BYTES = 0
    try:
        _, expected, _ = run(shape, events)
    finally:
        base.DEFERRED_BYTES = saved
    assert info == expected and info.output_text == expected.output_text
    assert not info.usage.is_empty() and info.finish_reasons and info.complete


def test_gathered_pieces_are_read_once_they_reach_the_bound() -> None:
    """Memory per stream stays bounded: at DEFERRED_BYTES the gathered pieces are read."""
    observer = CHAT.stream_observer(False)
    observer.feed(CHAT_HEAD)
    fed = 0
    for i in range(3 * DEFERRED_BYTES // len(CHAT_WORDS[0])):
        word = CHAT_WORDS[i % len(CHAT_WORDS)]
        observer.feed(word)
        fed += len(word)
        assert observer._deferred_bytes < DEFERRED_BYTES
    assert fed > 2 * DEFERRED_BYTES and observer._kept  # read in bulk on the way
    for event in CHAT_TAIL:
        observer.feed(event)
    observer.close()
    assert observer.result().usage.get("output") == 9


def test_a_stripped_stream_is_not_gathered() -> None:
    """With its usage chunk stripped, what is forwarded depends on each event: read at once."""
    observer = CHAT.stream_observer(True)
    assert observer.feed(CHAT_HEAD) == CHAT_HEAD
    assert observer.feed(CHAT_WORDS[0]) == CHAT_WORDS[0]
    assert observer.feed(CHAT_USAGE) == b""  # the injected usage chunk, stripped as it comes
    assert observer._deferred == []
