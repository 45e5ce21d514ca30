"""Alerting end to end: a real sidecar process, real traffic, a real apprise json:// receiver.

The receiver has three channels: one that takes messages, one that answers 500 and one
that never answers. The firing and the resolved messages reach the good channel, the
other two are counted as failed and timeout, and no proxied call waits on any of them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.alerting import AlertingSettings
from tests.harness import make_config, running_sidecar, sample
from tests.replay_upstream import ReplayUpstream
from tests.test_process import metric_value, sidecar_process

RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, group_by: [tenant], notify: [good, bad, hang]}
rules:
  - name: errors
    kind: error_rate
    bad: {error_type: [upstream_5xx]}
    threshold: 50%
    window: 30s
    min_requests: 3
    for: 0s
    severity: page
    annotations:
      summary: "{{ $labels.tenant }} calls fail"
"""


class Receiver:
    """An aiohttp server standing in for three notification endpoints."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.got = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/good", self.good)
        app.router.add_post("/bad", self.bad)
        app.router.add_post("/hang", self.hang)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        self.port = 0

    async def good(self, request: web.Request) -> web.Response:
        self.messages.append(json.loads(await request.read()))
        self.got.set()
        return web.json_response({})

    async def bad(self, request: web.Request) -> web.Response:
        return web.json_response({"error": "down"}, status=500)

    async def hang(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.json_response({})

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def wait_for(self, title_prefix: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if message.get("title", "").startswith(title_prefix):
                        return message
                self.got.clear()
                await self.got.wait()


async def timed_call(session: aiohttp.ClientSession, port: int) -> tuple[int, float]:
    started = time.monotonic()
    async with session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"x-tenant-id": "acme"},
    ) as r:
        await r.read()
        return r.status, time.monotonic() - started


async def test_firing_and_resolved_messages_for_real_traffic(
    replay_upstream: ReplayUpstream, tmp_path: Path
) -> None:
    receiver = Receiver()
    await receiver.start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = tmp_path / "sidecar.yaml"
    base = f"json://127.0.0.1:{receiver.port}"
    config.write_text(
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        f"upstreams:\n  - {{name: openai, url: '{replay_upstream.url}', provider: openai}}\n"
        f"data_dir: {tmp_path / 'data'}\n"
        "logs: {enabled: false}\n"
        f"rules: {{files: [{rules}]}}\n"
        "notify:\n"
        "  group_wait: 0s\n"
        "  timeout: 2s\n"
        f"  channels: {{good: ['{base}/good'], bad: ['{base}/bad'], hang: ['{base}/hang']}}\n"
    )
    try:
        async with (
            sidecar_process("--config", str(config)) as (proc, port, admin),
            aiohttp.ClientSession() as s,
        ):
            for _ in range(4):
                replay_upstream.serve_raw(503, b'{"error": {"message": "overloaded"}}')
            failing = [await timed_call(s, port) for _ in range(4)]
            assert [status for status, _ in failing] == [503] * 4

            firing = await receiver.wait_for("[FIRING:page] errors", timeout=15)
            assert "tenant=acme" in firing["title"]
            assert firing["type"] == "failure"
            assert "acme calls fail" in firing["message"]

            # While the hanging channel is still being waited on, proxying is unaffected.
            healthy = [await timed_call(s, port) for _ in range(10)]
            assert all(status == 200 for status, _ in healthy)
            assert max(elapsed for _, elapsed in healthy) < 1.0

            resolved = await receiver.wait_for("[RESOLVED:page] errors", timeout=15)
            assert "tenant=acme" in resolved["title"] and resolved["type"] == "success"

            async with asyncio.timeout(15):
                while (
                    await metric_value(s, admin, 'llm_notifications_total{channel="hang",outcome="timeout"}')
                    < 1
                ):
                    await asyncio.sleep(0.2)
            assert (
                await metric_value(s, admin, 'llm_notifications_total{channel="bad",outcome="failed"}') >= 1
            )
            assert await metric_value(s, admin, 'llm_notifications_total{channel="good",outcome="sent"}') >= 2
            assert await metric_value(s, admin, "llm_incidents_open") == 0

            # The incident is on disk: the CLI reads it back with its duration.
            receiver.release.set()
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "incidents",
            "list",
            "--data-dir",
            str(tmp_path / "data"),
            "--format",
            "json",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        incidents = json.loads(out)
        assert len(incidents) == 1 and incidents[0]["rule"] == "errors"
    finally:
        receiver.release.set()
        await receiver.runner.cleanup()


BUDGET_RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, group_by: [tenant], notify: []}
rules:
  - name: hard-cap
    kind: budget
    signal: tokens
    period: 1d
    calendar: true
    timezone: UTC
    limit: 1000
    action: reject
    severity: ticket
"""


async def test_reject_budget_holds_across_a_restart(replay_upstream: ReplayUpstream, tmp_path: Path) -> None:
    rules = tmp_path / "budget.yaml"
    rules.write_text(BUDGET_RULES)
    settings = AlertingSettings(rule_files=(rules,), notify_enabled=False, watch_interval=0)
    cfg = make_config(
        f"- {{name: openai, url: '{replay_upstream.url}', provider: openai}}\n",
        extra="logs: {enabled: false}\n",
        tmp=tmp_path / "data",
    )
    # Each call reports 1149 + 353 tokens: the first one spends the 1000-token cap.
    async with running_sidecar(cfg, alerting=settings) as (sc, collect), aiohttp.ClientSession() as s:
        replay_upstream.serve("openai_chat_nonstream_cached_tokens.json")
        status, _ = await timed_call(s, sc.proxy_port)
        assert status == 200
        await collect.wait_for(1)
        async with asyncio.timeout(10):
            while True:  # the next evaluation sees the spend
                replay_upstream.serve("openai_chat_nonstream_cached_tokens.json")
                status, _ = await timed_call(s, sc.proxy_port)
                if status == 429:
                    break
                await asyncio.sleep(0.2)
        refused = (await collect.wait_for(len(collect.records)))[-1]
        assert refused.error_type == "budget_exceeded" and refused.status == 429
        assert sample(sc, "llm_throttled_requests_total", tenant="acme", reason="budget") >= 1
    served_before = len(replay_upstream.requests)

    # A new process on the same data directory refuses at once: the spend came back from the ledger.
    async with running_sidecar(cfg, alerting=settings) as (sc, collect), aiohttp.ClientSession() as s:
        async with asyncio.timeout(10):
            while True:
                status, _ = await timed_call(s, sc.proxy_port)
                if status == 429:
                    break
                await asyncio.sleep(0.1)
        assert len(replay_upstream.requests) == served_before  # nothing reached the upstream
