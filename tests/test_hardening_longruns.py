"""The long hardening runs in short: ``make soak`` and ``make fuzz`` as CI runs them.

``hardening/soak.py`` for a minute (mixed traffic with failures and aborts: no record lost,
RSS flat after warm-up, descriptors level) and ``hardening/fuzz.py`` for a few seconds
(random HTTP both ways: no crash, no traceback, nothing left in flight). Each runs as its
own process, as ``make`` runs it, and must exit 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_soak_one_minute(tmp_path: Path) -> None:
    done = run(
        "hardening.soak",
        *("--duration", "60", "--warmup", "25", "--idle-wait", "0", "--out", str(tmp_path)),
        timeout=180,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "soak: ok" in done.stdout
    lines = (tmp_path / "soak.csv").read_text().splitlines()
    assert lines[0].startswith("t_s,calls,rss_bytes,fds") and len(lines) > 40
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_fuzz_a_few_seconds(tmp_path: Path) -> None:
    done = run("hardening.fuzz", "--duration", "8", "--seed", "11", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "fuzz: ok" in done.stdout


def _descriptor_problems(fds: list[int], inflight: list[float]) -> list[str]:
    """What the soak's judgement says of descriptors for one sample a second (25 s of warm-up)."""
    import argparse

    from hardening.soak import Sample, Tally, check

    args = argparse.Namespace(warmup=25.0, max_rss_growth=0.10, fd_slack=4, idle_wait=0.0)
    samples = [
        Sample(t=25.0 + i, calls=25 * i, rss=100 << 20, fds=f, lag_ms=1.0, inflight=n, backlog=0.0)
        for i, (f, n) in enumerate(zip(fds, inflight, strict=True))
    ]
    problems = check(args, Tally(), samples, samples[-1], None, "")
    return [p for p in problems if "descriptor" in p]


def test_soak_tells_descriptors_held_by_calls_in_flight_from_a_leak() -> None:
    """The CI run that failed: descriptors followed the calls in flight (a busy host stretched
    them), not the calls made. A leak grows with the calls at a steady concurrency. 36 samples
    after warm-up, as in CI's one-minute soak."""
    steady = [5.0] * 24 + [9.0] * 12
    peak = [5.0] * 24 + [55.0, 26.0, 59.0, 40.0, 30.0, 20.0] * 2
    busy = [60 + 2 * int(n) for n in peak]
    assert _descriptor_problems(busy, peak) == []
    leaking = [60 + 3 * i for i in range(36)]  # about one descriptor every 8 calls
    assert _descriptor_problems(leaking, steady) == [
        f"descriptors keep growing under load: {max(leaking[:12])} early, {max(leaking[-12:])} late"
    ]
