"""Hardening: the sidecar process under load — SIGTERM while calls flow, and SIGHUP storms.

The sidecar runs as ``python -m sidecar run`` in front of the built-in mock upstream (real
latencies, streams and JSON). ``test_process.py`` proves one stream draining on SIGTERM and
one good and one broken reload; these prove the same under concurrent traffic. The
ledger's side of SIGTERM/SIGKILL is ``test_e2e_observability.py``'s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path

import aiohttp

from hardening.support import metric, openai_upstream, sidecar_process, write_config
from sidecar.mock_upstream import MOCK_STATS, start_mock_upstream


def outcome_of(exc: BaseException) -> str:
    return type(exc).__name__


async def one_call(session: aiohttp.ClientSession, url: str, stream: bool) -> tuple[str, bool]:
    """One chat call; (outcome, whether the client saw any response bytes)."""
    body = {"model": "gpt-4o-mini", "stream": stream, "max_tokens": 40}
    body["messages"] = [{"role": "user", "content": "Tell me about draining."}]  # type: ignore[assignment]
    if stream:
        body["stream_options"] = {"include_usage": True}  # type: ignore[assignment]
    headers = {"x-mock-failure": "none"}
    seen = False
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            seen = True
            data = await r.read()
            if r.status != 200:
                return f"status {r.status}", seen
            if stream:
                complete = data.rstrip().endswith(b"data: [DONE]") and b'"usage":{' in data
            else:
                complete = json.loads(data).get("usage") is not None
            return ("complete" if complete else "truncated"), seen
    except (aiohttp.ClientError, ConnectionError) as exc:
        return outcome_of(exc), seen


async def test_sigterm_under_load_finishes_every_call_in_flight(tmp_path: Path) -> None:
    runner, port = await start_mock_upstream(failure_rate=0.0, latency_scale=1.0)
    stats = runner.app[MOCK_STATS]
    cfg = write_config(
        tmp_path / "sidecar.yaml",
        openai_upstream(f"http://127.0.0.1:{port}"),
        "shutdown: {drain_timeout: 15s}\n",
    )
    try:
        async with sidecar_process("--config", str(cfg)) as sc:
            outcomes: list[tuple[str, bool, bool]] = []  # (outcome, saw response, started after SIGTERM)
            stopping = asyncio.Event()

            async def client(n: int) -> None:
                # A fresh connection per call, as many SDK clients make after a pool timeout.
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as s:
                    while True:
                        late = stopping.is_set()
                        outcome, seen = await one_call(s, sc.url, stream=n % 2 == 0)
                        outcomes.append((outcome, seen, late))
                        if outcome != "complete" and late:
                            return  # the listener is gone: nothing more to try

            clients = [asyncio.create_task(client(n)) for n in range(24)]
            await asyncio.sleep(2.0)  # traffic of every shape is in flight
            in_flight = sum(stats.requests.values()) - sum(1 for o in outcomes if o[0] == "complete")
            sc.signal(signal.SIGTERM)
            stopping.set()
            code = await sc.wait(30)
            async with asyncio.timeout(30):
                await asyncio.gather(*clients)
        assert code == 0 and sc.tracebacks() == []
        tally = Counter(o[0] for o in outcomes)
        # Every call either finished whole, or failed before any response byte (safe to retry).
        assert {o for o in tally if o != "complete"} <= {
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
        }, tally
        assert all(not seen for outcome, seen, _ in outcomes if outcome != "complete"), tally
        # Every call that reached the upstream was answered to its client, streams included.
        assert sum(stats.requests.values()) == tally["complete"], (stats.requests, tally)
        assert in_flight > 0 and tally["complete"] > 24
    finally:
        await runner.cleanup()


def storm_config(path: Path, upstream_url: str, name: str) -> None:
    """Atomically replace the config (a good one naming the upstream ``name``, or a broken one)."""
    tmp = path.with_suffix(".tmp")
    if name.startswith("broken"):
        kind = int(name.removeprefix("broken")) % 3
        text = [
            "version: sidecar/v1\nupstreams: [\n",  # not YAML
            "version: sidecar/v1\nlisten: 127.0.0.1:0\nupstreams:\n  - {name: x, url: 'ftp://nope'}\n",
            path.read_text().replace("drain_timeout: 5s", "drain_timeout: 5x"),
        ][kind]
        tmp.write_text(text)
    else:
        write_config(tmp, openai_upstream(upstream_url, name=name), "shutdown: {drain_timeout: 5s}\n")
        tmp.write_text(tmp.read_text().replace(str(tmp.parent / "data"), str(path.parent / "data")))
    os.replace(tmp, path)


async def test_a_reload_storm_never_fails_a_call_and_the_last_good_config_wins(tmp_path: Path) -> None:
    runner, port = await start_mock_upstream(failure_rate=0.0, latency_scale=0.0)
    upstream = f"http://127.0.0.1:{port}"
    cfg = tmp_path / "sidecar.yaml"
    storm_config(cfg, upstream, "first")
    try:
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            results: Counter[str] = Counter()
            done = asyncio.Event()

            async def traffic(n: int) -> None:
                while not done.is_set():
                    outcome, _ = await one_call(s, sc.url, stream=n % 2 == 0)
                    results[outcome] += 1

            workers = [asyncio.create_task(traffic(n)) for n in range(4)]
            broken = 0
            for i in range(60):
                name = f"broken{i}" if i % 2 else f"good{i}"
                broken += name.startswith("broken")
                storm_config(cfg, upstream, name)
                sc.signal(signal.SIGHUP)
                await asyncio.sleep(0.02)
            storm_config(cfg, upstream, "final")
            sc.signal(signal.SIGHUP)
            # The last good file wins, whatever order the storm's reloads finished in.
            async with asyncio.timeout(15):
                while metric(await sc.scrape(s), "llm_requests_total", upstream="final") == 0:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # any reload still running would show now
            first = await sc.scrape(s)
            for _ in range(20):
                assert (await one_call(s, sc.url, stream=False))[0] == "complete"
            text = await sc.scrape(s)
            done.set()
            await asyncio.gather(*workers)

        def older(scrape: str) -> float:
            total = metric(scrape, "llm_requests_total")
            return total - metric(scrape, "llm_requests_total", upstream="final")

        assert older(text) == older(first)  # nothing served by an older config any more
        assert (
            metric(text, "llm_requests_total", upstream="final")
            >= metric(first, "llm_requests_total", upstream="final") + 20
        )
        assert set(results) == {"complete"}, results  # not one call failed during the storm
        failures = metric(text, "llm_config_reload_failures_total")
        assert 1 <= failures <= broken
        assert sc.tracebacks() == []
    finally:
        await runner.cleanup()
