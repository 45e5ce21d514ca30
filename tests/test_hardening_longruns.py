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
