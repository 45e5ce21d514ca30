"""The embedded default (``make demo``): mock upstream, sidecar, generated traffic, a summary.

Starts the built-in mock LLM upstream (OpenAI- and Anthropic-shaped, streaming and
not, with failures), a sidecar in front of it, and clients from several tenants that
call it for ``duration`` seconds with the kinds of requests real SDKs send (JSON and
streams, streams that do not ask for usage, embeddings, and clients that hang up
mid-stream). Then it prints a per-tenant summary built from the sidecar's own
records. No API key, no network: everything binds to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import socket
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp

from sidecar.app import Sidecar
from sidecar.calllog import LogSettings
from sidecar.config import default_config
from sidecar.metrics import iter_samples
from sidecar.mock_upstream import start_mock_upstream
from sidecar.model import CallRecord
from sidecar.sinks import QueueSink

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka")


class CollectSink(QueueSink):
    """Keeps every record in memory (the demo's summary; not for production)."""

    name = "demo"

    def __init__(self) -> None:
        super().__init__(maxsize=100_000)
        self.records: list[CallRecord] = []

    async def handle(self, records: list[CallRecord]) -> None:
        self.records.extend(records)


def _free(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1, else 0 (let the OS pick)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


@dataclass
class _Request:
    path: str
    body: dict[str, Any]
    stream: bool
    abort_after: int | None = None  # client hangs up after this many chunks
    headers: dict[str, str] = field(default_factory=dict)


def _pick_request(rng: random.Random) -> _Request:
    roll = rng.random()
    prompt = " ".join(
        rng.choice(("alpha", "beta", "gamma", "delta", "summarise", "the", "report")) for _ in range(40)
    )
    messages = [{"role": "user", "content": prompt}]
    if roll < 0.30:
        model = rng.choice(("gpt-4o-mini", "gpt-4o", "gpt-5-mini"))
        stream = rng.random() < 0.6
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": rng.randint(20, 200)}
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        abort = rng.randint(2, 6) if stream and rng.random() < 0.05 else None
        return _Request("/v1/chat/completions", body, stream, abort)
    if roll < 0.40:
        stream = rng.random() < 0.5
        body = {"model": "gpt-5-mini", "input": prompt, "stream": stream}
        return _Request("/v1/responses", body, stream)
    if roll < 0.50:
        body = {"model": "text-embedding-3-small", "input": [prompt[:200], prompt[200:]]}
        return _Request("/v1/embeddings", body, False)
    model = rng.choice(("claude-sonnet-4-20250514", "claude-3-5-haiku-20241022", "claude-haiku-4-5"))
    stream = rng.random() < 0.6
    body = {"model": model, "max_tokens": rng.randint(20, 300), "messages": messages, "stream": stream}
    abort = rng.randint(2, 6) if stream and rng.random() < 0.05 else None
    return _Request("/anthropic/v1/messages", body, stream, abort, {"anthropic-version": "2023-06-01"})


async def _client(
    session: aiohttp.ClientSession, base: str, deadline: float, seed: int, tenants: tuple[str, ...]
) -> int:
    rng = random.Random(seed)
    sent = 0
    while time.monotonic() < deadline:
        req = _pick_request(rng)
        tenant = rng.choices(tenants, weights=[len(tenants) - i for i in range(len(tenants))])[0]
        headers = {"x-tenant-id": tenant, "content-type": "application/json", **req.headers}
        sent += 1
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(base + req.path, data=json.dumps(req.body), headers=headers) as resp:
                if req.abort_after is None:
                    await resp.read()
                else:
                    chunks = 0
                    async for _ in resp.content.iter_any():
                        chunks += 1
                        if chunks >= req.abort_after:
                            resp.close()  # hang up mid-stream, like a user closing the tab
                            break
    return sent


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def summary_table(records: list[CallRecord]) -> str:
    """The per-tenant summary printed at the end of the demo."""
    by_tenant: dict[str, list[CallRecord]] = defaultdict(list)
    for record in records:
        by_tenant[record.tenant].append(record)
    header = (
        f"{'tenant':<10} {'reqs':>5} {'errors':>6} {'input':>8} {'cached':>7} {'c.write':>7} {'output':>7} "
        f"{'reason':>6} {'estim':>6} {'cost USD':>10} {'p50 ms':>7} {'p95 ms':>7} {'ttft50':>7} {'ttft95':>7}"
    )
    lines = [header, "-" * len(header)]
    totals: dict[str, int] = defaultdict(int)
    total_cost = Decimal(0)
    for tenant in sorted(by_tenant, key=lambda t: -len(by_tenant[t])):
        recs = by_tenant[tenant]
        tokens: dict[str, int] = defaultdict(int)
        estimated = 0
        for r in recs:
            for count in r.token_counts():
                tokens[count.type] += count.count
                if count.source == "estimated":
                    estimated += count.count
        cost = sum((r.cost_usd for r in recs if r.cost_usd is not None), Decimal(0))
        errors = sum(1 for r in recs if r.error_type)
        durations = [r.duration_s for r in recs]
        ttfts = [r.ttft_s for r in recs if r.ttft_s is not None]
        lines.append(
            f"{tenant:<10} {len(recs):>5} {errors:>6} {tokens['input']:>8} {tokens['cached_input']:>7} "
            f"{tokens['cache_write']:>7} {tokens['output']:>7} {tokens['reasoning']:>6} {estimated:>6} "
            f"{cost:>10.4f} {_ms(_quantile(durations, 0.5)):>7} {_ms(_quantile(durations, 0.95)):>7} "
            f"{_ms(_quantile(ttfts, 0.5)):>7} {_ms(_quantile(ttfts, 0.95)):>7}"
        )
        for key, value in tokens.items():
            totals[key] += value
        totals["requests"] += len(recs)
        totals["errors"] += errors
        totals["estimated"] += estimated
        total_cost += cost
    lines.append("-" * len(header))
    lines.append(
        f"{'TOTAL':<10} {totals['requests']:>5} {totals['errors']:>6} {totals['input']:>8} "
        f"{totals['cached_input']:>7} {totals['cache_write']:>7} {totals['output']:>7} "
        f"{totals['reasoning']:>6} "
        f"{totals['estimated']:>6} {total_cost:>10.4f}"
    )
    errors_by_type: dict[str, int] = defaultdict(int)
    for r in records:
        if r.error_type:
            errors_by_type[r.error_type] += 1
    if errors_by_type:
        lines.append("errors by type: " + ", ".join(f"{k}={v}" for k, v in sorted(errors_by_type.items())))
    return "\n".join(lines)


async def run_demo(duration: float = 30.0, tenants: int = 5, concurrency: int = 8) -> int:
    """Run the demo and print the summary; returns the exit status."""
    runner, upstream_port = await start_mock_upstream(seed=7, failure_rate=0.04)
    data_dir = tempfile.mkdtemp(prefix="llm-sidecar-demo-")
    upstream = f"http://127.0.0.1:{upstream_port}"
    cfg = default_config().with_overrides(
        listen=f"127.0.0.1:{_free(8080)}",
        admin_listen=f"127.0.0.1:{_free(9464)}",
        upstream_url=upstream + "/openai",
        data_dir=data_dir,
        extra_upstreams=[("anthropic", upstream + "/anthropic", "anthropic", "/anthropic")],
    )
    # The demo prints its own summary; per-call JSON lines would drown it.
    cfg = dataclasses.replace(cfg, logs=LogSettings(enabled=False))
    collect = CollectSink()
    sidecar = Sidecar(cfg, extra_sinks=[collect])
    await sidecar.start()
    base = f"http://127.0.0.1:{sidecar.proxy_port}"
    out = sys.stdout
    out.write(
        f"llm-sidecar demo: mock upstream on {upstream}, sidecar proxy on {base}\n"
        f"  while it runs, see the metrics at http://127.0.0.1:{sidecar.admin_port}/metrics\n"
        f"  {min(tenants, len(TENANTS))} tenants, {concurrency} concurrent clients, "
        f"{duration:.0f} s of traffic\n\n"
    )
    out.flush()
    names = TENANTS[: max(1, min(tenants, len(TENANTS)))]
    deadline = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            clients = [
                asyncio.create_task(_client(session, base, deadline, seed, names))
                for seed in range(concurrency)
            ]
            started = time.monotonic()
            while not all(c.done() for c in clients):
                await asyncio.wait(clients, timeout=5)
                done = sum(v for labels, v in iter_samples(sidecar.registry, "llm_requests_total"))
                out.write(f"  {time.monotonic() - started:5.1f}s  {int(done)} calls measured\n")
                out.flush()
            sent = sum(c.result() for c in clients)
    finally:
        await sidecar.stop()
        await runner.cleanup()
    out.write(f"\n{sent} calls sent, {len(collect.records)} records; per tenant:\n\n")
    out.write(summary_table(collect.records) + "\n")
    out.write(
        f"\nThe usage ledger of this run is in {data_dir}; for the finance view:\n"
        f"  llm-sidecar cost report --data-dir {data_dir} --by tenant,model\n"
    )
    return 0 if len(collect.records) == sent else 1
