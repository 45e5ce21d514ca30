"""``cost report`` and ``cost export`` on a ledger with known rows: exact output in every format."""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar.costreport import add_commands
from sidecar.ledger import COLUMNS, Store, to_row
from sidecar.model import CallRecord, Usage


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


BASE = CallRecord(
    request_id="r",
    started_at=0.0,
    tenant="a",
    upstream="openai",
    provider="openai",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    stream=False,
    status=200,
    error_type=None,
    request_model="gpt-4o",
    response_model=None,
    duration_s=0.5,
    price_version="pv",
)

CALLS = [
    # 23:30 UTC on 31 Jan is already 1 February in Paris.
    dataclasses.replace(
        BASE,
        request_id="r1",
        started_at=at("2025-01-31T23:30:00"),
        usage=Usage(input=1000, cached_input=200, output=100),
        cost_usd=Decimal("0.0025"),
    ),
    dataclasses.replace(
        BASE,
        request_id="r2",
        started_at=at("2025-02-01T10:00:00"),
        usage=Usage(input=500, output=50, reasoning=20),
        cost_usd=Decimal("0.00125"),
    ),
    dataclasses.replace(
        BASE,
        request_id="r3",
        tenant="b",
        upstream="anthropic",
        provider="anthropic",
        operation="messages",
        request_model="claude-haiku-4-5",
        started_at=at("2025-02-01T12:00:00"),
        stream=True,
        usage=Usage(input=300, cached_input=100, cache_write=50, output=30),
        cost_usd=Decimal("0.0000123456789"),
    ),
    # Unpriced and estimated; 23:00 UTC on 28 Feb is 1 March in Paris.
    dataclasses.replace(
        BASE,
        request_id="r4",
        tenant="b",
        upstream="anthropic",
        provider="anthropic",
        operation="messages",
        request_model="claude-haiku-4-5",
        started_at=at("2025-02-28T23:00:00"),
        status=502,
        error_type="connect_error",
        estimated=Usage(input=40, output=10),
    ),
    # Exactly at 1 March 00:00 UTC: outside [.., 2025-03-01). A tenant a spreadsheet would run.
    dataclasses.replace(
        BASE,
        request_id="r5",
        tenant="=HYPERLINK(1)",
        started_at=at("2025-03-01T00:00:00"),
        usage=Usage(input=10, output=1),
        cost_usd=Decimal("0.1000005"),
    ),
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    store = Store(tmp_path / "ledger.sqlite3")
    store.insert([to_row(call, f"c{i}") for i, call in enumerate(CALLS, 1)])
    store.close()
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llm-sidecar")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_csv_by_tenant_model(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "cost", "report", "--data-dir", str(data_dir), "--format", "csv")
    assert (code, err) == (0, "")
    assert out == (
        "tenant,model,requests,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,"
        "reasoning_tokens,estimated_tokens,cost_usd\r\n"
        "'=HYPERLINK(1),gpt-4o,1,10,0,0,1,0,0,0.100001\r\n"
        "a,gpt-4o,2,1500,200,0,150,20,0,0.003750\r\n"
        "b,claude-haiku-4-5,2,340,100,50,40,0,50,0.000012\r\n"
        "TOTAL,,5,1850,300,50,191,20,50,0.103763\r\n"
    )


def test_half_open_range_and_day_in_a_time_zone(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "cost", "report", "--data-dir", str(data_dir), "--format", "csv",
        "--from", "2025-02-01", "--to", "2025-03-01", "--by", "day,tenant", "--tz", "Europe/Paris",
    )  # fmt: skip
    assert code == 0
    # r1 (31 Jan 23:30 UTC) is before --from (UTC); r5 (1 Mar 00:00 UTC) is at --to: both out.
    assert out.splitlines() == [
        "day,tenant,requests,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,"
        "reasoning_tokens,estimated_tokens,cost_usd",
        "2025-02-01,a,1,500,0,0,50,20,0,0.001250",
        "2025-02-01,b,1,300,100,50,30,0,0,0.000012",
        "2025-03-01,b,1,40,0,0,10,0,50,0.000000",
        "TOTAL,,3,840,100,50,90,20,50,0.001262",
    ]


def test_month_grouping_with_offsets(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(
        capsys,
        "cost", "report", "--data-dir", str(data_dir), "--format", "csv", "--by", "month",
        "--from", "2025-02-01T00:30:00+01:00",
    )  # fmt: skip
    assert out.splitlines()[1:] == [  # --from is 23:30 UTC on 31 Jan, r1's start: r1 is in
        "2025-01,1,1000,200,0,100,0,0,0.002500",
        "2025-02,3,840,100,50,90,20,50,0.001262",
        "2025-03,1,10,0,0,1,0,0,0.100001",
        "TOTAL,5,1850,300,50,191,20,50,0.103763",
    ]


def test_json_keeps_full_precision(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "cost", "report", "--data-dir", str(data_dir), "--format", "json", "--by", "tenant",
        "--to", "2025-03-01",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out, parse_float=Decimal)
    assert data["from"] is None and data["to"] == "2025-03-01T00:00:00.000Z"
    assert data["tz"] == "UTC" and data["by"] == ["tenant"]
    assert [row["tenant"] for row in data["rows"]] == ["a", "b"]
    b = data["rows"][1]
    assert b["cost_usd"] == Decimal("0.0000123456789")  # every digit, as a number
    assert b["unpriced_requests"] == 1 and b["estimated_tokens"] == 50
    assert data["total"] == {
        "requests": 4,
        "input_tokens": 1840,
        "cached_input_tokens": 300,
        "cache_write_tokens": 50,
        "output_tokens": 190,
        "reasoning_tokens": 20,
        "estimated_tokens": 50,
        "cost_usd": Decimal("0.0037623456789"),
        "unpriced_requests": 1,
    }
    assert '"cost_usd": 0.0000123456789' in out


def test_table(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(
        capsys, "cost", "report", "--data-dir", str(data_dir), "--by", "provider", "--to", "2025-03-01"
    )
    assert out == (
        "provider   requests  input_tokens  cached_input_tokens  cache_write_tokens  output_tokens"
        "  reasoning_tokens  estimated_tokens  cost_usd\n"
        "---------  --------  ------------  -------------------  ------------------  -------------"
        "  ----------------  ----------------  --------\n"
        "anthropic         2           340                  100                  50             40"
        "                 0                50  0.000012\n"
        "openai            2          1500                  200                   0            150"
        "                20                 0  0.003750\n"
        "---------  --------  ------------  -------------------  ------------------  -------------"
        "  ----------------  ----------------  --------\n"
        "TOTAL             4          1840                  300                  50            190"
        "                20                50  0.003762\n"
    )


def test_export_csv_and_jsonl(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "cost", "export", "--data-dir", str(data_dir), "--format", "csv",
        "--from", "2025-02-01T12:00:00Z", "--to", "2025-02-01T12:00:01Z",
    )  # fmt: skip
    assert code == 0
    lines = out.split("\r\n")
    assert lines[0] == ",".join(COLUMNS)
    assert lines[1] == (
        "c3,2025-02-01T12:00:00.000Z,1738411200.0,r3,,,b,anthropic,anthropic,messages,claude-haiku-4-5,"
        "claude-haiku-4-5,,true,200,,300,reported,100,reported,50,reported,,30,reported,,,0,"
        "0.0000123456789,,pv,,0.5,,,"  # no ttft, route or variant
    )
    assert lines[2:] == [""]
    code, out, _ = run(capsys, "cost", "export", "--data-dir", str(data_dir), "--format", "jsonl")
    records = [json.loads(line, parse_float=Decimal) for line in out.splitlines()]
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3", "r4", "r5"]
    assert list(records[2]) == list(COLUMNS)
    assert records[2]["cost_usd"] == Decimal("0.0000123456789")
    assert records[2]["stream"] is True and records[0]["stream"] is False
    assert records[3]["cost_usd"] is None and records[3]["input_tokens_source"] == "estimated"


def test_errors(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "cost", "report", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 1 and out == "" and "no ledger at" in err
    code, _, err = run(
        capsys, "cost", "report", "--data-dir", str(data_dir), "--from", "2025-02-01", "--to", "2025-01-01"
    )
    assert code == 2 and "--from must be before --to" in err
    for bad in (
        ["--by", "tenant,colour"],
        ["--tz", "Mars/Olympus"],
        ["--from", "yesterday"],
        ["--by", "day,day"],
    ):
        with pytest.raises(SystemExit):
            run(capsys, "cost", "report", "--data-dir", str(data_dir), *bad)
    with pytest.raises(SystemExit):
        run(capsys, "cost", "export", "--data-dir", str(data_dir))  # --format is required


def test_journal_rows_are_mentioned(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (data_dir / "ledger.journal").write_text('{"v":1}\n{"v":1}\n')
    code, _, err = run(capsys, "cost", "report", "--data-dir", str(data_dir))
    assert code == 0 and "2 rows wait in" in err
