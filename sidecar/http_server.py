"""The proxy listener's HTTP/1.1 server: one asyncio protocol per connection, parsed with httptools.

Why not aiohttp's server, which the proxy used before: its request and response objects,
payload streams and writer cost about 86 µs of CPU per request on the benchmark machine,
against about 18 µs for a protocol like this one answering the same requests. The admin
listener stays on aiohttp (routing, few requests); this serves the proxy's one handler.

What it does, and what it refuses:

- HTTP/1.0 and 1.1, keep-alive, pipelining (requests are answered one at a time, in
  order), ``Expect: 100-continue`` (answered at once: the handler reads the whole body);
- llhttp's strict parsing: conflicting or malformed framing (``Content-Length`` with
  ``Transfer-Encoding``, two lengths, a signed length, ``chunked`` not last, bad chunks),
  bare CR or LF, NUL, obs-fold, a space before the colon or in a name get ``400`` and the
  connection closed, so bytes after them are never read as a request;
- a request line or header line over :data:`MAX_LINE` bytes, more than
  :data:`MAX_HEADERS` headers, or a head that is not complete after :data:`MAX_HEAD`
  bytes: ``400``, closed (the handler refuses smaller blocks it finds too large itself);
- ``CONNECT`` and ``Upgrade`` requests reach the handler (which refuses or forwards them
  as plain requests); their connection is closed after the answer;
- the handler starts when the head is complete, the body follows through
  :attr:`Request.content`; reading pauses while :data:`BODY_HIGH_WATER` bytes of body
  wait for the handler;
- a client that disconnects cancels its handler (the handler records the abort);
- a connection idle for :data:`KEEPALIVE` seconds, or whose head is not complete that
  long after it went idle, is closed;
- responses are written with ``Content-Length`` when the handler gives one, else chunked
  (HTTP/1.1) or delimited by closing (HTTP/1.0); never a body after ``HEAD``, 1xx, 204 or
  304; writes wait while the client's socket buffer is full.

:meth:`HttpServer.shutdown` stops accepting, closes idle connections, lets requests in
progress finish for up to the timeout, then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict

from sidecar.pieces import PieceBuffer

__all__ = [
    "BODY_HIGH_WATER",
    "KEEPALIVE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "MAX_LINE",
    "HttpServer",
    "InvalidBody",
    "Request",
    "RequestBody",
    "Response",
]

#: The longest request line or header line (name, colon and value), as aiohttp's server.
MAX_LINE = 8190
#: The most headers in one request.
MAX_HEADERS = 128
#: Bytes of a head that is still not complete: the request is refused past this.
MAX_HEAD = (MAX_HEADERS + 1) * (MAX_LINE + 2) + 2
#: Seconds a connection may idle between requests (aiohttp's default as well).
KEEPALIVE = 75.0
#: Bytes of request body waiting for the handler past which the client is no longer read.
BODY_HIGH_WATER = 256 * 1024
#: The client's socket buffer past which a response write waits.
WRITE_HIGH_WATER = 64 * 1024

_NO_BODY_STATUSES = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {int(s): s.phrase for s in http.HTTPStatus}


class _Refused(Exception):
    """The request cannot be read: answer ``status`` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InvalidBody(ConnectionError):
    """The request's body broke HTTP's framing (a bad chunk, say): the connection closes."""


class RequestBody(PieceBuffer):
    """A request's body as it arrives: :meth:`readany` gives what came since the last call."""

    __slots__ = ("_conn",)

    def __init__(self, conn: _ServerConnection) -> None:
        super().__init__()
        self._conn = conn

    @property
    def ready(self) -> bool:
        """Whether :meth:`readany` would answer without waiting."""
        return bool(self._pieces) or self.done or self._error is not None

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); ``b""`` at the end."""
        while True:
            if self._pieces:
                return self._take()
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _resume(self) -> None:
        self._conn.resume_reading()

    def _feed(self, data: bytes) -> None:
        if self._append(data, BODY_HIGH_WATER):
            self._conn.pause_reading()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self.done and self._error is None:
            self._error = exc
        self._wake()


class Request:
    """One request as the handler sees it. Header names and values are decoded as UTF-8
    with ``surrogateescape``, so they encode back to the bytes the client sent."""

    __slots__ = (
        "conn",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "query_string",
        "raw_headers",
        "raw_path",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: str,
        target: bytes,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        conn: _ServerConnection,
        content: RequestBody,
    ) -> None:
        self.conn = conn
        self.method = method
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDict[str] = CIMultiDict(
            [
                (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for n, v in raw_headers
            ]
        )
        self.keep_alive = keep_alive
        self.content = content
        self.upgrade = False
        length = self.headers.get("content-length")
        self.content_length = int(length) if length is not None else None
        self.raw_path, self.query_string = _split_target(target)

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client connection's transport (None once it is closed)."""
        return self.conn.transport


def _split_target(target: bytes) -> tuple[str, str]:
    """The path and query of a request target, as sent (percent-encoding kept).

    Origin form (``/p?q``) as it is; absolute form (``http://host/p?q``) by its path and
    query, the authority dropped; anything else (``*``, ``host:port``) whole as the path,
    which the handler refuses.
    """
    text = target.decode("utf-8", "surrogateescape")
    if not text.startswith("/") and "://" in text:
        try:
            parsed = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return text, ""
        path = (parsed.path or b"/").decode("utf-8", "surrogateescape")
        query = (parsed.query or b"").decode("utf-8", "surrogateescape")
        return path, query
    path, _, query = text.partition("?")
    return path.partition("#")[0], query.partition("#")[0]


class Response:
    """An answer: give ``body`` for a whole one, or :meth:`prepare`, :meth:`write` and
    :meth:`write_eof` to stream one. Headers can change until :meth:`prepare`."""

    __slots__ = (
        "_body",
        "_chunked",
        "_conn",
        "_eof",
        "_head",
        "_no_body",
        "force",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int = 200,
        reason: str | None = None,
        headers: CIMultiDict[str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason or _REASONS.get(status, "Unknown")
        self.headers: CIMultiDict[str] = headers if headers is not None else CIMultiDict()
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self._body = body
        self._conn: _ServerConnection | None = None
        self._head: bytes | None = None  # written with the first piece of body
        self._chunked = False
        self._no_body = False
        self._eof = False
        self.force = False  # close the connection after this answer

    def force_close(self) -> None:
        """Close the connection after this answer."""
        self.force = True

    async def prepare(self, request: Request) -> None:
        """Fix the status and headers (sent with the first piece of body, or at the end)."""
        if self._conn is not None:
            return
        conn = request.conn
        self._conn = conn
        status = self.status
        headers = self.headers
        self._no_body = request.method == "HEAD" or status in _NO_BODY_STATUSES or status < 200
        if self._body is not None and "content-length" not in headers and status not in _NO_BODY_STATUSES:
            headers["Content-Length"] = str(len(self._body))
        keep = request.keep_alive and not self.force and not request.upgrade and not conn.closing
        if "content-length" not in headers and not self._no_body:
            if request.version == "1.1":
                self._chunked = True
                headers["Transfer-Encoding"] = "chunked"
            else:
                keep = False  # the body ends when the connection does
        if not keep:
            self.force = True
            headers["Connection"] = "close"
        elif request.version == "1.0":
            headers["Connection"] = "keep-alive"
        self._head = _serialize_head(status, self.reason, headers.items())
        if conn.transport is None:
            raise ConnectionResetError("client disconnected")

    def _open(self) -> tuple[_ServerConnection, asyncio.Transport]:
        """The connection and its transport; ``ConnectionResetError`` when the client is gone."""
        conn = self._conn
        assert conn is not None, "prepare() first"
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        return conn, transport

    async def write(self, data: bytes) -> None:
        """Send a piece of the body; waits while the client's buffer is full. Raises
        ``ConnectionResetError`` when the client is gone."""
        conn, transport = self._open()
        head, self._head = self._head, None
        conn.wrote = True
        if self._no_body or not data:
            if head is not None:
                transport.write(head)
        elif len(data) < 16384:  # one write (one system call): copying this much is cheaper
            if self._chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            transport.write(data if head is None else head + data)
        else:
            if self._chunked:
                framing = b"%x\r\n" % len(data)
                head = framing if head is None else head + framing
            if head is not None:
                transport.write(head)
            transport.write(data)
            if self._chunked:
                transport.write(b"\r\n")
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """End the body (and send anything not sent yet), with ``data`` as its last piece:
        one write for the piece and the end when the piece is small."""
        if self._eof:
            return
        if data and (self._body is not None or len(data) >= 16384):
            await self.write(data)
            data = b""
        self._eof = True
        conn, transport = self._open()
        head, self._head = self._head, None
        body = (data or self._body) if not self._no_body else None
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._chunked and body:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        out = (head or b"") + (body or b"") + tail
        if out:
            conn.wrote = True
            transport.write(out)
        if conn.write_paused:
            await conn.drain()

    @property
    def ended(self) -> bool:
        return self._eof


def _serialize_head(status: int, reason: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"header {name!r} has a character that would split the response")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


Handler = Callable[[Request], Awaitable[Response]]


class _ServerConnection(asyncio.Protocol):
    """One client connection: parses its requests and runs the handler on each in turn."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closing = False  # no further request is read: close after the current answer
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._queue: deque[Request] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # the handler is running
        self._refused: _Refused | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = self._loop.time()  # when the last answer ended (or the connection came)
        self._reading_paused = False
        self._raw_left = 0  # body bytes still to come after an Upgrade head
        self.wrote = False  # a byte of the current answer was written
        # The request being parsed.
        self._head_size = 0
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: RequestBody | None = None
        self._last: Request | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._server.connections.add(self)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self._raw_left:
            self._feed_raw(data)
            return
        if self._refused is not None:
            return
        if self._body is None:  # between requests or in a head: bound what a head may take
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                self._refuse(_Refused(400, "request head too large"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # CONNECT, or an Upgrade request: answered (the handler refuses CONNECT and forwards
            # the other as a plain request), then the connection closes. llhttp stops at the
            # head; a Content-Length body is still read, and nothing after it.
            request = self._last
            if request is not None:
                request.upgrade = True
                length = request.content_length or 0
                if request.method != "CONNECT" and length > 0:
                    # llhttp ended the message at the head: its body is read here instead (the
                    # handler has not run yet, so nobody saw it end).
                    body = self._body = request.content
                    body.done = False
                    self._raw_left = length
                    self._feed_raw(data[int(upgrade.args[0]) :])
                    return
                if self._body is not None:
                    self._body._finish()
                    self._body = None
            self._stop_reading()
        except _Refused as refused:
            self._refuse(refused)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            self._refuse(cause or _Refused(400, str(exc) or type(exc).__name__))

    def _feed_raw(self, data: bytes) -> None:
        body = self._body
        take = data[: self._raw_left]
        self._raw_left -= len(take)
        if body is not None and take:
            body._feed(take)
        if not self._raw_left:
            if body is not None:
                body._finish()
            self._body = None
            self._stop_reading()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closing = True
        server = self._server
        server.connections.discard(self)
        if not server.connections:
            server._none_left.set()
        self._cancel_timer()
        if self._body is not None:
            self._body._fail(ConnectionResetError("client disconnected"))
        for request in self._queue:
            request.content._fail(ConnectionResetError("client disconnected"))
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("client disconnected"))
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the handler records the client's abort
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        self._drain = None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self) -> None:
        if not self.write_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("client disconnected")
        if self._drain is None:
            self._drain = self._loop.create_future()
        await self._drain

    def pause_reading(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused and self._refused is None:
            self._reading_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        if sum(len(u) for u in self._url) > MAX_LINE:
            raise _Refused(400, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) + 2 > MAX_LINE:
            raise _Refused(400, "header line too long")
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise _Refused(400, "too many headers")

    def on_headers_complete(self) -> None:
        parser = self._parser
        body = self._body = RequestBody(self)
        request = Request(
            parser.get_method().decode("ascii", "replace"),
            b"".join(self._url),
            parser.get_http_version(),
            self._headers,
            parser.should_keep_alive(),
            self,
            body,
        )
        self._head_size = 0
        self._last = request
        self._queue.append(request)
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body._feed(body)

    def on_message_complete(self) -> None:
        body = self._body
        self._body = None
        if body is not None:
            body._finish()

    # -- serving ------------------------------------------------------------------------
    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _serve(self) -> None:
        """Answer the queued requests in order, until the connection closes."""
        handler = self._server.handler
        while True:
            if not self._queue:
                if self._refused is not None:
                    self._answer_refusal(self._refused)
                    return
                if self.transport is None or self.closing:
                    self._close()
                    return
                self._idle_since = self._loop.time()  # the idle timer reads it (_idle_check)
                self._wakeup = self._loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                continue
            request = self._queue.popleft()
            if (
                request.version == "1.1"
                and self.transport is not None
                and request.headers.get("expect", "").lower() == "100-continue"
            ):
                self.transport.write(_CONTINUE)
            self._busy = True
            self.wrote = False
            try:
                response = await handler(request)
                if not response.ended:
                    await response.prepare(request)
                    await response.write_eof()
            except asyncio.CancelledError:
                if self.transport is None:
                    return  # the client went away; the handler recorded it
                raise
            except ConnectionError:
                self._close()
                return
            except Exception:
                self._server.log.exception("error handling request %s %s", request.method, request.raw_path)
                if self.transport is not None:
                    if not self.wrote:
                        self.transport.write(_internal_error())
                    self.transport.close()
                return
            finally:
                self._busy = False
            if response.force or not request.content.done:
                # Closing: the client asked, the answer said, or a body is left unread (its
                # bytes must never be read as the next request).
                self._close()
                return

    def _refuse(self, refused: _Refused) -> None:
        self._refused = refused
        self._stop_reading()
        last = self._last
        if last is not None and last in self._queue:
            # Its head was complete but what followed is not HTTP (a bad length, a bad chunk):
            # never handled, it gets the refusal instead.
            self._queue.remove(last)
        if self._body is not None:
            self._body._fail(InvalidBody(refused.reason))
        self._server.log.info("request refused with %d (%s)", refused.status, refused.reason)
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        else:
            self._wake()

    def _answer_refusal(self, refused: _Refused) -> None:
        transport = self.transport
        if transport is None:
            return
        text = f"{refused.status} {_REASONS.get(refused.status, 'Bad Request')}: {refused.reason}".encode(
            "ascii", "replace"
        )
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (refused.status, _REASONS.get(refused.status, "Bad Request").encode(), len(text), text)
        )
        transport.close()

    def _stop_reading(self) -> None:
        self.closing = True
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _arm_timer(self, delay: float | None = None) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(
            self._server.keepalive if delay is None else delay, self._idle_check
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_check(self) -> None:
        """The idle timer: one per connection, armed once and re-armed when it fires, rather
        than set and cancelled for every request. It closes a connection that has had no
        request in progress and no complete head for :attr:`HttpServer.keepalive` seconds."""
        self._timer = None
        if self.transport is None:
            return
        keepalive = self._server.keepalive
        if self._busy or self._queue:
            self._arm_timer(keepalive)
            return
        idle = self._loop.time() - self._idle_since
        if idle >= keepalive:
            self.transport.close()
        else:
            self._arm_timer(keepalive - idle)

    def close_if_idle(self) -> None:
        """At shutdown: close now if no request is in progress, else after its answer."""
        self.closing = True
        if not self._busy and not self._queue:
            self._close()
        self._wake()


def _internal_error() -> bytes:
    body = b"500 Internal Server Error"
    return (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


class HttpServer:
    """Serves ``handler`` on a TCP listener (see the module's text)."""

    def __init__(self, handler: Handler, log: logging.Logger, keepalive: float = KEEPALIVE) -> None:
        self.handler = handler
        self.log = log
        self.keepalive = keepalive
        self.connections: set[_ServerConnection] = set()
        self._none_left = asyncio.Event()  # set when the last connection closes
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host``:``port``; the port bound (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host, port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0]
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return int(sock.getsockname()[1])

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish for up to ``timeout`` seconds,
        then cancel what is left and close every connection."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        if self.connections:
            self._none_left.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), timeout)
        for conn in list(self.connections):
            task = conn._task
            if task is not None and not task.done():
                task.cancel()
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)
            self._server = None
