"""What each default feature costs under load: the sidecar with one feature switched off at a time.

``python -m bench.features`` starts the mock upstream, the floor, and the sidecar five times
over, pinned as ``make bench`` pins them: the default deployment (``full``, from
``bench/sidecar.yaml``), the same without the call log, without the ledger, without the
rules, and with none of the three (``bare``: forwarding, usage extraction, pricing and
metrics only). Each round runs a bounded load against every target in turn (a different
one first each round) and reads the target's CPU time over the run.

A feature's cost is the CPU per request of ``full`` minus that of the variant without it,
taken round by round and then the median: on a shared machine the CPU per request of the
same process moves by up to 2x between rounds, and two targets measured back to back in
the same round move together more than apart. Costs of the three features need not add up
to ``full - bare``: the sinks share the event loop and the interpreter lock.

``--simultaneous``: instead, each round loads every other target together with ``full``, at
once, both on the target core, and reports each one's CPU per request over ``full``'s in the
same run (median and range). Both go through the same moments of the host, so the ratio
holds within a few per cent where the figures of runs made in turn move by tens (see
:func:`bench.run.simultaneous_summary`).

Needs what ``make bench`` needs (wrk, or ``--loadgen python``); loopback only; every load
run bounded in time. Not a test and not in CI.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench import loadgen
from bench import run as bench_run

#: Variants of the config: name, what is switched off, and the sections that do it.
VARIANTS: tuple[tuple[str, str, Mapping[str, Any]], ...] = (
    ("full", "nothing: the default deployment", {}),
    ("no-calllog", "the call log", {"logs": {"enabled": False}}),
    ("no-ledger", "the usage ledger", {"ledger": {"enabled": False}}),
    ("no-rules", "the rules (engine with no rule files)", {"rules": {"files": []}}),
    (
        "bare",
        "call log, ledger and rules",
        {"logs": {"enabled": False}, "ledger": {"enabled": False}, "rules": {"files": []}},
    ),
)


def variant_text(config: Path, sections: Mapping[str, Any]) -> str:
    """The config at ``config`` with ``sections`` laid over its top-level keys (each merged
    into the file's own mapping of that name), rule files made absolute so that the text
    can be written anywhere."""
    data = yaml.safe_load(config.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{config}: not a mapping")
    rules = data.get("rules")
    if isinstance(rules, dict) and isinstance(rules.get("files"), list):
        rules["files"] = [str((config.parent / f).resolve()) for f in rules["files"]]
    for key, overlay in sections.items():
        own = data.get(key)
        data[key] = {**own, **overlay} if isinstance(own, dict) else dict(overlay)
    return yaml.safe_dump(data, sort_keys=False)


@dataclass(frozen=True)
class Cost:
    """The median difference of CPU per request, round by round, and its range."""

    median_us: float
    low_us: float
    high_us: float


def paired_costs(cpu: Mapping[str, Sequence[float]], base: str = "full") -> dict[str, Cost]:
    """For each other target, ``base``'s CPU per request minus its own, in the same round
    (the lists are per round, in round order), as a median and a range."""
    out: dict[str, Cost] = {}
    for name, values in cpu.items():
        if name == base:
            continue
        diffs = [b - v for b, v in zip(cpu[base], values, strict=True)]
        out[name] = Cost(statistics.median(diffs), min(diffs), max(diffs))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.features``."""
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="json,stream", help="json,stream (default both)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients (default 32)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5, max 20)")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds per load run (default 3, max 30)"
    )
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--config", type=Path, default=bench_run.DEFAULT_CONFIG, help="the full config")
    parser.add_argument(
        "--simultaneous", action="store_true", help="load each target at once with full (steadier ratios)"
    )
    args = parser.parse_args(argv)
    settings = bench_run.parse_args(["--loadgen", args.loadgen, "--settle", "0.5", "--skip-rule-engine"])
    settings = replace(
        settings,
        duration=max(0.2, min(args.duration, 30.0)),
        rounds=max(1, min(args.rounds, 20)),
        shapes=tuple(s for s in args.shapes.split(",") if s in ("json", "stream")),
    )
    conc = max(1, min(args.concurrency, 1024))
    cores = bench_run.choose_cores()
    workdir = Path(tempfile.mkdtemp(prefix="llm-sidecar-features-"))
    started: list[bench_run.Target] = []
    say = bench_run.say
    try:
        say(f"pinning: {cores.note}; load generator: {settings.loadgen_label}")
        upstream = bench_run.start_upstream(cores.load, workdir)
        started.append(upstream)
        url = f"http://127.0.0.1:{upstream.port}"
        targets: dict[str, bench_run.Target] = {"floor": bench_run.start_floor(url, cores.target, workdir)}
        started.append(targets["floor"])
        for name, _, sections in VARIANTS:
            path = workdir / f"{name}.yaml"
            path.write_text(variant_text(args.config, sections))
            targets[name] = bench_run.start_sidecar(name, path, url, cores.target, workdir)
            started.append(targets[name])
        addresses = {name: ("127.0.0.1", t.port) for name, t in targets.items()}
        for stream in (False, True):
            for name, res in loadgen.probe(addresses, stream, settings.warmup).items():
                if res.errors:
                    raise bench_run.BenchError(f"{name} failed {res.errors} warm-up requests")

        dropped = dict.fromkeys(targets, 0.0)
        rig = Rig(settings, cores, targets, upstream, conc, workdir)
        if args.simultaneous:
            ratios = simultaneous_rounds(rig, dropped)
            print(simultaneous_report(ratios, dropped, conc, settings.rounds), flush=True)
        else:
            print(rounds_in_turn(rig, dropped), flush=True)
    except bench_run.BenchError as exc:
        say(f"bench.features failed: {exc} (logs in {workdir})")
        return 1
    finally:
        for target in reversed(started):
            bench_run.stop(target)
    shutil.rmtree(workdir, ignore_errors=True)  # kept above when something failed
    return 0


@dataclass(frozen=True)
class Rig:
    """The started targets and what a load run needs."""

    settings: bench_run.Settings
    cores: bench_run.Cores
    targets: Mapping[str, bench_run.Target]
    upstream: bench_run.Target
    concurrency: int
    workdir: Path

    def load(self, target: bench_run.Target, stream: bool) -> dict[str, float]:
        """One bounded load run against ``target`` alone (:func:`bench.run.load_run`)."""
        return bench_run.load_run(
            self.settings, self.cores, target, [self.upstream], stream, self.concurrency, self.workdir
        )

    def load_pair(
        self, first: bench_run.Target, second: bench_run.Target, stream: bool, swap: bool
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Both loaded at once (:func:`bench.run.load_pair`)."""
        return bench_run.load_pair(
            self.settings,
            self.cores,
            first,
            second,
            [self.upstream],
            stream,
            self.concurrency,
            self.workdir,
            swap=swap,
        )


def simultaneous_rounds(rig: Rig, dropped: dict[str, float]) -> dict[str, dict[str, list[float]]]:
    """``--simultaneous``: per shape and target, its CPU per request over ``full``'s, each
    round loading the two at once; records the targets dropped are added to ``dropped``."""
    settings, targets = rig.settings, rig.targets
    ratios: dict[str, dict[str, list[float]]] = {
        s: {n: [] for n in targets if n != "full"} for s in settings.shapes
    }
    for index in range(1, settings.rounds + 1):
        for shape in settings.shapes:
            for name in ratios[shape]:
                # Which load generator starts first alternates, as in bench.run's pairs.
                runs = rig.load_pair(targets["full"], targets[name], shape == "stream", swap=index % 2 == 0)
                for target_name, figures in zip(("full", name), runs, strict=True):
                    if figures["errors"]:
                        raise bench_run.BenchError(f"{target_name}: {figures['errors']:.0f} failed requests")
                    dropped[target_name] += figures["dropped"]
                full, other = runs[0]["cpu_us_per_req"], runs[1]["cpu_us_per_req"]
                if full > 0:
                    ratios[shape][name].append(other / full)
        bench_run.say(f"round {index}/{settings.rounds} done")
    return ratios


def rounds_in_turn(rig: Rig, dropped: dict[str, float]) -> str:
    """Every target loaded alone, in turn, each round: the table of :func:`report`."""
    settings, targets = rig.settings, rig.targets
    cpu: dict[str, dict[str, list[float]]] = {s: {n: [] for n in targets} for s in settings.shapes}
    rps: dict[str, dict[str, list[float]]] = {s: {n: [] for n in targets} for s in settings.shapes}
    for index, order in enumerate(bench_run.rotations(list(targets), settings.rounds), 1):
        for shape in settings.shapes:
            for name in order:
                figures = rig.load(targets[name], shape == "stream")
                if figures["errors"]:
                    raise bench_run.BenchError(f"{name}: {figures['errors']:.0f} failed requests")
                cpu[shape][name].append(figures["cpu_us_per_req"])
                rps[shape][name].append(figures["rps"])
                dropped[name] += figures["dropped"]
        bench_run.say(f"round {index}/{settings.rounds} done")
    return report(cpu, rps, dropped, rig.concurrency, settings.rounds)


def report(
    cpu: Mapping[str, Mapping[str, Sequence[float]]],
    rps: Mapping[str, Mapping[str, Sequence[float]]],
    dropped: Mapping[str, float],
    concurrency: int,
    rounds: int,
) -> str:
    """The table: per shape and target, the best round's req/s, the median CPU per request,
    and what switching features off saves (full minus the variant, round by round)."""
    what = {name: off for name, off, _ in VARIANTS}
    lines: list[str] = []
    for shape, by_target in cpu.items():
        costs = paired_costs(by_target)
        full = statistics.median(by_target["full"])
        lines.append(f"\n{shape}, c={concurrency}, {rounds} rounds: CPU us per request of the target process")
        lines.append(
            f"{'target':11} {'req/s':>7} {'CPU us/req':>10}  {'saves vs full (median, range)':32} off"
        )
        for name, values in by_target.items():
            saved = ""
            if name in costs and name != "floor":
                c = costs[name]
                saved = f"{c.median_us:6.0f} ({c.median_us / full:4.0%})  {c.low_us:5.0f} to {c.high_us:5.0f}"
            elif name == "floor":
                saved = f"{'(full - floor)':>15} {costs['floor'].median_us:6.0f}"
            lines.append(
                f"{name:11} {max(rps[shape][name]):7.0f} {statistics.median(values):10.0f}  {saved:32} "
                f"{what.get(name, 'the bare aiohttp pass-through')}"
            )
    lost = {n: d for n, d in dropped.items() if d}
    lines.append(f"\nrecords dropped by the sinks: {lost or 'none'}")
    return "\n".join(lines)


def simultaneous_report(
    ratios: Mapping[str, Mapping[str, Sequence[float]]],
    dropped: Mapping[str, float],
    concurrency: int,
    rounds: int,
) -> str:
    """The table of ``--simultaneous``: per shape and target, its CPU per request over
    ``full``'s when both were loaded at once (median and range), and what that saves."""
    what = {name: off for name, off, _ in VARIANTS}
    lines: list[str] = []
    for shape, by_target in ratios.items():
        lines.append(
            f"\n{shape}, c={concurrency}, {rounds} rounds, each target loaded at once with full: "
            "its CPU per request over full's"
        )
        lines.append(f"{'target':11} {'x full':>6}  {'range':>12}  {'saves':>6}  off")
        for name, values in by_target.items():
            if not values:
                continue
            median = statistics.median(values)
            spread = f"{min(values):.2f} to {max(values):.2f}"
            saves = f"{1 - median:6.0%}" if name != "floor" else "     -"
            off = what.get(name, "the bare aiohttp pass-through")
            lines.append(f"{name:11} {median:6.2f}  {spread:>12}  {saves}  {off}")
    lost = {n: d for n, d in dropped.items() if d}
    lines.append(f"\nrecords dropped by the sinks: {lost or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
