"""The proxy's upstream client (sidecar/upstream_client.py) against a real loopback server.

Each test scripts what the server sends, byte by byte, on real sockets: framing (length,
chunked, until close), informational answers, keep-alive and its limits, timeouts, and
each way an upstream can break off. The proxy-level behaviour on top (what the client of
the sidecar sees, what is recorded) is in test_hardening_upstream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from sidecar import upstream_client
from sidecar.upstream_client import InvalidResponse, Origin, UpstreamClient, UpstreamResponse

Script = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUT = aiohttp.ClientTimeout(total=10, connect=2, sock_read=5)


class Server:
    """A loopback TCP server running ``script`` for each connection; keeps what it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test ended with the script still waiting
        finally:
            writer.close()
            self.closed.set()

    def origin(self, path: str = "") -> Origin:
        return Origin("http", "127.0.0.1", self.port, path, True)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request (head and Content-Length body), kept in :attr:`requests`."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answer(body: bytes = b'{"ok":true}', status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def keep_answering(reply: bytes) -> Script:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(reply)
            await writer.drain()

    return script


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[tuple[Server, UpstreamClient]]:
    server = Server(script)
    client = UpstreamClient()
    try:
        async with server:
            yield server, client
    finally:
        await client.close()


async def body_of(response: UpstreamResponse) -> bytes:
    parts = []
    while piece := await response.content.readany():
        parts.append(piece)
    return b"".join(parts)


async def post(
    client: UpstreamClient, origin: Origin, target: str = "/v1/chat/completions", body: bytes = b"{}"
) -> UpstreamResponse:
    return await client.request("POST", origin, target, [("Content-Type", "application/json")], body, TIMEOUT)


# --- what is sent -------------------------------------------------------------------------------


async def test_the_request_goes_out_as_given_with_host_and_length_only() -> None:
    async with serving(keep_answering(answer())) as (server, client):
        headers = [("Authorization", "Bearer sk-test"), ("X-Tenant-Id", "acme"), ("x-tenant-id", "again")]
        response = await client.request(
            "POST", server.origin("/base/"), "/v1/chat?x=1%202", headers, b'{"a":1}', TIMEOUT
        )
        assert response.status == 200 and await body_of(response) == b'{"ok":true}'
        response.release()
        assert server.requests == [
            b"POST /base/v1/chat?x=1%%202 HTTP/1.1\r\n"
            b"Host: 127.0.0.1:%d\r\n"
            b"Authorization: Bearer sk-test\r\nX-Tenant-Id: acme\r\nx-tenant-id: again\r\n"
            b"Content-Length: 7\r\n\r\n"
            b'{"a":1}' % server.port
        ]


def test_the_host_header_leaves_out_default_ports_and_brackets_ipv6() -> None:
    assert Origin("http", "api.example.com", 80, "", True).host_header == b"api.example.com"
    assert Origin("https", "api.example.com", 443, "", True).host_header == b"api.example.com"
    assert Origin("https", "api.example.com", 8443, "", True).host_header == b"api.example.com:8443"
    assert Origin("http", "::1", 8080, "", True).host_header == b"[::1]:8080"
    assert Origin("http", "h", 80, "/v1/", True).path == "/v1"


async def test_a_header_that_would_split_the_request_is_refused() -> None:
    async with serving(keep_answering(answer())) as (server, client):
        for bad in [("X-A", "1\r\nX-Injected: 2"), ("X-A", "1\nX"), ("X-A\r\nB", "1")]:
            with pytest.raises(ValueError, match="split the request"):
                await client.request("POST", server.origin(), "/", [bad], b"", TIMEOUT)
        assert server.requests == []


async def test_a_large_body_arrives_whole() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, written apart from the head
    async with serving(keep_answering(answer())) as (server, client):
        response = await post(client, server.origin(), body=body)
        await body_of(response)
        assert server.requests[0].endswith(b"\r\n\r\n" + body)


# --- framing ------------------------------------------------------------------------------------


async def test_connections_are_kept_alive_and_reused() -> None:
    async with serving(keep_answering(answer())) as (server, client):
        for _ in range(5):
            response = await post(client, server.origin())
            assert await body_of(response) == b'{"ok":true}'
            response.release()
        assert server.connections == 1 and client.connections_made == 1
        assert len(server.requests) == 5


async def test_concurrent_calls_each_get_a_connection_and_their_own_answer() -> None:
    async def echo(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            await asyncio.sleep(0.01)
            body = request.rpartition(b"\r\n\r\n")[2]
            writer.write(answer(body))

    async with serving(echo) as (server, client):
        answers = await asyncio.gather(*(post(client, server.origin(), body=b"%d" % i) for i in range(8)))
        assert [await body_of(r) for r in answers] == [b"%d" % i for i in range(8)]
        assert server.connections == 8
        again = await asyncio.gather(*(post(client, server.origin(), body=b"x") for _ in range(8)))
        assert [await body_of(r) for r in again] == [b"x"] * 8
        assert server.connections == 8  # all eight reused


async def test_a_chunked_answer_is_dechunked_and_streamed_piece_by_piece() -> None:
    gate = asyncio.Event()

    async def chunked(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(b"7\r\ndata: 1\r\n")
        await writer.drain()
        await gate.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep the connection open

    async with serving(chunked) as (server, client):
        response = await post(client, server.origin())
        assert response.headers["transfer-encoding"] == "chunked"
        assert await response.content.readany() == b"data: 1"
        gate.set()
        assert await response.content.readany() == b"data: 2"
        assert await response.content.readany() == b""
        assert response.done and client.idle_connections == 1


async def test_the_chunks_of_one_read_are_handed_over_as_one_piece() -> None:
    """An upstream that sends each event as a chunk of its own: the parser calls back once per
    chunk, and the response is fed once per read, with every byte in order."""
    events = [b"data: %d\n\n" % i for i in range(20)]

    async def many(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    fed: list[bytes] = []
    original = UpstreamResponse._feed

    def counting(self: UpstreamResponse, data: bytes) -> None:
        fed.append(data)
        original(self, data)

    async with serving(many) as (server, client):
        UpstreamResponse._feed = counting  # type: ignore[method-assign]
        try:
            response = await post(client, server.origin())
            body = await body_of(response)
        finally:
            UpstreamResponse._feed = original  # type: ignore[method-assign]
    assert body == b"".join(events)
    assert b"".join(fed) == body
    # One write of a few hundred bytes arrives in one read on loopback (two at most when the
    # head was read apart): far fewer pieces than chunks.
    assert 1 <= len(fed) <= 2


async def test_an_answer_delimited_by_close_ends_cleanly_and_is_not_reused() -> None:
    async def until_close(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":')
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"1}")
        await writer.drain()

    async with serving(until_close) as (server, client):
        response = await post(client, server.origin())
        assert await body_of(response) == b'{"a":1}'
        assert client.idle_connections == 0
        response = await post(client, server.origin())
        assert await body_of(response) == b'{"a":1}'
        assert server.connections == 2


async def test_informational_answers_are_skipped() -> None:
    async with serving(
        keep_answering(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"{}", extra=b"X-Final: yes\r\n")
        )
    ) as (server, client):
        response = await post(client, server.origin())
        assert (response.status, response.headers.get("x-final"), "link" in response.headers) == (
            200,
            "yes",
            False,
        )
        assert await body_of(response) == b"{}"
        response.release()
        response = await post(client, server.origin())
        assert response.status == 200 and await body_of(response) == b"{}"
        assert server.connections == 1


async def test_a_101_is_handed_over_and_its_connection_never_reused() -> None:
    async def switching(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nxx"
        )
        await reader.read()

    async with serving(switching) as (server, client):
        response = await post(client, server.origin())
        assert response.status == 101 and response.reason == "Switching Protocols"
        response.close()
        await asyncio.wait_for(server.closed.wait(), 2)
        assert client.idle_connections == 0


async def test_head_and_204_answers_have_no_body() -> None:
    async def script(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async with serving(script) as (server, client):
        for _ in range(2):
            response = await client.request("DELETE", server.origin(), "/v1/files/f", [], b"", TIMEOUT)
            assert response.status == 204 and await body_of(response) == b""
        assert b"Content-Length" not in server.requests[0]  # no body, no length
        assert server.connections == 1  # a 204 leaves the connection reusable
        response = await client.request("HEAD", server.origin(), "/v1/models", [], b"", TIMEOUT)
        assert response.headers["content-length"] == "1000"
        assert await asyncio.wait_for(body_of(response), 1) == b""
        response = await client.request("DELETE", server.origin(), "/v1/files/f", [], b"", TIMEOUT)
        assert response.status == 204
        assert server.connections == 2  # the HEAD's connection was not reused


async def test_bytes_nobody_asked_for_close_the_connection() -> None:
    async def chatty(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer(b'{"evil":1}'))  # no request is out
        await writer.drain()
        while True:
            await server.read_request(reader)
            writer.write(answer())

    async with serving(chatty) as (server, client):
        response = await post(client, server.origin())
        assert await body_of(response) == b'{"ok":true}'
        await asyncio.wait_for(server.closed.wait(), 2)
        response = await post(client, server.origin())
        assert await body_of(response) == b'{"ok":true}'
        assert server.connections == 2


async def test_an_idle_connection_past_keepalive_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_client, "KEEPALIVE", 0.05)
    async with serving(keep_answering(answer())) as (server, client):
        await body_of(await post(client, server.origin()))
        await asyncio.sleep(0.1)
        await body_of(await post(client, server.origin()))
        assert server.connections == 2
        await asyncio.wait_for(server.closed.wait(), 2)  # the stale one was closed, not leaked


async def test_idle_connections_of_a_pool_no_longer_asked_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload can leave a pool behind (new TLS settings, a new origin): calls elsewhere close
    its idle connections once they pass the keep-alive."""
    monkeypatch.setattr(upstream_client, "KEEPALIVE", 0.05)
    async with serving(keep_answering(answer())) as (left, client), Server(keep_answering(answer())) as other:
        await body_of(await post(client, left.origin()))
        await asyncio.sleep(0.1)
        await body_of(await post(client, other.origin()))  # never asks the first pool again
        await asyncio.wait_for(left.closed.wait(), 2)
        assert client.idle_connections == 1


async def test_a_sweep_while_a_pools_only_connection_is_busy_keeps_that_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection comes back to the pool calls take from, and is reused."""
    monkeypatch.setattr(upstream_client, "KEEPALIVE", 0.05)
    gate = asyncio.Event()

    async def held(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{")
            await gate.wait()
            writer.write(b"}")

    async with serving(held) as (busy, client), Server(keep_answering(answer())) as other:
        response = await post(client, busy.origin())
        await asyncio.sleep(0.1)
        await body_of(await post(client, other.origin()))  # sweeps while the first call is busy
        gate.set()
        assert await body_of(response) == b"{}"
        gate.clear()
        second = await post(client, busy.origin())
        gate.set()
        assert await body_of(second) == b"{}"
        assert busy.connections == 1


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused() -> None:
    async def once(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer())  # keep-alive announced, then closed anyway

    async with serving(once) as (server, client):
        await body_of(await post(client, server.origin()))
        await asyncio.wait_for(server.closed.wait(), 2)
        await asyncio.sleep(0.05)
        assert client.idle_connections == 0
        assert (await post(client, server.origin())).status == 200
        assert server.connections == 2


async def test_reading_pauses_while_the_caller_does_not_read() -> None:
    size = 8 * 1024 * 1024

    async def big(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()

    async with serving(big) as (server, client):
        response = await post(client, server.origin())
        await asyncio.sleep(0.3)  # the server writes as fast as it can meanwhile
        waiting = sum(len(p) for p in response._pieces)
        assert waiting < upstream_client.HIGH_WATER + 1024 * 1024
        assert len(await body_of(response)) == size


async def test_a_body_that_ends_while_reading_is_paused_leaves_the_connection_reusable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream_client, "HIGH_WATER", 1000)  # one read of the answer passes it

    async with serving(keep_answering(answer(b"z" * 3000))) as (server, client):
        timeout = aiohttp.ClientTimeout(total=5, connect=1, sock_read=1)
        for _ in range(2):
            response = await client.request("POST", server.origin(), "/", [], b"", timeout)
            assert await body_of(response) == b"z" * 3000
        assert server.connections == 1  # and the second call was answered on the same one


# --- failures -----------------------------------------------------------------------------------


async def test_nobody_listening_is_a_connection_error() -> None:
    async with serving(keep_answering(answer())) as (server, client):
        origin = server.origin()
    with pytest.raises(aiohttp.ClientOSError, match="cannot connect to upstream"):
        await client.request("POST", origin, "/", [], b"", TIMEOUT)


async def test_closed_before_the_head_is_a_disconnect() -> None:
    async def hang_up(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")

    async with serving(hang_up) as (server, client):
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(client, server.origin())


async def test_closed_before_the_announced_length_is_a_payload_error() -> None:
    async def short(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    async with serving(short) as (server, client):
        response = await post(client, server.origin())
        assert await response.content.readany() == b"0123456789"
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.readany()
        assert client.idle_connections == 0


BAD_HEADS = {
    "conflicting-framing": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "garbage": b"NOT HTTP AT ALL\r\n\r\n",
    "head-too-large": b"HTTP/1.1 200 OK\r\nX-Big: "
    + b"a" * (upstream_client.MAX_HEAD_BYTES + 10)
    + b"\r\n\r\n",
}


@pytest.mark.parametrize("head", BAD_HEADS.values(), ids=BAD_HEADS.keys())
async def test_a_head_that_does_not_parse_is_an_invalid_response(head: bytes) -> None:
    async def bad(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(head)
        await reader.read()

    async with serving(bad) as (server, client):
        with pytest.raises(InvalidResponse):
            await post(client, server.origin())
        await asyncio.wait_for(server.closed.wait(), 2)  # and the connection is dropped


async def test_a_broken_chunk_is_a_payload_error() -> None:
    async def bad(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await reader.read()

    async with serving(bad) as (server, client):
        response = await post(client, server.origin())
        with pytest.raises(aiohttp.ClientPayloadError):
            await body_of(response)


async def test_no_head_within_sock_read_times_out() -> None:
    async def silent(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()

    timeout = aiohttp.ClientTimeout(total=5, connect=1, sock_read=0.2)
    async with serving(silent) as (server, client):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(aiohttp.ServerTimeoutError):
            await client.request("POST", server.origin(), "/", [], b"", timeout)
        assert 0.15 < loop.time() - started < 2
        await asyncio.wait_for(server.closed.wait(), 2)


async def test_a_body_that_stalls_past_sock_read_times_out() -> None:
    async def stall(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        await reader.read()

    timeout = aiohttp.ClientTimeout(total=5, connect=1, sock_read=0.2)
    async with serving(stall) as (server, client):
        response = await client.request("POST", server.origin(), "/", [], b"", timeout)
        assert await response.content.readany() == b"abc"
        with pytest.raises(TimeoutError):
            await response.content.readany()
        await asyncio.wait_for(server.closed.wait(), 2)


async def test_total_ends_a_body_that_keeps_dripping() -> None:
    async def drip(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    timeout = aiohttp.ClientTimeout(total=0.5, connect=1, sock_read=0.2)
    async with serving(drip) as (server, client):
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.request("POST", server.origin(), "/", [], b"", timeout)
        with pytest.raises(TimeoutError):
            await body_of(response)
        assert 0.45 < loop.time() - started < 2


async def test_a_cancelled_call_drops_its_connection() -> None:
    async def slow(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            await asyncio.sleep(0.3)
            writer.write(answer())

    async with serving(slow) as (server, client):
        task = asyncio.create_task(post(client, server.origin()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed.wait(), 2)  # its late answer can never reach another call
        assert (await post(client, server.origin())).status == 200
        assert server.connections == 2


async def test_releasing_an_unread_body_closes_the_connection_and_close_drops_all() -> None:
    async def stream(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await reader.read()

    async with serving(stream) as (server, client):
        response = await post(client, server.origin())
        response.release()
        await asyncio.wait_for(server.closed.wait(), 2)
        server.closed.clear()
        await post(client, server.origin())  # in flight while the client closes
        await client.close()
        await asyncio.wait_for(server.closed.wait(), 2)
        assert server.connections == 2


# --- the same on uvloop, the loop the sidecar runs on (its transports are not asyncio's) ---------

ON_UVLOOP = [
    (name, args)
    for name, test in list(globals().items())
    if name.startswith("test_") and inspect.iscoroutinefunction(test)
    for args in (
        [{"head": head} for head in BAD_HEADS.values()]
        if "head" in inspect.signature(test).parameters
        else [{}]
    )
]


@pytest.mark.parametrize(("name", "args"), ON_UVLOOP, ids=[name for name, _ in ON_UVLOOP])
def test_on_uvloop(name: str, args: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    test = globals()[name]
    if "monkeypatch" in inspect.signature(test).parameters:
        args = {**args, "monkeypatch": monkeypatch}
    uvloop.run(test(**args))
