"""Access to the recorded provider payloads in ``shared/fixtures`` (see its README).

The directory sits beside the repository (``../shared/fixtures`` from the repo root);
``$SIDECAR_FIXTURES`` overrides it. A missing directory fails the tests that need it
rather than skipping them: the recorded payloads are the point of those tests.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

FIXTURES = Path(
    os.environ.get("SIDECAR_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)


def path(name: str) -> Path:
    """The path of one fixture file."""
    return FIXTURES / name


def read(name: str) -> bytes:
    """A fixture body; ``.gz`` files are returned decompressed."""
    data = path(name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def meta(stem: str) -> dict[str, Any]:
    """The ``NAME.meta.json`` of a fixture."""
    result: dict[str, Any] = json.loads(path(f"{stem}.meta.json").read_text(encoding="utf-8"))
    return result


def request_body(stem: str) -> bytes:
    """The recorded request body of a fixture, as JSON bytes."""
    return json.dumps(meta(stem)["request_body"]).encode("utf-8")


def names(suffix: str) -> list[str]:
    """File names of every fixture ending with ``suffix`` (e.g. ``".sse"``), sorted."""
    return sorted(p.name for p in FIXTURES.glob(f"*{suffix}"))


def stems() -> list[str]:
    """Stems of every fixture that has a meta file (top level, not ``transcribed/``)."""
    return [name[: -len(".meta.json")] for name in names(".meta.json")]
