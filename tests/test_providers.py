"""Provider adapters against the recorded payloads: exact usage, stream seams, stripping."""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass

import pytest

from sidecar.model import Usage
from sidecar.providers import MAX_OUTPUT_CHARS, PROVIDERS, SHAPES, ResponseInfo, Shape, detect
from sidecar.sse import SSEDecoder
from tests.fixtures import meta, names, path, read, request_body, stems

CHAT = SHAPES["openai", "chat"]
TEXT = SHAPES["openai", "text_completion"]
RESPONSES = SHAPES["openai", "responses"]
EMBEDDINGS = SHAPES["openai", "embeddings"]
MESSAGES = SHAPES["anthropic", "messages"]


# --- detect ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "provider", "expected"),
    [
        ("/v1/chat/completions", None, CHAT),
        ("/v1/chat/completions", "openai", CHAT),
        ("/v1/chat/completions?api-version=2024-10-21", "openai", CHAT),
        ("/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21", None, CHAT),
        ("/v1/chat/completions/", None, CHAT),
        ("chat/completions", None, CHAT),
        ("/v1/completions", None, TEXT),
        ("/openai/deployments/x/completions", "openai", TEXT),
        ("/v1/responses", None, RESPONSES),
        ("/openai/v1/responses?x=1", "openai", RESPONSES),
        ("/v1/embeddings", "openai", EMBEDDINGS),
        ("/v1/messages", None, MESSAGES),
        ("/v1/messages", "anthropic", MESSAGES),
        ("/anthropic/v1/messages?beta=true", "anthropic", MESSAGES),
        ("/v1/messages/count_tokens", None, None),
        ("/v1/messages/batches", "anthropic", None),
        ("/v1/chat/completions", "anthropic", None),
        ("/v1/messages", "openai", None),
        ("/v1/responses/resp_123", None, None),
        ("/v1/chat/completions/chatcmpl-123", None, None),
        ("/v1/models", None, None),
        ("/v1/chatcompletions", None, None),
        ("/v1/embeddings", "azure", None),
        ("", None, None),
    ],
)
def test_detect(path: str, provider: str | None, expected: Shape | None) -> None:
    assert detect(path, provider) is expected


def test_registry() -> None:
    assert set(SHAPES) == {
        ("openai", "chat"),
        ("openai", "text_completion"),
        ("openai", "responses"),
        ("openai", "embeddings"),
        ("anthropic", "messages"),
    }
    assert set(PROVIDERS) == {"openai", "anthropic"}
    for (provider, operation), shape in SHAPES.items():
        assert (shape.provider, shape.operation) == (provider, operation)


# --- the fixture table ----------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    usage: Usage
    model: str | None
    response_id: str | None
    finish_reasons: tuple[str, ...]
    service_tier: str | None
    output_text: str | None = None  # checked when given
    first_content: int | None = None  # index of the first content event (streams)


def U(
    input: int | None = None,
    cached_input: int | None = None,
    cache_write: int | None = None,
    cache_write_1h: int | None = None,
    output: int | None = None,
    reasoning: int | None = None,
) -> Usage:
    return Usage(input, cached_input, cache_write, cache_write_1h, output, reasoning)


EXPECTED: dict[str, Expected] = {
    # OpenAI chat, JSON
    "openai_chat_nonstream_reasoning_gpt5nano": Expected(
        U(input=11, cached_input=0, output=202, reasoning=192),
        "gpt-5-nano-2025-08-07",
        "chatcmpl-DPTCK253i6lgLWAYNGcPCKvwuZthn",
        ("stop",),
        "default",
        "3",
    ),
    "openai_chat_nonstream_cached_tokens": Expected(
        U(input=1149, cached_input=1024, output=353, reasoning=0),
        "gpt-4o-mini-2024-07-18",
        "chatcmpl-BNi420iFNtIOHzy8Gq2fVS5utTus7",
        ("stop",),
        "default",
    ),
    # OpenAI chat, streams
    "openai_chat_stream_include_usage": Expected(
        U(input=16, cached_input=0, output=10, reasoning=0),
        "gpt-4o-2024-08-06",
        "chatcmpl-CoDWl5rS0pF10P0W0TDVgY3NA26dk",
        ("stop",),
        "default",
        "4200 + 42 equals 4242.",
        first_content=1,
    ),
    "openai_chat_stream_include_usage_cached": Expected(
        U(input=1420, cached_input=1280, output=100, reasoning=0),
        "gpt-4o-2024-08-06",
        "chatcmpl-BpJBM4XqgLRpLxmTeun39ESCNhQwb",
        ("length",),
        "default",
        first_content=1,
    ),
    "openai_chat_stream_no_usage": Expected(
        U(),
        "gpt-4o-mini-2024-07-18",
        "chatcmpl-DQcd7FpSPJsUuDHRQSBAMIbcJna0v",
        ("stop",),
        "default",
        "Hello! How can I assist you today?",
        first_content=1,
    ),
    "openai_chat_stream_tool_calls": Expected(
        U(input=54, cached_input=0, output=20, reasoning=0),
        "gpt-4o-mini-2024-07-18",
        "chatcmpl-BWlJBDk2xe66hjff60joVYpXi1hh4",
        ("tool_calls",),
        "default",
        'multiply{"a":1231,"b":2331}',
        first_content=0,  # the first chunk already carries delta.tool_calls (id and name)
    ),
    # OpenAI Responses
    "openai_responses_nonstream_gpt55": Expected(
        U(input=11, cached_input=0, output=5, reasoning=0),
        "gpt-5.5-2026-04-23",
        "resp_08ddf351751647d60169fab1b8a7ac81a081b9e2400e87fb63",
        ("completed",),
        "default",
        "pong",
    ),
    "openai_responses_stream_gpt55": Expected(
        U(input=11, cached_input=0, output=5, reasoning=0),
        "gpt-5.5-2026-04-23",
        "resp_00592e63e61b66660169fab1b9f8e481a2b321356198d7ac1b",
        ("completed",),
        "default",
        "pong",
        first_content=4,
    ),
    "openai_responses_stream_web_search_reasoning_cached": Expected(
        U(input=9463, cached_input=8320, output=582, reasoning=512),
        "gpt-5-2025-08-07",
        "resp_00a60507bf41223d0068c9d2fbf93481a0ba2a7796ae2cab4c",
        ("completed",),
        "default",  # response.created says "auto" (the requested tier)
        first_content=13,
    ),
    # OpenAI embeddings: input only, no id; the model differs from the requested one
    "openai_embeddings_base64": Expected(U(input=2), "text-embedding-ada-002-v2", None, (), None, ""),
    # Anthropic: input_tokens excludes both cache counts
    "anthropic_messages_nonstream_cache_creation": Expected(
        U(input=4 + 1163, cached_input=0, cache_write=1163, output=187),
        "claude-3-5-sonnet-20240620",
        "msg_01EF3r8zYyZntM4Sg9a5kc6k",
        ("end_turn",),
        None,
    ),
    "anthropic_messages_nonstream_cache_read": Expected(
        U(input=4 + 1163, cached_input=1163, cache_write=0, output=202),
        "claude-3-5-sonnet-20240620",
        "msg_01YGB3PuEANUSkLuzemhtNVF",
        ("end_turn",),
        None,
    ),
    "anthropic_messages_stream_text_cache_read": Expected(
        # message_start says output 1 (a placeholder); message_delta says 221 (cumulative)
        U(input=4 + 1165, cached_input=1165, cache_write=0, output=221),
        "claude-3-5-sonnet-20240620",
        "msg_01XQRA3bs4SB4yTBMwD3dbUi",
        ("end_turn",),
        None,
        first_content=3,
    ),
    "anthropic_messages_stream_tool_use": Expected(
        U(input=543, cached_input=0, cache_write=0, cache_write_1h=0, output=40),
        "claude-haiku-4-5-20251001",
        "msg_01BnVamfF7ccY9Qt3nZHAyaG",
        ("tool_use",),
        "standard",
        first_content=3,  # input_json_delta with an empty partial_json
    ),
    "anthropic_messages_stream_thinking": Expected(
        U(input=46, cached_input=0, cache_write=0, cache_write_1h=0, output=133),
        "claude-haiku-4-5-20251001",
        "msg_01Eg56TYRnKCEgWtZu2yjR1t",
        ("end_turn",),
        "standard",
        first_content=12,  # thinking and signature deltas come first and are not content
    ),
    # Error bodies: nothing reported, nothing invented
    "openai_error_400_unsupported_parameter": Expected(U(), None, None, (), None, ""),
    "openai_error_404_model_not_found": Expected(U(), None, None, (), None, ""),
    "anthropic_error_400_invalid_request": Expected(U(), None, None, (), None, ""),
    "anthropic_error_404_not_found": Expected(U(), None, None, (), None, ""),
}


def shape_of(stem: str) -> Shape:
    info = meta(stem)
    shape = detect(info["endpoint"], info["provider"])
    assert shape is not None, stem
    return shape


def body_files(stem: str) -> list[str]:
    """Every stored body of a fixture: plain and, where recorded, the gzip one."""
    files = meta(stem)["body_files"]
    return [files[key] for key in ("raw", "decoded", "raw_compressed") if key in files]


def is_stream(stem: str) -> bool:
    return any(name.endswith((".sse", ".sse.gz")) for name in body_files(stem))


def observe(shape: Shape, chunks: list[bytes], strip: bool = False) -> tuple[ResponseInfo, bytes]:
    observer = shape.stream_observer(strip)
    out = b"".join(observer.feed(chunk) for chunk in chunks)
    out += observer.close()
    return observer.result(), out


def check(stem: str, result: ResponseInfo) -> None:
    expected = EXPECTED[stem]
    assert result.usage == expected.usage
    assert result.model == expected.model
    assert result.response_id == expected.response_id
    assert result.finish_reasons == expected.finish_reasons
    assert result.service_tier == expected.service_tier
    assert result.complete
    assert not result.malformed
    if expected.output_text is not None:
        assert result.output_text == expected.output_text


def test_every_fixture_has_an_expectation() -> None:
    assert set(stems()) == set(EXPECTED)


def test_usage_matches_the_meta_files() -> None:
    """The table above agrees with the raw usage recorded in each meta file."""
    for stem in stems():
        recorded = meta(stem)["usage"]
        usage = EXPECTED[stem].usage
        if not recorded:
            assert usage == U()
            continue
        last = recorded[-1]["usage"] if isinstance(recorded, list) else recorded
        if "prompt_tokens" in last:
            assert (usage.input, usage.output) == (last["prompt_tokens"], last.get("completion_tokens"))
        elif meta(stem)["provider"] == "openai":
            assert (usage.input, usage.output) == (last["input_tokens"], last["output_tokens"])
        else:
            start = recorded[0]["usage"] if isinstance(recorded, list) else recorded
            cache_read = last.get("cache_read_input_tokens", start.get("cache_read_input_tokens"))
            cache_creation = last.get("cache_creation_input_tokens", start.get("cache_creation_input_tokens"))
            assert (
                usage.input == last.get("input_tokens", start["input_tokens"]) + cache_read + cache_creation
            )
            assert usage.output == last["output_tokens"]


@pytest.mark.parametrize("stem", [s for s in EXPECTED if not is_stream(s)])
def test_json_bodies(stem: str) -> None:
    shape = shape_of(stem)
    for name in body_files(stem):
        check(stem, shape.parse_response(read(name)))


@pytest.mark.parametrize("stem", [s for s in EXPECTED if is_stream(s)])
def test_streams_whole_and_byte_by_byte(stem: str) -> None:
    shape = shape_of(stem)
    for name in body_files(stem):
        body = read(name)
        whole, _ = observe(shape, [body])
        check(stem, whole)
        assert observe(shape, [body[i : i + 1] for i in range(len(body))])[0] == whole


@pytest.mark.parametrize("stem", [s for s in EXPECTED if is_stream(s)])
def test_streams_at_split_points_and_random_chunks(stem: str) -> None:
    shape = shape_of(stem)
    body = read(f"{stem}.sse")
    whole, _ = observe(shape, [body])
    rng = random.Random(stem)
    points = range(len(body) + 1) if len(body) <= 8192 else rng.sample(range(len(body) + 1), 800)
    for i in points:
        assert observe(shape, [body[:i], body[i:]])[0] == whole, i
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randint(2, 80)))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        assert observe(shape, chunks)[0] == whole


@pytest.mark.parametrize("name", names(".sse.gz"))
def test_gzip_stream_decompressed_incrementally(name: str) -> None:
    """As the proxy does: decompress a copy of each compressed chunk, feed the result."""
    stem = name.removesuffix(".sse.gz")
    compressed = path(name).read_bytes()
    for size in (1, 7, 64, 4096):
        inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunks = [inflate.decompress(compressed[i : i + size]) for i in range(0, len(compressed), size)]
        chunks.append(inflate.flush())
        check(stem, observe(shape_of(stem), chunks)[0])


@pytest.mark.parametrize("stem", [s for s in EXPECTED if is_stream(s)])
def test_saw_content_turns_true_at_the_first_content_event(stem: str) -> None:
    body = read(f"{stem}.sse")
    decoder = SSEDecoder()
    events = decoder.feed(body) + decoder.flush()
    observer = shape_of(stem).stream_observer(False)
    states = []
    for event in events:
        observer.feed(event.raw)
        states.append(observer.saw_content)
    first = EXPECTED[stem].first_content
    assert first is not None
    assert states == [False] * first + [True] * (len(events) - first)


def test_feed_returns_its_argument_when_not_stripping() -> None:
    observer = CHAT.stream_observer(False)
    chunk = read("openai_chat_stream_include_usage.sse")[:100]
    assert observer.feed(chunk) is chunk
    assert observer.close() == b""


# --- strip mode -----------------------------------------------------------------------


def usage_event_raw(body: bytes) -> bytes:
    decoder = SSEDecoder()
    [raw] = [e.raw for e in decoder.feed(body) + decoder.flush() if '"choices":[]' in e.data]
    return raw


@pytest.mark.parametrize(
    "stem",
    [
        "openai_chat_stream_include_usage",
        "openai_chat_stream_include_usage_cached",
        "openai_chat_stream_tool_calls",
    ],
)
def test_strip_removes_exactly_the_usage_chunk(stem: str) -> None:
    body = read(f"{stem}.sse")
    usage_raw = usage_event_raw(body)
    expected = body.replace(usage_raw, b"")
    assert len(expected) == len(body) - len(usage_raw)
    assert expected.endswith(b"data: [DONE]\n\n")
    result, out = observe(CHAT, [body], strip=True)
    assert out == expected
    check(stem, result)  # the usage was still read
    points = range(len(body) + 1) if len(body) <= 8192 else random.Random(1).sample(range(len(body)), 500)
    for i in points:
        result, out = observe(CHAT, [body[:i], body[i:]], strip=True)
        assert out == expected, i
        assert result.usage == EXPECTED[stem].usage
    assert observe(CHAT, [body[i : i + 1] for i in range(len(body))], strip=True)[1] == expected


def test_strip_holds_an_incomplete_event_until_it_completes() -> None:
    observer = CHAT.stream_observer(True)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    assert observer.feed(first[:10]) == b""
    assert not observer.saw_content
    assert observer.feed(first[10:]) == first
    assert observer.saw_content


def test_strip_forwards_a_cut_event_as_is_at_close() -> None:
    body = read("openai_chat_stream_include_usage.sse")
    usage_at = body.index(usage_event_raw(body))
    for cut in (
        body.index(b"data:", 400) + 30,  # inside a content chunk
        usage_at + 50,  # inside the usage chunk: cut JSON is not recognised, and not repaired
    ):
        head = body[:cut]
        observer = CHAT.stream_observer(True)
        fed = observer.feed(head)
        assert head.startswith(fed) and len(fed) < len(head)
        assert fed + observer.close() == head
        result = observer.result()
        assert not result.complete
        assert not result.malformed  # a cut stream is incomplete, not malformed
        assert result.usage == U()
    # The usage chunk complete but for its blank line: recognised at close and stripped.
    head = body[: usage_at + len(usage_event_raw(body)) - 1]
    result, out = observe(CHAT, [head], strip=True)
    assert out == body[:usage_at]
    assert result.usage == EXPECTED["openai_chat_stream_include_usage"].usage
    assert not result.complete


@pytest.mark.parametrize("stem", [s for s in EXPECTED if is_stream(s) and not s.startswith("openai_chat")])
def test_strip_mode_changes_nothing_for_other_shapes(stem: str) -> None:
    body = read(f"{stem}.sse")
    result, out = observe(shape_of(stem), [body[i : i + 97] for i in range(0, len(body), 97)], strip=True)
    assert out == body
    check(stem, result)


def test_strip_keeps_oversized_events() -> None:
    big = b'data: {"choices":[{"delta":{"content":"' + b"x" * (9 * 1024 * 1024) + b'"}}]}\n\n'
    body = big + b"data: [DONE]\n\n"
    result, out = observe(CHAT, [body[i : i + 65536] for i in range(0, len(body), 65536)], strip=True)
    assert out == body
    assert result.complete


# --- request side ---------------------------------------------------------------------


@pytest.mark.parametrize("stem", list(EXPECTED))
def test_parse_request_of_recorded_bodies(stem: str) -> None:
    recorded = meta(stem)["request_body"]
    info = shape_of(stem).parse_request(request_body(stem))
    assert info.model == recorded["model"]
    assert info.stream == (recorded.get("stream") is True)
    include_usage = (recorded.get("stream_options") or {}).get("include_usage") is True
    opt_in = shape_of(stem) in (CHAT, TEXT) and info.stream
    assert info.wants_usage == (include_usage if opt_in else True)


def test_parse_request_never_raises() -> None:
    for shape in SHAPES.values():
        for body in (
            b"",
            b"{",
            b"[]",
            b"null",
            b"\xff\xfe",
            b'{"model": 3, "stream": "yes"}',
            b"[" * 100_000,
        ):
            info = shape.parse_request(body)
            assert (info.model, info.stream, info.wants_usage) == (None, False, True)


def test_inject_stream_usage_into_a_recorded_request() -> None:
    body = request_body("openai_chat_stream_no_usage")
    assert CHAT.parse_request(body).wants_usage is False
    injected = CHAT.inject_stream_usage(body)
    assert injected is not None
    assert json.loads(injected) == {**json.loads(body), "stream_options": {"include_usage": True}}
    # Spliced in: every other byte is as the client sent it.
    assert injected.replace(b'"stream_options":{"include_usage":true},', b"") == body
    assert CHAT.parse_request(injected).wants_usage is True
    assert CHAT.inject_stream_usage(injected) is None


@pytest.mark.parametrize(
    "stem",
    [
        "openai_chat_stream_include_usage",  # already asks for usage
        "openai_chat_nonstream_cached_tokens",  # not a stream
        "openai_responses_stream_gpt55",  # Responses always report usage
        "openai_embeddings_base64",
        "anthropic_messages_stream_tool_use",  # Anthropic always reports usage
    ],
)
def test_inject_stream_usage_leaves_other_requests_alone(stem: str) -> None:
    assert shape_of(stem).inject_stream_usage(request_body(stem)) is None


def test_inject_stream_usage_keeps_other_stream_options() -> None:
    request = {"model": "gpt-4o", "stream": True, "stream_options": {"include_obfuscation": False}}
    injected = CHAT.inject_stream_usage(json.dumps(request).encode())
    assert injected is not None
    expected = {**request, "stream_options": {"include_obfuscation": False, "include_usage": True}}
    assert json.loads(injected) == expected
    request["stream_options"] = {"include_usage": False}
    injected = TEXT.inject_stream_usage(json.dumps(request).encode())
    assert injected is not None
    assert json.loads(injected)["stream_options"] == {"include_usage": True}
    request["stream_options"] = None
    injected = CHAT.inject_stream_usage(json.dumps(request).encode())
    assert injected is not None
    assert json.loads(injected)["stream_options"] == {"include_usage": True}


def test_inject_stream_usage_edge_bodies() -> None:
    # Leading BOM and whitespace, non-ASCII text kept byte for byte.
    body = (
        '\ufeff \n{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"héllo ✓"}]}'.encode()
    )
    injected = CHAT.inject_stream_usage(body)
    assert injected is not None
    assert injected.replace(b'"stream_options":{"include_usage":true},', b"") == body
    assert json.loads(injected)["stream_options"] == {"include_usage": True}
    # Re-serialised with a lone surrogate escape: still valid JSON, same meaning.
    body = b'{"stream":true,"stream_options":{},"messages":[{"content":"\\ud800"}]}'
    injected = CHAT.inject_stream_usage(body)
    assert injected is not None
    assert json.loads(injected) == {**json.loads(body), "stream_options": {"include_usage": True}}
    # Invalid stream_options, malformed bodies, non-streams: left alone.
    for body in (
        b'{"stream":true,"stream_options":"x"}',
        b"{",
        b"[]",
        b'{"stream":"true"}',
        b'{"stream":false}',
    ):
        assert CHAT.inject_stream_usage(body) is None


def test_prompt_text_of_recorded_requests() -> None:
    text = CHAT.prompt_text(request_body("openai_chat_stream_no_usage"))
    assert (text.text, text.token_ids) == ("Hello", 0)
    text = CHAT.prompt_text(request_body("openai_chat_stream_tool_calls"))
    assert text.text.startswith("What is 1231 * 2331?\n")
    assert '"name":"multiply"' in text.text
    recorded = meta("openai_chat_nonstream_cached_tokens")["request_body"]["messages"]
    text = CHAT.prompt_text(request_body("openai_chat_nonstream_cached_tokens"))
    assert text.text == "\n".join(m["content"] for m in recorded)
    text = RESPONSES.prompt_text(request_body("openai_responses_stream_web_search_reasoning_cached"))
    assert text.text.startswith("You are a helpful assistant.\nWhat is the weather in San Francisco today?\n")
    assert '"type":"web_search"' in text.text
    assert EMBEDDINGS.prompt_text(request_body("openai_embeddings_base64")).text == "test query"
    recorded = meta("anthropic_messages_nonstream_cache_creation")["request_body"]
    text = MESSAGES.prompt_text(request_body("anthropic_messages_nonstream_cache_creation"))
    system = recorded["system"]
    system_text = system if isinstance(system, str) else "\n".join(b["text"] for b in system)
    assert text.text.startswith(system_text)
    assert recorded["messages"][0]["content"][0]["text"] in text.text
    text = MESSAGES.prompt_text(request_body("anthropic_messages_stream_tool_use"))
    assert text.text.startswith("Generate one name for a pet pelican\n")
    assert "pelican_name_generator" in text.text


def test_prompt_text_shapes() -> None:
    assert EMBEDDINGS.prompt_text(b'{"input": [[1, 2, 3], [4]]}').token_ids == 4
    assert EMBEDDINGS.prompt_text(b'{"input": [5, 6]}').token_ids == 2
    assert EMBEDDINGS.prompt_text(b'{"input": ["a", "b"]}').text == "a\nb"
    text = TEXT.prompt_text(b'{"prompt": ["one", "two"], "suffix": "end"}')
    assert (text.text, text.token_ids) == ("one\ntwo\nend", 0)
    assert TEXT.prompt_text(b'{"prompt": [1, 2, 3]}').token_ids == 3
    chat = {
        "messages": [
            {"role": "system", "content": "sys"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}],
            },
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert CHAT.prompt_text(json.dumps(chat).encode()).text == (
        'sys\nlook\nf\n{}\n42\n[{"type":"function","function":{"name":"f"}}]'
    )
    responses = {"instructions": "be brief", "input": "hi"}
    assert RESPONSES.prompt_text(json.dumps(responses).encode()).text == "be brief\nhi"
    messages = {
        "system": [{"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "name": "t", "input": {"a": 1}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "content": [{"type": "text", "text": "r"}]}],
            },
        ],
    }
    assert MESSAGES.prompt_text(json.dumps(messages).encode()).text == 'sys\nq\nt\n{"a":1}\nr'
    for shape in SHAPES.values():
        assert shape.prompt_text(b"not json").text == ""


# --- malformed and adversarial input --------------------------------------------------


def test_malformed_json_body() -> None:
    for shape in SHAPES.values():
        for body in (b"{not json", b"", b"[1, 2]", b"null", b"\xff"):
            result = shape.parse_response(body)
            assert result.malformed
            assert result.usage == U()
            assert not result.complete


def test_malformed_event_is_flagged_and_the_stream_goes_on() -> None:
    body = read("openai_chat_stream_include_usage.sse")
    broken = b'data: {"choices": [\n\n' + b"data: [1, 2]\n\n" + body
    result, _ = observe(CHAT, [broken])
    assert result.malformed
    assert result.usage == EXPECTED["openai_chat_stream_include_usage"].usage
    body = read("anthropic_messages_stream_text_cache_read.sse")
    broken = body.replace(b'"text":"Here"}}', b'"text":"Here"}', 1)
    result, _ = observe(MESSAGES, [broken])
    assert result.malformed
    assert result.usage == EXPECTED["anthropic_messages_stream_text_cache_read"].usage
    body = read("openai_responses_stream_gpt55.sse")
    broken = body.replace(b'"delta":"pong"', b'"delta":pong', 1)
    result, _ = observe(RESPONSES, [broken])
    assert result.malformed
    assert result.complete


def test_truncated_and_garbled_streams_never_raise() -> None:
    rng = random.Random(7)
    for stem in (s for s in EXPECTED if is_stream(s)):
        shape = shape_of(stem)
        body = read(f"{stem}.sse")
        for cut in rng.sample(range(len(body)), 200):
            observe(shape, [body[:cut]], strip=True)
        for _ in range(50):
            garbled = bytearray(body)
            for _ in range(20):
                garbled[rng.randrange(len(garbled))] = rng.randrange(256)
            observe(shape, [bytes(garbled)])
        wrong_types = body.replace(b'"usage":{', b'"usage":{"x":[],"y":"z","n":').replace(b":0", b':"0"')
        observe(shape, [wrong_types])


def test_wrong_types_in_usage_are_not_reported() -> None:
    body = (
        b'{"usage": {"prompt_tokens": "5", "completion_tokens": true, "prompt_tokens_details": [], "x": -1}}'
    )
    assert CHAT.parse_response(body).usage == U()
    body = b'{"usage": {"prompt_tokens": -3, "completion_tokens": 2.0}}'
    assert CHAT.parse_response(body).usage == U()
    assert MESSAGES.parse_response(b'{"usage": {"input_tokens": null, "output_tokens": 3}}').usage == U(
        output=3
    )


# --- usage rules on synthetic streams -------------------------------------------------


def sse(*events: tuple[str | None, object]) -> bytes:
    out = b""
    for name, data in events:
        if name is not None:
            out += f"event: {name}\n".encode()
        out += f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
    return out


def test_anthropic_output_is_not_reported_without_message_delta_usage() -> None:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": "claude-x",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1},
        },
    }
    result, _ = observe(MESSAGES, [sse(("message_start", start))])
    assert result.usage == U(input=15, cached_input=5, output=None)
    assert (result.model, result.response_id, result.complete) == ("claude-x", "msg_1", False)
    # A message_delta without usage still leaves output unreported.
    body = sse(("message_start", start), ("message_delta", {"type": "message_delta", "delta": {}}))
    assert observe(MESSAGES, [body])[0].usage.output is None


def test_anthropic_message_delta_usage_is_cumulative() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 100,
                "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60},
                "output_tokens": 1,
                "service_tier": "standard",
            }
        },
    }
    body = sse(
        ("message_start", start),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens"},
                "usage": {"input_tokens": 10, "cache_creation_input_tokens": 100, "output_tokens": 9},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    result, _ = observe(MESSAGES, [body])
    assert result.usage == U(input=110, cached_input=0, cache_write=100, cache_write_1h=60, output=9)
    assert result.finish_reasons == ("max_tokens",)
    assert result.service_tier == "standard"
    assert result.complete


def test_anthropic_events_without_event_lines_and_errors() -> None:
    body = sse(
        (None, {"type": "message_start", "message": {"usage": {"input_tokens": 3}}}),
        (None, {"type": "ping"}),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    observer = MESSAGES.stream_observer(False)
    observer.feed(body)
    observer.close()
    assert not observer.saw_content
    assert observer.result().usage == U(input=3)
    assert not observer.result().complete
    body = sse((None, {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x"}}))
    observer = MESSAGES.stream_observer(False)
    observer.feed(body)
    assert observer.saw_content


def test_chat_usage_null_means_nothing_and_the_last_usage_wins() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
    body = sse(
        (None, {"choices": [{"delta": {"role": "assistant"}}], "usage": None}),
        (None, {"choices": [], "usage": usage}),
        (None, {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": None}),
        (None, "[DONE]"),
    )
    result, _ = observe(CHAT, [body])
    assert result.usage == U(input=3, cached_input=0, output=0)  # a reported 0 is 0
    assert result.finish_reasons == ("stop",)
    assert result.complete


def test_chat_finish_reasons_by_choice_index_and_refusals() -> None:
    body = sse(
        (None, {"choices": [{"index": 1, "delta": {"refusal": "No."}, "finish_reason": "stop"}]}),
        (None, {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "length"}]}),
    )
    observer = CHAT.stream_observer(False)
    observer.feed(body)
    observer.close()
    assert observer.saw_content
    assert observer.result().finish_reasons == ("length", "stop")
    assert observer.result().output_text == "No."
    assert not observer.result().complete


def test_text_completion_stream() -> None:
    body = sse(
        (None, {"id": "cmpl-1", "model": "gpt-3.5-turbo-instruct", "choices": [{"text": "", "index": 0}]}),
        (None, {"choices": [{"text": "Hi", "index": 0, "finish_reason": "stop"}]}),
        (None, {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}),
        (None, "[DONE]"),
    )
    decoder = SSEDecoder()
    events = decoder.feed(body)
    observer = TEXT.stream_observer(True)
    assert observer.feed(events[0].raw) == events[0].raw
    assert not observer.saw_content
    assert observer.feed(events[1].raw) == events[1].raw
    assert observer.saw_content
    assert observer.feed(events[2].raw) == b""
    assert observer.feed(events[3].raw) == events[3].raw
    result = observer.result()
    assert result.usage == U(input=2, output=1)
    assert (result.model, result.response_id, result.output_text) == (
        "gpt-3.5-turbo-instruct",
        "cmpl-1",
        "Hi",
    )
    response = (
        b'{"id":"cmpl-2","model":"m","choices":[{"text":"ok","finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":1}}'
    )
    result = TEXT.parse_response(response)
    assert (result.usage, result.finish_reasons, result.output_text) == (U(input=1), ("length",), "ok")


def test_responses_incomplete_and_failed_end_the_stream() -> None:
    final = {
        "id": "resp_1",
        "model": "gpt-5",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "service_tier": "flex",
        "usage": {"input_tokens": 4, "output_tokens": 8, "output_tokens_details": {"reasoning_tokens": 8}},
    }
    body = sse(
        (
            "response.created",
            {"type": "response.created", "response": {**final, "usage": None, "status": "x"}},
        ),
        (
            "response.reasoning_summary_text.delta",
            {"type": "response.reasoning_summary_text.delta", "delta": "…"},
        ),
        ("response.incomplete", {"type": "response.incomplete", "response": final}),
    )
    result, _ = observe(RESPONSES, [body])
    assert result.usage == U(input=4, output=8, reasoning=8)
    assert (result.finish_reasons, result.service_tier, result.complete) == (
        ("max_output_tokens",),
        "flex",
        True,
    )
    failed = {"id": "resp_2", "model": "gpt-5", "status": "failed", "usage": None}
    result, _ = observe(RESPONSES, [sse((None, {"type": "response.failed", "response": failed}))])
    assert (result.usage, result.finish_reasons, result.complete) == (U(), ("failed",), True)


def test_responses_content_events() -> None:
    events = [
        ("response.output_text.delta", ""),  # empty text is not content
        ("response.function_call_arguments.delta", ""),  # a tool-call delta is, even empty
    ]
    for kind, delta in events:
        observer = RESPONSES.stream_observer(False)
        observer.feed(sse((kind, {"type": kind, "delta": delta})))
        assert observer.saw_content is (kind != "response.output_text.delta")
    observer = RESPONSES.stream_observer(False)
    observer.feed(sse((None, {"type": "response.refusal.delta", "delta": "no"})))
    assert observer.saw_content
    assert observer.result().output_text == "no"


def test_output_text_is_capped() -> None:
    piece = "x" * 300_000
    body = b"".join(sse((None, {"choices": [{"delta": {"content": piece}}]})) for _ in range(5))
    result, _ = observe(CHAT, [body])
    assert len(result.output_text) == MAX_OUTPUT_CHARS


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        (b'{"model": "m", "max_tokens": 300}', 300),
        (b'{"model": "m", "max_completion_tokens": 200, "max_tokens": 300}', 200),  # the current name wins
        (b'{"model": "m", "max_output_tokens": 50}', 50),  # the Responses API's name
        (b'{"model": "m", "max_tokens": true}', None),
        (b'{"model": "m", "max_tokens": 0}', None),
        (b'{"model": "m", "max_tokens": -5}', None),
        (b'{"model": "m", "max_tokens": 12.5}', None),
        (b'{"model": "m", "max_tokens": "100"}', None),
        (b'{"model": "m"}', None),
        (b"[1, 2]", None),
    ],
)
def test_parse_request_reads_the_output_cap(body: bytes, cap: int | None) -> None:
    """The token rate limits charge max_tokens up front: the shape's one parse reads it."""
    for shape in SHAPES.values():
        assert shape.parse_request(body).max_tokens == cap, shape


@pytest.mark.parametrize(
    "stem", ["openai_chat_stream_include_usage", "anthropic_messages_stream_text_cache_read"]
)
def test_a_stream_arriving_whole_is_looked_at_only_where_it_matters(
    stem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy sidecar reads a whole stream at once: its content deltas after the first are
    kept as one run, neither cut into events nor looked at one by one, as they are when
    they trickle in one per chunk; the result is the same."""
    from sidecar.sse import Event

    body = read(f"{stem}.sse")
    decoder = SSEDecoder()
    events = decoder.feed(body) + decoder.flush()
    shape = shape_of(stem)
    kind = type(shape.stream_observer(False))
    seen: list[bytes] = []
    original = kind._observe

    def counting(self: object, event: Event, final: bool) -> bool:
        seen.append(event.raw)
        return original(self, event, final)  # type: ignore[arg-type]

    monkeypatch.setattr(kind, "_observe", counting)
    whole, _ = observe(shape, [body])
    check(stem, whole)
    seen_whole = list(seen)
    seen.clear()
    assert observe(shape, [e.raw for e in events])[0] == whole
    assert seen == seen_whole  # the same events looked at, however the stream arrives
    assert len(events) >= 10, "the fixture needs several content deltas to show anything"
    assert len(seen_whole) < len(events) // 2  # looked at one by one, all of them would be
