"""The rules and incidents subcommands, run through argparse as cli.py wires them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sidecar.incidents import IncidentStore
from sidecar.rules.commands import add_commands, parse_time
from sidecar.rules.incidents import Incident

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "rules"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llm-sidecar")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    status: int = args.func(args)
    return status


def test_shipped_example_rules_pass_rules_check(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 6
    assert run("rules", "check", *map(str, files)) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.startswith("ok: ") and f"in {len(files)} file(s)" in out.out
    # A directory means its YAML files.
    assert run("rules", "check", str(EXAMPLES)) == 0


def test_shipped_examples_cover_every_kind() -> None:
    from sidecar.rules.loader import load_files
    from sidecar.rules.model import KINDS

    rules, problems = load_files([EXAMPLES])
    assert problems == []
    assert {r.kind for r in rules} == set(KINDS)


def test_rules_check_prints_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: sidecar/v1\n"
        "rules:\n"
        "  - {name: a, kind: latency, quantile: 1.5, threshold: 2s, window: 5m}\n"
        "  - {name: b, kind: absence, windw: 5m}\n"
    )
    missing = tmp_path / "missing.yaml"
    assert run("rules", "check", str(bad), str(missing)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{missing}:1:1: cannot read the rule file: No such file or directory",
        f"{bad}:3:40: rules[0].quantile: must be between 0 and 1, exclusive",
        f'{bad}:4:5: rules[1].window: missing required key "window"',
        f'{bad}:4:30: rules[1].windw: unknown key "windw"; did you mean "window"?',
        "4 problem(s) found",
    ]


def test_rules_export_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("rules", "export", "--format", "prometheus", str(EXAMPLES)) == 0
    prom = capsys.readouterr().out
    assert "groups:\n" in prom and "- alert: availability" in prom
    assert run("rules", "export", "--format", "prometheus-operator", "--namespace", "obs", str(EXAMPLES)) == 0
    operator = capsys.readouterr().out
    assert "kind: PrometheusRule" in operator and "namespace: obs" in operator
    assert run("rules", "export", "--alertmanager", "--group-wait", "1m", str(EXAMPLES)) == 0
    am = capsys.readouterr().out
    assert "inhibit_rules:" in am and "group_wait: 1m" in am


def test_rules_export_refuses_invalid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: sidecar/v9\nrules: []\n")
    assert run("rules", "export", str(bad)) == 1
    out = capsys.readouterr()
    assert out.out == "" and "unsupported version" in out.err


def seed(data_dir: Path, now: float) -> None:
    store = IncidentStore(data_dir)
    store.save(
        [
            Incident("a1", "availability", "page", (("tenant", "acme"),), now - 7200, now - 5400, peak=0.02),
            Incident(
                "a2",
                "availability",
                "page",
                (("tenant", "beta"),),
                now - 3600,
                now - 3000,
                acked_at=now - 3500,
                acked_by="ana",
            ),
            Incident("e1", "errors", "ticket", (), now - 600, None, peak=0.1),
            Incident("old", "errors", "ticket", (), now - 30 * 86400, now - 29 * 86400),
        ]
    )


def test_incidents_list_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    now = time.time()
    seed(tmp_path, now)
    assert run("incidents", "list", "--data-dir", str(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "RULE", "SEVERITY", "LABELS", "START", "END", "DURATION", "ACKED"]
    assert [line.split()[0] for line in lines[1:]] == ["e1", "a2", "a1", "old"]  # newest first
    assert "open" in lines[1] and "ana" in lines[2]
    assert run("incidents", "list", "--data-dir", str(tmp_path), "--open", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["e1"] and rows[0]["open"] and rows[0]["end"] is None
    assert run("incidents", "list", "--data-dir", str(tmp_path), "--since", "1d", "--format", "json") == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["e1", "a2", "a1"]


def test_incidents_mttr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    now = time.time()
    seed(tmp_path, now)
    assert run("incidents", "mttr", "--data-dir", str(tmp_path), "--window", "1d") == 0
    out = capsys.readouterr().out.splitlines()
    # a1 took 30m, a2 10m: MTTR 20m; a2 acked after 100 s; e1 open for 10 min.
    assert out[1].split() == ["RESOLVED", "MTTR", "ACKED", "MTTA", "OPEN", "OLDEST", "OPEN"]
    assert out[2].split() == ["2", "20m", "1", "1m40s", "1", "10m"]
    assert (
        run("incidents", "mttr", "--data-dir", str(tmp_path), "--window", "1d", "--by", "rule,severity") == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in out[2:]] == [
        ["availability", "page", "2", "20m"],
        ["errors", "ticket", "0", "-"],
    ]
    assert run("incidents", "mttr", "--data-dir", str(tmp_path), "--by", "tenant") == 2


def test_incidents_commands_need_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("incidents", "list", "--data-dir", str(tmp_path / "none")) == 1
    assert "no incident store" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # reading never creates the directory


def test_parse_time() -> None:
    assert parse_time("2023-11-14T00:00:00Z") == 1_699_920_000
    assert parse_time("2023-11-14T01:00:00+01:00") == 1_699_920_000
    assert parse_time("2023-11-14T00:00:00") == 1_699_920_000  # UTC unless an offset is given
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")
