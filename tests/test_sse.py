"""The SSE decoder at every chunk seam, over the recorded streams and synthetic edge cases."""

from __future__ import annotations

import random
import re
import time

import pytest

from sidecar.sse import Event, SSEDecoder
from tests.fixtures import names, read

SSE_FILES = names(".sse") + names(".sse.gz")


def decode(chunks: list[bytes], **kwargs: int) -> tuple[list[Event], SSEDecoder]:
    decoder = SSEDecoder(**kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.flush()
    return events, decoder


def fields(events: list[Event]) -> list[tuple[str | None, str]]:
    """(event, data) of every event that is more than leftover blank lines."""
    return [(e.event, e.data) for e in events if e.raw.strip(b"\r\n")]


def reference(body: bytes) -> list[tuple[str | None, str]]:
    """A plain, non-incremental reading of the WHATWG rules, for comparison."""
    out: list[tuple[str | None, str]] = []
    event: str | None = None
    data: list[str] | None = None
    seen = False
    for line in re.split(r"\r\n|\r|\n", body.decode("utf-8")):
        if line == "":
            if seen:
                out.append((event, "\n".join(data) if data is not None else ""))
            event, data, seen = None, None, False
            continue
        seen = True
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "" and colon:
            continue
        if name == "event":
            event = value
        elif name == "data":
            data = [*(data or []), value]
    if seen:
        out.append((event, "\n".join(data) if data is not None else ""))
    return out


def split_points(body: bytes, limit: int = 8192) -> list[int]:
    """Every split point of a small body; of a large one, both ends fully and 500 between."""
    if len(body) <= limit:
        return list(range(len(body) + 1))
    rng = random.Random(len(body))
    edge = limit // 2
    middle = rng.sample(range(edge, len(body) - edge), 500)
    return [*range(edge), *middle, *range(len(body) - edge, len(body) + 1)]


def splits(body: bytes, rng: random.Random, pieces: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(body)), min(pieces, len(body) - 1)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@pytest.mark.parametrize("name", SSE_FILES)
def test_fixture_at_split_points(name: str) -> None:
    body = read(name)
    whole, _ = decode([body])
    assert b"".join(e.raw for e in whole) == body
    assert fields(whole) == reference(body)
    for i in split_points(body):
        events, _ = decode([body[:i], body[i:]])
        assert b"".join(e.raw for e in events) == body, i
        assert fields(events) == fields(whole), i


@pytest.mark.parametrize("name", SSE_FILES)
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_fixture_line_endings_and_awkward_chunks(name: str, ending: bytes) -> None:
    body = read(name).replace(b"\n", ending)
    expected = fields(decode([read(name)])[0])
    rng = random.Random(name)
    chunkings = [
        [body],
        [body[i : i + 1] for i in range(len(body))],
        *(splits(body, rng, rng.randint(2, 60)) for _ in range(20)),
    ]
    for chunks in chunkings:
        events, _ = decode(chunks)
        assert b"".join(e.raw for e in events) == body
        assert fields(events) == expected


def test_gzip_fixtures_match_their_plain_copy() -> None:
    for name in names(".sse.gz"):
        assert read(name) == read(name.removesuffix(".gz"))


def test_httpx_seams() -> None:
    # httpx's LineDecoder test: a "\r" ending one chunk and its "\n" starting the next.
    events, _ = decode([b"", b"data: a\r", b"\n\r\ndata: b"])
    assert [(e.data, e.raw) for e in events] == [("a", b"data: a\r\n\r\n"), ("b", b"data: b")]
    events, _ = decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert fields(events) == [(None, "a\nb")]
    assert b"".join(e.raw for e in events) == b"data: a\r\ndata: b\r\n\r\n"


def test_cr_line_endings_are_not_held_back() -> None:
    decoder = SSEDecoder()
    # A lone CR ends the event at once; the next chunk does not start with "\n".
    assert [e.data for e in decoder.feed(b"data: x\r\r")] == ["x"]
    assert [e.data for e in decoder.feed(b"data: y\r\r")] == ["y"]


def test_empty_chunks_return_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert [e.data for e in decoder.feed(b"\n")] == ["x"]
    assert decoder.flush() == []
    assert SSEDecoder().flush() == []


def test_fields() -> None:
    body = (
        b": comment line\n"
        b"id: 7\n"
        b"retry: 1000\n"
        b"event: custom\n"
        b"data:no-space\n"
        b"data:  two spaces\n"
        b"data\n"
        b"unknown: x\n"
        b"data: trailing   \n"
        b"\n"
    )
    [event] = decode([body])[0]
    assert event.event == "custom"
    assert event.data == "no-space\n two spaces\n\ntrailing   "
    assert event.raw == body


def test_comment_only_and_dataless_blocks_keep_their_bytes() -> None:
    body = b": keep-alive\n\nid: 1\n\ndata: x\n\n"
    events, _ = decode([body])
    assert [(e.event, e.data, e.raw) for e in events] == [
        (None, "", b": keep-alive\n\n"),
        (None, "", b"id: 1\n\n"),
        (None, "x", b"data: x\n\n"),
    ]


def test_extra_blank_lines_travel_with_the_next_event() -> None:
    events, _ = decode([b"\n\ndata: a\n\n\n\ndata: b\n\n\n"])
    assert [(e.data, e.raw) for e in events] == [
        ("a", b"\n\ndata: a\n\n"),
        ("b", b"\n\ndata: b\n\n"),
        ("", b"\n"),
    ]


def test_flush_returns_an_unterminated_event() -> None:
    events, _ = decode([b"event: done\ndata: [DONE]"])
    assert [(e.event, e.data, e.raw) for e in events] == [("done", "[DONE]", b"event: done\ndata: [DONE]")]
    events, _ = decode([b'data: a\n\ndata: {"cut'])
    assert [e.data for e in events] == ["a", '{"cut']


def test_utf8_split_inside_a_character_and_bom() -> None:
    body = "\ufeffdata: héllo ✓\n\n".encode()
    for i in range(len(body) + 1):
        events, _ = decode([body[:i], body[i:]])
        assert [e.data for e in events] == ["héllo ✓"]
        assert b"".join(e.raw for e in events) == body


def test_invalid_utf8_is_replaced_not_raised() -> None:
    [event] = decode([b"data: \xff\xfe\n\n"])[0]
    assert event.data == "\ufffd\ufffd"


def test_oversized_event_is_handed_out_undecoded() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    body = b"data: small\n\n" + big + b"data: after\n\n"
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    decoder = SSEDecoder(max_event_bytes=1000)
    events: list[Event] = []
    for chunk in chunks:
        out = decoder.feed(chunk)
        events += out
    events += decoder.flush()
    assert decoder.oversized == 1
    assert b"".join(e.raw for e in events) == body
    assert [e.data for e in events if e.data] == ["small", "after"]
    # The oversized block comes back in pieces as it arrives: nothing big is held.
    assert all(len(e.raw) <= 1100 for e in events)


def test_oversized_then_crlf_seam() -> None:
    body = b"data: " + b"y" * 50 + b"\r\n\r\ndata: ok\r\n\r\n"
    for i in range(len(body) + 1):
        events, decoder = decode([body[:i], body[i:]], max_event_bytes=20)
        assert b"".join(e.raw for e in events) == body, i
        assert [e.data for e in events if e.data] == ["ok"], i
        assert decoder.oversized == 1


def test_random_synthetic_streams_match_the_reference() -> None:
    rng = random.Random(1234)
    lines = [b"data: a", b"data:", b'data: {"k": 1}', b"event: e", b": c", b"id: 3", b"retry: 5", b"x", b""]
    endings = [b"\n", b"\r\n", b"\r"]
    for _ in range(300):
        body = b"".join(rng.choice(lines) + rng.choice(endings) for _ in range(rng.randint(1, 25)))
        expected = reference(body)
        for chunks in ([body], [body[i : i + 1] for i in range(len(body))], splits(body, rng, 5)):
            if not body:
                continue
            events, _ = decode(chunks)
            assert b"".join(e.raw for e in events) == body
            assert fields(events) == expected, body


def test_a_long_line_in_many_chunks_is_not_searched_quadratically() -> None:
    body = b"data: " + b"x" * (4 * 1024 * 1024) + b"\n\n"
    decoder = SSEDecoder()
    started = time.perf_counter()
    events: list[Event] = []
    for i in range(0, len(body), 512):
        events += decoder.feed(body[i : i + 512])
    elapsed = time.perf_counter() - started
    assert [len(e.data) for e in events] == [4 * 1024 * 1024]
    assert elapsed < 3  # about 16 GB of searching if every chunk rescanned the line
