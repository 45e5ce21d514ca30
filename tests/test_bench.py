"""The benchmark harness runs end to end (tiny durations) and writes its figures.

No performance is asserted: the benchmark is not a test. This proves that ``make bench``
starts every target, drives it, measures it and writes ``latest.json`` and ``latest.png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import loadgen, wrk

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.run", "--loadgen", "python", "--out", str(tmp_path)]
    cmd += ["--targets", "direct,floor,sidecar", "--duration", "0.3", "--rounds", "1", "--rounds-c32", "2"]
    cmd += ["--concurrency", "2,32", "--pair-rounds", "2"]
    cmd += ["--streams", "8", "--hold-ms", "300", "--probe-count", "10", "--warmup", "5", "--settle", "0"]
    cmd += ["--skip-rule-engine"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    assert "req/s" in done.stdout and "headline" in done.stdout
    results = json.loads((tmp_path / "latest.json").read_text())
    cells = {(c["target"], c["shape"], c["concurrency"]) for c in results["cells"]}
    every = {(t, s) for t in ("direct", "floor", "sidecar") for s in ("json", "stream")}
    assert cells == {(t, s, c) for t, s in every for c in (2, 32)}
    # The headline cells (c=32) get their extra round; the others run --rounds times.
    rounds = {(r["target"], r["shape"], r["concurrency"]): len(r["runs"]) for r in results["rounds_raw"]}
    assert rounds == {(t, s, c): 2 if c == 32 else 1 for t, s in every for c in (2, 32)}
    assert results["settings"]["rounds_c32"] == 2
    assert all(len(p["ratios"]) == 2 for p in results["paired_c32"].values())
    # The floor and the sidecar loaded at once, twice per shape: both served, the ratio from both.
    pairs = results["simultaneous_c32"]
    assert set(pairs) == {"sidecar json", "sidecar stream"}
    for key, rounds in pairs.items():
        assert len(rounds) == 2
        for r in rounds:
            assert r["floor"]["requests"] > 0 and r["target"]["requests"] > 0, key
            assert r["floor"]["errors"] == 0 and r["target"]["errors"] == 0, key
        summary = results["simultaneous_summary"][key]
        expected = [r["target"]["cpu_us_per_req"] / r["floor"]["cpu_us_per_req"] for r in rounds]
        assert summary["cpu_ratios"] == expected
    assert "loaded at once" in done.stdout
    assert all(c["requests"] > 0 and c["errors"] == 0 and c["dropped"] == 0 for c in results["cells"])
    assert "records_dropped" in {c["check"] for c in results["checks"] if c["target"] == "sidecar"}
    assert results["memory"]["sidecar"]["streams_held"] == 8
    assert results["features"]["sidecar"]["metrics"] is True
    assert (tmp_path / "latest.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_response_parser_at_every_seam() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"
    sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc"
    wire = chunked + sized
    parser = loadgen.ResponseParser()
    statuses = [s for i in range(len(wire)) for s in parser.feed(wire[i : i + 1])]
    assert statuses == [200, 404]
    assert not parser.buf


def test_wrk_script_escapes_request_bytes() -> None:
    script = wrk.lua_script([b'POST / HTTP/1.1\r\nX: "a\\b"\r\n\r\n'])
    assert '"POST / HTTP/1.1\\013\\010X: \\034a\\092b\\034\\013\\010\\013\\010"' in script


def test_paired_ratios_compare_each_round_with_the_floors_same_round() -> None:
    from bench.run import paired_ratios

    def cell(target: str, shape: str, rps: list[float], concurrency: int = 32) -> dict[str, object]:
        return {
            "target": target,
            "shape": shape,
            "concurrency": concurrency,
            "runs": [{"rps": r} for r in rps],
        }

    rounds_raw = [
        cell("direct", "stream", [5000, 5000, 5000]),
        cell("floor", "stream", [2000, 1000, 1500]),
        cell("sidecar", "stream", [1800, 1300, 1500]),
        cell("sidecar", "stream", [9, 9, 9], concurrency=1),  # another concurrency: not paired
        cell("sidecar", "json", [100]),  # no floor for this shape: left out
    ]
    paired = paired_ratios(rounds_raw, 32)
    assert list(paired) == ["sidecar stream"]
    assert paired["sidecar stream"]["ratios"] == pytest.approx([0.9, 1.3, 1.0])
    assert paired["sidecar stream"]["median"] == pytest.approx(1.0)
    # The ratio of the two best rounds would say 0.9: the best rounds are not the same round.


def test_dropped_records_are_read_from_the_sinks_counters() -> None:
    from bench.run import dropped_in

    exposition = "\n".join(
        [
            "# HELP llm_sink_dropped_total Records a sink refused",
            "# TYPE llm_sink_dropped_total counter",
            'llm_sink_dropped_total{sink="metrics"} 12.0',
            'llm_sink_dropped_total{sink="calllog"} 3.0',
            'llm_sink_dropped_created{sink="metrics"} 1.7e+09',
            "llm_ledger_lost_total 2.0",
            "llm_ledger_spilled_total 40.0",
            'llm_requests_total{tenant="a"} 99.0',
        ]
    )
    assert dropped_in(exposition) == 17.0  # spilled to the journal is not lost
    assert dropped_in("") == 0.0


def test_instructions_per_request_is_the_difference_of_two_runs_over_n() -> None:
    from bench.instructions import Count, collected

    stderr = "==1== Events    : Ir\n==1== Collected : 3244378049\n==1==\n==1== I   refs:      3,244,378,049\n"
    assert collected(stderr) == 3_244_378_049
    with pytest.raises(RuntimeError, match="no instruction count"):
        collected("valgrind: command not found")
    # Start-up, warm-up and shutdown are in both totals and cancel out.
    assert Count(requests=100, first=3_244_378_049, second=3_399_307_784).per_request == 1_549_297.35


def test_the_rule_engine_figures_count_the_work_of_a_tick() -> None:
    """Ring reads depend on the series (tenants x rules), not on the calls; the buckets a
    tick sums are at most 60 per read; the counting wrapper is removed afterwards."""
    from bench import rules_engine
    from sidecar.rules.windows import Ring

    totals = Ring.totals
    figures = rules_engine.measure(cases=((2, 300), (2, 1200), (4, 300)))
    assert figures["available"] and Ring.totals is totals
    few, more, wider = figures["cases"]
    assert few["ring_reads_per_tick"] == more["ring_reads_per_tick"] > 0
    assert wider["ring_reads_per_tick"] > few["ring_reads_per_tick"]
    for case in figures["cases"]:
        assert 0 < case["buckets_per_tick"] <= 60 * case["ring_reads_per_tick"]
    assert more["buckets_per_tick"] >= few["buckets_per_tick"]
    assert "ring reads" in rules_engine.table(figures)


def test_feature_variants_switch_off_what_they_name(tmp_path: Path) -> None:
    from bench.features import VARIANTS, variant_text
    from sidecar.calllog import LogSettings
    from sidecar.config import load_file
    from sidecar.ledger import LedgerSettings

    source = ROOT / "bench" / "sidecar.yaml"
    env = {"BENCH_UPSTREAM_URL": "http://127.0.0.1:9"}
    seen: dict[str, tuple[bool, bool, int]] = {}
    for name, _, sections in VARIANTS:
        path = tmp_path / f"{name}.yaml"  # elsewhere than the source: its rule paths must still resolve
        path.write_text(variant_text(source, sections))
        config = load_file(path, env=env)
        logs = config.logs or LogSettings()  # an absent section: its defaults
        ledger = config.ledger or LedgerSettings()
        assert config.rules is not None
        assert [u.name for u in config.upstreams] == ["openai", "anthropic"]
        assert all(f.is_absolute() and f.exists() for f in config.rules.files)
        seen[name] = (logs.enabled, ledger.enabled, len(config.rules.files))
    assert seen["full"] == (True, True, 1)
    assert seen["no-calllog"] == (False, True, 1)
    assert seen["no-ledger"] == (True, False, 1)
    assert seen["no-rules"] == (True, True, 0)
    assert seen["bare"] == (False, False, 0)


def test_feature_costs_are_paired_round_by_round() -> None:
    from bench.features import paired_costs

    cpu = {"full": [400.0, 800.0, 420.0], "no-ledger": [380.0, 700.0, 410.0], "floor": [300.0, 500.0, 340.0]}
    costs = paired_costs(cpu)
    assert set(costs) == {"no-ledger", "floor"}
    assert (costs["no-ledger"].median_us, costs["no-ledger"].low_us, costs["no-ledger"].high_us) == (
        20,
        10,
        100,
    )
    # The difference of the medians would say 420 - 410 = 10: the slow round is one round for both.
    assert costs["floor"].median_us == 100


def test_sinks_bench_counts_every_record_and_the_threads_that_handle_it() -> None:
    cmd = [
        sys.executable,
        "-m",
        "bench.sinks",
        "--records",
        "1000",
        "--rounds",
        "1",
        "--variants",
        "full,bare",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert set(rows) == {"full", "bare"}
    full, bare = ([float(x) for x in rows[name]] for name in ("full", "bare"))
    # Columns: loop, ledger, rules, calllog, other, all, all - bare. The bare variant runs no
    # ledger writer and no rule engine, so its threads show none of their time.
    assert bare[1] == bare[2] == 0.0 and bare[6] == 0.0
    assert full[5] > bare[5] > 0.0


def _floor_pids() -> set[int]:
    """Processes running ``python -m bench.floor`` (from /proc)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bench.floor" in argv:
            pids.add(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_a_target_that_fails_to_start_leaves_none_of_the_others_running(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: sidecar/v1\nupstreams: []\n")  # the sidecar refuses it and exits
    before = _floor_pids()
    cmd = [sys.executable, "-m", "bench.run", "--loadgen", "python", "--out", str(tmp_path)]
    cmd += ["--targets", "floor,sidecar", "--config", str(bad), "--skip-rule-engine"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sidecar exited" in done.stderr
    assert _floor_pids() - before == set()  # the floor started first, and was stopped


def test_core_times_split_the_busy_time_no_process_is_charged_for(tmp_path: Path) -> None:
    from bench.procstat import core_times

    # user nice system idle iowait irq softirq steal guest guest_nice
    before = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 50 800 10 5 20 15 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\n"
    after = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 400 0 150 1000 20 10 90 115 0 0\ncpu1 2 0 2 2 0 0 0 0 0 0\n"
    (tmp_path / "a").write_text(before)
    (tmp_path / "b").write_text(after)
    a, b = core_times(str(tmp_path / "a"))[0], core_times(str(tmp_path / "b"))[0]
    # 785 ticks passed: 210 idle or iowait, 300 user, 100 system, 75 irq + softirq, 100 steal.
    assert b.total - a.total == 785
    assert b.busy_share(a) == (300 + 100 + 75 + 100) / 785
    assert b.softirq_share(a) == 75 / 785
    assert b.steal_share(a) == 100 / 785


def test_simultaneous_summary_divides_the_target_by_the_floor_of_the_same_run() -> None:
    from bench.run import simultaneous_summary

    def run(cpu: float, requests: float = 1000.0, dropped: float = 0.0) -> dict[str, float]:
        return {"cpu_us_per_req": cpu, "requests": requests, "errors": 0.0, "dropped": dropped}

    pairs = {
        "sidecar stream": [
            {"floor": run(400.0), "target": run(460.0)},
            {"floor": run(200.0), "target": run(240.0, dropped=2.0)},  # a fast moment: both faster
            {"floor": run(300.0), "target": run(330.0)},
            {"floor": run(300.0), "target": run(300.0, requests=0.0)},  # the target served nothing
        ]
    }
    summary = simultaneous_summary(pairs)["sidecar stream"]
    assert summary["cpu_ratios"] == [460 / 400, 240 / 200, 330 / 300]
    assert summary["cpu_ratio_median"] == 460 / 400
    assert summary["throughput_vs_floor"] == pytest.approx(400 / 460)
    assert summary["dropped"] == 2.0


def test_simultaneous_feature_report_gives_each_targets_ratio_to_full() -> None:
    from bench.features import simultaneous_report

    ratios = {"stream": {"floor": [0.84, 0.93, 0.89], "no-ledger": [0.92, 0.97, 0.94], "bare": []}}
    text = simultaneous_report(ratios, {"full": 0.0, "no-ledger": 3.0}, 32, 3)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split()}
    assert rows["floor"][1:5] == ["0.89", "0.84", "to", "0.93"]
    assert rows["no-ledger"][1:6] == ["0.94", "0.92", "to", "0.97", "6%"]
    assert "bare" not in rows  # no rounds: no row rather than a made-up figure
    assert "records dropped by the sinks: {'no-ledger': 3.0}" in text


def test_load_pair_gives_each_targets_figures_whichever_starts_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import run as bench_run

    started: list[list[str]] = []

    def fake_load_runs(
        settings: object, cores: object, targets: list[Any], *rest: object
    ) -> list[dict[str, float]]:
        started.append([t.name for t in targets])
        return [{"cpu_us_per_req": 100.0 if t.name == "floor" else 110.0} for t in targets]

    monkeypatch.setattr(bench_run, "load_runs", fake_load_runs)
    floor, sidecar = SimpleNamespace(name="floor"), SimpleNamespace(name="sidecar")
    settings: Any = None
    cores: Any = None
    pair: tuple[Any, Any] = (floor, sidecar)
    for swap in (False, True):
        first, second = bench_run.load_pair(settings, cores, *pair, [], True, 32, Path("."), swap=swap)
        assert (first["cpu_us_per_req"], second["cpu_us_per_req"]) == (100.0, 110.0)
    assert started == [["floor", "sidecar"], ["sidecar", "floor"]]
