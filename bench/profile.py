"""Where the sidecar's CPU goes per request: a profile of a running sidecar under load.

``python -m bench.profile`` starts the mock upstream and the sidecar as ``make bench``
does (pinned apart), drives it with wrk (or :mod:`bench.loadgen`) for JSON and for
streaming, and samples it with py-spy when installed (``pip install py-spy``: sampling,
every thread, next to no overhead), else with cProfile (main thread only, and its own
overhead inflates small functions), or not at all (``--profiler none``: the CPU figure
alone). Prints, per shape, the sidecar's CPU time per request (user + system of every
thread, from ``/proc``, over the load run; py-spy samples from the other core and adds
next to nothing to it), the same split by thread (event loop, ledger writer, rules
engine, ...: CPU only, where sampled stacks also count a thread blocked in a system
call such as the ledger's fsync), and the share of its busy samples by area, function
(self and inclusive) and module; writes the collapsed stacks (py-spy) or the pstats
file (cProfile) next to the report for flame graphs.
"""

from __future__ import annotations

import argparse
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import loadgen, procstat, wrk
from bench.run import DEFAULT_CONFIG, DEFAULT_OUT, BenchError, choose_cores, clean_env, pinned, start, stop

SIDECAR_READY = r"proxy on http://[\d.]+:(\d+), metrics on http://[\d.]+:(\d+)/metrics"


def frame_label(frame: str) -> str:
    """``func (path/file.py:12)`` as ``path/file.py:func``, site-packages prefixes dropped."""
    func, _, where = frame.rpartition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{func or frame}"


def module_of(label: str) -> str:
    """The package or module a frame label belongs to (``sidecar/proxy.py``, ``aiohttp``...)."""
    path = label.rsplit(":", 1)[0]
    if path.startswith("sidecar/"):
        return path
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if head else path


# Where a sample's time belongs: the first pattern found walking its stack from the leaf up.
AREAS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("sidecar/ledger/",), "ledger sink"),
    (("sidecar/calllog.py",), "call log sink"),
    (("sidecar/tracing.py", "opentelemetry/"), "tracing sink"),
    (("sidecar/metrics.py", "prometheus_client/"), "metrics sink"),
    (
        ("sidecar/rules/", "sidecar/alerting.py", "sidecar/notify.py", "sidecar/incidents.py"),
        "rules, alerting",
    ),
    (("sidecar/tokens.py", "tiktoken"), "token estimation"),
    (("sidecar/pipeline.py", "sidecar/pricing.py", "sidecar/sinks.py"), "pipeline, pricing, sink queues"),
    (("sidecar/providers/", "sidecar/sse.py"), "usage extraction (JSON/SSE parsing)"),
    (("sidecar/upstream_client.py",), "upstream client (the upstream call)"),
    (("sidecar/http_server.py",), "HTTP server (request parsing, response writing)"),
    (("sidecar/",), "proxy handler (other sidecar code)"),
    (("aiohttp/client", "aiohttp/connector"), "aiohttp client (the upstream call)"),
    (("aiohttp/", "multidict", "yarl"), "aiohttp (admin listener, headers)"),
)


def area_of(frames: Sequence[str]) -> str:
    """The area of one sampled stack (labels root first), see :data:`AREAS`."""
    for label in reversed(frames):
        for patterns, area in AREAS:
            if label.startswith(patterns):
                return area
    return "event loop, threads, other"


def collapsed_report(text: str, top: int) -> tuple[str, dict[str, list[tuple[str, float]]]]:
    """Self, inclusive and per-module shares of py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_label(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        modules[module_of(frames[-1])] += count
        areas[area_of(frames)] += count
        for label in set(frames):
            incl_counts[label] += count
    shares = {
        "area": [(k, v / total) for k, v in areas.most_common()],
        "self": [(k, v / total) for k, v in self_counts.most_common(top)],
        "inclusive": [
            (k, v / total)
            for k, v in incl_counts.most_common(top * 4)
            if not k.startswith(
                ("asyncio/", "<frozen", "threading.py", "runpy", "sidecar/cli.py", "sidecar/__main__")
            )
        ][:top],
        "module": [(k, v / total) for k, v in modules.most_common(top)],
    }
    lines = [f"{total} busy samples"]
    for kind, rows in shares.items():
        lines.append(f"  by {kind}:")
        lines += [f"    {share:6.1%}  {label}" for label, share in rows]
    return "\n".join(lines), shares


_PYSPY_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "(.*)"', re.MULTILINE)


def python_thread_names(pyspy: str | None, pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from ``py-spy dump`` ({} without py-spy)."""
    if pyspy is None or not Path(pyspy).exists():
        return {}
    try:
        out = subprocess.run(
            [pyspy, "dump", "--pid", str(pid), "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(tid): name for tid, name in _PYSPY_THREAD.findall(out.stdout)}


def thread_report(
    before: dict[int, float], after: dict[int, float], names: dict[int, str], pid: int, requests: float
) -> str:
    """CPU time per request of each thread over the load run, busiest first (from /proc).

    Unlike sampled stacks, this counts only CPU: a thread waiting in a system call (the
    ledger's fsync) costs nothing here.
    """
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(used.values()) or 1.0
    rows = sorted(((cpu, tid) for tid, cpu in used.items() if cpu > 0), reverse=True)
    lines = ["CPU by thread (/proc, over the load run):"]
    for cpu, tid in rows:
        name = names.get(tid) or procstat.thread_name(pid, tid)
        lines.append(f"  {cpu / max(1.0, requests) * 1e6:8.0f} us/req  {cpu / total:6.1%}  {name}")
    return "\n".join(lines)


def pstats_report(path: Path, top: int) -> str:
    """Top functions by own time from a cProfile file, as shares of the profiled time."""
    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    lines = [f"cProfile, main thread, {total:.2f} s of own time"]
    for (file, _line, func), (_cc, calls, tottime, cumtime, _callers) in rows[:top]:
        short = file.split("site-packages/")[-1].split("python3.11/")[-1]
        lines.append(f"  {tottime / total:6.1%} self  {cumtime:7.2f} s cum  {calls:>9} calls  {short}:{func}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.profile``."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="json,stream")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per shape (max 120)")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--profiler", choices=["auto", "py-spy", "cprofile", "none"], default="auto")
    parser.add_argument(
        "--tracing", action="store_true", help="tracing on, 100 %% sampled, to a local span receiver"
    )
    parser.add_argument(
        "--py-spy-args",
        default="--nonblocking",
        help="extra py-spy record flags (default: --nonblocking; e.g. '--native' to see C frames, "
        "'--gil' for the GIL holder only; --native pauses the process on each sample)",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    duration = max(1.0, min(args.duration, 120.0))
    pyspy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy"))
    use_pyspy = args.profiler == "py-spy" or (args.profiler == "auto" and Path(pyspy).exists())
    use_cprofile = args.profiler == "cprofile" or (args.profiler == "auto" and not use_pyspy)
    if args.profiler == "py-spy" and not Path(pyspy).exists():
        parser.error("py-spy not found (pip install py-spy)")
    tool = "wrk" if wrk.wrk_version() else "python"
    cores = choose_cores()
    workdir = Path(tempfile.mkdtemp(prefix="llm-sidecar-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    started = []
    try:
        upstream, _ = start(
            "upstream", [py, "-m", "bench.upstream"], cores.load, r"upstream on http://[\d.]+:(\d+)", workdir
        )
        started.append(upstream)
        tracing_env: dict[str, str] = {}
        if args.tracing:
            receiver, _ = start(
                "spans", [py, "-m", "bench.spans"], cores.load, r"spans on http://[\d.]+:(\d+)", workdir
            )
            started.append(receiver)
            tracing_env = {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
                "OTEL_TRACES_SAMPLER": "always_on",
                "OTEL_BSP_SCHEDULE_DELAY": "500",
            }
        for shape in [s for s in args.shapes.split(",") if s in ("json", "stream")]:
            prof = workdir / f"sidecar-{shape}.prof"
            cmd = [py, "-m", "sidecar", "run", "--config", str(args.config.resolve())]
            cmd += [
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(workdir / "data"),
            ]
            if use_cprofile:
                cmd[1:1] = ["-m", "cProfile", "-o", str(prof)]
            env = clean_env(BENCH_UPSTREAM_URL=f"http://127.0.0.1:{upstream.port}", **tracing_env)
            sidecar, _ = start(f"sidecar-{shape}", cmd, cores.target, SIDECAR_READY, workdir, env)
            started.append(sidecar)
            loadgen.probe({"s": ("127.0.0.1", sidecar.port)}, shape == "stream", 200)  # warm up
            sampler = None
            raw = args.out / f"profile-{shape}.collapsed.txt"
            if use_pyspy:
                spy = [pyspy, "record", "--pid", str(sidecar.popen.pid), "--format", "raw", "--function"]
                spy += [
                    "--rate",
                    "250",
                    *args.py_spy_args.split(),
                    "--duration",
                    f"{round(duration)}",
                    "-o",
                    str(raw),
                ]
                sampler = subprocess.Popen(
                    pinned(spy, cores.load), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                time.sleep(0.5)
            load = wrk.command(
                tool, "127.0.0.1", sidecar.port, shape == "stream", args.concurrency, duration, workdir
            )
            pid = sidecar.popen.pid
            cpu0, threads0 = procstat.cpu_seconds(pid), procstat.thread_cpu_seconds(pid)
            out = subprocess.run(
                pinned(load, cores.load), capture_output=True, text=True, timeout=duration + 60, check=False
            )
            cpu, threads1 = procstat.cpu_seconds(pid) - cpu0, procstat.thread_cpu_seconds(pid)
            figures = wrk.parse(out.stdout + out.stderr)
            rps = figures["requests"] / (figures["duration_us"] / 1e6)
            per_req = cpu / max(1.0, figures["requests"]) * 1e6
            if sampler is not None:
                sampler.wait(timeout=duration + 60)
            names = python_thread_names(pyspy, pid)
            stop(sidecar)
            started.remove(sidecar)
            under = "under the profiler" if args.profiler != "none" else "not profiled"
            print(
                f"\n== {shape}, c={args.concurrency}: {rps:.0f} req/s {under} ({tool}); "
                f"sidecar CPU {per_req:.0f} us/req ({figures['requests']:.0f} requests)"
            )
            print(thread_report(threads0, threads1, names, pid, figures["requests"]))
            if use_pyspy:
                text, _ = collapsed_report(raw.read_text(), args.top)
                print(f"py-spy, every thread; collapsed stacks in {raw}\n{text}")
            elif not use_cprofile:
                pass
            elif prof.exists():
                kept = args.out / f"profile-{shape}.prof"
                shutil.copyfile(prof, kept)
                print(f"pstats file in {kept}\n{pstats_report(prof, args.top)}")
            else:
                print("no profile was written (the sidecar did not exit cleanly)")
    except BenchError as exc:
        print(f"profile failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for target in reversed(started):
            stop(target)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
