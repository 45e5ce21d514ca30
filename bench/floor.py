"""The floor: a bare aiohttp pass-through with no accounting (uvloop when installed).

What a user would write in an afternoon instead of running the sidecar: forward the
method, path, headers and body to one upstream, stream the response back chunk by
chunk. No usage parsing, no metrics, no tenants. The benchmark's headline figures are
ratios to this. ``python -m bench.floor --upstream URL --listen 127.0.0.1:0`` prints
``floor on http://HOST:PORT`` on stderr once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiohttp
from aiohttp import web

from bench.upstream import new_event_loop

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request on unchanged and stream the upstream's answer back."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = await request.read()
    url = request.app[UPSTREAM] + request.path_qs
    session = request.app[SESSION]
    async with session.request(request.method, url, headers=headers, data=body) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.headers.update({k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def serve(upstream: str, host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    session = aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(limit=0), skip_auto_headers=["User-Agent"]
    )
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app[SESSION] = session
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"floor on http://{host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()
    await session.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.floor``."""
    parser = argparse.ArgumentParser(description="bare aiohttp pass-through (the benchmark's floor)")
    parser.add_argument("--upstream", required=True, help="upstream base URL")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.upstream, host, int(port)))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
