"""The ledger in a real process: SIGKILL under load, and a file-size limit standing in for a full disk.

Both run the ledger in a child Python process writing to a temporary data directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sidecar.ledger import Journal, Ledger, LedgerSettings
from tests.test_ledger import rec

REPO = Path(__file__).resolve().parents[1]

CHILD_PRELUDE = textwrap.dedent(
    """
    import asyncio, dataclasses, json, sys, time
    from pathlib import Path
    from sidecar.ledger import Ledger, LedgerSettings
    from tests.test_ledger import BASE

    def record(i):
        now = time.time()
        return dataclasses.replace(BASE, request_id=f"req-{i}", started_at=now, finished_at=now)
    """
)

LOAD_CHILD = CHILD_PRELUDE + textwrap.dedent(
    """
    async def main():
        settings = LedgerSettings(queue_size=100, batch_size=100, flush_interval=0.05)
        ledger = Ledger(settings, Path(sys.argv[1]))
        await ledger.start()
        print("ready", flush=True)
        i = 0
        while True:
            for _ in range(150):  # bursts past the queue: some rows go through the journal
                ledger.offer(record(i))
                i += 1
            print(i, time.time(), flush=True)  # every record below i has been offered
            await asyncio.sleep(0.01)

    asyncio.run(main())
    """
)


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _db_ids(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(data_dir / "ledger.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [row[0] for row in conn.execute("SELECT request_id FROM calls")]
    finally:
        conn.close()


def _journal_ids(data_dir: Path) -> tuple[list[str], int]:
    ids: list[str] = []
    bad = 0
    for name in ("ledger.journal", "ledger.journal.replaying"):
        path = data_dir / name
        if path.exists():
            for row in Journal.read(path):
                if row is None:
                    bad += 1
                else:
                    ids.append(str(row["request_id"]))
    return ids, bad


async def test_sigkill_under_load_loses_only_the_last_moments(tmp_path: Path) -> None:
    child = _child(LOAD_CHILD, str(tmp_path))
    assert child.stdout is not None
    assert await asyncio.to_thread(child.stdout.readline) == "ready\n"
    await asyncio.sleep(1.5)
    killed_at = time.time()
    child.send_signal(signal.SIGKILL)
    out, err = await asyncio.to_thread(child.communicate)
    assert child.returncode == -signal.SIGKILL, err

    # The last progress line may be torn by the kill: keep whole ones only.
    progress = [parts for line in out.splitlines() if len(parts := line.split()) == 2]
    offered = {int(count): float(at) for count, at in progress}
    assert max(offered) > 1000, "the child should have offered a good load"

    db_ids = await asyncio.to_thread(_db_ids, tmp_path)  # integrity_check passes
    journal_ids, torn = await asyncio.to_thread(_journal_ids, tmp_path)
    assert torn <= 1  # at most the line being written at the kill
    assert len(db_ids) == len(set(db_ids))  # a row may also sit in a journal not yet replayed
    present = set(db_ids) | set(journal_ids)

    # Everything offered more than a second before the kill is on disk.
    settled = max(count for count, at in offered.items() if at <= killed_at - 1.0)
    missing = [i for i in range(settled) if f"req-{i}" not in present]
    assert missing == [], f"{len(missing)} records offered >1 s before the kill are missing"
    # The measured loss window: how long before the kill the first missing record was offered.
    first_missing = next((i for i in range(max(offered)) if f"req-{i}" not in present), None)
    window = 0.0
    if first_missing is not None:
        offered_at = min(at for count, at in offered.items() if count > first_missing)
        window = killed_at - offered_at
        assert window < 1.0, f"lost records offered {window:.3f}s before the kill"
    lost = sum(1 for i in range(max(offered)) if f"req-{i}" not in present)
    print(
        f"SIGKILL: offered {max(offered)}, in db {len(db_ids)}, in journal {len(journal_ids)}, "
        f"lost {lost}, loss window {window * 1000:.0f} ms"
    )

    # A restart replays the journal and goes on appending.
    ledger = Ledger(LedgerSettings(flush_interval=0.02), tmp_path)
    await ledger.start()
    ledger.offer(rec(10_000_000))
    await ledger.stop(10.0)
    after = await asyncio.to_thread(_db_ids, tmp_path)
    assert len(after) == len(set(after))
    assert set(after) == present | {"req-10000000"}


DISK_FULL_CHILD = CHILD_PRELUDE + textwrap.dedent(
    """
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead

    async def main():
        data_dir = Path(sys.argv[1])
        settings = LedgerSettings(batch_size=50, flush_interval=0.02)
        ledger = Ledger(settings, data_dir)
        await ledger.start()
        # A few rows land while there is room; then the "disk" is full for the database.
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        for i in range(100):
            ledger.offer(record(i))
        await ledger.flush()
        db_size = (data_dir / "ledger.sqlite3").stat().st_size
        wal_size = (data_dir / "ledger.sqlite3-wal").stat().st_size
        # The limit holds the database files where they are, or a little further, and leaves the
        # journal room for the few hundred lines spilled below (it is a file too: at the size of a
        # small database, it would be refused before the database is).
        limit = max(db_size, wal_size, 256 * 1024) + 4096
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        i = 100
        while ledger.status().write_errors == 0 and i < 200_000:
            ledger.offer(record(i))
            i += 1
            if i % 50 == 0:
                await ledger.flush()
        await ledger.flush()
        full = ledger.status()
        for j in range(i, i + 100):  # while full: these go to the journal (small, under the limit)
            ledger.offer(record(j))
        await ledger.flush()
        spilled = ledger.status()
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
        deadline = time.monotonic() + 20
        # Healthy with the journal folded in: a reopen alone is not recovery (the first replay
        # after it can still fail and mark the database down again).
        while time.monotonic() < deadline:
            now = ledger.status()
            if now.healthy and not now.journal_pending:
                break
            await asyncio.sleep(0.05)
        await ledger.flush()
        healthy_again = ledger.healthy() and not ledger.status().journal_pending
        await ledger.stop(10.0)
        print(json.dumps({
            "offered": i + 100,
            "full_healthy": full.healthy,
            "full_reason": full.reason,
            "write_errors": full.write_errors,
            "spilled": spilled.spilled,
            "healthy_again": healthy_again,
            "final": dataclasses.asdict(ledger.status()),
        }))

    asyncio.run(main())
    """
)


async def test_full_disk_spills_reports_and_recovers(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse to grow the database files (EFBIG, also for root):
    the ledger turns unhealthy, spills to the journal, and replays once writes work again."""
    child = _child(DISK_FULL_CHILD, str(tmp_path))
    out, err = await asyncio.to_thread(child.communicate, None, 60)
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    print("disk full:", {k: v for k, v in report.items() if k != "final"})
    assert report["write_errors"] >= 1
    assert not report["full_healthy"] and "database unavailable" in report["full_reason"]
    assert report["spilled"] >= 100
    assert report["healthy_again"], report
    final = report["final"]
    assert final["lost"] == 0 and final["backlog"] == 0 and not final["journal_pending"]
    ids = await asyncio.to_thread(_db_ids, tmp_path)
    assert len(ids) == len(set(ids)) == report["offered"]
