"""A mock LLM upstream fast enough never to be the bottleneck: a raw asyncio protocol.

Every response is rendered once at start (:mod:`bench.payloads`): a ``POST`` whose path
ends in ``/chat/completions`` gets the OpenAI shape, one ending in ``/messages`` the
Anthropic shape; a body with ``"stream": true`` gets the server-sent-event stream
(chunked transfer encoding), anything else the JSON body with ``Content-Length``.
Stream events go out one per event-loop iteration, so a proxy in front sees them as
separate reads rather than one coalesced write. A request carrying the
:data:`~bench.payloads.HOLD_HEADER` header (milliseconds) holds its stream open after the
first event, so that many streams can be open at once. ``GET`` of any path answers
``200 ok``.

``python -m bench.upstream --listen 127.0.0.1:0 [--workers N]`` prints
``upstream on http://HOST:PORT pids=P1,P2`` on stderr once listening; with ``--workers``
above 1 the processes share one listening socket. SIGTERM stops every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import cast

from bench import payloads

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024


def _framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _stream_parts(events: list[bytes], content_type: bytes) -> tuple[bytes, ...]:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
        b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\nx-request-id: req_bench\r\n\r\n"
    )
    parts = [_framed(e) for e in events]
    parts[0] = head + parts[0]
    parts[-1] += b"0\r\n\r\n"
    return tuple(parts)


def _json_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_bench\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


OPENAI_JSON = _json_response(payloads.openai_json())
ANTHROPIC_JSON = _json_response(payloads.anthropic_json())
OPENAI_STREAM = _stream_parts(payloads.openai_events(), b"text/event-stream; charset=utf-8")
ANTHROPIC_STREAM = _stream_parts(payloads.anthropic_events(), b"text/event-stream; charset=utf-8")
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_HOLD = payloads.HOLD_HEADER.encode()


def _dechunk(buf: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body starting at ``start``: (body, end offset), or None while incomplete."""
    pos = start
    body = bytearray()
    for _ in range(1_000_000):  # bounded: at most one iteration per chunk
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # no trailers are sent by our clients
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    raise ValueError("too many chunks")


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests in turn, answer from the pre-rendered bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.busy = False  # a stream is being written; later requests wait in buf
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport, so no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio sets no TCP_NODELAY on sockets it did not create itself
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._fail()
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            if len(parts) != 3:
                self._fail()
                return
            method, target = parts[0], parts[1]
            length = 0
            chunked = False
            hold = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == _HOLD:
                    hold = int(value)
            if chunked:
                got = _dechunk(self.buf, end + 4)
                if got is None:
                    return
                body, consumed = got
            else:
                if length > MAX_BODY:
                    self._fail()
                    return
                if len(self.buf) < end + 4 + length:
                    return
                body, consumed = bytes(self.buf[end + 4 : end + 4 + length]), end + 4 + length
            del self.buf[:consumed]
            self._respond(method, target.split(b"?", 1)[0], body, hold)

    def _respond(self, method: bytes, path: bytes, body: bytes, hold_ms: int) -> None:
        assert self.transport is not None
        if method != b"POST":
            self.transport.write(OK)
            return
        stream = b'"stream":true' in body or b'"stream": true' in body
        if path.endswith(b"/chat/completions"):
            parts = OPENAI_STREAM if stream else None
            whole = OPENAI_JSON
        elif path.endswith(b"/messages"):
            parts = ANTHROPIC_STREAM if stream else None
            whole = ANTHROPIC_JSON
        else:
            self.transport.write(NOT_FOUND)
            return
        if parts is None:
            self.transport.write(whole)
            return
        self.busy = True
        self.transport.write(parts[0])
        if hold_ms > 0:
            self.loop.call_later(hold_ms / 1000, self._write_part, parts, 1)
        else:
            self.loop.call_soon(self._write_part, parts, 1)

    def _write_part(self, parts: tuple[bytes, ...], index: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(parts[index])
        if index + 1 < len(parts):
            self.loop.call_soon(self._write_part, parts, index + 1)
            return
        self.busy = False
        if self.buf:
            self._process()

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(
    sock: socket.socket,
    on_ready: Callable[[], None] | None = None,
    protocol: type[UpstreamProtocol] = UpstreamProtocol,
) -> None:
    """Serve ``protocol`` on ``sock`` until SIGTERM or SIGINT."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        server = await loop.create_server(protocol, sock=sock, backlog=4096)
        if on_ready is not None:
            on_ready()
        await stop.wait()
        server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.upstream``."""
    parser = argparse.ArgumentParser(description="fast mock LLM upstream for the benchmark")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the socket")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        parser.error("the benchmark upstream listens on 127.0.0.1 only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    children: list[int] = []
    for _ in range(max(0, min(args.workers, 16) - 1)):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            serve(sock)
            os._exit(0)
        children.append(pid)
    bound = sock.getsockname()[1]
    pids = ",".join(str(p) for p in [os.getpid(), *children])

    def ready() -> None:
        print(f"upstream on http://127.0.0.1:{bound} pids={pids}", file=sys.stderr, flush=True)

    try:
        serve(sock, ready)
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
