"""Cost of the rule engine: per observed call, and per evaluation tick, at 10 and 1,000 tenants.

The shipped example rules (``rules/*.yaml``) are loaded as the sidecar loads them and fed
synthetic finished calls (1 % upstream errors) spread over ten minutes, in process, no
I/O: ``observe`` per call should not grow with the number of calls seen, and an
evaluation tick grows with the number of live series (tenants x rules), not with calls.
``python -m bench.rules_engine`` prints the table; :func:`measure` returns the figures.

A tick reads each window of each series once (``ring reads``) and sums that window's
filled buckets, at most 60 (``buckets``). Both are counted in one more, untimed tick.
With few calls per series the short windows still have empty buckets, so a tick sums
more as calls fill them (at 1,000 tenants: 20 calls per tenant leave most empty), up to
60 per ring read and no further; the timing follows the buckets, not the calls.
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CASES = ((10, 20_000), (10, 100_000), (1000, 20_000), (1000, 100_000))
SPAN_S = 600.0  # the calls of a case are spread over ten minutes
TICKS = 5


def measure(rules_dir: Path = ROOT / "rules", cases: tuple[tuple[int, int], ...] = CASES) -> dict[str, Any]:
    """The figures of each (tenants, calls) case; ``{"available": False, ...}`` without an engine."""
    try:
        from sidecar.model import CallRecord, Usage
        from sidecar.rules.engine import Engine
        from sidecar.rules.loader import load_or_raise
    except ImportError as exc:
        return {"available": False, "reason": f"not available: {exc}"}
    rules = load_or_raise([rules_dir])
    out: list[dict[str, float]] = []
    for tenants, calls in cases:
        start = 1_800_000_000.0
        engine = Engine(rules, now=start)
        step = SPAN_S / calls
        records = [
            CallRecord(
                request_id=str(i),
                started_at=start + i * step,
                tenant=f"tenant-{i % tenants:04d}",
                upstream="openai",
                provider="openai",
                operation="chat",
                method="POST",
                path="/v1/chat/completions",
                stream=False,
                status=500 if i % 100 == 0 else 200,
                error_type="upstream_5xx" if i % 100 == 0 else None,
                request_model="gpt-4o-mini",
                response_model="gpt-4o-mini",
                duration_s=0.4,
                ttft_s=0.2,
                usage=Usage(input=100, output=50),
                cost_usd=Decimal("0.000045"),
                finished_at=start + i * step + 0.4,
            )
            for i in range(calls)
        ]
        t0 = time.perf_counter()
        for record in records:
            engine.observe(record, record.finished_at)
        observe_s = time.perf_counter() - t0
        now = start + SPAN_S + 1
        ticks: list[float] = []
        for k in range(TICKS):
            t0 = time.perf_counter()
            engine.evaluate(now + k * 15)
            ticks.append(time.perf_counter() - t0)
        reads, buckets = _work_of_a_tick(engine, now + TICKS * 15)
        out.append(
            {
                "tenants": tenants,
                "calls": calls,
                "observe_us_per_call": observe_s / calls * 1e6,
                "evaluate_ms_per_tick": sorted(ticks)[len(ticks) // 2] * 1000,
                "ring_reads_per_tick": reads,
                "buckets_per_tick": buckets,
            }
        )
    return {"available": True, "rules": len(list(rules)), "cases": out}


def _work_of_a_tick(engine: Any, now: float) -> tuple[int, int]:
    """Windows read and filled buckets summed by one evaluation at ``now`` (counted, not timed)."""
    from sidecar.rules.windows import Ring

    counted = [0, 0]
    totals = Ring.totals

    def counting(ring: Ring, at: float) -> list[float]:
        newest = ring._epoch(at)
        counted[0] += 1
        counted[1] += sum(1 for epoch in ring._epochs if newest - ring._slots < epoch <= newest)
        return totals(ring, at)

    Ring.totals = counting  # type: ignore[method-assign, assignment]
    try:
        engine.evaluate(now)
    finally:
        Ring.totals = totals  # type: ignore[method-assign]
    return counted[0], counted[1]


def table(figures: dict[str, Any]) -> str:
    """The figures as text."""
    if not figures.get("available"):
        return f"rule engine: {figures.get('reason', 'not available')}"
    lines = [f"rule engine ({figures['rules']} shipped rules), in process:"]
    lines.append(
        f"  {'tenants':>7} {'calls':>8} {'observe us/call':>16} {'evaluate ms/tick':>17}"
        f" {'ring reads':>11} {'buckets':>9}"
    )
    for c in figures["cases"]:
        lines.append(
            f"  {c['tenants']:>7} {c['calls']:>8} {c['observe_us_per_call']:>16.1f} "
            f"{c['evaluate_ms_per_tick']:>17.2f} {c.get('ring_reads_per_tick', 0):>11d}"
            f" {c.get('buckets_per_tick', 0):>9d}"
        )
    lines.append("  (a tick sums at most 60 filled buckets per ring read: its cost follows the buckets)")
    return "\n".join(lines)


def main() -> int:
    """Entry point of ``python -m bench.rules_engine``."""
    figures = measure()
    print(table(figures))
    if "--json" in sys.argv:
        print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
