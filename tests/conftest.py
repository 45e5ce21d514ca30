"""Shared pytest fixtures: the recorded-payload directory and a replaying upstream server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.replay_upstream import ReplayUpstream, default_fixtures_dir


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``/work/shared/fixtures`` (``shared/fixtures`` beside the checkout), or ``$SIDECAR_FIXTURES``."""
    path = default_fixtures_dir()  # Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    if not path.is_dir():
        pytest.fail(f"recorded fixtures not found at {path} (set SIDECAR_FIXTURES)", pytrace=False)
    return path


@pytest.fixture
async def replay_upstream(fixtures_dir: Path) -> AsyncIterator[ReplayUpstream]:
    """A started :class:`ReplayUpstream` on 127.0.0.1, closed after the test."""
    upstream = ReplayUpstream(fixtures_dir)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()
