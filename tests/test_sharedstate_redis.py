"""Rate limits shared through a real ``redis-server`` on loopback, its outages included.

Each test starts its own ``redis-server`` (Debian's package) on a free port with a
password, no persistence, in a temporary directory; the tests kill it, pause it
(SIGSTOP) and restart it on the same port to see the fallback and the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from blockbuster import blockbuster_ctx

from sidecar.errors import ConfigError
from sidecar.gateway.model import Limits
from sidecar.gateway.ratelimit import Decision, LocalLimiter, Scope
from sidecar.gateway.sharedstate import (
    RedisLimiter,
    SharedLimiter,
    StateConfig,
    parse_state,
    redacted_url,
)
from sidecar.yamlspec import Reader
from tests.redis_server import PASSWORD, RedisServer

PREFIX = "test:"


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    """Two limiters with separate connection pools: two replicas of the sidecar."""
    a = RedisLimiter.from_url(redis_server.url, prefix=PREFIX)
    b = RedisLimiter.from_url(redis_server.url, prefix=PREFIX)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


def scope(kind: str = "tenant", id: str = "acme", **limits: int) -> Scope:
    return Scope(kind, id, Limits(**limits))


async def spread(
    replicas: tuple[RedisLimiter, RedisLimiter], scopes: list[Scope], tokens: int, n: int
) -> list[Decision]:
    """``n`` concurrent calls, alternating between the replicas."""
    return await asyncio.gather(*(replicas[i % 2].try_acquire(scopes, tokens, 0.0) for i in range(n)))


def count(decisions: list[Decision]) -> int:
    return sum(d.allowed for d in decisions)


# -- the limiter itself ----------------------------------------------------------------------


@pytest.mark.usefixtures("no_blocking_calls")
async def test_two_replicas_share_exact_counts(replicas: tuple[RedisLimiter, RedisLimiter]) -> None:
    # 60 concurrent calls against rpm 20: exactly 20 pass (refill in the few ms this takes is
    # far below one request), whichever replica they hit.
    rpm = await spread(replicas, [scope(id="r", rpm=20)], 0, 60)
    assert count(rpm) == 20
    assert {d.reason for d in rpm if not d.allowed} == {"rpm"}
    assert all(d.grant is not None and d.grant.origin == "redis" for d in rpm if d.allowed)
    refused = next(d for d in rpm if not d.allowed)
    assert refused.retry_after is not None and 2.5 < refused.retry_after <= 3.0  # 60 / 20 s per request

    assert count(await spread(replicas, [scope(id="t", tpm=1000)], 100, 30)) == 10

    slots = await spread(replicas, [scope(id="c", concurrency=5)], 0, 30)
    assert count(slots) == 5
    assert {d.reason for d in slots if not d.allowed} == {"concurrency"}
    grant = next(d.grant for d in slots if d.grant is not None)
    await replicas[1].release(grant)  # released by the other replica: the slot is shared
    await replicas[1].release(grant)  # idempotent
    assert count(await spread(replicas, [scope(id="c", concurrency=5)], 0, 10)) == 1


async def test_snapshot_correct_and_all_or_nothing(replicas: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = replicas
    first = await a.try_acquire([scope(rpm=20, tpm=1000)], 600, 0.0)
    assert first.allowed and first.grant is not None
    assert first.snapshot.requests is not None and first.snapshot.requests.remaining == 19
    assert first.snapshot.tokens is not None and first.snapshot.tokens.remaining == 400
    assert first.snapshot.tokens.reset == pytest.approx(36.0, abs=0.1)
    assert (await b.try_acquire([scope(rpm=20, tpm=1000)], 600, 0.0)).reason == "tpm"

    # The reply used 100: 500 come back, once, whichever replica settles it.
    await b.correct(first.grant, 100, 0.0)
    await a.correct(first.grant, 100, 0.0)
    second = await b.try_acquire([scope(rpm=20, tpm=1000)], 600, 0.0)
    assert second.allowed and second.snapshot.tokens is not None and second.grant is not None
    assert second.snapshot.tokens.remaining == 300
    # An extra debit (1500 used, 600 charged) takes the bucket below zero: 300 - 900 = -600.
    await a.correct(second.grant, 1500, 0.0)
    owed = await b.try_acquire([scope(rpm=20, tpm=1000)], 1, 0.0)
    assert owed.reason == "tpm" and owed.retry_after == pytest.approx(601 * 60 / 1000, abs=0.1)

    # Larger than the limit: never passes, and says so.
    huge = await a.try_acquire([scope(id="h", tpm=1000)], 1001, 0.0)
    assert (huge.reason, huge.retry_after, huge.never_passes) == ("tpm", None, True)

    # The model's limit refuses: the tenant's buckets are not charged for refused calls.
    tenant, model = scope(id="x", rpm=5), scope("model", "gpt", rpm=2)
    assert count([await a.try_acquire([tenant, model], 0, 0.0) for _ in range(4)]) == 2
    alone = await b.try_acquire([tenant], 0, 0.0)
    assert alone.snapshot.requests is not None and alone.snapshot.requests.remaining == 2


async def test_slots_of_a_crashed_replica_come_back_after_the_lease(redis_server: RedisServer) -> None:
    crashed = RedisLimiter.from_url(redis_server.url, prefix=PREFIX, lease=0.3)
    other = RedisLimiter.from_url(redis_server.url, prefix=PREFIX)
    try:
        assert (await crashed.try_acquire([scope(concurrency=1)], 0, 0.0)).allowed
        await crashed.aclose()  # never releases
        assert (await other.try_acquire([scope(concurrency=1)], 0, 0.0)).reason == "concurrency"
        await asyncio.sleep(0.4)
        assert (await other.try_acquire([scope(concurrency=1)], 0, 0.0)).allowed
    finally:
        await other.aclose()


async def test_keys_are_prefixed_and_expire(
    redis_server: RedisServer, replicas: tuple[RedisLimiter, RedisLimiter]
) -> None:
    a, _ = replicas
    assert (
        await a.try_acquire([scope(rpm=60, tpm=6000, concurrency=2), scope("model", "m", rpm=6)], 60, 0.0)
    ).allowed
    await a.add_spend("acme:2026-05", 1.25, time.time() + 3600)
    client = redis_server.client()
    try:
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys == [
            "test:b:model:m",
            "test:b:tenant:acme",
            "test:c:tenant:acme",
            "test:spend:acme:2026-05",
        ]
        ttls = {k: await client.pttl(k) for k in keys}
        # A bucket lives until it would be full again, plus 1 s: 10 s for one request of 6 rpm; 1 s for
        # one of 60 rpm (longer than 0.6 s for 60 tokens of 6000 tpm in the same hash); a slot set for
        # its lease (15 min).
        assert 10_000 < ttls["test:b:model:m"] <= 11_000
        assert 1000 < ttls["test:b:tenant:acme"] <= 2100
        assert 899_000 < ttls["test:c:tenant:acme"] <= 901_000
        assert 3_590_000 < ttls["test:spend:acme:2026-05"] <= 3_601_000
    finally:
        await client.aclose()


async def test_the_script_is_loaded_again_after_a_flush(
    redis_server: RedisServer, replicas: tuple[RedisLimiter, RedisLimiter]
) -> None:
    a, _ = replicas
    assert (await a.try_acquire([scope(rpm=2)], 0, 0.0)).allowed
    client = redis_server.client()
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    assert (await a.try_acquire([scope(rpm=2)], 0, 0.0)).allowed
    assert not (await a.try_acquire([scope(rpm=2)], 0, 0.0)).allowed


async def test_shared_budget_spend(replicas: tuple[RedisLimiter, RedisLimiter]) -> None:
    a, b = replicas
    assert await a.spend("t1") == 0.0
    await asyncio.gather(*(r.add_spend("t1", 0.125, time.time() + 60) for r in (a, b) * 4))
    assert await b.spend("t1") == 1.0
    assert await a.add_spend("old", 5.0, time.time() - 1) == 5.0
    assert await a.spend("old") == 0.0  # its period is over: the counter is gone


# -- outages ------------------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.states: list[bool] = []
        self.errors: list[str] = []


def shared(server: RedisServer, events: Events, mode: str = "fail_open", **kw: float) -> SharedLimiter:
    config = StateConfig(
        url=server.url,
        on_error=mode,
        prefix=PREFIX,
        timeout=kw.get("timeout", 0.05),
        retry_interval=kw.get("retry_interval", 0.1),
    )
    return SharedLimiter.from_config(
        config,
        LocalLimiter(),
        probe_timeout=kw.get("probe_timeout", 0.5),
        on_state=events.states.append,
        on_error=events.errors.append,
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.usefixtures("no_blocking_calls")
async def test_fail_open_counts_locally_then_goes_back_to_redis(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.gateway.sharedstate")
    events = Events()
    limiter = shared(redis_server, events)
    other = RedisLimiter.from_url(redis_server.url, prefix=PREFIX)
    try:
        assert await limiter.start()
        assert events.states == [True]
        up = await limiter.try_acquire([scope(rpm=3, concurrency=10)], 0, 0.0)
        assert up.grant is not None and up.grant.origin == "redis"

        redis_server.kill()
        now = time.monotonic()
        down = [await limiter.try_acquire([scope(rpm=3, concurrency=10)], 0, now) for _ in range(5)]
        # Counted locally from a fresh bucket: exactly the limit passes, never everything, never nothing.
        assert count(down) == 3
        assert all(d.grant.origin == "local" for d in down if d.grant is not None)
        assert events.states == [True, False]
        assert events.errors == ["acquire"]  # the next calls did not touch Redis
        assert limiter.up is False
        # A grant taken locally is returned locally.
        local_grant = down[0].grant
        assert local_grant is not None
        assert limiter.fallback.in_flight("tenant", "acme") == 3
        await limiter.release(local_grant)
        await limiter.correct(local_grant, 0, now)
        assert limiter.fallback.in_flight("tenant", "acme") == 2

        # The prober keeps pinging (each failure counted) until Redis is back.
        await wait_until(lambda: events.errors.count("ping") >= 2)
        redis_server.start()  # empty again: no persistence
        await wait_until(lambda: limiter.up is True)
        assert events.states == [True, False, True]
        back = await limiter.try_acquire([scope(id="fleet", rpm=1)], 0, time.monotonic())
        assert back.grant is not None and back.grant.origin == "redis"
        # Really in Redis: the other replica sees the bucket spent.
        assert (await other.try_acquire([scope(id="fleet", rpm=1)], 0, 0.0)).reason == "rpm"
        await limiter.release(up.grant)  # a Redis grant from before the outage; nothing to free now
        assert set(events.errors) == {"acquire", "ping"}

        lines = [r for r in caplog.records if r.name == "sidecar.gateway.sharedstate"]
        assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
        assert "unreachable" in lines[0].getMessage() and "fail_open" in lines[0].getMessage()
        assert f"127.0.0.1:{redis_server.port}" in lines[0].getMessage()
        assert "reachable again" in lines[1].getMessage()
        assert PASSWORD not in caplog.text
    finally:
        await limiter.aclose()
        await other.aclose()


async def test_fail_closed_refuses_while_redis_is_down(redis_server: RedisServer) -> None:
    events = Events()
    limiter = shared(redis_server, events, mode="fail_closed")
    try:
        assert (await limiter.try_acquire([scope(rpm=3)], 0, 0.0)).allowed
        redis_server.kill()
        refused = [await limiter.try_acquire([scope(rpm=3)], 0, 0.0) for _ in range(3)]
        assert {(d.allowed, d.reason, d.retry_after) for d in refused} == {(False, "state_unavailable", 0.1)}
        # Calls with no limit never need Redis.
        assert (await limiter.try_acquire([], 0, 0.0)).allowed
        assert await limiter.spend("x") is None
        assert events.states == [True, False]
    finally:
        await limiter.aclose()


async def test_start_reports_a_redis_that_is_not_there(redis_server: RedisServer) -> None:
    redis_server.kill()
    events = Events()
    limiter = shared(redis_server, events)
    try:
        assert not await limiter.start()
        assert (events.states, events.errors, limiter.up) == ([False], ["ping"], False)
        assert (await limiter.try_acquire([scope(rpm=1)], 0, 0.0)).allowed  # fail_open: local
    finally:
        await limiter.aclose()


@pytest.mark.usefixtures("no_blocking_calls")
async def test_a_hung_redis_costs_at_most_the_timeout(redis_server: RedisServer) -> None:
    events = Events()
    limiter = shared(redis_server, events, timeout=0.05, retry_interval=0.1, probe_timeout=0.2)
    try:
        assert (await limiter.try_acquire([scope(rpm=100)], 0, 0.0)).allowed
        redis_server.pause()
        # The calls caught in flight by the hang all come back within the timeout.
        started = time.monotonic()
        burst = await asyncio.gather(*(limiter.try_acquire([scope(rpm=100)], 0, 0.0) for _ in range(20)))
        assert time.monotonic() - started < 0.3
        assert count(burst) == 20  # fail_open: served locally
        assert events.errors == ["acquire"] * 20
        # Later calls do not wait on Redis at all, while the prober keeps failing in the background.
        slowest = 0.0
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            t = time.monotonic()
            await limiter.try_acquire([scope(rpm=100)], 0, 0.0)
            slowest = max(slowest, time.monotonic() - t)
            await asyncio.sleep(0.01)
        assert slowest < 0.05  # below the timeout: no call waits on the hung Redis
        assert events.errors.count("acquire") == 20
        assert events.errors.count("ping") >= 2
        assert events.states == [True, False]
        redis_server.resume()
        await wait_until(lambda: limiter.up is True)
        after = await limiter.try_acquire([scope(rpm=100)], 0, 0.0)
        assert after.grant is not None and after.grant.origin == "redis"
    finally:
        redis_server.resume()
        await limiter.aclose()


async def test_a_slot_whose_release_failed_is_freed_when_redis_is_back(redis_server: RedisServer) -> None:
    events = Events()
    limiter = shared(redis_server, events, timeout=0.05, retry_interval=0.1)
    admin = redis_server.client()
    other = RedisLimiter.from_url(redis_server.url, prefix=PREFIX)
    try:
        held = await limiter.try_acquire([scope(concurrency=1)], 0, 0.0)
        assert held.grant is not None and held.grant.origin == "redis"
        # Writes pause for 300 ms: the release times out, and Redis drops it with its connection.
        await admin.execute_command("CLIENT", "PAUSE", "300", "WRITE")
        await limiter.release(held.grant)
        assert events.errors == ["release"]
        # Without a second release the slot would stay taken for the whole lease (15 min).
        deadline = time.monotonic() + 5
        while not (await other.try_acquire([scope(concurrency=1)], 0, 0.0)).allowed:
            assert time.monotonic() < deadline, "the slot was never freed"
            await asyncio.sleep(0.05)
    finally:
        await admin.aclose()
        await other.aclose()
        await limiter.aclose()


# -- config ----------------------------------------------------------------------------------


def parse(text: str, env: dict[str, str] | None = None) -> StateConfig:
    r = Reader("c.yaml", env=env)
    node = r.compose(text)
    assert node is not None
    section = parse_state(r, node, "state", None)
    r.raise_for_problems()
    return section


def test_parse_state() -> None:
    assert parse("url: redis://localhost:6379/0") == StateConfig(url="redis://localhost:6379/0")
    cfg = parse(
        "url: ${REDIS_URL}\non_error: fail_closed\nprefix: '{llm}:'\ntimeout: 20ms\nretry_interval: 5s\n",
        env={"REDIS_URL": "rediss://app:hunter2@cache:6380/2"},
    )
    assert cfg == StateConfig(
        url="rediss://app:hunter2@cache:6380/2",
        on_error="fail_closed",
        prefix="{llm}:",
        timeout=0.02,
        retry_interval=5.0,
    )
    assert "hunter2" not in repr(cfg)
    assert cfg.redacted_url() == "rediss://app:***@cache:6380/2"
    assert parse("url: unix:///run/redis.sock").url == "unix:///run/redis.sock"


def test_parse_state_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            "url: ${REDIS_URL}\non_error: fail_later\ntimeout: 0s\nretry_intervall: 1s\n",
            env={"REDIS_URL": "http://:hunter2@cache:6379"},
        )
    text = str(info.value)
    assert "hunter2" not in text
    assert [str(p) for p in info.value.problems] == [
        # A value that came from ${VAR} is never quoted in a problem (secrets live there).
        "c.yaml:1:6: state.url: invalid URL <22 characters, not shown>: the scheme must be one of redis://, "
        "rediss://, unix://, got http",
        'c.yaml:2:11: state.on_error: invalid value "fail_later": expected one of fail_open, fail_closed; '
        'did you mean "fail_closed"?',
        "c.yaml:3:10: state.timeout: must be greater than 0s",
        'c.yaml:4:1: state.retry_intervall: unknown key "retry_intervall"; did you mean "retry_interval"?',
    ]
    with pytest.raises(ConfigError) as info:
        parse("prefix: x\n")
    assert [str(p) for p in info.value.problems] == ['c.yaml:1:1: state.url: missing required key "url"']
    for bad in ("redis://:pw@host:99999", "redis://", "unix://", "redis://h/abc"):
        with pytest.raises(ConfigError) as info:
            parse(f"url: '{bad}'")
        assert ":pw@" not in str(info.value)


def test_redacted_url() -> None:
    assert redacted_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redacted_url("redis://user:pw@h") == "redis://user:***@h"
    assert redacted_url("redis://h:6379") == "redis://h:6379"
    assert redacted_url("unix:///s.sock?db=1&password=pw") == "unix:///s.sock?db=1&password=***"
    assert "pw" not in redacted_url("redis://:pw@h:99999")
