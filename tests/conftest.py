"""Shared pytest fixtures: the recorded-payload directory and a replaying upstream server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.redis_server import RedisServer
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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A ``redis-server`` on a free loopback port with ``requirepass``; killed at the end."""
    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def _hypothesis_profiles() -> None:
    """Hypothesis (tests/test_properties.py): a small example budget in CI, ``HYPOTHESIS_PROFILE=dev``
    for more; ``make fuzz`` runs the same properties with a large one (hardening/fuzz.py). No
    example database: nothing is written into the checkout."""
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile("dev", max_examples=300, deadline=None, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()
