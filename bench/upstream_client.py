"""The CPU one upstream call costs the proxy's client: aiohttp's ``ClientSession`` against
:class:`sidecar.upstream_client.UpstreamClient`, over the same loopback connections.

``python -m bench.upstream_client`` starts the benchmark's mock upstream on one core,
then, on the other, makes the same calls (chat JSON or a 20-chunk stream, read to the
end) through each client in turn, ``--rounds`` times alternating, 32 at a time, and
prints the calls per second and the CPU time per call of the calling process
(user + system, ``resource.getrusage``). Both clients run on uvloop when installed,
with the settings the sidecar used for aiohttp's (no cookies, no proxy from the
environment, no decompression, no added headers). Loopback only; bounded in calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.run import choose_cores, start, stop
from bench.upstream import new_event_loop
from sidecar.upstream_client import Origin, UpstreamClient

HEADERS = [
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer sk-bench"),
    ("X-Tenant-Id", "acme"),
]
BODIES = {
    "json": json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    "stream": json.dumps(
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode(),
}
PATH = "/v1/chat/completions"
TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5, sock_read=30)


async def _measure(call: Callable[[], Awaitable[None]], calls: int, concurrency: int) -> tuple[float, float]:
    """Calls per second and CPU µs per call for ``calls`` calls, ``concurrency`` at a time."""
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return calls / elapsed, cpu / calls * 1e6


async def _compare(
    base: str, shape: str, calls: int, concurrency: int, rounds: int
) -> dict[str, list[float]]:
    host, _, port = base.removeprefix("http://").partition(":")
    body = BODIES[shape]
    session = aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        trust_env=False,
    )
    skip = frozenset({"Accept-Encoding", "User-Agent", "Accept", "Content-Type"})

    async def via_aiohttp() -> None:
        async with session.request(
            "POST", base + PATH, headers=HEADERS, data=body, skip_auto_headers=skip, timeout=TIMEOUT
        ) as response:
            while await response.content.readany():
                pass

    client = UpstreamClient()
    origin = Origin("http", host, int(port), "", True)

    async def via_sidecar() -> None:
        response = await client.request("POST", origin, PATH, HEADERS, body, TIMEOUT)
        while await response.content.readany():
            pass
        response.release()

    results: dict[str, list[float]] = {
        "aiohttp rps": [],
        "aiohttp us": [],
        "sidecar rps": [],
        "sidecar us": [],
    }
    try:
        for call in (via_aiohttp, via_sidecar):
            await _measure(call, min(calls, 500), concurrency)  # warm the pool and the code
        for _ in range(rounds):
            for name, call in (("aiohttp", via_aiohttp), ("sidecar", via_sidecar)):
                rps, us = await _measure(call, calls, concurrency)
                results[f"{name} rps"].append(rps)
                results[f"{name} us"].append(us)
    finally:
        await session.close()
        await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.upstream_client``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20000, help="calls per client per round (max 200000)")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default="json,stream")
    args = parser.parse_args(argv)
    calls = max(1, min(args.calls, 200_000))
    cores = choose_cores()  # pins this process to the load core until told otherwise
    logdir = Path(tempfile.mkdtemp(prefix="llm-sidecar-bench-client-"))
    upstream, _ = start(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--listen", "127.0.0.1:0"],
        cores.load,
        r"upstream on http://[\d.]+:(\d+)",
        logdir,
    )
    try:
        if cores.target is not None:
            os.sched_setaffinity(0, {cores.target})
        print(
            f"{cores.note} (the clients are the target); "
            f"{calls} calls per round, {args.concurrency} at a time"
        )
        print(f"{'shape':<8}{'client':<10}{'calls/s (median)':>18}{'CPU us/call (median)':>22}  rounds")
        for shape in args.shapes.split(","):
            loop = new_event_loop()
            try:
                results = loop.run_until_complete(
                    _compare(
                        f"http://127.0.0.1:{upstream.port}",
                        shape,
                        calls,
                        args.concurrency,
                        max(1, args.rounds),
                    )
                )
            finally:
                loop.close()
            for name in ("aiohttp", "sidecar"):
                rps = sorted(results[f"{name} rps"])
                us = sorted(results[f"{name} us"])
                spread = ", ".join(f"{u:.0f}" for u in results[f"{name} us"])
                print(f"{shape:<8}{name:<10}{rps[len(rps) // 2]:>18.0f}{us[len(us) // 2]:>22.1f}  [{spread}]")
    finally:
        stop(upstream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
