"""A local OTLP/HTTP span receiver that accepts every export and drops it.

``POST /v1/traces`` answers ``200`` with an empty ``ExportTraceServiceResponse`` (an
empty protobuf message is zero bytes) without decoding the body, so the receiver costs
next to nothing on the load core. ``GET /stats`` answers ``{"exports": N, "bytes": M}``.
``python -m bench.spans --listen 127.0.0.1:0`` prints ``spans on http://HOST:PORT`` on
stderr once listening.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from bench.upstream import UpstreamProtocol, serve

EXPORTED = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
COUNTS = {"exports": 0, "bytes": 0}


class SpanProtocol(UpstreamProtocol):
    """Counts ``POST`` bodies, answers them with an empty success, serves ``/stats``."""

    def _respond(self, method: bytes, path: bytes, body: bytes, hold_ms: int) -> None:
        assert self.transport is not None
        if method == b"POST":
            COUNTS["exports"] += 1
            COUNTS["bytes"] += len(body)
            self.transport.write(EXPORTED)
            return
        stats = json.dumps(COUNTS).encode()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(stats), stats)
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.spans``."""
    parser = argparse.ArgumentParser(description="OTLP/HTTP span receiver that drops spans")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    args = parser.parse_args(argv)
    _, _, port = args.listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    bound = sock.getsockname()[1]

    def ready() -> None:
        print(f"spans on http://127.0.0.1:{bound}", file=sys.stderr, flush=True)

    serve(sock, ready, SpanProtocol)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
