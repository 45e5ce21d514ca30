"""``make bench``: the upstream directly, the bare pass-through floor and the sidecar, alternating.

Every target runs pinned to one core (``taskset``); the load generator, the mock
upstream, the span receiver and this orchestrator share the other core, and each run
records how busy that core was, so a saturated load side shows instead of passing for
a slow target. Targets:

- ``direct``: a second mock upstream, pinned like a proxy — the latency baseline;
- ``floor``: :mod:`bench.floor`, a bare aiohttp pass-through with no accounting;
- ``sidecar``: ``python -m sidecar run --config bench/sidecar.yaml`` (a default deployment);
- ``sidecar+tracing``: the same with OTLP tracing at 100 % sampling to :mod:`bench.spans`,
  when the sidecar exports spans ("not available" otherwise).

Phases, all bounded in time and count: start and warm up; idle RSS; memory per open
stream (streams held open by the upstream); time to first byte at one client (requests
interleaved across targets); then throughput and latency for JSON and streaming at each
concurrency, ``--rounds`` times (the headline cells at 32 clients ``--rounds-c32`` times) with
the targets in rotating order (see :func:`best_cell`).
Results: a table on stdout, ``latest.json`` and ``latest.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import chart, loadgen, payloads, procstat, rules_engine, wrk

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path(__file__).resolve().parent / "sidecar.yaml"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TARGETS = ("direct", "floor", "sidecar", "sidecar+tracing")
SATURATED = 0.90  # a load core busier than this may be the bottleneck
HEADLINE_CONCURRENCY = 32  # the concurrency of the throughput targets

# The issue's targets: (check, limit, "max" or "min").
LIMITS: dict[str, tuple[float, str]] = {
    "throughput_json_c32_vs_floor": (1.0, "min"),
    "throughput_stream_c32_vs_floor": (1.0, "min"),
    "added_p50_json_c1_ms": (0.4, "max"),
    "added_p99_json_c1_ms": (1.0, "max"),
    "added_ttfb_p50_c1_ms": (0.6, "max"),
    "mem_per_stream_vs_floor": (1.5, "max"),
    "idle_rss_mib": (80.0, "max"),
    "cpu_per_req_json_c32_vs_floor": (1.5, "max"),
    "cpu_per_req_stream_c32_vs_floor": (1.5, "max"),
    # Flat scaling: CPU per request at 128 clients no more than 10 % above one client's
    # (at one client each request pays wake-ups that many concurrent ones share, so the
    # ratio is usually below 1; work that grows with concurrency shows as above it).
    "cpu_per_req_json_c128_vs_c1": (1.10, "max"),
    "cpu_per_req_stream_c128_vs_c1": (1.10, "max"),
    # Throughput bought by shedding work does not count: every call's record reaches every
    # sink (llm_sink_dropped_total and llm_ledger_lost_total stay where they were).
    "records_dropped": (0.0, "max"),
}
# Which limits apply to which target (tracing on: cost reported, CPU per request bounded).
APPLIES: dict[str, tuple[str, ...]] = {
    "sidecar": (
        "throughput_json_c32_vs_floor",
        "throughput_stream_c32_vs_floor",
        "added_p50_json_c1_ms",
        "added_p99_json_c1_ms",
        "added_ttfb_p50_c1_ms",
        "mem_per_stream_vs_floor",
        "idle_rss_mib",
        "cpu_per_req_json_c128_vs_c1",
        "cpu_per_req_stream_c128_vs_c1",
        "records_dropped",
    ),
    "sidecar+tracing": (
        "cpu_per_req_json_c32_vs_floor",
        "cpu_per_req_stream_c32_vs_floor",
        "idle_rss_mib",
        "cpu_per_req_json_c128_vs_c1",
        "cpu_per_req_stream_c128_vs_c1",
        "records_dropped",
    ),
}


@dataclass(frozen=True)
class Settings:
    """What one benchmark run does."""

    mode: str
    duration: float
    rounds: int
    concurrency: tuple[int, ...]
    shapes: tuple[str, ...]
    streams: int
    hold_ms: int
    probe_count: int
    warmup: int
    settle: float
    loadgen: str
    loadgen_label: str
    upstream_workers: int
    targets: tuple[str, ...]
    config: Path
    out: Path
    rule_engine: bool
    #: Rounds of the c=32 cells, the headline (at least ``rounds``; 0: ``rounds``): more than the
    #: other cells, since one disturbed round moves a best-of-3 ratio by tens of percent.
    rounds_c32: int = 0
    #: Rounds of the simultaneous pairs at c=32 (each sidecar target and the floor loaded at
    #: once on the target core, see :func:`simultaneous_summary`); 0: none.
    pair_rounds: int = 0

    def rounds_at(self, concurrency: int) -> int:
        """Rounds run at ``concurrency``."""
        return max(self.rounds, self.rounds_c32) if concurrency == HEADLINE_CONCURRENCY else self.rounds


@dataclass
class Target:
    """A started process and where it listens."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int
    admin_port: int | None = None
    pids: list[int] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(procstat.cpu_seconds(p) for p in self.pids)

    def rss(self) -> int:
        return sum(procstat.rss_bytes(p) for p in self.pids)


class BenchError(RuntimeError):
    """The benchmark could not run (a target did not start or answered wrongly)."""


# --- processes ------------------------------------------------------------------------------


def pinned(cmd: Sequence[str], core: int | None) -> list[str]:
    """``cmd`` run on ``core`` through taskset (unpinned without a core or without taskset)."""
    if core is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", str(core), *cmd]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without OTEL_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def start(
    name: str,
    cmd: Sequence[str],
    core: int | None,
    ready: str,
    logdir: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[Target, re.Match[str]]:
    """Start ``cmd`` and wait for the ``ready`` pattern on its stderr (stdout is discarded)."""
    log = logdir / f"{name.replace('+', '-')}.log"
    with log.open("wb") as err:
        popen = subprocess.Popen(
            pinned(cmd, core),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # the sidecar's call log: a real deployment ships it elsewhere
            stderr=err,
            env=dict(env) if env is not None else clean_env(),
            cwd=ROOT,
            start_new_session=True,
        )
    pattern = re.compile(ready)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = pattern.search(text)
        if found:
            return Target(name, popen, log, int(found.group(1)), pids=[popen.pid]), found
        if popen.poll() is not None:
            raise BenchError(f"{name} exited with {popen.returncode} before listening:\n{text[-3000:]}")
        time.sleep(0.05)
    stop(Target(name, popen, log, 0))
    raise BenchError(
        f"{name} did not listen within {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}"
    )


def start_upstream(core: int | None, logdir: Path, workers: int = 1) -> Target:
    """The mock upstream (``workers`` processes), its pids filled in."""
    target, found = start(
        "upstream",
        [sys.executable, "-m", "bench.upstream", "--workers", str(workers)],
        core,
        r"upstream on http://[\d.]+:(\d+) pids=([\d,]+)",
        logdir,
    )
    target.pids = [int(p) for p in found.group(2).split(",")]
    return target


def start_floor(upstream_url: str, core: int | None, logdir: Path) -> Target:
    """The floor (``bench/floor.py``) in front of ``upstream_url``."""
    target, _ = start(
        "floor",
        [sys.executable, "-m", "bench.floor", "--upstream", upstream_url],
        core,
        r"floor on http://[\d.]+:(\d+)",
        logdir,
    )
    return target


def start_sidecar(
    name: str, config: Path, upstream_url: str, core: int | None, logdir: Path, **env: str
) -> Target:
    """``llm-sidecar run`` with ``config`` on free loopback ports and a data directory of its own
    under ``logdir``; ``env`` adds to the environment (without the caller's ``OTEL_*``)."""
    cmd = [sys.executable, "-m", "sidecar", "run", "--config", str(config)]
    cmd += ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    cmd += ["--data-dir", str(logdir / f"{name.replace('+', '-')}-data")]
    ready = r"proxy on http://[\d.]+:(\d+), metrics on http://[\d.]+:(\d+)/metrics"
    target, found = start(name, cmd, core, ready, logdir, clean_env(BENCH_UPSTREAM_URL=upstream_url, **env))
    target.admin_port = int(found.group(2))
    return target


def stop(target: Target, timeout: float = 20.0) -> None:
    """SIGTERM the target (it drains), SIGKILL after ``timeout``."""
    if target.popen.poll() is not None:
        return
    target.popen.send_signal(signal.SIGTERM)
    try:
        target.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        target.popen.kill()
        target.popen.wait(5)


def http_get(port: int, path: str, timeout: float = 5.0) -> str:
    """The body of ``GET http://127.0.0.1:PORT/PATH``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode()


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Cores:
    """Which core the targets get, and which one everything else shares."""

    load: int | None
    target: int | None
    note: str


def choose_cores() -> Cores:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return Cores(None, None, f"only {len(usable)} usable core: nothing pinned, figures are indicative")
    if shutil.which("taskset") is None:
        return Cores(None, None, "taskset not found: nothing pinned, figures are indicative")
    load, target = usable[0], usable[1]
    os.sched_setaffinity(0, {load})  # this orchestrator and what it starts unpinned
    return Cores(load, target, f"targets on core {target}; load generator, upstream, receiver on core {load}")


def load_run(
    settings: Settings,
    cores: Cores,
    target: Target,
    side: Sequence[Target],
    stream: bool,
    connections: int,
    workdir: Path,
) -> dict[str, float]:
    """One bounded load run against ``target`` with the figures around it.

    ``side`` are the load side's own processes (mock upstream, span receiver); the load
    generator's CPU comes from this process's reaped-children usage.
    """
    return load_runs(settings, cores, [target], side, stream, connections, workdir)[0]


def load_runs(
    settings: Settings,
    cores: Cores,
    targets: Sequence[Target],
    side: Sequence[Target],
    stream: bool,
    connections: int,
    workdir: Path,
) -> list[dict[str, float]]:
    """One bounded load run against every target of ``targets`` at once (a load generator
    each, ``connections`` clients each), with each target's figures, in order.

    With two targets on the target core, both run through the same moments of the host's
    noise and the core's time is split between them, so the ratio of their CPU per request
    no longer depends on what the machine did between two runs (see
    :func:`simultaneous_summary`).
    """
    time.sleep(settings.settle)
    dropped0 = [records_dropped(t) for t in targets]
    cmds = [
        pinned(
            wrk.command(
                settings.loadgen, "127.0.0.1", t.port, stream, connections, settings.duration, workdir
            ),
            cores.load,
        )
        for t in targets
    ]
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, side0 = [t.cpu() for t in targets], [t.cpu() for t in side]
    cores0, t0 = procstat.core_times(), time.monotonic()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in cmds
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=settings.duration + 60)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cpu1, side1 = [t.cpu() for t in targets], [t.cpu() for t in side]
    cores1, t1 = procstat.core_times(), time.monotonic()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = t1 - t0
    loadgen_cpu = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    side_cpu = [b - a for a, b in zip(side0, side1, strict=True)]
    load_busy = cores1[cores.load].busy_share(cores0[cores.load]) if cores.load is not None else 0.0
    target_busy = steal = softirq = 0.0
    if cores.target is not None:
        after, before = cores1[cores.target], cores0[cores.target]
        target_busy = after.busy_share(before)
        steal, softirq = after.steal_share(before), after.softirq_share(before)
    shares = [(b - a) / wall for a, b in zip(cpu0, cpu1, strict=True)]
    results = []
    for i, out in enumerate(outs):
        figures = wrk.parse(out)
        requests = max(1.0, figures["requests"])
        seconds = figures["duration_us"] / 1e6
        results.append(
            {
                "rps": figures["requests"] / seconds if seconds > 0 else 0.0,
                "requests": figures["requests"],
                "errors": figures["errors_status"] + figures["errors_socket"],
                "p50_ms": figures["p50_us"] / 1000,
                "p90_ms": figures["p90_us"] / 1000,
                "p99_ms": figures["p99_us"] / 1000,
                "cpu_us_per_req": (cpu1[i] - cpu0[i]) / requests * 1e6,
                "target_cpu_share": shares[i],
                "upstream_cpu_share": side_cpu[0] / wall if side_cpu else 0.0,
                "bench_cpu_share": (loadgen_cpu + sum(side_cpu)) / wall,
                "load_core_busy": load_busy,
                "target_core_busy": target_busy,
                # The target core's busy time that is not the targets' own: the hypervisor's
                # steal, and other processes. Interrupt and softirq time (much of it the
                # targets' loopback TCP) is shown apart; where the kernel charges it to the
                # running process (no CONFIG_IRQ_TIME_ACCOUNTING), it is in the targets' CPU
                # time already, otherwise it shows in "other".
                "target_core_softirq": softirq,
                "target_core_steal": steal,
                "target_core_other": max(0.0, target_busy - sum(shares) - steal),
                "dropped": records_dropped(targets[i]) - dropped0[i],
            }
        )
    return results


def load_pair(
    settings: Settings,
    cores: Cores,
    first: Target,
    second: Target,
    side: Sequence[Target],
    stream: bool,
    connections: int,
    workdir: Path,
    swap: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`load_runs` of two targets at once: the figures of ``first`` and of ``second``.
    ``swap`` starts ``second``'s load generator first (alternate it from round to round)."""
    if swap:
        later, earlier = load_runs(settings, cores, [second, first], side, stream, connections, workdir)
        return earlier, later
    earlier, later = load_runs(settings, cores, [first, second], side, stream, connections, workdir)
    return earlier, later


#: Samples that count a finished call's record lost to a sink: refused by a full queue, or
#: lost by the ledger (a record spilled to the ledger's journal is not lost).
DROP_SAMPLES = ("llm_sink_dropped_total", "llm_ledger_lost_total")


def records_dropped(target: Target) -> float:
    """Records the target's sinks dropped so far (0 for a target without an admin listener)."""
    if target.admin_port is None:
        return 0.0
    return dropped_in(http_get(target.admin_port, "/metrics"))


def dropped_in(exposition: str) -> float:
    """The sum of the :data:`DROP_SAMPLES` in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in DROP_SAMPLES:
            total += float(line.rsplit(" ", 1)[1])
    return total


def best_cell(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One cell from its rounds: best throughput and latency, median CPU per request.

    Other work on a shared machine only ever lowers throughput and raises latency, so
    the best round is the closest to the target's own figure; CPU time per request is
    the target's own and takes the median. The load side's busiest round is kept.
    """
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["rps"] = max(r["rps"] for r in runs)
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        out[key] = min(r[key] for r in runs)
    for key in (
        "load_core_busy",
        "upstream_cpu_share",
        "bench_cpu_share",
        "target_core_other",
        "target_core_steal",
    ):
        out[key] = max(r.get(key, 0.0) for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["dropped"] = sum(r.get("dropped", 0.0) for r in runs)
    return out


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The target order of each round, rotated so that no target always goes first."""
    for r in range(rounds):
        k = r % max(1, len(names))
        yield [*names[k:], *names[:k]]


def metric_families(text: str) -> list[str]:
    """Metric family names of a Prometheus text exposition."""
    return sorted({line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")})


def features(families: Sequence[str]) -> dict[str, bool]:
    """Which sidecar subsystems expose metrics (so the run says what it measured)."""

    def has(*prefixes: str) -> bool:
        return any(f.startswith(prefixes) for f in families)

    return {
        "metrics": has("llm_requests"),
        "tracing": has("llm_spans"),
        "ledger": has("llm_ledger"),
        "rules": has("llm_rule_evaluation", "llm_alerts_firing", "llm_slo_"),
    }


# --- the run --------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    """Start everything, measure, stop everything; the results."""
    machine = procstat.machine()  # before pinning this process to the load core
    cores = choose_cores()
    workdir = Path(tempfile.mkdtemp(prefix="llm-sidecar-bench-"))
    started: list[Target] = []
    ok = False
    py = sys.executable
    try:
        say(f"pinning: {cores.note}")
        say(f"load generator: {settings.loadgen_label}")
        receiver, _ = start(
            "spans", [py, "-m", "bench.spans"], cores.load, r"spans on http://[\d.]+:(\d+)", workdir
        )
        started.append(receiver)
        upstream = start_upstream(cores.load, workdir, settings.upstream_workers)
        started.append(upstream)
        upstream_url = f"http://127.0.0.1:{upstream.port}"
        targets: dict[str, Target] = {}
        if "direct" in settings.targets:
            targets["direct"], _ = start(
                "direct",
                [py, "-m", "bench.upstream"],
                cores.target,
                r"upstream on http://[\d.]+:(\d+)",
                workdir,
            )
            started.append(targets["direct"])  # stopped at the end even if a later start fails
        if "floor" in settings.targets:
            targets["floor"] = start_floor(upstream_url, cores.target, workdir)
            started.append(targets["floor"])
        for name in ("sidecar", "sidecar+tracing"):
            if name not in settings.targets:
                continue
            env: dict[str, str] = {}
            if name == "sidecar+tracing":
                env.update(
                    OTEL_TRACES_EXPORTER="otlp",
                    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://127.0.0.1:{receiver.port}/v1/traces",
                    OTEL_TRACES_SAMPLER="always_on",
                    OTEL_BSP_SCHEDULE_DELAY="500",
                )
            targets[name] = start_sidecar(name, settings.config, upstream_url, cores.target, workdir, **env)
            started.append(targets[name])
        for name, target in targets.items():
            affinity = sorted(os.sched_getaffinity(target.popen.pid))
            say(f"{name}: pid {target.popen.pid} on 127.0.0.1:{target.port}, cores {affinity}")

        results = measure(settings, cores, targets, upstream, receiver, workdir)
        results["machine"] = machine
        ok = True
        return results
    finally:
        for target in reversed(started):
            stop(target)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"logs kept in {workdir}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(
    settings: Settings,
    cores: Cores,
    targets: dict[str, Target],
    upstream: Target,
    receiver: Target,
    workdir: Path,
) -> dict[str, Any]:
    """Every phase against started targets."""
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {},
        "loadgen": settings.loadgen_label,
        "pinning": cores.note,
        "settings": {
            "mode": settings.mode,
            "duration_s": settings.duration,
            "rounds": settings.rounds,
            "rounds_c32": settings.rounds_at(HEADLINE_CONCURRENCY),
            "pair_rounds": settings.pair_rounds,
            "concurrency": list(settings.concurrency),
            "shapes": list(settings.shapes),
            "open_streams": settings.streams,
            "probe_requests": settings.probe_count,
            "stream_chunks": payloads.STREAM_CHUNKS,
            "tenants": payloads.TENANTS,
            "mix": "OpenAI chat completions and Anthropic messages alternately",
            "upstream_workers": settings.upstream_workers,
            "config": str(
                settings.config.relative_to(ROOT) if settings.config.is_relative_to(ROOT) else settings.config
            ),
        },
        "unavailable": {},
    }

    # Warm-up: every target answers both shapes correctly.
    addresses = {name: ("127.0.0.1", t.port) for name, t in targets.items()}
    for stream in (False, True):
        for name, res in loadgen.probe(addresses, stream, settings.warmup).items():
            if res.errors:
                raise BenchError(f"{name} failed {res.errors} warm-up requests; see {targets[name].log}")

    # What the sidecar runs; tracing only where spans arrive.
    for name in ("sidecar", "sidecar+tracing"):
        target = targets.get(name)
        if target is None or target.admin_port is None:
            continue
        families = metric_families(http_get(target.admin_port, "/metrics"))
        results.setdefault("features", {})[name] = features(families)
        results.setdefault("metric_families", {})[name] = families
    if "sidecar+tracing" in targets:
        exports = 0
        for _ in range(40):  # up to 4 s for the first export (schedule delay 0.5 s)
            exports = json.loads(http_get(receiver.port, "/stats"))["exports"]
            if exports:
                break
            time.sleep(0.1)
        if not exports:
            reason = "not available: the sidecar exported no span (no OTLP tracing support yet)"
            say(f"sidecar+tracing: {reason}")
            results["unavailable"]["sidecar+tracing"] = reason
            stop(targets.pop("sidecar+tracing"))
            addresses.pop("sidecar+tracing")
    for name in TARGETS:
        if name not in settings.targets:
            results["unavailable"].setdefault(name, "not selected")

    # Memory: idle RSS, then streams held open at once.
    time.sleep(0.5)
    memory: dict[str, dict[str, float]] = {n: {"idle_rss_mib": t.rss() / 2**20} for n, t in targets.items()}
    for name, target in targets.items():
        if name == "direct":
            continue
        before = target.rss()
        during: list[int] = []

        def sample(t: Target = target, into: list[int] = during) -> None:
            into.append(t.rss())

        held, completed = asyncio.run(
            loadgen.open_streams("127.0.0.1", target.port, settings.streams, settings.hold_ms, sample)
        )
        memory[name].update(
            {
                "streams_held": held,
                "streams_completed": completed,
                "rss_open_mib": during[0] / 2**20,
                "per_stream_kib": (during[0] - before) / max(1, held) / 1024,
            }
        )
        say(f"{name}: {held} streams open at once, {(during[0] - before) / max(1, held) / 1024:.1f} KiB each")
    results["memory"] = memory

    # Time to first byte at one client, targets interleaved request by request.
    ttfb = loadgen.probe(addresses, True, settings.probe_count)
    results["ttfb_c1"] = {
        name: {
            "first_byte_p50_ms": _pct(r.first_byte_us, 50) / 1000,
            "first_byte_p99_ms": _pct(r.first_byte_us, 99) / 1000,
            "first_event_p50_ms": _pct(r.first_body_us, 50) / 1000,
            "first_event_p99_ms": _pct(r.first_body_us, 99) / 1000,
            "errors": r.errors,
        }
        for name, r in ttfb.items()
    }

    # Throughput and latency: rounds x shapes x concurrency, targets alternating.
    side = [upstream, receiver]
    raw: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    rounds = max(settings.rounds_at(c) for c in settings.concurrency)
    total = sum(settings.rounds_at(c) for c in settings.concurrency) * len(settings.shapes) * len(targets)
    done = 0
    for index, order in enumerate(rotations(list(targets), rounds)):
        for shape in settings.shapes:
            for conc in settings.concurrency:
                if index >= settings.rounds_at(conc):
                    continue  # the extra rounds of the headline cells
                for name in order:
                    figures = load_run(settings, cores, targets[name], side, shape == "stream", conc, workdir)
                    if name == "direct":  # the direct target is its own upstream
                        figures["upstream_cpu_share"] = figures["target_cpu_share"]
                    raw.setdefault((name, shape, conc), []).append(figures)
                    done += 1
                    say(
                        f"[{done}/{total}] {name:16} {shape:6} c={conc:<4} {figures['rps']:9.0f} req/s  "
                        f"p50 {figures['p50_ms']:7.2f} ms  load core {figures['load_core_busy']:4.0%}"
                    )
    # Simultaneous pairs: the floor and a sidecar target loaded at once on the target core.
    if "floor" in targets and HEADLINE_CONCURRENCY in settings.concurrency:
        pairs: dict[str, list[dict[str, dict[str, float]]]] = {}
        names = [n for n in ("sidecar", "sidecar+tracing") if n in targets]
        for index in range(settings.pair_rounds):
            for shape in settings.shapes:
                for name in names:
                    floor_run, target_run = load_pair(
                        settings,
                        cores,
                        targets["floor"],
                        targets[name],
                        side,
                        shape == "stream",
                        HEADLINE_CONCURRENCY,
                        workdir,
                        swap=index % 2 == 1,
                    )
                    pair = {"floor": floor_run, "target": target_run}
                    pairs.setdefault(f"{name} {shape}", []).append(pair)
                    mine, floors = pair["target"]["cpu_us_per_req"], pair["floor"]["cpu_us_per_req"]
                    say(
                        f"[pair {index + 1}/{settings.pair_rounds}] {name:16} {shape:6} and the floor "
                        f"at once: CPU us/req {mine:.0f} and {floors:.0f}"
                    )
        if pairs:
            results["simultaneous_c32"] = pairs
    for name, target in targets.items():
        memory[name]["final_rss_mib"] = target.rss() / 2**20
    if "sidecar+tracing" in targets:
        results["spans_received"] = json.loads(http_get(receiver.port, "/stats"))
    results["cells"] = [
        {"target": n, "shape": s, "concurrency": c, **best_cell(runs)} for (n, s, c), runs in raw.items()
    ]
    results["rounds_raw"] = [
        {"target": n, "shape": s, "concurrency": c, "runs": runs} for (n, s, c), runs in raw.items()
    ]
    summarise(results)
    return results


def _pct(values: Sequence[float], q: float) -> float:
    return loadgen.percentile(sorted(values), q)


# --- summary ----------------------------------------------------------------------------------


def paired_ratios(rounds_raw: Sequence[Mapping[str, Any]], concurrency: int) -> dict[str, dict[str, Any]]:
    """Throughput of each target over the floor's, round by round, at ``concurrency``.

    The targets run one after the other within a round, so a round's ratio compares runs a
    few seconds apart; on a shared host, where a target's best round and the floor's best
    round can be minutes apart, the median of these ratios is steadier than the ratio of
    the two bests (the headline). ``{"target shape": {"ratios": [...], "median": m}}``.
    """
    runs = {(r["target"], r["shape"]): r["runs"] for r in rounds_raw if r["concurrency"] == concurrency}
    out: dict[str, dict[str, Any]] = {}
    for (name, shape), target_runs in runs.items():
        floor_runs = runs.get(("floor", shape))
        if name in ("floor", "direct") or not floor_runs:
            continue
        ratios = [t["rps"] / f["rps"] for t, f in zip(target_runs, floor_runs, strict=False) if f["rps"] > 0]
        if ratios:
            out[f"{name} {shape}"] = {"ratios": ratios, "median": statistics.median(ratios)}
    return out


def simultaneous_summary(pairs: Mapping[str, Sequence[Mapping[str, Mapping[str, float]]]]) -> dict[str, Any]:
    """Each pair's CPU per request, target over floor, when both were loaded at once.

    On a shared host a target's CPU per request moves by up to 2x between two runs a few
    seconds apart, for the floor as much as for the sidecar, so the ratio of two runs made
    one after the other is mostly noise. Loaded at the same time on the same core, the two
    go through the same moments of the host: the ratio of their CPU per request holds from
    one round to the next within a few per cent. The core's time is split between them, so
    their throughputs are not the figure; on a core of its own, a target bound by its CPU
    serves ``1 / ratio`` of the floor's requests (``throughput_vs_floor``).
    """
    out: dict[str, Any] = {}
    for key, rounds in pairs.items():
        ratios = [
            r["target"]["cpu_us_per_req"] / r["floor"]["cpu_us_per_req"]
            for r in rounds
            if r["floor"]["cpu_us_per_req"] > 0 and r["target"]["requests"] > 0 and r["floor"]["requests"] > 0
        ]
        if not ratios:
            continue
        median = statistics.median(ratios)
        out[key] = {
            "cpu_ratios": ratios,
            "cpu_ratio_median": median,
            "throughput_vs_floor": 1 / median if median > 0 else None,
            "errors": sum(r["target"]["errors"] + r["floor"]["errors"] for r in rounds),
            "dropped": sum(r["target"].get("dropped", 0.0) for r in rounds),
        }
    return out


def summarise(results: dict[str, Any]) -> None:
    """Add differences to direct, ratios to the floor, the headline and the checks."""
    cells: list[dict[str, Any]] = results["cells"]
    index = {(c["target"], c["shape"], c["concurrency"]): c for c in cells}
    for c in cells:
        direct = index.get(("direct", c["shape"], c["concurrency"]))
        floor = index.get(("floor", c["shape"], c["concurrency"]))
        if direct is not None:
            c["added_p50_ms"] = c["p50_ms"] - direct["p50_ms"]
            c["added_p99_ms"] = c["p99_ms"] - direct["p99_ms"]
        if floor is not None and floor["rps"] > 0:
            c["rps_vs_floor"] = c["rps"] / floor["rps"]
            c["cpu_vs_floor"] = (
                c["cpu_us_per_req"] / floor["cpu_us_per_req"] if floor["cpu_us_per_req"] else None
            )

    ttfb = results.get("ttfb_c1", {})
    added: dict[str, dict[str, float]] = {}
    for name in ("floor", "sidecar", "sidecar+tracing"):
        row: dict[str, float] = {}
        for shape in ("json", "stream"):
            cell = index.get((name, shape, 1))
            if cell is not None and "added_p50_ms" in cell:
                row[f"{shape}_p50_ms"] = cell["added_p50_ms"]
                row[f"{shape}_p99_ms"] = cell["added_p99_ms"]
        if name in ttfb and "direct" in ttfb:
            row["ttfb_p50_ms"] = ttfb[name]["first_byte_p50_ms"] - ttfb["direct"]["first_byte_p50_ms"]
            row["ttfb_p99_ms"] = ttfb[name]["first_byte_p99_ms"] - ttfb["direct"]["first_byte_p99_ms"]
        if row:
            added[name] = row
    results["added_latency_c1"] = added

    memory = results.get("memory", {})
    headline: dict[str, dict[str, float | None]] = {}
    for name in ("floor", "sidecar", "sidecar+tracing"):
        if not any(c["target"] == name for c in cells):
            continue
        h: dict[str, float | None] = {}
        for shape in ("json", "stream"):
            c32 = index.get((name, shape, 32))
            if c32 is not None:
                h[f"throughput_{shape}_c32_vs_floor"] = c32.get("rps_vs_floor")
                h[f"cpu_per_req_{shape}_c32_vs_floor"] = c32.get("cpu_vs_floor")
            lo, hi = index.get((name, shape, 1)), index.get((name, shape, 128))
            if lo is not None and hi is not None and lo["cpu_us_per_req"]:
                h[f"cpu_per_req_{shape}_c128_vs_c1"] = hi["cpu_us_per_req"] / lo["cpu_us_per_req"]
        h["added_p50_json_c1_ms"] = added.get(name, {}).get("json_p50_ms")
        h["added_p99_json_c1_ms"] = added.get(name, {}).get("json_p99_ms")
        h["added_ttfb_p50_c1_ms"] = added.get(name, {}).get("ttfb_p50_ms")
        mem, floor_mem = memory.get(name, {}), memory.get("floor", {})
        if mem.get("per_stream_kib") is not None and floor_mem.get("per_stream_kib"):
            h["mem_per_stream_vs_floor"] = mem["per_stream_kib"] / floor_mem["per_stream_kib"]
        h["idle_rss_mib"] = mem.get("idle_rss_mib")
        h["records_dropped"] = sum(c.get("dropped", 0.0) for c in cells if c["target"] == name)
        headline[name] = h
    results["headline"] = headline
    results["paired_c32"] = paired_ratios(results.get("rounds_raw", []), HEADLINE_CONCURRENCY)
    simultaneous = simultaneous_summary(results.get("simultaneous_c32", {}))
    results["simultaneous_summary"] = simultaneous
    for key, pair in simultaneous.items():
        name = key.rsplit(" ", 1)[0]
        if name in headline:  # a record dropped in a pair run counts as much as in the matrix
            headline[name]["records_dropped"] = (headline[name].get("records_dropped") or 0.0) + pair[
                "dropped"
            ]

    checks = []
    for name, h in headline.items():
        for key in APPLIES.get(name, ()):
            limit, kind = LIMITS[key]
            value = h.get(key)
            passed = None if value is None else (value >= limit if kind == "min" else value <= limit)
            checks.append(
                {"target": name, "check": key, "value": value, "limit": limit, "kind": kind, "ok": passed}
            )
    proxied = [c for c in cells if c["target"] != "direct"]
    results["load_side"] = {
        "max_load_core_busy": max((c["load_core_busy"] for c in proxied), default=0.0),
        "max_bench_cpu_share": max((c["bench_cpu_share"] for c in proxied), default=0.0),
        "max_upstream_cpu_share": max((c["upstream_cpu_share"] for c in proxied), default=0.0),
        "max_target_core_other": max((c["target_core_other"] for c in cells), default=0.0),
        "max_target_core_steal": max((c.get("target_core_steal", 0.0) for c in cells), default=0.0),
        "saturated_runs": sum(c["load_core_busy"] > SATURATED for c in proxied),
        "runs": len(proxied),
    }
    # The measurement itself: the load side (load generator, mock upstream, span receiver,
    # and whatever else ran on that core) never the bottleneck of a proxied run.
    if proxied:
        busiest = results["load_side"]["max_load_core_busy"]
        checks.append(
            {
                "target": "load side",
                "check": "load_core_busy_max",
                "value": busiest,
                "limit": SATURATED,
                "kind": "max",
                "ok": busiest <= SATURATED,
            }
        )
    results["checks"] = checks


# --- output ---------------------------------------------------------------------------------


def _f(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(results: Mapping[str, Any]) -> str:
    """The results as text tables."""
    lines: list[str] = []
    m = results["machine"]
    lines.append(
        f"llm-sidecar bench, {results['settings']['mode']} run, {results['date']}: {m['cpu']}, "
        f"{m['cores_usable']} usable cores, Python {m['python']}, kernel {m['kernel']}"
    )
    lines.append(f"pinning: {results['pinning']}; load generator: {results['loadgen']}")
    s = results["settings"]
    lines.append(
        f"mix: {s['mix']}, {s['tenants']} tenants; streams of {s['stream_chunks']} chunks + usage; "
        f"{s['duration_s']:g} s per run, best of {s['rounds']} round(s), "
        f"{s.get('rounds_c32', s['rounds'])} at c={HEADLINE_CONCURRENCY} (CPU per request: median)"
    )
    for name, feats in results.get("features", {}).items():
        on = ", ".join(k for k, v in feats.items() if v) or "none"
        off = ", ".join(k for k, v in feats.items() if not v) or "none"
        lines.append(f"{name}: measured with {on}; not running: {off}")
    for name, reason in results.get("unavailable", {}).items():
        lines.append(f"{name}: {reason}")
    lines.append("")
    head = (
        f"{'target':16} {'shape':6} {'c':>4} {'req/s':>9} {'xfloor':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p50':>6} {'+p99':>6} {'CPU us/req':>10} {'xfloor':>6} {'load core':>9} "
        f"{'bench':>5} {'other':>5} {'steal':>5} {'err':>4} {'drop':>5}"
    )
    lines += [head, "-" * len(head)]
    order = {n: i for i, n in enumerate(TARGETS)}
    cells = sorted(results["cells"], key=lambda c: (c["shape"], c["concurrency"], order.get(c["target"], 9)))
    previous = None
    for c in cells:
        if previous is not None and previous != (c["shape"], c["concurrency"]):
            lines.append("")
        previous = (c["shape"], c["concurrency"])
        lines.append(
            f"{c['target']:16} {c['shape']:6} {c['concurrency']:>4} {c['rps']:>9.0f} "
            f"{_f(c.get('rps_vs_floor'), '>6.2f', '     -')} {c['p50_ms']:>7.2f} {c['p99_ms']:>7.2f} "
            f"{_f(c.get('added_p50_ms'), '>+6.2f', '     -')} "
            f"{_f(c.get('added_p99_ms'), '>+6.2f', '     -')} "
            f"{c['cpu_us_per_req']:>10.0f} {_f(c.get('cpu_vs_floor'), '>6.2f', '     -')} "
            f"{c['load_core_busy']:>9.0%} {c['bench_cpu_share']:>5.0%} {c['target_core_other']:>5.0%} "
            f"{c.get('target_core_steal', 0.0):>5.0%} {c['errors']:>4.0f} {c.get('dropped', 0.0):>5.0f}"
        )
    lines.append("")
    lines.append(
        "one client (c=1), ms added over direct:  json p50  json p99  stream p50  stream p99  "
        "TTFB p50  TTFB p99"
    )
    for name, a in results.get("added_latency_c1", {}).items():
        lines.append(
            f"  {name:37} {_f(a.get('json_p50_ms'), '>+8.3f')}  {_f(a.get('json_p99_ms'), '>+8.3f')}  "
            f"{_f(a.get('stream_p50_ms'), '>+10.3f')}  {_f(a.get('stream_p99_ms'), '>+10.3f')}  "
            f"{_f(a.get('ttfb_p50_ms'), '>+8.3f')}  {_f(a.get('ttfb_p99_ms'), '>+8.3f')}"
        )
    direct_ttfb = results.get("ttfb_c1", {}).get("direct")
    if direct_ttfb:
        lines.append(
            f"  (direct: TTFB p50 {direct_ttfb['first_byte_p50_ms']:.3f} ms, first event p50 "
            f"{direct_ttfb['first_event_p50_ms']:.3f} ms)"
        )
    lines.append("")
    lines.append(
        f"memory: {'idle RSS MiB':>12} {'open streams':>12} {'KiB/stream':>10} {'RSS at end MiB':>14}"
    )
    for name, mem in results.get("memory", {}).items():
        lines.append(
            f"  {name:16} {mem['idle_rss_mib']:>8.1f} {_f(mem.get('streams_held'), '>12.0f')} "
            f"{_f(mem.get('per_stream_kib'), '>10.1f')} {_f(mem.get('final_rss_mib'), '>14.1f')}"
        )
    ls = results.get("load_side", {})
    if ls:
        lines.append("")
        lines.append(
            f"load core: at most {ls['max_load_core_busy']:.0%} busy during proxied runs; the bench's own "
            "processes (load generator, mock upstream, span receiver) at most "
            f"{ls['max_bench_cpu_share']:.0%} of it, the mock upstream at most "
            f"{ls['max_upstream_cpu_share']:.0%}"
        )
        if ls["saturated_runs"]:
            lines.append(
                f"  WARNING: the load core was over {SATURATED:.0%} busy in {ls['saturated_runs']} of "
                f"{ls['runs']} proxied runs (column 'bench' vs 'load core': the rest is other work "
                "on the machine)"
            )
        else:
            lines.append("  not saturated: the targets, not the load side, set the proxied figures")
        steal = ls.get("max_target_core_steal", 0.0)
        if ls["max_target_core_other"] > 0.1 or steal > 0.05:
            lines.append(
                f"  note: other processes took up to {ls['max_target_core_other']:.0%} of the target core "
                f"(column 'other') and the hypervisor up to {steal:.0%} (column 'steal', time given to "
                "other guests): a shared machine; compare ratios, not absolute figures"
            )
    lines.append("")
    lines.append("headline (ratios to the floor, measured in this run) and the issue's targets:")
    for check in results.get("checks", []):
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[check["ok"]]
        sign = ">=" if check["kind"] == "min" else "<="
        lines.append(
            f"  {mark} {check['target']:16} {check['check']:34} {_f(check['value'], '>8.2f')}  "
            f"(target {sign} {check['limit']:g})"
        )
    paired = results.get("paired_c32", {})
    if any(len(p["ratios"]) > 1 for p in paired.values()):
        lines.append("  throughput at c=32 round by round (target / floor in the same round; median, range):")
        for key, p in paired.items():
            ratios = p["ratios"]
            spread = f"{min(ratios):.2f} to {max(ratios):.2f}, {len(ratios)} rounds"
            lines.append(f"    {key:24} {p['median']:.2f}  ({spread})")
    simultaneous = results.get("simultaneous_summary", {})
    if simultaneous:
        lines.append(
            "  CPU per request at c=32, the target and the floor loaded at once on the target core "
            "(the steadiest comparison on a shared host):"
        )
        lines.append(
            "    target / floor, median and range; on a core of its own the target serves 1 / ratio "
            "of the floor's requests"
        )
        for key, p in simultaneous.items():
            ratios = p["cpu_ratios"]
            spread = f"{min(ratios):.2f} to {max(ratios):.2f}, {len(ratios)} rounds"
            extra = f", {p['errors']:.0f} failed requests" if p["errors"] else ""
            lines.append(
                f"    {key:24} {p['cpu_ratio_median']:.2f}  ({spread}{extra})  "
                f"throughput {_f(p['throughput_vs_floor'], '.2f')} x floor"
            )
    for name, h in results.get("headline", {}).items():
        flat = [f"{k} {v:.2f}" for k, v in h.items() if k.endswith("c128_vs_c1") and v is not None]
        if flat:
            lines.append(f"  CPU per request, c=128 vs c=1, {name}: {', '.join(flat)} (flat = 1.00)")
    if "rule_engine" in results:
        lines.append("")
        lines.append(rules_engine.table(results["rule_engine"]))
    return "\n".join(lines)


def write(results: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """``latest.json`` and ``latest.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "latest.json", out / "latest.png"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    png_path.write_bytes(chart.render(results))
    return json_path, png_path


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: 1 s runs, 1 round")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 3, quick 1)")
    parser.add_argument("--rounds", type=int, help="rounds of the whole matrix (default 3, quick 1)")
    parser.add_argument(
        "--rounds-c32", type=int, help="rounds of the c=32 cells, the headline (default 7, quick 1)"
    )
    parser.add_argument(
        "--pair-rounds",
        type=int,
        help="rounds of the floor and each sidecar loaded at once at c=32 (default 5, quick 1; 0: none)",
    )
    parser.add_argument("--concurrency", default="1,32,128", help="comma-separated (default 1,32,128)")
    parser.add_argument("--shapes", default="json,stream", help="json,stream (default both)")
    parser.add_argument("--streams", type=int, default=256, help="streams held open at once (default 256)")
    parser.add_argument("--probe-count", type=int, help="sequential TTFB requests per target (default 1000)")
    parser.add_argument("--hold-ms", type=int, default=3000, help="how long the upstream holds them (ms)")
    parser.add_argument("--warmup", type=int, help="warm-up requests per target and shape (default 200)")
    parser.add_argument("--settle", type=float, default=0.3, help="pause before each load run (s)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"subset of {','.join(TARGETS)}")
    parser.add_argument(
        "--loadgen", choices=["auto", "wrk", "python"], default="auto", help="auto: wrk when installed"
    )
    parser.add_argument("--upstream-workers", type=int, default=1, help="mock upstream processes (default 1)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the sidecar's config")
    parser.add_argument(
        "--skip-rule-engine", action="store_true", help="skip the rule engine's in-process cost"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for latest.json/png")
    args = parser.parse_args(argv)
    quick = args.quick
    loadgen_tool = args.loadgen
    if loadgen_tool == "auto":
        loadgen_tool = "wrk" if wrk.wrk_version() else "python"
    elif loadgen_tool == "wrk" and not wrk.wrk_version():
        parser.error("wrk is not installed (apt-get install wrk), use --loadgen python")
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    duration = args.duration if args.duration is not None else (1.0 if quick else 3.0)
    settings = Settings(
        mode="quick"
        if quick
        else ("custom" if args.duration or args.rounds or args.rounds_c32 is not None else "full"),
        duration=max(0.2, min(duration, 60.0)),
        rounds=max(1, min(args.rounds if args.rounds is not None else (1 if quick else 3), 10)),
        concurrency=tuple(max(1, min(int(c), 1024)) for c in args.concurrency.split(",") if c),
        shapes=tuple(s for s in args.shapes.split(",") if s in ("json", "stream")),
        streams=max(1, min(args.streams, 4096)),
        hold_ms=max(100, min(args.hold_ms, 60_000)),
        probe_count=max(1, min(args.probe_count or (300 if quick else 1000), 100_000)),
        warmup=max(1, min(args.warmup or (50 if quick else 200), 10_000)),
        settle=max(0.0, min(args.settle, 10.0)),
        loadgen=loadgen_tool,
        loadgen_label=(
            f"{wrk.wrk_version()}, one thread, Lua script"
            if loadgen_tool == "wrk"
            else "bench.loadgen (Python asyncio, closed loop)"
            + ("" if wrk.wrk_version() else "; wrk not installed")
        ),
        upstream_workers=max(1, min(args.upstream_workers, 16)),
        targets=targets,
        config=args.config.resolve(),
        out=args.out,
        rule_engine=not args.skip_rule_engine,
        rounds_c32=max(0, min(args.rounds_c32 if args.rounds_c32 is not None else (0 if quick else 7), 20)),
        pair_rounds=max(
            0, min(args.pair_rounds if args.pair_rounds is not None else (1 if quick else 5), 20)
        ),
    )
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.run`` (``make bench``)."""
    settings = parse_args(argv)
    try:
        results = run(settings)
    except BenchError as exc:
        say(f"bench failed: {exc}")
        return 1
    if settings.rule_engine:
        say("rule engine: observing calls and evaluating at 10 and 1,000 tenants")
        quick_cases = ((10, 10_000), (1000, 10_000), (1000, 40_000))
        results["rule_engine"] = rules_engine.measure(
            cases=quick_cases if settings.mode == "quick" else rules_engine.CASES
        )
    print(table(results), flush=True)
    json_path, png_path = write(results, settings.out)
    print(f"\nwritten: {json_path} and {png_path}", flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
