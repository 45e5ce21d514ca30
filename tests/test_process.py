"""The sidecar as a real process: CLI, config errors, SIGTERM drain, SIGHUP reload."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from tests.replay_upstream import ReplayUpstream

PYTHON = sys.executable


def write_config(path: Path, upstream: str, mount: str = "/") -> None:
    path.write_text(
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "upstreams:\n"
        f"  - {{name: openai, url: '{upstream}', provider: openai, mount: {mount}}}\n"
        "shutdown: {drain_timeout: 10s}\n"
        f"data_dir: {path.parent / 'data'}\n"
    )


@asynccontextmanager
async def sidecar_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, int]]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "sidecar",
        "run",
        *args,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "sidecar exited before listening"
                found = re.search(r"proxy on http://[\d.]+:(\d+), metrics on http://[\d.]+:(\d+)", line)
                if found:
                    break
        # Keep draining stderr so the process never blocks on a full pipe; show it on failure.
        log: list[bytes] = []

        async def drain() -> None:
            assert proc.stderr is not None
            while line := await proc.stderr.readline():
                log.append(line)

        drainer = asyncio.create_task(drain())
        try:
            yield proc, int(found.group(1)), int(found.group(2))
        except BaseException:
            print("sidecar stderr:\n" + b"".join(log).decode(errors="replace"))
            raise
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await drainer
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def metric_value(session: aiohttp.ClientSession, admin_port: int, line_prefix: str) -> float:
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(line_prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_config_check_lists_every_problem_with_location(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:99999\n"
        "upstreams:\n"
        "  - name: openai\n"
        "    url: ftp://example.com\n"
        "    timeouts: {connect: 5x}\n"
        "    colour: blue\n"
    )
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "sidecar", "config", "check", str(bad), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert len(lines) >= 4, lines
    assert any(line.startswith(f"{bad}:2:") and "listen" in line for line in lines)
    assert any(line.startswith(f"{bad}:5:") and "upstreams[0].url" in line for line in lines)
    assert any(line.startswith(f"{bad}:6:") and "upstreams[0].timeouts.connect" in line for line in lines)
    assert any(line.startswith(f"{bad}:7:") and "colour" in line for line in lines)


async def test_config_check_ok(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    write_config(good, "https://api.openai.com")
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "sidecar", "config", "check", str(good), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"ok" in out


async def test_run_refuses_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: sidecar/v2\nupstreams: []\n")
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "sidecar", "run", "--config", str(bad), stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode != 0
    assert f"{bad}:1:" in err.decode()


async def test_sigterm_drains_streams_then_exits_zero(
    replay_upstream: ReplayUpstream, tmp_path: Path
) -> None:
    replay_upstream.serve("openai_chat_stream_include_usage.sse", chunk_delay=0.05)
    cfg = tmp_path / "sidecar.yaml"
    write_config(cfg, replay_upstream.url)
    async with sidecar_process("--config", str(cfg)) as (proc, port, _admin), aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            first = await r.content.readany()
            proc.send_signal(signal.SIGTERM)
            rest = await r.read()
        body = first + rest
        assert body.rstrip().endswith(b"data: [DONE]")  # the in-flight stream finished
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_sighup_reload_keeps_last_good_config(replay_upstream: ReplayUpstream, tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.yaml"
    write_config(cfg, replay_upstream.url)
    async with sidecar_process("--config", str(cfg)) as (proc, port, admin), aiohttp.ClientSession() as s:
        cfg.write_text(cfg.read_text().replace("provider: openai", "provider: nonsense"))
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while await metric_value(s, admin, "llm_config_reload_failures_total{") < 1:
                await asyncio.sleep(0.1)
        replay_upstream.serve_raw(200, b"still here")
        async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
            assert await r.read() == b"still here"
        # A good file is taken: the upstream now sits under /v2 only.
        write_config(cfg, replay_upstream.url, mount="/v2")
        proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:
                async with s.get(f"http://127.0.0.1:{port}/v1/models") as r:
                    if r.status == 404:
                        break
                await asyncio.sleep(0.1)
        replay_upstream.serve_raw(200, b"moved")
        async with s.get(f"http://127.0.0.1:{port}/v2/v1/models") as r:
            assert await r.read() == b"moved"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
