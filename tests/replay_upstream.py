"""A real HTTP server on 127.0.0.1 that replays the recorded provider payloads byte for byte.

Tests put the sidecar (or any client) in front of it and queue the responses it should
give, in order::

    async def test_something(replay_upstream: ReplayUpstream) -> None:
        fx = replay_upstream.serve("openai_chat_stream_include_usage", chunk_sizes=[7])
        ...  # send a request to replay_upstream.url + "/v1/chat/completions"
        assert received == fx.body
        assert replay_upstream.requests[0].json()["stream"] is True

A fixture is named by its stem or by any of its files (``x``, ``x.json``, ``x.sse``,
``x.json.gz``, ``transcribed/y.transcribed.json``). Status, reason and headers come
from ``<stem>.meta.json`` (hop-by-hop headers, ``Content-Length`` and the redacted
``Set-Cookie`` are left out; framing is the server's own). The body is served as
recorded: the ``.gz`` bytes with ``Content-Encoding: gzip`` when the recording was
compressed, else the plain file; ``compressed=False`` serves the decoded body without
the header and ``compressed=True`` the gzip bytes (compressing the plain file when no
``.gz`` was recorded). Framing is ``Content-Length`` when the recording had one and no
chunking or cut is asked for, chunked otherwise.

Failure modes: ``cut_after=N`` writes N body bytes and closes the connection without
the terminating chunk; ``stall_after=N`` writes N bytes and then sends nothing more
(until the server closes); ``hang=True`` accepts the request and never answers.
When nothing is queued a small 200 JSON (:data:`DEFAULT_BODY`) is served.

Test infrastructure only: nothing under ``sidecar/`` imports it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "DEFAULT_BODY",
    "Fixture",
    "RecordedRequest",
    "ReplayUpstream",
    "default_fixtures_dir",
    "load_fixture",
    "sse_events",
]

#: Served (status 200, ``application/json``) when a request arrives and nothing is queued.
DEFAULT_BODY = b'{"replay_upstream":"no response queued"}'

# Headers that describe one connection or the framing, never copied from a recording.
_SKIPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "set-cookie",  # redacted placeholders in every recording
    }
)
_SSE_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def default_fixtures_dir() -> Path:
    """``$SIDECAR_FIXTURES``, else ``shared/fixtures`` next to the repository checkout."""
    env = os.environ.get("SIDECAR_FIXTURES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def sse_events(body: bytes) -> list[bytes]:
    """``body`` split after each blank line that ends an SSE event (the rest, if any, last)."""
    chunks: list[bytes] = []
    start = 0
    for match in _SSE_EVENT_END.finditer(body):
        chunks.append(body[start : match.end()])
        start = match.end()
    if start < len(body):
        chunks.append(body[start:])
    return chunks


@dataclass(frozen=True)
class Fixture:
    """A recorded response, ready to serve: the wire ``body`` and the ``decoded`` text."""

    name: str
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes  # as served (gzip bytes when compressed)
    decoded: bytes  # the uncompressed body
    compressed: bool
    is_sse: bool
    had_content_length: bool
    meta: dict[str, Any]

    def json(self) -> Any:
        """The decoded body parsed as JSON."""
        return json.loads(self.decoded)


def load_fixture(fixtures_dir: Path, name: str, compressed: bool | None = None) -> Fixture:
    """Resolve ``name`` in ``fixtures_dir`` and read its body and meta file (see the module docstring)."""
    stem = name.removesuffix(".gz").removesuffix(".meta.json")
    explicit_gz = name.endswith(".gz")
    ext = next((e for e in (".sse", ".json") if stem.endswith(e)), None)
    if ext is not None:
        stem = stem.removesuffix(ext)
    else:
        ext = next((e for e in (".sse", ".json") if (fixtures_dir / (stem + e)).is_file()), None)
        if ext is None and (fixtures_dir / (stem + ".json.gz")).is_file():
            ext = ".json"
        if ext is None and (fixtures_dir / (stem + ".sse.gz")).is_file():
            ext = ".sse"
    if ext is None:
        raise FileNotFoundError(f"no fixture body for {name!r} in {fixtures_dir}")
    plain_path = fixtures_dir / (stem + ext)
    gz_path = fixtures_dir / (stem + ext + ".gz")
    meta_path = fixtures_dir / (stem + ".meta.json")
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}

    gz_bytes = gz_path.read_bytes() if gz_path.is_file() else None
    if plain_path.is_file():
        decoded = plain_path.read_bytes()
    elif gz_bytes is not None:
        decoded = gzip.decompress(gz_bytes)
    else:
        raise FileNotFoundError(f"no fixture body for {name!r} in {fixtures_dir}")
    if compressed is None:
        compressed = explicit_gz or gz_bytes is not None
    body = decoded
    if compressed:
        body = gz_bytes if gz_bytes is not None else gzip.compress(decoded, mtime=0)

    headers: CIMultiDict[str] = CIMultiDict()
    recorded = meta.get("response_headers") or {}
    had_content_length = any(k.lower() == "content-length" for k in recorded)
    for key, value in recorded.items():
        if key.lower() in _SKIPPED or key.lower() == "content-encoding":
            continue
        for item in value if isinstance(value, list) else [value]:
            headers.add(key, str(item))
    if "Content-Type" not in headers:
        headers["Content-Type"] = "text/event-stream; charset=utf-8" if ext == ".sse" else "application/json"
    if compressed:
        headers["Content-Encoding"] = "gzip"
    return Fixture(
        name=stem,
        status=int(meta.get("status_code") or 200),
        reason=meta.get("status_message") or None,
        headers=headers,
        body=body,
        decoded=decoded,
        compressed=compressed,
        is_sse=ext == ".sse",
        had_content_length=had_content_length,
        meta=meta,
    )


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received: ``path`` includes the query string."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        """The request body parsed as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class _Planned:
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    chunks: list[bytes]  # already truncated to cut_after / stall_after
    content_length: int | None  # None: chunked framing
    chunk_delay: float
    first_byte_delay: float
    cut: bool
    stall: bool
    hang: bool


def _split(body: bytes, sizes: list[int]) -> list[bytes]:
    """``body`` in pieces of ``sizes``, the list repeated until the body is used up."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"chunk_sizes must be positive, got {sizes}")
    chunks: list[bytes] = []
    pos, i = 0, 0
    while pos < len(body):  # bounded: every pass advances pos by at least 1
        size = sizes[i % len(sizes)]
        chunks.append(body[pos : pos + size])
        pos += size
        i += 1
    return chunks


def _truncate(chunks: list[bytes], limit: int) -> list[bytes]:
    """The first ``limit`` bytes of ``chunks``, keeping their boundaries."""
    out: list[bytes] = []
    left = limit
    for chunk in chunks:
        if left <= 0:
            break
        out.append(chunk[:left])
        left -= len(out[-1])
    return out


class ReplayUpstream:
    """A real aiohttp server replaying queued responses in FIFO order, recording every request.

    ``requests`` lists what arrived, in order, for assertions.
    """

    def __init__(self, fixtures_dir: Path | None = None, host: str = "127.0.0.1") -> None:
        self.fixtures_dir = fixtures_dir if fixtures_dir is not None else default_fixtures_dir()
        self.host = host
        self.requests: list[RecordedRequest] = []
        self._queue: list[_Planned] = []
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing: asyncio.Event | None = None
        self._arrived: asyncio.Event | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind an ephemeral port on ``host`` and start serving."""
        if self._runner is not None:
            raise RuntimeError("already started")
        self._closing = asyncio.Event()
        self._arrived = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
            self._port = int(runner.addresses[0][1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        """Release hanging and stalled responses, then stop the server (idempotent)."""
        if self._closing is not None:
            self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> ReplayUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port."""
        if self._port is None:
            raise RuntimeError("ReplayUpstream is not started")
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pending(self) -> int:
        """How many queued responses have not been served yet."""
        return len(self._queue)

    # -- queueing ------------------------------------------------------------------

    def fixture(self, name: str, compressed: bool | None = None) -> Fixture:
        """Load a fixture from :attr:`fixtures_dir` without queueing it."""
        return load_fixture(self.fixtures_dir, name, compressed)

    def serve(
        self,
        fixture: str,
        *,
        status: int | None = None,
        chunk_sizes: list[int] | None = None,
        chunk_delay: float = 0.0,
        first_byte_delay: float = 0.0,
        cut_after: int | None = None,
        stall_after: int | None = None,
        hang: bool = False,
        compressed: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> Fixture:
        """Queue a recorded response; returns the :class:`Fixture` (``.body`` is what will be sent).

        Without ``chunk_sizes`` an SSE body goes out one event per chunk (a compressed
        one as a single chunk) and a JSON body in one piece.
        """
        fx = self.fixture(fixture, compressed)
        if chunk_sizes is not None:
            chunks = _split(fx.body, chunk_sizes)
        elif fx.is_sse and not fx.compressed:
            chunks = sse_events(fx.body)
        else:
            chunks = [fx.body] if fx.body else []
        hdrs = fx.headers.copy()
        keep_length = fx.had_content_length and chunk_sizes is None
        self._queue.append(
            self._plan(
                status if status is not None else fx.status,
                fx.reason if status is None else None,
                hdrs,
                chunks,
                keep_length,
                chunk_delay,
                first_byte_delay,
                cut_after,
                stall_after,
                hang,
                headers,
            )
        )
        return fx

    def serve_raw(
        self,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        chunk_sizes: list[int] | None = None,
        chunk_delay: float = 0.0,
        first_byte_delay: float = 0.0,
        cut_after: int | None = None,
        stall_after: int | None = None,
        hang: bool = False,
    ) -> None:
        """Queue an arbitrary response (``Content-Type: application/json`` unless given)."""
        hdrs: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        chunks = _split(body, chunk_sizes) if chunk_sizes is not None else ([body] if body else [])
        self._queue.append(
            self._plan(
                status,
                None,
                hdrs,
                chunks,
                chunk_sizes is None,
                chunk_delay,
                first_byte_delay,
                cut_after,
                stall_after,
                hang,
                headers,
            )
        )

    @staticmethod
    def _plan(
        status: int,
        reason: str | None,
        hdrs: CIMultiDict[str],
        chunks: list[bytes],
        keep_length: bool,
        chunk_delay: float,
        first_byte_delay: float,
        cut_after: int | None,
        stall_after: int | None,
        hang: bool,
        extra: dict[str, str] | None,
    ) -> _Planned:
        if cut_after is not None and stall_after is not None:
            raise ValueError("cut_after and stall_after exclude each other")
        for key, value in (extra or {}).items():
            hdrs[key] = value  # replaces every recorded value of that name
        total = sum(len(c) for c in chunks)
        limit = cut_after if cut_after is not None else stall_after
        if limit is not None:
            if not 0 <= limit <= total:
                raise ValueError(f"cut/stall point {limit} outside the body (0..{total} bytes)")
            chunks = _truncate(chunks, limit)
        framed = keep_length and limit is None
        return _Planned(
            status=status,
            reason=reason,
            headers=hdrs,
            chunks=chunks,
            content_length=total if framed else None,
            chunk_delay=chunk_delay,
            first_byte_delay=first_byte_delay,
            cut=cut_after is not None,
            stall=stall_after is not None,
            hang=hang,
        )

    # -- assertions helpers --------------------------------------------------------

    async def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``count`` requests arrived (``TimeoutError`` after ``timeout`` s)."""
        assert self._arrived is not None, "ReplayUpstream is not started"
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:  # bounded by the timeout
                self._arrived.clear()
                await self._arrived.wait()
        return self.requests

    # -- serving -------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        planned = self._queue.pop(0) if self._queue else None
        body = await request.read()
        headers: CIMultiDict[str] = CIMultiDict(request.headers)
        self.requests.append(RecordedRequest(request.method, request.path_qs, headers, body))
        assert self._arrived is not None and self._closing is not None
        self._arrived.set()
        if planned is None:
            return web.Response(status=200, body=DEFAULT_BODY, content_type="application/json")

        if planned.first_byte_delay > 0:
            await self._wait_or_close(planned.first_byte_delay)
        if planned.hang:
            await self._closing.wait()
            return self._abort(request, web.StreamResponse())
        response = web.StreamResponse(status=planned.status, reason=planned.reason, headers=planned.headers)
        if planned.content_length is not None:
            response.content_length = planned.content_length
        try:
            await response.prepare(request)
            for i, chunk in enumerate(planned.chunks):
                if i and planned.chunk_delay > 0:
                    await self._wait_or_close(planned.chunk_delay)
                await response.write(chunk)
            if planned.stall:
                await self._closing.wait()
                return self._abort(request, response)
            if planned.cut:
                return self._abort(request, response)
        except ConnectionResetError:
            pass  # the client went away; the test is looking at what it saw
        return response

    async def _wait_or_close(self, seconds: float) -> None:
        assert self._closing is not None
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            pass

    @staticmethod
    def _abort(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """Close the connection after what was written: the client sees no terminating chunk.

        aiohttp then fails to finish ``response`` with a ``ConnectionError``, which it
        treats as a client that went away (no log, no traceback).
        """
        if request.transport is not None:
            request.transport.close()
        return response
