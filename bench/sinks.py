"""CPU per finished call of the sidecar's sinks, by thread, in process: no HTTP, no load generator.

``python -m bench.sinks`` starts the sidecar as ``llm-sidecar run`` does (the config of
``bench/sidecar.yaml``, uvloop when installed, the same switch interval and garbage
collector settings) and, instead of serving calls, submits finished-call records straight
to its pipeline: ``--per-tick`` records (default 100) every 40 ms, as a busy proxy would
hand them over, until ``--records`` are in. It waits until every sink has handled them and
prints the CPU time per record of each thread (the event loop, the ledger writer, the rule
engine, the call log's writer) and of the whole process.

Each variant of ``bench.features`` runs in a process of its own (``full``: the default
deployment; ``bare``: no call log, no ledger, no rules, so pricing, metrics and the
pipeline only), in turn, ``--rounds`` times; the table gives the median. Without sockets
and a load generator on the same core, the figures move by a few percent between runs
where ``bench.features``'s move by tens: a yardstick for work on the sinks themselves.
What it leaves out: the sinks' effect on the proxy's own work under load (caches, the
interpreter lock), which only ``bench.features`` sees.

The records are :func:`bench.ledger.records` (OpenAI and Anthropic calls alternately, a
stream every third, ten tenants, 1 % errors), made before the clock starts. The loop is
marked busy while they are submitted (``sidecar.threads.LOAD``), as it is under load, so
the background threads do not pause for it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.features import VARIANTS, variant_text
from bench.ledger import thread_cpu

ROOT = Path(__file__).resolve().parent.parent
TICK = 0.04  # seconds between two handfuls of records
WARMUP = 200  # records before the measured ones
THREADS = {
    "MainThread": "loop",
    "sidecar-ledger-writer": "ledger",
    "sidecar-rules_0": "rules",
    "sidecar-calllog_0": "calllog",
}


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name."""
    return {thread.name: thread_cpu(thread) for thread in threading.enumerate()}


def child(variant: str, count: int, per_tick: int) -> dict[str, float]:
    """Run one variant in this process; the CPU microseconds per record, by thread and in all."""
    from bench.ledger import records
    from sidecar import cli, threads
    from sidecar.alerting import settings_from
    from sidecar.app import Sidecar
    from sidecar.config import load_file
    from sidecar.sinks import QueueSink

    sections = {name: overlay for name, _, overlay in VARIANTS}[variant]
    work = Path(tempfile.mkdtemp(prefix="llm-sidecar-sinks-"))
    path = work / "sidecar.yaml"
    text = variant_text(ROOT / "bench" / "sidecar.yaml", sections)
    text += f"data_dir: {work / 'data'}\nlisten: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\n"
    path.write_text(text)
    config = load_file(path, env={"BENCH_UPSTREAM_URL": "http://127.0.0.1:9"})
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the call log's lines, for the process's life
    sys.setswitchinterval(cli.SWITCH_INTERVAL)

    async def run() -> dict[str, float]:
        sidecar = Sidecar(config, config_path=str(path), alerting=settings_from(config.rules, config.notify))
        await sidecar.start()
        gc.freeze()
        gc.set_threshold(cli.GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        pipeline = sidecar.pipeline
        assert pipeline is not None
        for record in records(WARMUP, seed=1):  # warm-up: lazy imports, first batches
            pipeline.submit(dataclasses.replace(record, started_at=time.time(), finished_at=time.time()))
        await asyncio.sleep(0.5)
        start = time.time()
        step = TICK / per_tick  # the records' times follow the rate they are submitted at
        batch = [
            dataclasses.replace(r, started_at=start + i * step - r.duration_s, finished_at=start + i * step)
            for i, r in enumerate(records(count, seed=2))
        ]
        threads.LOAD.calls = 32
        before, wall = _thread_cpu(), time.process_time()
        for i in range(0, count, per_tick):
            for record in batch[i : i + per_tick]:
                pipeline.submit(record)
            await asyncio.sleep(TICK)
        for sink in sidecar.sinks:
            if isinstance(sink, QueueSink):
                await sink.drained()
        if sidecar.ledger_enabled:
            # The writer's last batch: a counter of its thread, polled (bounded).
            deadline = time.monotonic() + 60
            while sidecar.ledger.rows_written < count + WARMUP and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if sidecar.ledger.rows_written != count + WARMUP:
                raise RuntimeError(f"the ledger wrote {sidecar.ledger.rows_written} rows of {count + WARMUP}")
        after, total = _thread_cpu(), time.process_time() - wall
        threads.LOAD.calls = 0
        out = {"all": total / count * 1e6}
        for name, seconds in after.items():
            key = THREADS.get(name, "other")
            out[key] = out.get(key, 0.0) + (seconds - before.get(name, 0.0)) / count * 1e6
        await sidecar.stop()
        return out

    factory = cli._loop_factory("auto")
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(run())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.sinks``."""
    parser = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=10_000, help="records per run (default 10000)")
    parser.add_argument("--per-tick", type=int, default=100, help="records per 40 ms (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="subset of the variants")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = max(100, min(args.records, 200_000))
    per_tick = max(1, min(args.per_tick, 10_000))
    if args.child:
        figures = child(args.child, count, per_tick)  # its stdout is the call log's: /dev/null
        print(json.dumps(figures), file=sys.__stdout__, flush=True)
        return 0
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for _ in range(max(1, min(args.rounds, 10))):
        for name in names:
            cmd = [sys.executable, "-m", "bench.sinks", "--child", name]
            cmd += ["--records", str(count), "--per-tick", str(per_tick)]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                print(f"{name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(runs, count, per_tick))
    return 0


def table(runs: dict[str, list[dict[str, float]]], count: int, per_tick: int) -> str:
    """Median CPU microseconds per record by thread, per variant, and each over ``bare``."""
    columns = ["loop", "ledger", "rules", "calllog", "other", "all"]
    lines = [
        f"sinks in process: {count} records, {per_tick} per {TICK * 1000:.0f} ms, "
        f"{len(next(iter(runs.values())))} runs each; CPU us per record (median)",
        f"{'variant':11} " + " ".join(f"{c:>8}" for c in columns) + "  all - bare",
    ]
    medians = {
        n: {c: statistics.median(r.get(c, 0.0) for r in rs) for c in columns} for n, rs in runs.items()
    }
    bare = medians.get("bare", {}).get("all")
    for name, m in medians.items():
        extra = f"  {m['all'] - bare:9.1f}" if bare is not None else ""
        lines.append(f"{name:11} " + " ".join(f"{m[c]:8.1f}" for c in columns) + extra)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
