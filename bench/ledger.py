"""CPU cost of the usage ledger per finished call: records through the real sink to a temporary dir.

``python -m bench.ledger`` offers synthetic finished calls to a :class:`sidecar.ledger.Ledger`
(default settings: ``synchronous: full``, ``journal_fsync``, 500-row batches every 200 ms) at
a steady rate, as the sidecar's pipeline does under load, waits until every row is in the
database, and prints the CPU time per row of the ledger's writer thread (user + system, from
the thread's own CPU clock: what py-spy attributes to the ledger in ``bench.profile``) and of
the offering thread (the event loop's share: :meth:`Ledger.offer`), plus the wall time the
writer spent per batch. Repeat it (``--runs``): the machine's other work shows as spread.
``--rows-before N`` fills the database with N rows first: the cost in a ledger that has grown
(request ids are random, as the proxy makes them, so an index on them would show here).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

from sidecar.ledger import DB_NAME, Ledger, LedgerSettings
from sidecar.ledger._schema import to_values
from sidecar.ledger._store import Store
from sidecar.model import CallRecord, Usage

BASE = CallRecord(
    request_id="",
    started_at=1_800_000_000.0,
    finished_at=1_800_000_000.4,
    tenant="tenant-0000",
    upstream="openai",
    provider="openai",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    stream=False,
    status=200,
    error_type=None,
    request_model="gpt-4o-mini",
    response_model="gpt-4o-mini-2024-07-18",
    duration_s=0.4,
    ttft_s=0.2,
    usage=Usage(input=120, cached_input=64, output=48),
    cost_usd=Decimal("0.0000468"),
    price_model="gpt-4o-mini",
    price_version="3f9a1c2b",
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
)


ANTHROPIC = dataclasses.replace(
    BASE,
    upstream="anthropic",
    provider="anthropic",
    operation="messages",
    path="/anthropic/v1/messages",
    request_model="claude-3-5-haiku-latest",
    response_model="claude-3-5-haiku-20241022",
    usage=Usage(input=120, cached_input=64, cache_write=16, output=48),
    price_model="claude-3-5-haiku",
)


def records(count: int, seed: int = 0, shift: float = 0.0) -> list[CallRecord]:
    """``count`` distinct records as the benchmark's load makes them: OpenAI and Anthropic calls
    alternately (their rows have different columns empty), a stream every third call (the others
    have no time to first token), ten tenants, 1 % upstream errors (no usage, an estimate), and
    random request ids, as the proxy makes them when a client sends none (``seed`` picks them);
    two calls per millisecond, from ``shift`` seconds after the benchmark's usual start."""
    rng = random.Random(seed)
    out: list[CallRecord] = []
    for i in range(count):
        error = i % 100 == 0
        base = ANTHROPIC if i % 2 else BASE
        stream = i % 3 == 0
        out.append(
            dataclasses.replace(
                base,
                request_id=f"{rng.getrandbits(128):032x}",
                started_at=base.started_at + shift + i * 0.0005,
                finished_at=base.finished_at + shift + i * 0.0005,
                tenant=f"tenant-{i % 10:04d}",
                stream=stream,
                ttft_s=0.2 if stream else None,
                status=502 if error else 200,
                error_type="upstream_5xx" if error else None,
                usage=Usage() if error else base.usage,
                estimated=Usage(input=120) if error else Usage(),
            )
        )
    return out


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds of a live thread of this process, from its own CPU clock (nanoseconds)."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def prefill(directory: Path, count: int) -> None:
    """``count`` rows in the ledger database of ``directory`` before a run (earlier calls, with
    other request ids): the cost of a ledger that has grown."""
    store = Store(directory / DB_NAME, synchronous="normal")
    try:
        done = 0
        while done < count:
            part = records(min(10_000, count - done), seed=1 + done, shift=done * 0.0005 - 30 * 86400)
            store.insert_values([to_values(r, f"prefill-{done + i:x}") for i, r in enumerate(part)])
            done += len(part)
    finally:
        store.close()


async def run_once(
    count: int, rate: float, settings: LedgerSettings, rows_before: int = 0
) -> dict[str, float]:
    """One run: ``count`` records offered at ``rate`` per second, into a ledger that holds
    ``rows_before`` rows already; the figures of the run."""
    batch = records(count)
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        if rows_before:
            await asyncio.to_thread(prefill, Path(tmp), rows_before)
        ledger = Ledger(settings, Path(tmp))
        await ledger.start()
        writer = next(t for t in threading.enumerate() if t.name == "sidecar-ledger-writer")
        await asyncio.sleep(0.3)  # past the start-up replay
        writer_cpu0 = thread_cpu(writer)
        offer_cpu = 0.0
        t0 = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - t0) * rate) + 1)
            c0 = time.thread_time()
            while sent < due:
                ledger.offer(batch[sent])
                sent += 1
            offer_cpu += time.thread_time() - c0
            await asyncio.sleep(0.001)
        if not await ledger.flush(60.0):
            raise RuntimeError("the ledger did not settle in 60 s")
        writer_cpu = thread_cpu(writer) - writer_cpu0
        wall = time.perf_counter() - t0
        status = ledger.status()
        await ledger.stop(30.0)
    if status.rows_written != count or status.spilled or status.rejected or status.lost:
        raise RuntimeError(f"unexpected ledger status: {status}")
    return {
        "writer_us_per_row": writer_cpu / count * 1e6,
        "offer_us_per_row": offer_cpu / count * 1e6,
        "rows_per_batch": count / max(status.batches_written, 1),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.ledger``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000, help="records per run (default 10000)")
    parser.add_argument("--rate", type=float, default=2000.0, help="records per second (default 2000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rows-before", type=int, default=0, help="rows in the database before each run (a grown ledger)"
    )
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    args = parser.parse_args(argv)
    settings = LedgerSettings(synchronous=args.synchronous)
    results = [
        asyncio.run(run_once(args.rows, args.rate, settings, args.rows_before)) for _ in range(args.runs)
    ]
    print(
        f"ledger: {args.rows} rows at {args.rate:.0f}/s into {args.rows_before} rows, "
        f"synchronous={args.synchronous}, {args.runs} runs (CPU us per row)"
    )
    for key in ("writer_us_per_row", "offer_us_per_row", "rows_per_batch"):
        values = sorted(r[key] for r in results)
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"  {key:<18} {shown}   (range {values[0]:.2f}-{values[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
