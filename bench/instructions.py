"""Instructions per request of the sidecar (or the floor), counted by valgrind: a CPU cost
that a shared machine's noise does not move.

``python -m bench.instructions [--target sidecar|floor] [--shape json|stream] [--requests 100]``
starts the mock upstream, then the target under ``valgrind --tool=callgrind`` twice: once
serving ``N`` requests and once ``2N``, one client, each after the same warm-up. The
difference of the two totals over ``N`` is what one request costs in user-space
instructions, every thread included (the event loop, the ledger writer, the rule engine),
with start-up, warm-up and shutdown cancelled out. Kernel work (system calls, TCP) is not
counted. Two runs of the same tree agree within about 2 %, where wall-clock CPU per request
moved by 25 % between rounds on the machine this was written on; compare two trees with
``--repo``. Each run takes about a minute: valgrind slows the target some fifty times, so
what the sidecar does by the clock (pacing its background threads, slicing the loop's
work, GIL hand-offs) comes fifty times as often per request, and its count is not
comparable with the floor's, only with another tree's.

Needs ``valgrind`` (``apt-get install valgrind``); loopback only, bounded in requests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20  # requests before the counted ones (lazy imports, first connections)
_COLLECTED = re.compile(r"Collected : (\d+)")


@dataclass(frozen=True)
class Count:
    """Instructions of two runs and what one request costs."""

    requests: int
    first: int  # total for ``requests``
    second: int  # total for ``2 * requests``

    @property
    def per_request(self) -> float:
        return (self.second - self.first) / self.requests


def collected(valgrind_stderr: str) -> int:
    """The total instructions callgrind reports on exit (``Collected : N``)."""
    found = _COLLECTED.search(valgrind_stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{valgrind_stderr[-2000:]}")
    return int(found.group(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def _roundtrip(sock: socket.socket, parser: loadgen.ResponseParser, request: bytes) -> None:
    """Send one request and read its whole answer (framed by the load generator's parser)."""
    sock.sendall(request)
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the target closed the connection")
        if parser.feed(data):
            return


def _command(
    target: str, repo: Path, upstream: str, port: int, data_dir: str, config: Path | None
) -> list[str]:
    if target == "floor":
        return ["-m", "bench.floor", "--upstream", upstream, "--listen", f"127.0.0.1:{port}"]
    admin = _free_port()
    cfg = config or repo / "bench" / "sidecar.yaml"
    return [
        "-m", "sidecar", "run", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}", "--data-dir", data_dir,
    ]  # fmt: skip


def measure_once(
    target: str, repo: Path, shape: str, requests: int, upstream_port: int, config: Path | None
) -> int:
    """Total instructions of one target process serving ``WARMUP + requests`` requests."""
    port = _free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "BENCH_UPSTREAM_URL": upstream, "PYTHONHASHSEED": "0"}
        args = _command(target, repo, upstream, port, data_dir, config)
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *args],
            cwd=repo,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_listening(port, time.monotonic() + 300)
            rendered = loadgen.rendered(shape == "stream", f"127.0.0.1:{port}")
            parser = loadgen.ResponseParser()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                for i in range(WARMUP + requests):
                    _roundtrip(sock, parser, rendered[i % len(rendered)])
            time.sleep(3)  # the sinks take the last records
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return collected(err)


def measure(target: str, repo: Path, shape: str, requests: int, config: Path | None = None) -> Count:
    """Instructions per request of ``target`` (see the module docstring)."""
    upstream_port = _free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream", "--listen", f"127.0.0.1:{upstream_port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert upstream.stderr is not None
        upstream.stderr.readline()  # "upstream on ..." once listening
        first = measure_once(target, repo, shape, requests, upstream_port, config)
        second = measure_once(target, repo, shape, 2 * requests, upstream_port, config)
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    return Count(requests, first, second)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.instructions``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--target", choices=["sidecar", "floor"], default="sidecar")
    parser.add_argument("--shape", choices=["json", "stream"], default="stream")
    parser.add_argument("--requests", type=int, default=100, help="N: runs of N and 2N requests (max 2000)")
    parser.add_argument(
        "--repo", type=Path, default=ROOT, help="the tree whose sidecar runs (default: this one)"
    )
    parser.add_argument("--config", type=Path, help="sidecar config (default: REPO/bench/sidecar.yaml)")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        parser.error("valgrind not found (apt-get install valgrind)")
    requests = max(1, min(args.requests, 2000))
    count = measure(args.target, args.repo.resolve(), args.shape, requests, args.config)
    print(
        f"{args.target} {args.shape}, one client: {count.first:,} instructions for {requests} requests, "
        f"{count.second:,} for {2 * requests}: {count.per_request:,.0f} per request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
