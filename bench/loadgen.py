"""HTTP/1.1 clients of the benchmark: a closed-loop load generator and the probes.

- :func:`run_load` (``python -m bench.loadgen``): N keep-alive connections, each sending
  the next request of the mix as soon as the previous response has ended, for a bounded
  time and number of requests; prints one ``BENCHJSON {...}`` line in the same form as
  the wrk script (:mod:`bench.wrk`). Used when wrk is not installed. In-flight requests
  are completed at the end, not cut.
- :func:`probe` : sequential requests on one blocking connection, timing the first byte of
  each response and its first body byte (streaming time to first byte).
- :func:`open_streams`: many streams held open at once (memory per open stream).

Responses are parsed properly (status, ``Content-Length`` or chunked framing), so a
target that answers wrongly shows up as errors, not as speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from bench import payloads

MAX_RESPONSE = 16 * 1024 * 1024


class ResponseParser:
    """Incremental parser of HTTP/1.1 responses on one connection."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.body_bytes = 0  # body bytes of the current response seen so far
        self._remaining = -1  # Content-Length left; -1 while reading the head
        self._chunked = False

    def feed(self, data: bytes) -> list[int]:
        """Consume ``data``; the statuses of the responses it completed."""
        self.buf += data
        done: list[int] = []
        for _ in range(100_000):  # bounded: each pass consumes input or returns
            if self._remaining < 0 and not self._chunked:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_RESPONSE:
                        raise ValueError("response head too large")
                    return done
                self._head(bytes(self.buf[:end]))
                del self.buf[: end + 4]
                self.body_bytes = 0
                if self._remaining == 0 and not self._chunked:
                    done.append(self.status)
                    self._remaining = -1
                continue
            if self._chunked:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return done
                size = int(bytes(self.buf[:eol]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(self.buf) < eol + 4:
                        return done
                    del self.buf[: eol + 4]
                    self._chunked = False
                    self._remaining = -1
                    done.append(self.status)
                    continue
                if len(self.buf) < eol + 2 + size + 2:
                    self.body_bytes = max(self.body_bytes, 1)  # a chunk has started to arrive
                    return done
                del self.buf[: eol + 2 + size + 2]
                self.body_bytes += size
                continue
            take = min(self._remaining, len(self.buf))
            if take == 0:
                return done
            del self.buf[:take]
            self.body_bytes += take
            self._remaining -= take
            if self._remaining == 0:
                self._remaining = -1
                done.append(self.status)
        raise ValueError("parser did not make progress")

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        self._remaining = 0
        self._chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._remaining = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True


def rendered(stream: bool, host: str, extra: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    """The request mix of one shape as bytes for ``host``."""
    return [r.render(host, extra) for r in payloads.requests(stream)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, nearest rank; 0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


# --- closed-loop load ---------------------------------------------------------------------


@dataclass
class LoadState:
    """Shared state of one load run."""

    requests: list[bytes]
    deadline: float
    max_requests: int
    sent: int = 0
    ok: int = 0
    errors_status: int = 0
    errors_socket: int = 0
    latencies_us: list[float] = field(default_factory=list)
    open_conns: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def next_request(self) -> bytes | None:
        if self.sent >= self.max_requests or time.perf_counter() >= self.deadline:
            return None
        req = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        return req


class LoadConnection(asyncio.Protocol):
    """One keep-alive connection of the load generator."""

    def __init__(self, state: LoadState) -> None:
        self.state = state
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.waiting = False  # a request is out and its response has not ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's is not a subclass of asyncio.Transport, so no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        req = self.state.next_request()
        if req is None:
            self.transport.close()
            return
        self.started = time.perf_counter()
        self.waiting = True
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.parser.feed(data)
        except ValueError:
            self.state.errors_socket += 1
            if self.transport is not None:
                self.transport.close()
            return
        for status in statuses:
            self.waiting = False
            self.state.latencies_us.append((time.perf_counter() - self.started) * 1e6)
            if 200 <= status < 400:
                self.state.ok += 1
            else:
                self.state.errors_status += 1
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting:
            self.state.errors_socket += 1
        self.state.open_conns -= 1
        if self.state.open_conns <= 0:
            self.state.finished.set()


async def run_load(
    host: str, port: int, stream: bool, connections: int, duration: float, max_requests: int
) -> dict[str, float]:
    """Drive the target for ``duration`` seconds (or ``max_requests``); the run's figures."""
    loop = asyncio.get_running_loop()
    state = LoadState(rendered(stream, f"{host}:{port}"), time.perf_counter() + duration, max_requests)
    started = time.perf_counter()
    state.open_conns = connections
    for _ in range(connections):
        try:
            await loop.create_connection(lambda: LoadConnection(state), host, port)
        except OSError:
            state.errors_socket += 1
            state.open_conns -= 1
    if state.open_conns > 0:
        await asyncio.wait_for(state.finished.wait(), timeout=duration + 30)
    elapsed = time.perf_counter() - started
    lat = sorted(state.latencies_us)
    return {
        "requests": state.ok + state.errors_status,
        "duration_us": elapsed * 1e6,
        "errors_status": state.errors_status,
        "errors_socket": state.errors_socket,
        "p50_us": percentile(lat, 50),
        "p90_us": percentile(lat, 90),
        "p99_us": percentile(lat, 99),
        "mean_us": sum(lat) / len(lat) if lat else 0.0,
        "max_us": lat[-1] if lat else 0.0,
    }


# --- probes -------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Timings of sequential requests, in microseconds."""

    first_byte_us: list[float] = field(default_factory=list)
    first_body_us: list[float] = field(default_factory=list)
    total_us: list[float] = field(default_factory=list)
    errors: int = 0


class Prober:
    """One blocking keep-alive connection sending requests one at a time."""

    def __init__(self, host: str, port: int, stream: bool) -> None:
        self.host, self.port = host, port
        self.requests = rendered(stream, f"{host}:{port}")
        self.sock: socket.socket | None = None
        self.count = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def once(self, result: ProbeResult) -> None:
        """Send the next request of the mix and time its response into ``result``."""
        if self.sock is None:
            self.sock = self._connect()
        req = self.requests[self.count % len(self.requests)]
        self.count += 1
        parser = ResponseParser()
        t0 = time.perf_counter()
        self.sock.sendall(req)
        first_byte = first_body = 0.0
        statuses: list[int] = []
        for _ in range(100_000):
            data = self.sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            first_byte = first_byte or now
            statuses = parser.feed(data)
            if parser.body_bytes and not first_body:
                first_body = now
            if statuses:
                first_body = first_body or now
                break
        if not statuses or not 200 <= statuses[0] < 400:
            result.errors += 1
            self.close()
            return
        end = time.perf_counter()
        result.first_byte_us.append((first_byte - t0) * 1e6)
        result.first_body_us.append((first_body - t0) * 1e6)
        result.total_us.append((end - t0) * 1e6)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def probe(targets: dict[str, tuple[str, int]], stream: bool, count: int) -> dict[str, ProbeResult]:
    """``count`` sequential requests per target, the targets interleaved request by request."""
    probers = {name: Prober(host, port, stream) for name, (host, port) in targets.items()}
    results = {name: ProbeResult() for name in targets}
    try:
        for _ in range(count):
            for name, prober in probers.items():
                prober.once(results[name])
    finally:
        for prober in probers.values():
            prober.close()
    return results


async def open_streams(
    host: str,
    port: int,
    count: int,
    hold_ms: int,
    while_open: Callable[[], None],
) -> tuple[int, int]:
    """Open ``count`` streams held by the upstream, call ``while_open`` once every one has its
    first event, then read them all to the end. Returns (streams open at once, completed)."""
    extra = ((payloads.HOLD_HEADER, str(hold_ms)),)
    reqs = rendered(True, f"{host}:{port}", extra)
    all_open = asyncio.Event()
    opened = 0
    completed = 0

    async def one(i: int) -> None:
        nonlocal opened, completed
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(reqs[i % len(reqs)])
            parser = ResponseParser()
            counted = False
            for _ in range(100_000):
                data = await reader.read(65536)
                if not data:
                    return
                statuses = parser.feed(data)
                if not counted and (parser.body_bytes or statuses):
                    counted = True
                    opened += 1
                    if opened == count:
                        all_open.set()
                if statuses:
                    completed += statuses[0] == 200
                    return
        finally:
            writer.close()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_open.wait(), timeout=hold_ms / 1000)
    held = opened
    while_open()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=hold_ms / 1000 + 30)
    return held, completed


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.loadgen``: one bounded load run, one JSON line."""
    parser = argparse.ArgumentParser(description="closed-loop HTTP/1.1 load generator (wrk stand-in)")
    parser.add_argument("--target", required=True, help="HOST:PORT (127.0.0.1 only)")
    parser.add_argument("--shape", choices=["json", "stream"], default="json")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if host != "127.0.0.1":
        parser.error("load goes to 127.0.0.1 only")
    from bench.upstream import new_event_loop

    loop = new_event_loop()
    try:
        figures = loop.run_until_complete(
            run_load(
                host,
                int(port),
                args.shape == "stream",
                args.connections,
                min(args.duration, 600.0),
                args.max_requests,
            )
        )
    finally:
        loop.close()
    print("BENCHJSON " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
