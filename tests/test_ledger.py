"""The usage ledger: rows, batching, the journal when the database cannot take rows, replay
exactly once, retention, the lock, totals. Real SQLite files in a temporary directory."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from sidecar.errors import ConfigError
from sidecar.ledger import (
    COLUMNS,
    Journal,
    Ledger,
    LedgerLockedError,
    LedgerSettings,
    parse_ledger,
    row_to_record,
    to_row,
)
from sidecar.model import CallRecord, Usage
from sidecar.yamlspec import Reader
from tests.harness import make_config, running_sidecar

DAY = 86400.0
BASE = CallRecord(
    request_id="req",
    started_at=1735689600.25,
    finished_at=1735689601.5,
    tenant="acme",
    upstream="openai",
    provider="openai",
    operation="chat",
    method="POST",
    path="/v1/chat/completions",
    stream=True,
    status=200,
    error_type=None,
    request_model="gpt-4o",
    response_model="gpt-4o-2024-08-06",
    duration_s=1.25,
    ttft_s=0.5,
    usage=Usage(input=100, cached_input=40, cache_write=10, cache_write_1h=4, output=20),
    estimated=Usage(reasoning=3),
    cost_usd=Decimal("0.000123456789"),
    price_model="gpt-4o",
    price_version="v1hash",
    service_tier="default",
    trace_id="0af7651916cd43dd8448eb211c80319c",
    span_id="b7ad6b7169203331",
)
FAST = LedgerSettings(flush_interval=0.02)


def rec(i: int = 0, **changes: object) -> CallRecord:
    return dataclasses.replace(BASE, request_id=f"req-{i}", **changes)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


def rows(data_dir: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(data_dir / "ledger.sqlite3")
    try:
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM calls ORDER BY id")
        return [dict(zip(COLUMNS, row, strict=True)) for row in cursor]
    finally:
        conn.close()


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


# -- the row ---------------------------------------------------------------------------------


def test_row_of_a_record() -> None:
    row = to_row(BASE, "c-1")
    assert list(row) == list(COLUMNS)
    assert row == {
        "call_id": "c-1",
        "time": "2025-01-01T00:00:00.250Z",
        "epoch": 1735689600.25,
        "request_id": "req",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "tenant": "acme",
        "upstream": "openai",
        "provider": "openai",
        "operation": "chat",
        "model": "gpt-4o-2024-08-06",
        "request_model": "gpt-4o",
        "response_model": "gpt-4o-2024-08-06",
        "stream": 1,
        "status": 200,
        "error_type": None,
        "input_tokens": 100,
        "input_tokens_source": "reported",
        "cached_input_tokens": 40,
        "cached_input_tokens_source": "reported",
        "cache_write_tokens": 10,
        "cache_write_tokens_source": "reported",
        "cache_write_1h_tokens": 4,
        "output_tokens": 20,
        "output_tokens_source": "reported",
        "reasoning_tokens": 3,
        "reasoning_tokens_source": "estimated",
        "estimated_tokens": 0,
        "cost_usd": "0.000123456789",
        "price_model": "gpt-4o",
        "price_version": "v1hash",
        "service_tier": "default",
        "duration_s": 1.25,
        "ttft_s": 0.5,
        "route": None,
        "variant": None,
    }
    estimated = to_row(rec(usage=Usage(), estimated=Usage(input=7, output=5), cost_usd=Decimal("1E-7")), "c")
    assert (estimated["estimated_tokens"], estimated["input_tokens_source"]) == (12, "estimated")
    assert estimated["cost_usd"] == "0.0000001"  # never scientific notation
    assert to_row(rec(cost_usd=None), "c")["cost_usd"] is None


def test_record_round_trip() -> None:
    back = row_to_record(to_row(BASE, "c"))
    assert back.token_counts() == BASE.token_counts()
    assert (back.cost_usd, back.model, back.tenant, back.ttft_s) == (BASE.cost_usd, BASE.model, "acme", 0.5)
    assert back.usage.cache_write_1h == 4


# -- writing ---------------------------------------------------------------------------------


async def test_rows_are_written_in_batches(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    ledger = Ledger(LedgerSettings(batch_size=100, flush_interval=0.05), tmp_path, registry=registry)
    await ledger.start()
    for i in range(1000):
        assert ledger.offer(rec(i)) is True
    assert await ledger.flush()
    status = ledger.status()
    assert status.healthy and status.reason == "ok"
    assert (status.rows_written, status.spilled, status.backlog) == (1000, 0, 0)
    assert status.batches_written <= 15, status.batches_written  # ~100 rows per transaction
    await ledger.stop(5.0)
    written = rows(tmp_path)
    assert [r["request_id"] for r in written] == [f"req-{i}" for i in range(1000)]
    assert written[0] == {**to_row(rec(0), str(written[0]["call_id"]))}
    assert len({r["call_id"] for r in written}) == 1000
    conn = sqlite3.connect(tmp_path / "ledger.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert registry.get_sample_value("llm_ledger_rows_written_total") == 1000
    assert registry.get_sample_value("llm_ledger_healthy") == 0  # stopped
    assert not (tmp_path / "ledger.journal").exists()


async def test_full_queue_spills_to_the_journal_and_loses_nothing(tmp_path: Path) -> None:
    ledger = Ledger(LedgerSettings(queue_size=20, batch_size=20, flush_interval=0.01), tmp_path)
    await ledger.start()
    for i in range(2000):  # no await between offers: the writer cannot keep the queue short
        ledger.offer(rec(i))
    assert await ledger.flush()
    spilled = ledger.status().spilled
    assert spilled > 0
    await ledger.stop(10.0)  # stop folds the journal into the database
    status = ledger.status()
    assert status.rows_written + status.replayed == 2000
    assert status.replayed == spilled and status.lost == 0
    assert sorted(r["request_id"] for r in rows(tmp_path)) == sorted(f"req-{i}" for i in range(2000))
    assert not await asyncio.to_thread(Journal(tmp_path / "ledger.journal").pending)


async def test_unavailable_database_spills_then_replays_exactly_once(tmp_path: Path) -> None:
    """The database path is a directory (an honest "cannot open", also as root): records go to
    the journal, the ledger says why it is not healthy, and once the path is freed the journal
    is replayed into the database, each row once."""
    blocker = tmp_path / "ledger.sqlite3"
    blocker.mkdir()
    (blocker / "keep").write_text("x")
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    for i in range(300):
        ledger.offer(rec(i))
    assert await ledger.flush()
    status = ledger.status()
    assert not status.healthy and not ledger.healthy()
    assert "database unavailable" in status.reason and "spilling to the journal" in status.reason
    assert (status.spilled, status.rows_written) == (300, 0)
    assert (tmp_path / "ledger.journal").stat().st_size > 0

    await asyncio.to_thread(shutil.rmtree, blocker)
    await wait_until(lambda: ledger.status().replayed == 300)
    for i in range(300, 400):
        ledger.offer(rec(i))
    await ledger.flush()
    await wait_until(lambda: ledger.status().rows_written == 100)
    status = ledger.status()
    assert status.healthy, status.reason
    await ledger.stop(5.0)
    assert sorted(r["request_id"] for r in rows(tmp_path)) == sorted(f"req-{i}" for i in range(400))


async def test_stop_folds_the_journal_in_when_the_database_came_back(tmp_path: Path) -> None:
    """The database works again but the writer's backoff has not reopened it yet when the sidecar
    stops: stop() tries once more, so the spilled rows are in the database, not left for a restart."""
    blocker = tmp_path / "ledger.sqlite3"
    blocker.mkdir()
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    for i in range(120):
        ledger.offer(rec(i))
    assert await ledger.flush()
    assert ledger.status().spilled == 120
    blocker.rmdir()  # back, and stop() at once: well inside the writer's 0.5 s reopen backoff
    await ledger.stop(5.0)
    status = ledger.status()
    assert (status.replayed, status.lost, status.journal_pending) == (120, 0, False)
    assert sorted(r["request_id"] for r in rows(tmp_path)) == sorted(f"req-{i}" for i in range(120))
    assert not await asyncio.to_thread(Journal(tmp_path / "ledger.journal").pending)


async def test_replay_after_restart_and_twice_is_exactly_once(tmp_path: Path) -> None:
    blocker = tmp_path / "ledger.sqlite3"
    blocker.mkdir()
    first = Ledger(FAST, tmp_path)
    await first.start()
    for i in range(250):
        first.offer(rec(i))
    await first.stop(5.0)  # the database never opened: everything is in the journal
    journal = tmp_path / "ledger.journal"
    assert len(journal.read_text().splitlines()) == 250
    saved = journal.read_bytes()
    blocker.rmdir()

    second = Ledger(FAST, tmp_path)
    await second.start()  # replays on start
    await wait_until(lambda: second.status().replayed == 250)
    await second.stop(5.0)
    assert len(rows(tmp_path)) == 250 and not journal.exists()

    # A crash after the commit and before the journal was deleted: the same lines come back.
    journal.write_bytes(saved)
    third = Ledger(FAST, tmp_path)
    await third.start()
    await wait_until(lambda: third.status().replay_duplicates == 250)
    await third.stop(5.0)
    assert third.status().replayed == 0
    assert len(rows(tmp_path)) == 250


async def test_torn_journal_line_is_skipped_and_not_glued(tmp_path: Path) -> None:
    blocker = tmp_path / "ledger.sqlite3"
    blocker.mkdir()
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    ledger.offer(rec(1))
    await ledger.flush()
    await ledger.stop(5.0)
    journal = tmp_path / "ledger.journal"
    with journal.open("a") as file:
        file.write('{"v":1,"row":{"call_id":"torn","ep')  # a kill in the middle of a write
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    ledger.offer(rec(2))
    await ledger.flush()
    await ledger.stop(5.0)
    lines = journal.read_text().splitlines()
    assert len(lines) == 3 and lines[1].endswith('"ep')  # the new line did not glue onto the torn one
    blocker.rmdir()
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    await wait_until(lambda: ledger.status().replayed == 2)
    await ledger.stop(5.0)
    assert ledger.status().journal_bad_lines == 1
    assert sorted(r["request_id"] for r in rows(tmp_path)) == ["req-1", "req-2"]


async def test_unusable_data_directory_holds_records_until_it_works(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a file where the directory should be")
    ledger = Ledger(FAST, data_dir)
    await ledger.start()
    for i in range(50):
        ledger.offer(rec(i))
    await asyncio.sleep(0.1)
    status = ledger.status()
    assert not status.healthy and "data directory unusable" in status.reason
    assert status.backlog == 50
    await asyncio.to_thread(data_dir.unlink)
    await wait_until(lambda: ledger.status().healthy, timeout=15)
    assert await ledger.flush()
    await ledger.stop(5.0)
    assert len(rows(data_dir)) == 50


async def test_one_sidecar_per_data_directory(tmp_path: Path) -> None:
    first = Ledger(FAST, tmp_path)
    await first.start()
    with pytest.raises(LedgerLockedError):
        await Ledger(FAST, tmp_path).start()
    await first.stop(5.0)
    again = Ledger(FAST, tmp_path)
    await again.start()
    await again.stop(5.0)


async def test_retention_prunes_old_rows(tmp_path: Path) -> None:
    now = BASE.started_at + 100 * DAY
    settings = LedgerSettings(flush_interval=0.02, retention=30 * DAY)
    writer = Ledger(LedgerSettings(flush_interval=0.02), tmp_path, clock=lambda: now)
    await writer.start()
    for i in range(12000):  # more than one prune chunk
        writer.offer(rec(i, started_at=now - 40 * DAY))
    for i in range(12000, 12010):
        writer.offer(rec(i, started_at=now - 10 * DAY))
    await writer.stop(10.0)
    assert len(rows(tmp_path)) == 12010

    ledger = Ledger(settings, tmp_path, clock=lambda: now)
    await ledger.start()
    await wait_until(lambda: ledger.status().pruned == 12000)
    ledger.offer(rec(99999, started_at=now))
    await ledger.stop(5.0)
    kept = rows(tmp_path)
    assert sorted(r["request_id"] for r in kept) == sorted(
        [*(f"req-{i}" for i in range(12000, 12010)), "req-99999"]
    )


async def test_totals_and_recent(tmp_path: Path) -> None:
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    ledger.offer(rec(1, tenant="a", cost_usd=Decimal("0.1")))
    ledger.offer(rec(2, tenant="a", cost_usd=Decimal("0.2"), started_at=BASE.started_at + DAY))
    ledger.offer(rec(3, tenant="b", cost_usd=None, usage=Usage(), estimated=Usage(input=9, output=1)))
    assert await ledger.flush()
    groups, total = await ledger.totals(by=["tenant"])
    assert [(g.keys, g.requests, g.cost_usd) for g in groups] == [
        (("a",), 2, Decimal("0.3")),
        (("b",), 1, Decimal(0)),
    ]
    assert total.requests == 3 and total.unpriced == 1
    assert total.tokens["estimated_tokens"] == 10
    assert total.tokens_by_source[("input", "reported")] == 200
    assert total.tokens_by_source[("input", "estimated")] == 9
    _, day_one = await ledger.totals(BASE.started_at, BASE.started_at + DAY)
    assert day_one.requests == 2  # [from, to): the call exactly at `to` is out
    recent = await ledger.recent(BASE.started_at + 1)
    assert [r.request_id for r in recent] == ["req-2"]
    await ledger.stop(5.0)


async def test_offer_is_instant_while_the_database_is_down(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").mkdir()
    ledger = Ledger(FAST, tmp_path)
    await ledger.start()
    calls = [rec(i) for i in range(1000)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    for call in calls:
        ledger.offer(call)
    assert loop.time() - started < 0.05
    await ledger.stop(5.0)
    assert ledger.status().spilled == 1000


def _parse(text: str) -> LedgerSettings:
    r = Reader("c.yaml")
    node = r.compose(text)
    assert node is not None
    settings = parse_ledger(r, node, "ledger")
    r.raise_for_problems()
    return settings


def test_parse_section() -> None:
    assert _parse("{retention: 400d, queue_size: 500, synchronous: normal}") == LedgerSettings(
        retention=400 * DAY, queue_size=500, synchronous="normal"
    )
    assert _parse("{retention: 0}").retention is None
    with pytest.raises(ConfigError) as info:
        _parse("{retention: 5m, queue_size: 0, synchronous: off, flush_interval: 0s}")
    assert sorted(p.field for p in info.value.problems) == [
        "ledger.flush_interval",
        "ledger.queue_size",
        "ledger.retention",
        "ledger.synchronous",
    ]


def test_route_and_variant_are_kept_and_an_older_ledger_is_migrated(tmp_path: Path) -> None:
    from sidecar.ledger._schema import _TYPES, row_to_record, to_row
    from sidecar.ledger._store import Store

    # A ledger written by schema 1 (no route, variant columns), with one row in it.
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    v1_columns = [c for c in COLUMNS if c not in ("route", "variant")]
    typed = ", ".join(f"{c} {_TYPES.get(c, 'TEXT')}" for c in v1_columns)
    conn.execute(f"CREATE TABLE calls (id INTEGER PRIMARY KEY, {typed})")
    old = to_row(BASE, "old")
    conn.execute(
        f"INSERT INTO calls ({', '.join(v1_columns)}) VALUES ({', '.join('?' for _ in v1_columns)})",
        [old[c] for c in v1_columns],
    )
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()

    store = Store(path)
    try:
        routed = dataclasses.replace(BASE, request_id="new", route="chat", variant="candidate")
        store.insert([to_row(routed, "new")])
        rows = {
            r[0]: r[1:] for r in store.conn.execute("SELECT call_id, route, variant FROM calls").fetchall()
        }
        assert rows == {"old": (None, None), "new": ("chat", "candidate")}
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        store.conn.close()
    back = row_to_record(to_row(routed, "x"))
    assert (back.route, back.variant) == ("chat", "candidate")


def test_request_ids_are_not_indexed_and_a_call_is_found_by_its_request_id_and_time(tmp_path: Path) -> None:
    """Random request ids in an index made every batch rewrite a page per row (the writer's
    cost grew with the table): a ledger written before loses that index, its rows stay, and
    the documented lookup (request id and time) goes through the ``epoch`` index."""
    from sidecar.ledger._schema import DDL, to_row
    from sidecar.ledger._store import Store

    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    for statement in (s for s in DDL if not s.startswith("DROP")):  # the table and calls_epoch
        conn.execute(statement)
    conn.execute("CREATE INDEX calls_request_id ON calls (request_id)")  # as written before
    old = to_row(dataclasses.replace(BASE, request_id="req-old"), "old")
    conn.execute(
        f"INSERT INTO calls ({', '.join(old)}) VALUES ({', '.join('?' for _ in old)})", list(old.values())
    )
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()

    store = Store(path)
    try:
        new = dataclasses.replace(BASE, request_id="req-new", started_at=BASE.started_at + 60)
        assert store.insert([to_row(new, "new")]).new == 1
        indexes = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "calls_request_id" not in indexes and "calls_epoch" in indexes
        lookup = "SELECT call_id FROM calls WHERE epoch BETWEEN ? AND ? AND request_id = ?"
        plan = " ".join(str(r[-1]) for r in store.conn.execute("EXPLAIN QUERY PLAN " + lookup, (0, 0, "")))
        assert "USING INDEX calls_epoch" in plan, plan
        for request_id, started, call_id in (
            ("req-old", BASE.started_at, "old"),
            ("req-new", new.started_at, "new"),
        ):
            found = store.conn.execute(lookup, (started - 1, started + 1, request_id)).fetchall()
            assert found == [(call_id,)]
    finally:
        store.close()


async def test_a_disabled_ledger_writes_nothing_and_does_not_gate_readiness(
    tmp_path: Path, replay_upstream: Any
) -> None:
    data = tmp_path / "data"
    cfg = make_config(
        f"- {{name: openai, url: '{replay_upstream.url}', provider: openai}}",
        "ledger: {enabled: false}\nlogs: {enabled: false}\n",
        tmp=data,
    )
    async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with s.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json=body) as r:
            await r.read()
        await collect.wait_for(1)
        async with s.get(f"http://127.0.0.1:{sc.admin_port}/readyz") as r:
            assert r.status == 200
    assert not (data / "ledger.sqlite3").exists() and not (data / "ledger.journal").exists()


# -- the writer's fast paths: the same text, the same rows, the same reasons --------------------


def test_iso_utc_is_datetimes_text() -> None:
    import random
    from datetime import UTC, datetime

    from sidecar.ledger import iso_utc

    rng = random.Random(7)
    epochs = [rng.uniform(0, 4e9) for _ in range(20_000)]
    epochs += [
        rng.randrange(0, 4 * 10**9) + f for f in (0.0, 0.0005, 0.9995, 0.9999995, 0.0000005, 0.9999994)
    ]
    epochs += [1735689600.25, 0.0, 1e-7, 999999999.9999999]
    for epoch in epochs:
        expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
        assert iso_utc(epoch) == expected.replace("+00:00", "Z"), epoch


def test_decimal_text_is_plain_notation() -> None:
    import random

    from sidecar.ledger import decimal_text

    rng = random.Random(3)
    values = [Decimal(f"{rng.randrange(10**12)}E{rng.randrange(-30, 8)}") for _ in range(5000)]
    values += [-v for v in values[:500]]
    values += [
        Decimal(t) for t in ("0", "-0", "0E-10", "-0.00", "1E+2", "1E-7", "123.4500", "NaN", "Infinity")
    ]
    values += [Decimal(1) / Decimal(3), Decimal("0.000123456789")]
    for value in values:
        assert decimal_text(value) == format(value, "f"), value
        assert "E" not in decimal_text(value)


def test_to_values_is_the_row_in_column_order() -> None:
    from sidecar.ledger._schema import row_values, to_values

    for record in (
        BASE,
        rec(1, usage=Usage(), estimated=Usage(input=7, output=5), cost_usd=None, ttft_s=None),
        rec(2, status=502, error_type="upstream_5xx", route="chat", variant="candidate", stream=False),
    ):
        values = to_values(record, "c")
        assert len(values) == len(COLUMNS)
        assert values == row_values(to_row(record, "c"))
        assert dict(zip(COLUMNS, values, strict=True)) == to_row(record, "c")


def _reference(rows: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
    """What the store must end up with, computed the slow, obvious way: every value checked
    with row_problem, the others inserted one by one binding every value (None too)."""
    from sidecar.ledger._schema import DDL, INSERT, row_problem, row_values

    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in DDL:
        conn.execute(statement)
    rejected: list[tuple[str, str]] = []
    for row in rows:
        problem = row_problem(row)
        if problem is None:
            conn.execute(INSERT, row_values(row))
        else:
            rejected.append((str(row["call_id"]), problem))
    return _typed_rows(conn), rejected


def _typed_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """Every stored row in id order, each value with its SQLite storage class."""
    columns = ", ".join(f"typeof({c}), {c}" for c in ("id", *COLUMNS))
    return conn.execute(f"SELECT {columns} FROM calls ORDER BY id").fetchall()


def _bad_rows(good: dict[str, Any]) -> list[dict[str, Any]]:
    """A row for each way a value can be refused (or merely unusual), in several columns."""
    out: list[dict[str, Any]] = []
    cases: list[tuple[str, object]] = [
        ("input_tokens", 2**63),  # past 64 bits: left to binding on the fast path
        ("estimated_tokens", -(2**63) - 1),
        ("cache_write_1h_tokens", 2**63 - 1),  # fits: stored
        ("status", -(2**63)),  # fits: stored
        ("tenant", "acme-\ud800"),  # not UTF-8: left to binding on the fast path
        ("trace_id", "\udcff"),
        ("model", "gpt-4o-é"),  # fine, not ASCII
        ("epoch", float("nan")),
        ("duration_s", float("inf")),
        ("ttft_s", float("-inf")),
        ("ttft_s", 0.0),
        ("epoch", 1735689600),  # an int epoch is fine (not the fast path)
        ("duration_s", 2**70),  # an int past 64 bits in a REAL column
        ("status", None),  # a required value missing
        ("request_id", None),
        ("stream", True),  # a bool is not an integer
        ("status", 200.0),
        ("tenant", 7),
        ("tenant", ["acme"]),
        ("cost_usd", {"usd": 1}),
        ("service_tier", type("Tier", (str,), {})("scale")),  # a str subclass is text
        ("route", None),
        ("variant", "primary"),
    ]
    for n, (column, value) in enumerate(cases):
        out.append({**good, "call_id": f"bad-{n}-{column}", column: value})
    return out


def test_store_fast_path_stores_and_refuses_exactly_what_the_checks_say(tmp_path: Path) -> None:
    from sidecar.ledger._store import Store

    records = [
        rec(0),
        rec(1, usage=Usage(), estimated=Usage(input=7, output=5), cost_usd=None, ttft_s=None),
        rec(2, status=502, error_type="upstream_5xx", route="chat", variant="candidate", stream=False),
        rec(3, trace_id=None, span_id=None, service_tier=None, price_model=None, request_model=None),
    ]
    good = [to_row(r, f"good-{i}") for i, r in enumerate(records)]
    bad = _bad_rows(good[0])
    # Rows of different shapes interleaved (NULL in different columns), bad ones among them,
    # and a call_id given twice (the second is skipped, as on a replay).
    batch = [good[i % len(good)] | {"call_id": f"g{i}"} for i in range(40)]
    for n, row in enumerate(bad):
        batch.insert(1 + n, row)
    batch.append(batch[0])
    store = Store(tmp_path / "ledger.sqlite3")
    try:
        expected_rows, expected_rejected = _reference(batch)
        assert len(expected_rejected) > 10 and len(expected_rows) > 40  # the cases do both
        done = store.insert(batch)
        assert [tuple(r) for r in done.rejected] == expected_rejected
        assert done.new == len(expected_rows)
        assert _typed_rows(store.conn) == expected_rows
        # One bad row alone in an otherwise clean batch, each kind in turn: the rest is stored.
        for n, row in enumerate(bad):
            chunk = [
                good[1] | {"call_id": f"a{n}"},
                row | {"call_id": f"b{n}"},
                good[2] | {"call_id": f"c{n}"},
            ]
            _, reference_rejected = _reference(chunk)
            done = store.insert(chunk)
            assert [tuple(r) for r in done.rejected] == reference_rejected, row
            assert done.new == 3 - len(reference_rejected)
    finally:
        store.close()


def test_store_with_more_row_shapes_than_statements_kept(tmp_path: Path) -> None:
    from sidecar.ledger._schema import _STATEMENTS_KEPT, _TYPES
    from sidecar.ledger._store import Store

    nullable = [c for c in COLUMNS if "NOT NULL" not in _TYPES.get(c, "")]
    full = to_row(rec(0, route="chat", variant="primary", error_type="x", usage=Usage(1, 2, 3, 4, 5, 6)), "x")
    assert all(full[c] is not None for c in COLUMNS)
    batch = []
    for n in range(3 * _STATEMENTS_KEPT):  # a NULL in one or two columns: a new shape each time
        row = {**full, "call_id": f"s{n}", nullable[n % len(nullable)]: None}
        if n >= len(nullable):
            row[nullable[(n * 7) % len(nullable)]] = None
        batch.append(row)
    store = Store(tmp_path / "ledger.sqlite3")
    try:
        assert store.insert(batch) == (len(batch), ())
        assert _typed_rows(store.conn) == _reference(batch)[0]
    finally:
        store.close()


def test_insert_for_writes_the_nulls_into_the_statement() -> None:
    from sidecar.ledger._schema import INSERT, insert_for, row_values, values_problem

    values = row_values(to_row(BASE, "c"))
    found = insert_for(values)
    assert found is not None
    statement, params = found
    assert statement != INSERT and statement.count("NULL") == values.count(None) + statement.count("NOT NULL")
    assert params == tuple(v for v in values if v is not None)
    # Not the fast path: a row the quick screen cannot vouch for goes to the full check.
    for column, value in (
        ("epoch", 1735689600),
        ("status", True),
        ("ttft_s", float("nan")),
        ("tenant", None),
    ):
        odd = row_values({**to_row(BASE, "c"), column: value})
        assert insert_for(odd) is None, column
    assert values_problem(row_values({**to_row(BASE, "c"), "epoch": 1735689600})) is None


def test_store_paces_between_rows_inside_one_transaction(tmp_path: Path) -> None:
    """The writer thread's pacer runs between two rows of an insert (inside ``executemany``,
    which pulls the rows one at a time) and between two chunks of a prune; the batch is
    still one transaction: a reader sees none of it until the commit."""
    from sidecar.ledger._store import PRUNE_STEP, Store

    path = tmp_path / "ledger.sqlite3"
    seen: list[int] = []  # rows the writer's connection holds at each call of the pacer
    store: Store | None = None

    def pace() -> None:
        assert store is not None
        seen.append(store.conn.execute("SELECT count(*) FROM calls").fetchone()[0])
        reader = sqlite3.connect(path)
        try:
            assert reader.execute("SELECT count(*) FROM calls").fetchone()[0] in (0, 120)
        finally:
            reader.close()

    store = Store(path, pace=pace)
    try:
        rows = [to_row(rec(i, started_at=1000.0 + i), f"p{i}") for i in range(120)]
        assert store.insert(rows).new == 120
        # Called for every row while converting, screening and inserting; during the insert
        # the count grows a row at a time, so the pacer ran between two rows of executemany.
        inserting = seen[2 * 120 :]
        assert inserting[:3] == [0, 1, 2] and inserting[-1] == 119, inserting
        seen.clear()
        assert store.prune(cutoff=1000.0 + 100, limit=1000) == 100
        assert PRUNE_STEP < 100 and seen[:2] == [120, 120 - PRUNE_STEP] and seen[-1] == 20, seen
        assert store.conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 20
    finally:
        store.close()
