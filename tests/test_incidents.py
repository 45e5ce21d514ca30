"""Incidents: the pure book (merge gap, finalization, MTTR/MTTA) and the SQLite store."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

from sidecar.incidents import FILENAME, IncidentStore
from sidecar.rules.incidents import Incident, IncidentBook, stats
from sidecar.rules.state import Transition

T0 = 1_699_920_000
LABELS = (("tenant", "acme"), ("model", "gpt-4o"))  # group_by order, not alphabetical


def tr(
    status: str, at: float, since: float | None = None, value: float = 1.0, rule: str = "errors"
) -> Transition:
    return Transition(
        rule=rule,
        kind="error_rate",
        severity="page",
        labels=LABELS,
        status=status,
        at=at,
        since=at if since is None else since,
        value=value,
        peak=value,
        value_text="",
        threshold_text="",
    )


def ids() -> object:
    counter = iter(range(1000))
    return lambda: f"inc{next(counter)}"


def test_firing_opens_resolved_closes_and_a_refire_inside_the_gap_reopens() -> None:
    book = IncidentBook(merge_gap=300, id_factory=ids())  # type: ignore[arg-type]
    opened = book.apply(tr("firing", T0, value=0.2))
    assert opened is not None and (opened.id, opened.start, opened.end, opened.peak) == (
        "inc0",
        T0,
        None,
        0.2,
    )
    assert book.note_value(("errors", "page", LABELS), 0.5) is not None  # a higher peak
    assert book.note_value(("errors", "page", LABELS), 0.3) is None
    closed = book.apply(tr("resolved", T0 + 600, since=T0, value=0.3))
    assert closed is not None and closed.end == T0 + 600 and closed.peak == 0.5
    # Re-fire 300 s after the end: inside the gap (<=), same incident.
    again = book.apply(tr("firing", T0 + 900))
    assert again is not None and (again.id, again.end, again.fires) == ("inc0", None, 2)
    book.apply(tr("resolved", T0 + 1000, since=T0 + 900))
    # 301 s later: a new incident.
    fresh = book.apply(tr("firing", T0 + 1301))
    assert fresh is not None and fresh.id == "inc1"
    assert [i.id for i in book.drain_changes()] == ["inc0", "inc1"]
    assert book.drain_changes() == []


def test_finalized_once_after_the_gap_and_not_again_after_a_seed() -> None:
    book = IncidentBook(merge_gap=60, id_factory=ids())  # type: ignore[arg-type]
    book.apply(tr("firing", T0))
    book.apply(tr("resolved", T0 + 100, since=T0))
    assert book.drain_finalized(T0 + 160) == []
    (final,) = book.drain_finalized(T0 + 161)
    assert final.duration(T0 + 999) == 100
    assert book.drain_finalized(T0 + 500) == []
    # After a restart, old closed incidents are not reported again; recent ones are.
    seeded = IncidentBook(merge_gap=60)
    recent = Incident("r", "errors", "page", LABELS, T0 + 400, T0 + 450)
    seeded.seed([final, recent], T0 + 480)
    assert [i.id for i in seeded.drain_finalized(T0 + 511)] == ["r"]
    assert seeded.drain_changes() == []


def test_ack_prune_and_queries() -> None:
    book = IncidentBook(merge_gap=0, id_factory=ids())  # type: ignore[arg-type]
    book.apply(tr("firing", T0))
    book.apply(tr("firing", T0 + 10, rule="other"))
    book.apply(tr("resolved", T0 + 100, since=T0))
    assert book.ack("inc0", "ana", T0 + 50)
    assert book.ack("inc0", "bob", T0 + 60)  # the first acknowledgement stays
    assert book.get("inc0").acked_by == "ana"  # type: ignore[union-attr]
    assert not book.ack("missing", "ana", T0)
    assert [i.rule for i in book.open_incidents()] == ["other"]
    assert [i.id for i in book.resolved_between(["errors"], T0, T0 + 100)] == ["inc0"]
    assert book.resolved_between(["errors"], T0 + 100, T0 + 200) == []
    book.drain_changes()
    book.prune(T0 + 1000, keep=500)
    assert book.get("inc0") is None and book.get("inc1") is not None


def test_stats_mttr_mtta_and_open_by_age() -> None:
    incidents = [
        Incident("a", "r", "page", (), T0, T0 + 600, acked_at=T0 + 60),
        Incident("b", "r", "page", (), T0 + 1000, T0 + 2800, acked_at=T0 + 1120),
        Incident("c", "r", "page", (), T0 + 3000, None),
        Incident("old", "r", "page", (), T0 - 9000, T0 - 8000),
    ]
    s = stats(incidents, since=T0, until=T0 + 3600)
    assert (s.resolved, s.mttr, s.acked, s.mtta, s.open, s.oldest_open_age) == (2, 1200.0, 2, 90.0, 1, 600.0)
    empty = stats([], since=T0, until=T0 + 1)
    assert (empty.mttr, empty.mtta, empty.oldest_open_age) == (None, None, None)


def test_store_round_trip_keeps_label_order_and_nan_peaks(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path / "data")
    assert not store.exists() and store.list() == []
    a = Incident("a", "errors", "page", LABELS, T0, None, peak=math.nan)
    b = Incident(
        "b", "errors", "ticket", (), T0 + 10, T0 + 70, peak=0.25, acked_at=T0 + 20, acked_by="ana", fires=3
    )
    store.save([a, b])
    assert store.exists() and (tmp_path / "data" / FILENAME).is_file()
    got = {i.id: i for i in store.list()}
    assert got["a"].labels == LABELS and got["a"].is_open and math.isnan(got["a"].peak)
    assert got["b"] == b
    store.save([Incident("a", "errors", "page", LABELS, T0, T0 + 300, peak=1.0)])  # an update
    assert [i.id for i in store.list(open_only=True)] == []
    assert [i.id for i in store.list(since=T0 + 100)] == ["a"]  # b ended before
    assert [i.id for i in store.recent(T0 + 50)] == ["b", "a"]  # newest first


def test_store_ack_and_schema(tmp_path: Path) -> None:
    store = IncidentStore(tmp_path)
    assert not store.ack("a", "ana", T0)
    store.save([Incident("a", "errors", "page", (), T0, None)])
    assert store.ack("a", "ana", T0 + 5)
    assert store.ack("a", "bob", T0 + 9)  # known, already acknowledged: unchanged
    assert not store.ack("zzz", "ana", T0)
    (inc,) = store.list()
    assert (inc.acked_at, inc.acked_by) == (T0 + 5, "ana")
    conn = sqlite3.connect(tmp_path / FILENAME)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
