"""The proxy's HTTP/1.1 client for upstream calls: pooled keep-alive connections, parsed with httptools.

Why not aiohttp's client, which the proxy used before: its per-request machinery (request
and response objects, cookie handling, timers, a task to write the body, a stream reader)
cost 170-220 µs of CPU per call on the benchmark machine, against about 22 µs for this
client over the same connections (``bench/upstream_client.py``): more than everything else
the sidecar does for a call. This client does what a reverse proxy needs and no more:

- one request at a time per connection (no pipelining), connections kept alive and reused
  most recent first, idle ones dropped after :data:`KEEPALIVE` seconds or when the
  upstream closes them, any byte an idle connection receives (a response nobody asked
  for) closing it;
- the request sent as given: the method, the target, a ``Host`` header, the caller's
  headers in their order, ``Content-Length``; no header of its own (no ``User-Agent``,
  no ``Accept-Encoding``), no redirect followed, no cookie kept, no proxy from the
  environment;
- the response's body handed over as it arrives, de-chunked but never decompressed,
  with reading paused while more than :data:`HIGH_WATER` bytes wait for the caller;
- timeouts as aiohttp's ``ClientTimeout``: ``connect`` for TCP and TLS, ``sock_read``
  for every wait on the upstream (the head, then each piece of the body), ``total`` for
  the whole call, body included;
- failures raised as aiohttp's client exceptions, so callers handle one family:
  ``aiohttp.ServerTimeoutError`` (a ``TimeoutError``) for any timeout,
  ``aiohttp.ClientOSError`` when the connection cannot be made,
  ``aiohttp.ServerDisconnectedError`` when it closes before the head,
  :class:`InvalidResponse` (a ``ClientConnectionError``) for a head that does not parse,
  and ``aiohttp.ClientPayloadError`` when the body breaks off or does not parse.

Informational answers (100, 102, 103) are skipped, as aiohttp's client does; a ``101``
is handed over as it is (the caller refuses it) and its connection is never reused.
After a ``HEAD`` the answer has no body, and its connection is not reused either.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import aiohttp
import httptools
from multidict import CIMultiDict

from sidecar.pieces import PieceBuffer

__all__ = [
    "HIGH_WATER",
    "KEEPALIVE",
    "MAX_HEAD_BYTES",
    "InvalidResponse",
    "Origin",
    "UpstreamClient",
    "UpstreamResponse",
]

#: Seconds an idle connection stays in the pool (aiohttp's default keep-alive as well).
KEEPALIVE = 15.0
#: Bytes of body waiting for the caller past which the upstream is no longer read.
HIGH_WATER = 256 * 1024
#: The largest response head (status line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
_HEAD_TOO_LARGE = "response head too large"
_NEVER = float("inf")
#: A request body at least this long is written apart from the head (not copied into it).
_WRITE_APART = 64 * 1024


class InvalidResponse(aiohttp.ClientConnectionError):
    """The upstream's answer is not HTTP/1.1 this client can read (a bad head, bad framing)."""


class _Unsolicited(Exception):
    """Bytes arrived on a connection that has no request out."""


def _timeout(what: str) -> aiohttp.ServerTimeoutError:
    return aiohttp.ServerTimeoutError(f"upstream timed out ({what})")


class Origin:
    """Where a route's calls go: scheme, host and port, the ``Host`` header, TLS settings.

    ``host`` is ASCII (a name in its IDNA form, as ``yarl.URL.raw_host`` gives it); calls go
    to ``path`` + the target.
    ``tls``: True to verify with the system's roots, False not to verify, or a context.
    """

    __slots__ = ("host", "host_header", "key", "path", "port", "server_hostname", "ssl")

    def __init__(self, scheme: str, host: str, port: int, path: str, tls: ssl.SSLContext | bool) -> None:
        secure = scheme == "https"
        self.host = host
        self.port = port
        self.path = path.rstrip("/")
        bracketed = f"[{host}]" if ":" in host else host
        default = 443 if secure else 80
        self.host_header = (bracketed if port == default else f"{bracketed}:{port}").encode("ascii")
        self.ssl: ssl.SSLContext | None = _context(tls) if secure else None
        self.server_hostname = host if secure else None
        self.key = (secure, host, port, id(self.ssl))


_VERIFIED: ssl.SSLContext | None = None
_UNVERIFIED: ssl.SSLContext | None = None


def _context(tls: ssl.SSLContext | bool) -> ssl.SSLContext:
    global _VERIFIED, _UNVERIFIED
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls:
        if _VERIFIED is None:
            _VERIFIED = ssl.create_default_context()
        return _VERIFIED
    if _UNVERIFIED is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _UNVERIFIED = context
    return _UNVERIFIED


class UpstreamResponse(PieceBuffer):
    """An upstream's answer: status, reason and headers now, the body through :meth:`readany`.

    Call :meth:`release` when done (the connection goes back to the pool when the whole
    body was read, and is closed otherwise) or :meth:`close` to drop the connection.
    """

    __slots__ = (
        "_conn",
        "_loop",
        "_sock_read",
        "_timer",
        "_total_at",
        "_waiting_since",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, sock_read: float | None, total_at: float) -> None:
        super().__init__()
        self._loop = loop
        self._sock_read = sock_read
        self._total_at = total_at
        self._conn: _Connection | None = None
        self._waiting_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()

    @property
    def content(self) -> UpstreamResponse:
        """The body reader (this object): ``await response.content.readany()`` as with aiohttp."""
        return self

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and been read: the next :meth:`readany` gives ``b""``."""
        return self.done and not self._pieces and self._error is None

    async def readany(self) -> bytes:
        """The body bytes that have arrived since the last call, waiting for some if none;
        ``b""`` once the body is complete."""
        while True:
            if self._pieces:
                if not self.done and self._loop.time() >= self._total_at:
                    error = _timeout("total")
                    self._fail(error)
                    raise error
                return self._take()
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            await self._wait()

    async def _wait(self) -> None:
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self._waiting_since = now = loop.time()
        if self._timer is None:
            self._arm(now)
        try:
            await waiter
        except aiohttp.ServerTimeoutError as exc:
            self._fail(exc)
            raise
        finally:
            self._waiter = None

    def _arm(self, now: float) -> None:
        at = self._total_at
        if self._sock_read is not None and self._waiter is not None:
            at = min(at, self._waiting_since + self._sock_read)
        elif self._sock_read is not None:
            at = min(at, now + self._sock_read)
        if at != _NEVER:
            self._timer = self._loop.call_at(at, self._check_time)

    def _check_time(self) -> None:
        """The read timer: one per response, armed at its first wait and re-armed when it
        fires, rather than set and cancelled for every piece of a stream."""
        self._timer = None
        if self.done or self._error is not None:
            return
        now = self._loop.time()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if now >= self._total_at:
                waiter.set_exception(_timeout("total"))
                return
            if self._sock_read is not None and now - self._waiting_since >= self._sock_read:
                waiter.set_exception(_timeout("read"))
                return
        self._arm(now)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _resume(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    # -- fed by the connection ----------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        if self._append(data, HIGH_WATER) and self._conn is not None:
            self._conn.pause()

    def _finish(self) -> None:
        self.done = True
        self._conn = None
        self._stop_timer()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self.done:
            self._error = exc
        self._stop_timer()
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()
        self._wake()

    # -- the caller's end ---------------------------------------------------------------
    def release(self) -> None:
        """Done with the answer: an unfinished body closes its connection."""
        if not self.done:
            self.close()

    def close(self) -> None:
        """Drop the connection (a body still coming is not read)."""
        self._stop_timer()
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.abort()
        if not self.done and self._error is None:
            self._error = aiohttp.ClientConnectionError("response closed")


class _Connection(asyncio.Protocol):
    """One connection to an upstream and the response it is reading, if any."""

    def __init__(self, pool: _Pool, live: set[_Connection]) -> None:
        self._pool = pool
        self._live = live
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = True
        self._reading_paused = False
        self._response: UpstreamResponse | None = None
        self._head: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []  # body pieces parsed from the current read, not yet handed over
        self._head_bytes = 0
        self._reason = ""
        self._informational = False
        self._head_only = False  # the request was HEAD: the answer has no body
        self._close_delimited = False  # the body ends when the connection does

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._live.add(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reusable = False  # a 101: the head was handed over; nothing else is read
        except _Unsolicited:  # the last answer's body was handed over when it completed
            self.abort()
        except httptools.HttpParserError as exc:
            self._deliver()  # the body before the fault reaches the caller, then the fault
            self._broken(str(exc))
        else:
            self._deliver()

    def _deliver(self) -> None:
        """Hand the body pieces of this read to the response at once: an upstream that sends
        each event as an HTTP chunk of its own has the parser call :meth:`on_body` once per
        event, and the response is fed (and its reader woken) once per read instead."""
        body = self._body
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            response = self._response
            if response is not None:
                response._feed(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._live.discard(self)
        self._pool.forget(self)
        head = self._head
        if head is not None and not head.done():
            self._head = None
            head.set_exception(aiohttp.ServerDisconnectedError())
            return
        response = self._response
        if response is not None:
            self._response = None
            if self._close_delimited:
                response._finish()
            else:
                response._fail(
                    aiohttp.ClientPayloadError("upstream closed the connection before the body ended")
                )

    def pause(self) -> None:
        if self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        transport = self.transport
        if transport is not None:
            transport.abort()

    def _broken(self, reason: str) -> None:
        self.reusable = False
        head = self._head
        if head is not None and not head.done():
            self._head = None
            head.set_exception(InvalidResponse(f"invalid response from upstream: {reason}"))
        elif self._response is not None:
            response = self._response
            self._response = None
            response._fail(aiohttp.ClientPayloadError(f"invalid response body from upstream: {reason}"))
        self.abort()

    # -- one exchange -------------------------------------------------------------------
    def send(
        self, head: bytes, body: bytes, response: UpstreamResponse, head_only: bool
    ) -> asyncio.Future[UpstreamResponse]:
        """Write a request; the future gets ``response`` when its head has arrived."""
        transport = self.transport
        assert transport is not None
        answered = self._head = response._loop.create_future()
        self._response = response
        self._head_only = head_only
        self._headers = []
        self._head_bytes = 0
        if len(body) < _WRITE_APART:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return answered

    # -- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._response is None:
            raise _Unsolicited  # caught in data_received, which closes the connection
        self._headers = []
        self._head_bytes = 0
        self._informational = False

    def on_status(self, reason: bytes) -> None:
        self._reason = reason.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError(_HEAD_TOO_LARGE)
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._informational = True  # 100, 102, 103: the real answer follows
            return
        response = self._response
        head = self._head
        if response is None or head is None:
            raise _Unsolicited
        self._head = None
        response.status = status
        response.reason = self._reason
        headers = response.headers = CIMultiDict(self._headers)
        if not self._parser.should_keep_alive():
            self.reusable = False
        framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        self._close_delimited = not framed and status not in (204, 304) and not self._head_only
        if self._close_delimited:
            self.reusable = False
        response._conn = self
        head.set_result(response)
        if self._head_only:
            # llhttp cannot know the request was HEAD and would read a body that never comes.
            self.reusable = False
            self._response = None
            response._finish()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)  # handed over by _deliver, after the read or at the body's end

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._deliver()
        response = self._response
        self._response = None
        if response is not None:
            response._finish()
        if self.reusable and not self.closed:
            self.resume()  # the body's last read may have filled the caller's buffer
            self._pool.put(self)
        else:
            self.abort()


class _Pool:
    """Idle connections to one origin, most recently used last."""

    def __init__(self) -> None:
        self.idle: deque[_Connection] = deque()

    def put(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.append(conn)

    def take(self, now: float) -> _Connection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed or not conn.reusable or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > KEEPALIVE:
                # This one and every older one have idled too long.
                conn.abort()
                while idle:
                    idle.popleft().abort()
                return None
            return conn
        return None

    def expire(self, now: float) -> None:
        """Close the connections that have idled past :data:`KEEPALIVE` (the oldest first)."""
        idle = self.idle
        while idle and now - idle[0].idle_since > KEEPALIVE:
            idle.popleft().abort()

    def forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.popleft().abort()


class UpstreamClient:
    """Pooled HTTP/1.1 connections to the configured upstreams (see the module's text)."""

    def __init__(self) -> None:
        self._pools: dict[tuple[bool, str, int, int], _Pool] = {}
        self._live: set[_Connection] = set()
        self._swept = 0.0
        self.connections_made = 0  # for tests and the benchmark: how often the pool missed

    def _sweep(self, now: float) -> None:
        """Close idle connections past :data:`KEEPALIVE` in every pool: a reload that changes an
        upstream's TLS settings starts a new pool, and the old one is never asked again. Pools
        themselves stay (one per origin ever used): a connection busy with a call returns to
        its own pool, which must still be the one calls take from."""
        self._swept = now
        for pool in self._pools.values():
            pool.expire(now)

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        timeout: aiohttp.ClientTimeout,
    ) -> UpstreamResponse:
        """Send ``method`` ``origin.path + target`` with ``headers`` and ``body``; the answer once
        its head has arrived. Raises as the module's text says."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        total_at = now + timeout.total if timeout.total else _NEVER
        data = _serialize(method, origin, target, headers, body)
        if now - self._swept > KEEPALIVE:
            self._sweep(now)
        pool = self._pools.get(origin.key)
        if pool is None:
            pool = self._pools[origin.key] = _Pool()
        conn = pool.take(now)
        if conn is None:
            conn = await self._connect(loop, pool, origin, timeout, total_at)
        response = UpstreamResponse(loop, timeout.sock_read, total_at)
        try:
            answered = conn.send(data, body, response, method == "HEAD")
            at = total_at if timeout.sock_read is None else min(total_at, loop.time() + timeout.sock_read)
            handle = loop.call_at(at, _expire_head, answered) if at != _NEVER else None
            try:
                return await answered
            finally:
                if handle is not None:
                    handle.cancel()
        except BaseException:
            conn.abort()  # cancelled or failed before the head: the answer may still come
            raise

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: _Pool,
        origin: Origin,
        timeout: aiohttp.ClientTimeout,
        total_at: float,
    ) -> _Connection:
        limit = total_at - loop.time()
        if timeout.connect is not None:
            limit = min(limit, timeout.connect)
        try:
            async with asyncio.timeout(limit if limit != _NEVER else None):
                _, conn = await loop.create_connection(
                    lambda: _Connection(pool, self._live),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.server_hostname,
                )
        except TimeoutError:
            raise _timeout("connect") from None
        except OSError as exc:
            raise aiohttp.ClientOSError(
                exc.errno, f"cannot connect to upstream: {exc.strerror or exc}"
            ) from exc
        self.connections_made += 1
        return conn

    @property
    def idle_connections(self) -> int:
        """Connections waiting in the pools (for tests and the benchmark)."""
        return sum(len(p.idle) for p in self._pools.values())

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        for pool in self._pools.values():
            pool.close()
        for conn in list(self._live):
            conn.abort()
        await asyncio.sleep(0)  # let the transports' connection_lost run


def _expire_head(head: asyncio.Future[Any]) -> None:
    if not head.done():
        head.set_exception(_timeout("waiting for the response head"))


def _serialize(
    method: str, origin: Origin, target: str, headers: Iterable[tuple[str, str]], body: bytes
) -> bytes:
    """The request's head (the body is sent after it). Raises ValueError for a header that
    would split the request."""
    lines = [f"{method} {origin.path}{target} HTTP/1.1\r\nHost: "]
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} has a character that would split the request")
        lines.append(f"\r\n{name}: {value}")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"\r\nContent-Length: {len(body)}")
    lines.append("\r\n\r\n")
    head = lines[0].encode("utf-8", "surrogateescape")
    rest = "".join(lines[1:]).encode("utf-8", "surrogateescape")
    return b"".join((head, origin.host_header, rest))
