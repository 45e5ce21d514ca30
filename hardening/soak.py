"""``make soak``: mixed traffic through a sidecar process for a bounded time, watching for leaks.

A sidecar runs as ``python -m sidecar run`` in front of the built-in mock upstream (with
its failures on: 5xx, 429, streams cut mid-way, Anthropic error events). An open-loop load
generator sends a steady rate of calls — OpenAI chat JSON and streams (with and without
``include_usage``), Responses streams, embeddings, Anthropic messages JSON and streams —
from many tenants (more than ``tenants.max_distinct``, so the overflow path runs), and
aborts some streams half-way. Every second it samples the sidecar's RSS and open file
descriptors from ``/proc``, its event-loop lag (the round trip of ``/healthz``, served by
the same loop as the proxy) and its queues (calls in flight, the ledger's backlog).

At the end it checks, and exits 1 if any fails:

* no record lost: ``llm_requests_total`` equals the calls made, the ledger wrote (or
  journalled) every one of them, and no sink dropped a record;
* RSS stable: the last part of the run is within ``--max-rss-growth`` (10 %) of the part
  just after warm-up (warm-up loads the tokenizer and fills the label sets);
* no descriptor leak: once traffic stops and idle connections expire, the sidecar holds
  no more descriptors than after warm-up (plus a small slack);
* no traceback in the sidecar's log, and it exits 0 on SIGTERM.

It prints the samples as a table, and writes ``soak.csv`` and ``soak.png`` (four panels
over time) to ``--out``. ``SOAK_SECONDS`` sets the default duration (600).

    python -m hardening.soak --duration 600 --rate 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from hardening.support import SidecarProcess, metric, write_config
from sidecar.mock_upstream import start_mock_upstream

MiB = 1024 * 1024


@dataclass
class Sample:
    t: float
    calls: int
    rss: int
    fds: int
    lag_ms: float
    inflight: float
    backlog: float


@dataclass
class Tally:
    """What the load generator did: every call it started and how each ended."""

    started: int = 0
    finished: int = 0
    aborted: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)


# --- the traffic mix ----------------------------------------------------------------------------

OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-5-mini", "o4-mini")
ANTHROPIC_MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5")


def pick_call(rng: random.Random) -> tuple[str, dict[str, object], bool]:
    """(path, body, stream) of one call of the mix."""
    prompt = [{"role": "user", "content": "soak " + " ".join(rng.choices("abcdefgh", k=rng.randint(1, 30)))}]
    roll = rng.random()
    model = rng.choice(OPENAI_MODELS)
    if roll < 0.30:
        return "/v1/chat/completions", {"model": model, "messages": prompt, "max_tokens": 60}, False
    if roll < 0.50:
        body: dict[str, object] = {"model": model, "messages": prompt, "stream": True, "max_tokens": 60}
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body, True
    if roll < 0.60:
        return (
            "/v1/responses",
            {"model": model, "input": "soak", "stream": True, "max_output_tokens": 60},
            True,
        )
    if roll < 0.70:
        return (
            "/v1/embeddings",
            {"model": "text-embedding-3-small", "input": ["soak"] * rng.randint(1, 4)},
            False,
        )
    anthropic = {"model": rng.choice(ANTHROPIC_MODELS), "messages": prompt, "max_tokens": 60}
    if roll < 0.85:
        return "/anthropic/v1/messages", anthropic, False
    return "/anthropic/v1/messages", {**anthropic, "stream": True}, True


async def one_call(
    session: aiohttp.ClientSession, base: str, rng: random.Random, tenants: int, tally: Tally
) -> None:
    path, body, stream = pick_call(rng)
    tenant = f"tenant-{rng.randrange(tenants)}" if rng.random() < 0.95 else f"drive-by-{rng.random()}"
    abort = stream and rng.random() < 0.08
    tally.started += 1
    try:
        async with session.post(base + path, json=body, headers={"X-Tenant-Id": tenant}) as r:
            if abort:
                await r.content.readany()
                r.close()  # hang up mid-stream: recorded as a client abort
                tally.aborted += 1
            else:
                with contextlib.suppress(aiohttp.ClientPayloadError):  # the mock's cut streams
                    await r.read()
            tally.statuses[r.status] = tally.statuses.get(r.status, 0) + 1
    except (aiohttp.ClientError, ConnectionError) as exc:
        name = type(exc).__name__
        tally.transport_errors[name] = tally.transport_errors.get(name, 0) + 1
    finally:
        tally.finished += 1


# --- the run ------------------------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, sc: SidecarProcess) -> str:
    async with session.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r:
        return await r.text()


async def sample(session: aiohttp.ClientSession, sc: SidecarProcess, t0: float, tally: Tally) -> Sample:
    started = time.perf_counter()
    async with session.get(f"http://127.0.0.1:{sc.admin_port}/healthz") as r:
        await r.read()
    lag = (time.perf_counter() - started) * 1000
    text = await scrape(session, sc)
    return Sample(
        t=time.monotonic() - t0,
        calls=tally.started,
        rss=sc.rss(),
        fds=sc.fds(),
        lag_ms=lag,
        inflight=metric(text, "llm_inflight_requests"),
        backlog=metric(text, "llm_ledger_backlog"),
    )


async def settle(probe: aiohttp.ClientSession, sc: SidecarProcess, tally: Tally, timeout: float = 30) -> None:
    """Wait until every call is counted, none is in flight and the ledger holds no backlog
    (records reach the metrics a moment after the answer; estimated ones a little later)."""
    with contextlib.suppress(TimeoutError):  # what did not settle is judged afterwards
        async with asyncio.timeout(timeout):
            while True:
                text = await scrape(probe, sc)
                counted = metric(text, "llm_requests_total") >= tally.started
                idle = metric(text, "llm_inflight_requests") == 0 and metric(text, "llm_ledger_backlog") == 0
                if counted and idle:
                    return
                await asyncio.sleep(0.2)


def print_row(s: Sample) -> None:
    sys.stdout.write(
        f"{s.t:7.1f}s {s.calls:8d} calls  rss {s.rss / MiB:7.1f} MiB  fds {s.fds:4d}  "
        f"lag {s.lag_ms:6.1f} ms  inflight {s.inflight:4.0f}  ledger backlog {s.backlog:5.0f}\n"
    )
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    runner, port = await start_mock_upstream(
        seed=args.seed, failure_rate=args.failure_rate, latency_scale=args.latency_scale
    )
    mock = f"http://127.0.0.1:{port}"
    cfg = write_config(
        work / "sidecar.yaml",
        f"- {{name: openai, url: '{mock}', provider: openai, mount: /}}\n"
        f"- {{name: anthropic, url: '{mock}', provider: anthropic, mount: /anthropic}}\n",
        f"tenants: {{max_distinct: {args.max_tenants}}}\nshutdown: {{drain_timeout: 10s}}\n"
        "logs: {enabled: true, stream: stdout}\n",
    )
    sc = SidecarProcess("--config", str(cfg), "--log-level", "warning")
    await sc.start()
    rng = random.Random(args.seed)
    tally = Tally()
    samples: list[Sample] = []
    problems: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as traffic, aiohttp.ClientSession() as probe:
            t0 = time.monotonic()
            next_call = t0
            next_sample = t0
            warm_fds: int | None = None
            while (now := time.monotonic()) - t0 < args.duration:
                if sc.proc is not None and sc.proc.returncode is not None:
                    problems.append(f"the sidecar exited with {sc.proc.returncode} during the run")
                    break
                while next_call <= now:  # open loop: the rate holds even when calls are slow
                    if len(tasks) < args.concurrency:
                        task = asyncio.create_task(one_call(traffic, sc.url, rng, args.tenants, tally))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    next_call += 1.0 / args.rate
                if now >= next_sample:
                    s = await sample(probe, sc, t0, tally)
                    samples.append(s)
                    if warm_fds is None and s.t >= args.warmup:
                        warm_fds = s.fds
                    if len(samples) % args.print_every == 0:
                        print_row(s)
                    next_sample += 1.0
                await asyncio.sleep(min(next_call, next_sample) - time.monotonic())
            if tasks:
                await asyncio.wait(tasks, timeout=60)
        # Traffic over and the client's connections closed: wait for the sidecar's idle
        # upstream connections to expire (aiohttp keeps them 15 s), then count descriptors.
        async with aiohttp.ClientSession() as probe:
            await settle(probe, sc, tally)
            await asyncio.sleep(args.idle_wait)
            final = await sample(probe, sc, t0, tally)
            text = await scrape(probe, sc)
        print_row(final)
        problems += check(args, tally, samples, final, warm_fds, text)
        sc.signal(signal.SIGTERM)
        code = await sc.wait(30)
        if code != 0:
            problems.append(f"the sidecar exited {code} on SIGTERM")
        if sc.tracebacks():
            problems.append(f"{len(sc.tracebacks())} traceback(s) in the sidecar's log")
    finally:
        for task in tasks:
            task.cancel()
        await sc.stop()
        await runner.cleanup()
    write_outputs(out, samples, tally, problems, sc.log)
    sys.stdout.write(f"\ncalls: {tally.started} started, {tally.aborted} aborted by the client\n")
    sys.stdout.write(
        f"statuses: {dict(sorted(tally.statuses.items()))}  transport: {tally.transport_errors}\n"
    )
    sys.stdout.write(f"wrote {out / 'soak.csv'} and {out / 'soak.png'}\n")
    for problem in problems:
        sys.stdout.write(f"FAIL: {problem}\n")
    sys.stdout.write("soak: " + ("FAILED" if problems else "ok") + "\n")
    return 1 if problems else 0


def check(
    args: argparse.Namespace,
    tally: Tally,
    samples: list[Sample],
    final: Sample,
    warm_fds: int | None,
    text: str,
) -> list[str]:
    problems: list[str] = []
    if tally.transport_errors:
        problems.append(f"calls failed below HTTP: {tally.transport_errors}")
    counted = metric(text, "llm_requests_total")
    if counted != tally.started:
        problems.append(f"llm_requests_total is {counted:.0f}, calls made {tally.started}: records lost")
    written = metric(text, "llm_ledger_rows_written_total") + metric(text, "llm_ledger_spilled_total")
    if written != tally.started:
        problems.append(f"the ledger took {written:.0f} records of {tally.started}")
    if metric(text, "llm_ledger_lost_total") or metric(text, "llm_sink_dropped_total"):
        problems.append("records dropped: " + str(metric(text, "llm_sink_dropped_total")))
    aborts = metric(text, "llm_requests_total", code="499")
    # A hang-up that lands after the sidecar wrote the whole stream is a success, not an abort.
    if aborts > tally.aborted or (tally.aborted >= 20 and aborts == 0):
        problems.append(f"{tally.aborted} client aborts made, {aborts:.0f} recorded as 499")
    after_warmup = [s for s in samples if s.t >= args.warmup]
    if len(after_warmup) >= 10:
        tenth = max(3, len(after_warmup) // 10)
        base = statistics.median(s.rss for s in after_warmup[:tenth])
        late = statistics.median(s.rss for s in after_warmup[-tenth:])
        growth = late / base - 1
        sys.stdout.write(
            f"RSS after warm-up {base / MiB:.1f} MiB, at the end {late / MiB:.1f} MiB ({growth:+.1%})\n"
        )
        if growth > args.max_rss_growth:
            problems.append(f"RSS grew {growth:.1%} after warm-up (limit {args.max_rss_growth:.0%})")
    else:
        problems.append("too short a run to judge RSS (fewer than 10 samples after warm-up)")
    if len(after_warmup) >= 10:
        # Under steady traffic the descriptors (client and upstream connections) level off. The
        # calls in flight are not steady (the mock upstream's latencies vary, and a busy host
        # stretches them): each call in flight past the early peak may hold two more, its client
        # connection and its upstream one (pooled after it ends), so the limit allows for that.
        # A leak grows with the calls made (about 1,500 a minute), far past this allowance.
        third = len(after_warmup) // 3
        early_part, late_part = after_warmup[:third], after_warmup[-third:]
        early, late_fds = max(s.fds for s in early_part), max(s.fds for s in late_part)
        more_in_flight = max(0.0, max(s.inflight for s in late_part) - max(s.inflight for s in early_part))
        allowed = early * 1.5 + args.fd_slack + 2 * more_in_flight
        sys.stdout.write(
            f"descriptors under load: at most {early} early, {late_fds} late "
            f"(at most {allowed:.0f} allowed with {more_in_flight:.0f} more calls in flight)\n"
        )
        if late_fds > allowed:
            problems.append(f"descriptors keep growing under load: {early} early, {late_fds} late")
    if warm_fds is not None and args.idle_wait >= 16:
        # Idle, with the pooled connections expired, the sidecar is back where it started.
        sys.stdout.write(f"descriptors after warm-up {warm_fds}, idle at the end {final.fds}\n")
        if final.fds > warm_fds + args.fd_slack:
            problems.append(f"descriptors leak: {warm_fds} after warm-up, {final.fds} idle at the end")
    lags = sorted(s.lag_ms for s in samples)
    if lags:
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        median = statistics.median(lags)
        sys.stdout.write(f"event-loop lag (healthz round trip): median {median:.1f} ms, p99 {p99:.1f} ms\n")
    return problems


# --- outputs ------------------------------------------------------------------------------------


def write_outputs(out: Path, samples: list[Sample], tally: Tally, problems: list[str], log: str) -> None:
    with (out / "soak.csv").open("w") as f:
        f.write("t_s,calls,rss_bytes,fds,loop_lag_ms,inflight,ledger_backlog\n")
        for s in samples:
            f.write(f"{s.t:.1f},{s.calls},{s.rss},{s.fds},{s.lag_ms:.2f},{s.inflight:.0f},{s.backlog:.0f}\n")
    summary = {
        "calls": tally.started,
        "aborted": tally.aborted,
        "statuses": tally.statuses,
        "transport_errors": tally.transport_errors,
        "problems": problems,
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "sidecar.log").write_text(log)
    try:
        png = plot(samples)
    except ImportError:  # the chart helper ships with the benchmark
        sys.stdout.write("no PNG: bench.chart is not importable\n")
        return
    (out / "soak.png").write_bytes(png)


def plot(samples: list[Sample]) -> bytes:
    """Four panels over time: RSS, descriptors, loop lag, in flight + ledger backlog."""
    from bench.chart import BLACK, GREY, LIGHT, Canvas

    panels = [
        ("RSS (MiB)", [s.rss / MiB for s in samples], (230, 120, 30)),
        ("open descriptors", [float(s.fds) for s in samples], (70, 130, 180)),
        ("event-loop lag (ms)", [s.lag_ms for s in samples], (150, 80, 170)),
        ("in flight + ledger backlog", [s.inflight + s.backlog for s in samples], (60, 150, 80)),
    ]
    width, height, pad = 900, 170, 40
    canvas = Canvas(width, height * len(panels) + 20)
    end = max((s.t for s in samples), default=1.0) or 1.0
    for i, (title, values, color) in enumerate(panels):
        top = 10 + i * height
        x0, x1, y0, y1 = 70, width - 20, top + 22, top + height - pad + 20
        canvas.text(x0, top + 6, title, BLACK, 2)
        hi = max(values, default=1.0) * 1.1 or 1.0
        # RSS from just under its lowest value after start-up, so that a slow climb shows.
        lo = min(values[len(values) // 10 :], default=0.0) * 0.95 if title.startswith("RSS") else 0.0
        for frac in (0.0, 0.5, 1.0):
            y = int(y1 - frac * (y1 - y0))
            canvas.rect(x0, y, x1, y + 1, LIGHT)
            canvas.text(8, y - 3, f"{lo + frac * (hi - lo):.0f}", GREY)
        canvas.rect(x0, y1, x1, y1 + 1, GREY)
        canvas.text(x1 - 60, y1 + 6, f"{end:.0f} s", GREY)
        last: tuple[int, int] | None = None
        for s, v in zip(samples, values, strict=True):
            x = x0 + int((x1 - x0) * s.t / end)
            y = y1 - int((y1 - y0) * (v - lo) / (hi - lo))
            if last is not None:
                _line(canvas, last, (x, y), color)
            last = (x, y)
    png: bytes = canvas.png()
    return png


def _line(canvas: object, a: tuple[int, int], b: tuple[int, int], color: tuple[int, int, int]) -> None:
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    for k in range(steps + 1):
        x = a[0] + (b[0] - a[0]) * k // steps
        y = a[1] + (b[1] - a[1]) * k // steps
        canvas.rect(x, y, x + 2, y + 2, color)  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hardening.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    parser.add_argument("--rate", type=float, default=25.0, help="calls per second (open loop)")
    parser.add_argument("--concurrency", type=int, default=200, help="most calls in flight at once")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: 15%% of the run, 20-60)"
    )
    # Every (tenant, model) pair is a set of metric series: the warm-up must see them all for
    # RSS to be flat afterwards. 20 tenants under a cap of 20 plus drive-by ones (counted as
    # __overflow__) exercise the cap without a label space the warm-up cannot fill.
    parser.add_argument("--tenants", type=int, default=20, help="distinct regular tenants")
    parser.add_argument("--max-tenants", type=int, default=20, help="the sidecar's tenants.max_distinct")
    parser.add_argument("--failure-rate", type=float, default=0.08, help="the mock upstream's failures")
    parser.add_argument("--latency-scale", type=float, default=0.3, help="the mock upstream's latencies")
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--fd-slack", type=int, default=4)
    parser.add_argument("--idle-wait", type=float, default=17.0, help="seconds for idle connections to close")
    parser.add_argument("--print-every", type=int, default=10, help="print every Nth one-second sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "soak"))
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, max(20.0, args.duration * 0.15))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
