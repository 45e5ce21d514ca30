"""Helpers the hardening tests and the long runs share (test infrastructure: ``sidecar/`` never imports it).

* :class:`RawUpstream` — a TCP server on 127.0.0.1 that runs a scripted coroutine per
  connection, speaking raw bytes: it can accept and never answer, send headers and hang,
  reset mid-body, drip one byte a second, lie in ``Content-Length`` or stream 100 MiB.
  It records whether the sidecar closed each connection (a cancelled upstream call).
* :class:`SidecarProcess` — ``python -m sidecar run`` as a real process, its ports parsed
  from the start-up line, its stderr kept for assertions (``tracebacks()``).
* :func:`rss_bytes`, :func:`fd_count` — a process's resident memory and open descriptors,
  read from ``/proc``.
* :func:`metric` — one metric's sum over the samples whose labels match, from a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent

# --- a raw, scriptable upstream -----------------------------------------------------------


@dataclass
class RawRequest:
    """The request head and body one connection received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RawConn:
    """One accepted connection: the script reads and writes through it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0  # body and head bytes the kernel accepted (after drain)
    requests: list[RawRequest] = field(default_factory=list)
    peer_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_request(self) -> RawRequest | None:
        """The next request (head and ``Content-Length`` or chunked body); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                body += chunk[:-2]
                if size == 0:
                    break
        request = RawRequest(method, target, headers, body)
        self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        """Write ``data`` and wait until the kernel took it (flow control reaches us here)."""
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)

    async def wait_peer_closed(self, timeout: float | None = None) -> bool:
        """Read (and discard) until the sidecar closes its end; True when it did within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        self.peer_closed.set()
        return True

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), not a FIN."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            import socket
            import struct

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[RawConn], Awaitable[None]]


def response_head(status: int = 200, headers: Sequence[tuple[str, str]] = (), reason: str = "OK") -> bytes:
    """An HTTP/1.1 status line and header block."""
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# --- canned OpenAI-shaped answers -------------------------------------------------------------

MODEL = "gpt-4o-2024-08-06"


def chat_json(prompt: int = 12, completion: int = 5, model: str = MODEL) -> bytes:
    """A Chat Completions JSON answer reporting ``prompt``/``completion`` tokens."""
    return (
        b'{"id":"chatcmpl-1","object":"chat.completion","model":"%s","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}'
        % (model.encode(), prompt, completion, prompt + completion)
    )


def chat_chunk(content: str, model: str = MODEL) -> bytes:
    """One Chat Completions stream event carrying ``content``."""
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"%s","choices":'
        b'[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n'
        % (model.encode(), content.encode())
    )


def usage_chunk(prompt: int = 12, completion: int = 5, model: str = MODEL) -> bytes:
    """The final usage event of a Chat Completions stream that asked for usage."""
    return (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"%s","choices":[],'
        b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        % (model.encode(), prompt, completion, prompt + completion)
    )


DONE = b"data: [DONE]\n\n"


def chat_stream(words: int = 5, prompt: int = 12) -> bytes:
    """A whole Chat Completions stream: ``words`` content events, usage, ``[DONE]``."""
    return b"".join(chat_chunk(f"w{i} ") for i in range(words)) + usage_chunk(prompt, words) + DONE


async def answer_json(conn: RawConn, body: bytes | None = None) -> None:
    """Answer every request on the connection with a JSON body (keep-alive)."""
    body = chat_json() if body is None else body
    head = response_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    while await conn.read_request() is not None:
        await conn.send(head + body)


async def answer_sse(conn: RawConn, body: bytes, piece: int = 0, delay: float = 0.0) -> None:
    """Answer one request with ``body`` as a chunked event stream, in pieces of ``piece`` bytes."""
    await conn.read_request()
    await conn.send(
        response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
    )
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)] if piece else [body]
    for i, data in enumerate(pieces):
        if i and delay:
            await asyncio.sleep(delay)
        await conn.send(chunk(data))
    await conn.send(LAST_CHUNK)


class RawUpstream:
    """A TCP server on 127.0.0.1 running ``script`` for every connection.

    ``script`` may be replaced between calls. ``conns`` lists every connection in
    accept order; :attr:`open` counts those not yet closed by either side.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[RawConn] = []
        self.open = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.accepted = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn(reader, writer)
        self.conns.append(conn)
        self.open += 1
        self.accepted.set()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.peer_closed.set()
        except asyncio.CancelledError:
            pass  # close(): this task belongs to the server, ending it is all that is asked
        finally:
            self.open -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def wait_accepted(self, count: int = 1, timeout: float = 5.0) -> RawConn:
        async with asyncio.timeout(timeout):
            while len(self.conns) < count:
                self.accepted.clear()
                await self.accepted.wait()
        return self.conns[count - 1]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> RawUpstream:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


# --- a sidecar process -------------------------------------------------------------------------


def write_config(path: Path, upstreams: str, extra: str = "") -> Path:
    """Write a sidecar config with ephemeral ports and the given ``upstreams:`` items (YAML)."""
    path.write_text(
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "upstreams:\n"
        + textwrap.indent(textwrap.dedent(upstreams).strip("\n"), "  ")
        + "\n"
        + textwrap.dedent(extra)
        + ("" if "data_dir:" in extra else f"data_dir: {path.parent / 'data'}\n")
        + ("" if "logs:" in extra else "logs: {enabled: false}\n")
    )
    return path


def openai_upstream(url: str, name: str = "openai", mount: str = "/", **extra: str) -> str:
    """One ``upstreams:`` item as a YAML flow mapping."""
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"- {{name: {name}, url: '{url}', provider: openai, mount: {mount}{fields}}}\n"


_STARTED = re.compile(r"proxy on http://[\d.]+:(\d+), metrics on http://[\d.]+:(\d+)")


class SidecarProcess:
    """``python -m sidecar run ARGS`` with its stderr kept in :attr:`log`."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.admin_port = 0
        self.lines: list[str] = []
        self._drainer: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def tracebacks(self) -> list[str]:
        """Log lines that start an exception traceback (none should escape)."""
        return [line for line in self.lines if line.startswith("Traceback")]

    async def start(self) -> SidecarProcess:
        self.proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "-m",
            "sidecar",
            "run",
            *self.args,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, **(self.env or {})},
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise RuntimeError("sidecar exited before listening:\n" + self.log)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                found = _STARTED.search(line)
                if found:
                    self.port, self.admin_port = int(found.group(1)), int(found.group(2))
                    break
        self._drainer = asyncio.create_task(self._drain())
        return self

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.lines.append(raw.decode(errors="replace"))

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._drainer is not None:
            await self._drainer
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._drainer is not None:
            with contextlib.suppress(BaseException):
                await self._drainer

    async def scrape(self, session: aiohttp.ClientSession, token: str | None = None) -> str:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with session.get(f"http://127.0.0.1:{self.admin_port}/metrics", headers=headers) as r:
            assert r.status == 200, r.status
            return await r.text()

    async def scrape_when(
        self, session: aiohttp.ClientSession, name: str, at_least: float, timeout: float = 10.0, **labels: str
    ) -> str:
        """A scrape once ``name`` (labels matching) reached ``at_least``: records reach the
        metrics a moment after the client got its answer (later still when estimated)."""
        async with asyncio.timeout(timeout):
            while True:  # polling a scrape: there is no event to wait on across processes
                text = await self.scrape(session)
                if metric(text, name, **labels) >= at_least:
                    return text
                await asyncio.sleep(0.05)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)


@contextlib.asynccontextmanager
async def sidecar_process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[SidecarProcess]:
    """A started :class:`SidecarProcess`; killed on exit, its log printed when the body failed."""
    proc = SidecarProcess(*args, env=env)
    try:
        await proc.start()
        yield proc
    except BaseException:
        sys.stderr.write("sidecar stderr:\n" + proc.log[-20000:] + "\n")
        raise
    finally:
        await proc.stop()


# --- /proc readings ---------------------------------------------------------------------------


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` now."""
    return _status_field(pid, "VmRSS")


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds while running; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            value = rss_bytes(self.pid)
            self.samples.append(value)
            self.peak = max(self.peak, value)
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# --- metrics ---------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` in a Prometheus scrape whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def series(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called ``name``."""
    return [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def sigterm(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
