"""The proxy listener's HTTP/1.1 server (sidecar/http_server.py) on real loopback sockets.

Raw bytes in, raw bytes out: keep-alive and pipelining, framing of answers (length,
chunked, close), HEAD and 204, ``Expect: 100-continue``, the limits on heads, refusals
that close the connection, a body read as it arrives, a client that goes away, the idle
timeout, back-pressure and shutdown. The smuggling cases and the proxy's own refusals
on top are in test_hardening_security.py and test_hardening_client.py. Every test runs
on asyncio's loop and on uvloop (the sidecar's).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict

from sidecar import http_server
from sidecar.http_server import HttpServer, Request, Response

LOG = logging.getLogger("test.http_server")
Handler = Callable[[Request], Awaitable[Response]]


async def echo(request: Request) -> Response:
    """Answers with the method, path, query and body it saw."""
    parts = []
    while piece := await request.content.readany():
        parts.append(piece)
    body = b"%s %s ?%s %s" % (
        request.method.encode(),
        request.raw_path.encode(),
        request.query_string.encode(),
        b"".join(parts),
    )
    return Response(200, body=body, content_type="text/plain")


@contextlib.asynccontextmanager
async def serving(handler: Handler = echo, keepalive: float = 75.0) -> AsyncIterator[tuple[HttpServer, int]]:
    server = HttpServer(handler, LOG, keepalive=keepalive)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.shutdown(1)


async def exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data``, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


CLOSE = b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


# --- requests -----------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async with serving() as (_, port):
        answer = await exchange(port, post("/a?x=1", b"one") + post("/b", b"two") + CLOSE)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b"POST /a ?x=1 one") < answer.index(b"POST /b ? two") < answer.index(b"GET /last ? ")
    assert answer.endswith(b"GET /last ? ")


async def test_a_chunked_request_body_arrives_dechunked() -> None:
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with serving() as (_, port):
        answer = await exchange(port, chunked + CLOSE)
    assert b"POST /c ? abcde" in answer


async def test_targets_keep_their_encoding_and_absolute_form_loses_its_authority() -> None:
    seen: list[tuple[str, str]] = []

    async def record(request: Request) -> Response:
        seen.append((request.raw_path, request.query_string))
        return Response(204)

    async with serving(record) as (_, port):
        for target in (b"/v1/a%2Fb?q=%20x", b"http://u:p@evil:81/v1/m?k=v", b"//evil/v1", b"*"):
            await exchange(port, b"OPTIONS %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target)
    assert seen == [("/v1/a%2Fb", "q=%20x"), ("/v1/m", "k=v"), ("//evil/v1", ""), ("*", "")]


async def test_headers_round_trip_byte_for_byte() -> None:
    seen: list[Request] = []

    async def record(request: Request) -> Response:
        seen.append(request)
        return Response(200, body=b"", headers=CIMultiDict([("X-Back", request.headers["x-odd"])]))

    async with serving(record) as (_, port):
        answer = await exchange(
            port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Odd: caf\xe9\xff\r\nConnection: close\r\n\r\n"
        )
    assert seen[0].raw_headers[1] == (b"X-Odd", b"caf\xe9\xff")
    assert b"\r\nX-Back: caf\xe9\xff\r\n" in answer


async def test_expect_100_continue_is_answered_before_the_handler_reads() -> None:
    async with serving() as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/e", b"", b"Expect: 100-continue\r\n").replace(b"Length: 0", b"Length: 4"))
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"request line too long"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"header line too long"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(129)) + b"\r\n",
            b"too many headers",
        ),
        # One header line that never ends: cut once the head passes MAX_HEAD (all of it read,
        # so that closing does not reset the connection before the answer is read).
        (b"GET / HTTP/1.1\r\nX-Endless: " + b"a" * http_server.MAX_HEAD, b"request head too large"),
        (b"NOT HTTP\r\n\r\n", b""),
    ],
    ids=["request-line", "header-line", "header-count", "endless-head", "garbage"],
)
async def test_an_unreadable_head_gets_400_and_the_connection_closes(
    request_bytes: bytes, reason: bytes
) -> None:
    handled: list[Request] = []

    async def record(request: Request) -> Response:
        handled.append(request)
        return Response(200)

    async with serving(record) as (_, port):
        answer = await exchange(port, request_bytes if b"Endless" in request_bytes else request_bytes + CLOSE)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and answer.count(b"HTTP/1.1") == 1
    assert reason in answer and handled == []


async def test_a_bad_chunk_after_the_head_reaches_the_handler_as_an_invalid_body() -> None:
    errors: list[BaseException] = []

    async def reader(request: Request) -> Response:
        try:
            while await request.content.readany():
                pass
        except http_server.InvalidBody as exc:
            errors.append(exc)
            return Response(400, body=b"bad body")
        return Response(200)

    async with serving(reader) as (_, port):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await asyncio.sleep(0.1)  # the handler is reading
        w.write(b"zz\r\n" + CLOSE)
        answer = await asyncio.wait_for(r.read(), 5)
        w.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1 and len(errors) == 1


async def test_connect_and_upgrade_requests_are_answered_then_closed() -> None:
    async with serving() as (_, port):
        answer = await exchange(port, b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n" + CLOSE)
        assert answer.count(b"HTTP/1.1 200") == 1 and b"CONNECT evil:443" in answer
        upgrade = post("/u", b"data", b"Connection: upgrade\r\nUpgrade: h2c\r\n")
        answer = await exchange(port, upgrade + CLOSE)
        assert answer.count(b"HTTP/1.1 200") == 1 and answer.endswith(b"POST /u ? data")
        assert b"Connection: close" in answer


# --- answers ------------------------------------------------------------------------------------


async def test_a_streamed_answer_is_chunked_for_1_1_and_close_delimited_for_1_0() -> None:
    async def stream(request: Request) -> Response:
        response = Response(200)
        await response.prepare(request)
        for piece in (b"one", b"two" * 10000):
            await response.write(piece)
        await response.write_eof()
        return response

    async with serving(stream) as (_, port):
        answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + CLOSE)
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in first
        assert rest.startswith(b"3\r\none\r\n%x\r\n" % 30000 + b"two" * 10000 + b"\r\n0\r\n\r\nHTTP/1.1 200")
        answer = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Connection: close" in head and b"Transfer-Encoding" not in head
        assert body == b"one" + b"two" * 10000


class _CountingTransport:
    """A transport that notes what each write sent (everything else is the real one's)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


@pytest.mark.parametrize("last", [b"two", b"x" * 20000, b""])
async def test_the_last_piece_and_the_end_of_a_streamed_answer_go_in_one_write(last: bytes) -> None:
    counted: list[_CountingTransport] = []

    async def stream(request: Request) -> Response:
        counting = _CountingTransport(request.conn.transport)  # type: ignore[arg-type]
        request.conn.transport = counting  # type: ignore[assignment]
        counted.append(counting)
        response = Response(200, content_type="text/event-stream")
        await response.prepare(request)
        await response.write(b"one")
        await response.write_eof(last)
        return response

    async with serving(stream) as (_, port):
        answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = answer.partition(b"\r\n\r\n")[2]
    expected = b"3\r\none\r\n" + (b"%x\r\n%s\r\n" % (len(last), last) if last else b"") + b"0\r\n\r\n"
    assert body == expected
    writes = counted[0].writes
    if len(last) < 16384:
        assert len(writes) == 2 and writes[-1].endswith(b"0\r\n\r\n")  # head+one, then last+end
    else:  # a large piece is not copied to join it to the end
        assert b"".join(writes).endswith(last + b"\r\n0\r\n\r\n")


async def test_head_and_204_answers_carry_no_body() -> None:
    async def answer(request: Request) -> Response:
        if request.method == "HEAD":
            return Response(200, body=b"0123456789")
        return Response(204, body=b"ignored")

    async with serving(answer) as (_, port):
        data = await exchange(
            port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nDELETE / HTTP/1.1\r\nHost: x\r\n\r\n" + CLOSE
        )
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")


async def test_a_failing_handler_gets_a_500_before_anything_was_sent() -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    async with serving(boom) as (_, port):
        answer = await exchange(port, post("/", b"x") + CLOSE)
    assert answer.startswith(b"HTTP/1.1 500 Internal Server Error") and answer.count(b"HTTP/1.1") == 1


async def test_an_unread_body_closes_the_connection_after_the_answer() -> None:
    async def early(request: Request) -> Response:
        return Response(413, body=b"too large")  # the body is never read

    async with serving(early) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b"too large")


# --- the client's side --------------------------------------------------------------------------


async def test_a_client_that_goes_away_cancels_its_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    async with serving(slow) as (server, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/", b"{}"))
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert server.connections == set()


async def test_writes_wait_while_the_client_does_not_read_and_fail_once_it_is_gone() -> None:
    progress: list[int] = []
    failed = asyncio.Event()

    async def flood(request: Request) -> Response:
        response = Response(200)
        await response.prepare(request)
        try:
            for i in range(10_000):
                await response.write(b"x" * 65536)
                progress.append(i)
        except (ConnectionResetError, asyncio.CancelledError):  # cancelled, as the client is gone
            failed.set()
            raise
        return response

    async with serving(flood) as (_, port):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.5)
        assert 0 < len(progress) < 500  # held back by the client's full buffers, not 640 MB queued
        writer.transport.abort()
        await asyncio.wait_for(failed.wait(), 5)


async def test_an_idle_connection_is_closed_after_the_keepalive() -> None:
    async with serving(keepalive=0.2) as (_server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/", b"a"))
        await asyncio.wait_for(reader.readuntil(b"POST / ? a"), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.15 < loop.time() - started < 2
        writer.close()
        # A head that never completes is cut the same way.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_reading_pauses_while_the_handler_does_not_take_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_server, "BODY_HIGH_WATER", 64 * 1024)
    waiting: list[int] = []
    go = asyncio.Event()

    async def lazy(request: Request) -> Response:
        await go.wait()
        waiting.append(request.content._size)
        size = 0
        while piece := await request.content.readany():
            size += len(piece)
        return Response(200, body=b"%d" % size)

    size = 16 * 1024 * 1024
    async with serving(lazy) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
        sender = asyncio.create_task(_send(writer, b"y" * size))
        await asyncio.sleep(0.3)
        go.set()
        answer = await asyncio.wait_for(reader.read(), 10)
        await sender
        writer.close()
    assert waiting[0] < 64 * 1024 + 1024 * 1024  # held in the socket, not in the sidecar
    assert answer.endswith(b"\r\n\r\n%d" % size)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def test_shutdown_lets_a_call_in_progress_finish_and_closes_idle_ones() -> None:
    release = asyncio.Event()

    async def held(request: Request) -> Response:
        await release.wait()
        return Response(200, body=b"done")

    server = HttpServer(held, LOG)
    port = await server.start("127.0.0.1", 0)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(post("/", b"x"))
    await asyncio.sleep(0.1)
    stopping = asyncio.create_task(server.shutdown(5))
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    release.set()
    answer = await asyncio.wait_for(busy_reader.read(), 2)
    assert (
        answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer and answer.endswith(b"done")
    )
    await asyncio.wait_for(stopping, 5)
    idle_writer.close()
    busy_writer.close()


async def test_shutdown_cancels_what_outlasts_the_timeout() -> None:
    cancelled = asyncio.Event()

    async def stuck(request: Request) -> Response:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server = HttpServer(stuck, LOG)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/", b"x"))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.shutdown(0.3)
    assert 0.25 < loop.time() - started < 3
    await asyncio.wait_for(cancelled.wait(), 2)
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


# --- the same on uvloop -------------------------------------------------------------------------

ON_UVLOOP = [
    name
    for name, test in list(globals().items())
    if name.startswith("test_") and inspect.iscoroutinefunction(test)
]


@pytest.mark.parametrize("name", ON_UVLOOP)
def test_on_uvloop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    test = globals()[name]
    params = inspect.signature(test).parameters
    if "request_bytes" in params:
        marks = test.pytestmark[0].args[1]
        for request_bytes, reason in marks:
            uvloop.run(test(request_bytes, reason))
        return
    if "last" in params:
        for last in test.pytestmark[0].args[1]:
            uvloop.run(test(last))
        return
    uvloop.run(test(monkeypatch) if "monkeypatch" in params else test())
