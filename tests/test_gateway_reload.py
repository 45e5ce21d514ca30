"""A reload that adds the first gateway section: keys take effect at once, never a pass without one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from sidecar import config as config_mod
from sidecar.app import Sidecar
from sidecar.gateway.keys import new_key
from tests.replay_upstream import ReplayUpstream


async def test_a_reload_that_adds_keys_requires_them_at_once(
    replay_upstream: ReplayUpstream, tmp_path: Path
) -> None:
    key, digest = new_key()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"version: sidecar/v1\nkeys:\n  - {{name: k, tenant: acme, sha256: {digest}}}\n")
    base = (
        "version: sidecar/v1\nlisten: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\n"
        f"upstreams: [{{name: openai, url: '{replay_upstream.url}', provider: openai}}]\n"
        f"data_dir: {tmp_path / 'data'}\nlogs: {{enabled: false}}\n"
    )
    texts = [base, base + f"keys: {{file: {keys_file}}}\n"]
    current: dict[str, Any] = {"text": texts[0]}
    cfg = config_mod.load(current["text"], str(tmp_path / "sidecar.yaml"))
    sidecar = Sidecar(
        cfg,
        registry=CollectorRegistry(),
        reload_config=lambda: config_mod.load(current["text"], str(tmp_path / "sidecar.yaml")),
    )
    await sidecar.start()
    url = f"http://127.0.0.1:{sidecar.proxy_port}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as r:
                assert r.status == 200  # no keys configured: a plain pass-through
            current["text"] = texts[1]
            assert await asyncio.to_thread(sidecar.reload)
            # From the moment the reload returns, a call without a key is refused.
            statuses = []
            for _ in range(20):
                async with s.post(url, json=body) as r:
                    statuses.append(r.status)
                await asyncio.sleep(0.01)
            assert set(statuses) == {401}, statuses
            async with s.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
    finally:
        await sidecar.stop()
