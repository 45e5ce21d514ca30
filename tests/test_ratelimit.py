"""The pure rate-limit core: bucket arithmetic, all-or-nothing charging, headers and the config section."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import ConfigError
from sidecar.gateway.model import Limits
from sidecar.gateway.ratelimit import (
    Decision,
    LocalLimiter,
    RateLimitsConfig,
    RateSnapshot,
    Scope,
    Window,
    anthropic_headers,
    estimate_request_tokens,
    format_reset,
    openai_headers,
    parse_rate_limits,
    retry_after_header,
    scopes_for,
)
from sidecar.yamlspec import Reader

T0 = 1000.0


def tenant(rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None) -> Scope:
    return Scope("tenant", "acme", Limits(rpm=rpm, tpm=tpm, concurrency=concurrency))


def allowed(decisions: list[Decision]) -> int:
    return sum(d.allowed for d in decisions)


# -- requests per minute ------------------------------------------------------------------


def test_rpm_burst_is_exactly_the_limit_then_one_per_refill_interval() -> None:
    lim = LocalLimiter()
    scopes = [tenant(rpm=10)]
    burst = [lim.try_acquire(scopes, 0, T0) for _ in range(25)]
    assert allowed(burst) == 10
    assert all(d.allowed for d in burst[:10])  # the first ten, not any ten
    refused = burst[10]
    assert (refused.reason, refused.scope, refused.retry_after) == ("rpm", scopes[0], 6.0)
    assert refused.grant is None

    # 10 per minute refills one request every 6 s: none just before, exactly one at 6 s.
    assert not lim.try_acquire(scopes, 0, T0 + 5.9).allowed
    after = [lim.try_acquire(scopes, 0, T0 + 6.0) for _ in range(5)]
    assert allowed(after) == 1
    # A whole idle minute brings back the full burst, never more.
    assert allowed([lim.try_acquire(scopes, 0, T0 + 6.0 + 600) for _ in range(25)]) == 10


def test_a_refused_call_passes_exactly_after_its_retry_after() -> None:
    lim = LocalLimiter()
    scopes = [tenant(rpm=7, tpm=700)]
    for _ in range(7):
        assert lim.try_acquire(scopes, 50, T0).allowed
    # Both limits refuse: tokens need (400 - 350) * 60 / 700 s, requests 60 / 7 s, which is longer.
    refused = lim.try_acquire(scopes, 400, T0)
    assert refused.reason == "rpm"
    assert refused.retry_after == pytest.approx(60 / 7)
    assert refused.retry_after is not None
    assert not lim.try_acquire(scopes, 400, T0 + refused.retry_after - 0.01).allowed
    assert lim.try_acquire(scopes, 400, T0 + refused.retry_after).allowed


def test_the_longest_wait_is_reported() -> None:
    lim = LocalLimiter()
    fast, slow = Scope("tenant", "a", Limits(rpm=60)), Scope("model", "m", Limits(rpm=6))
    assert allowed([lim.try_acquire([fast], 0, T0) for _ in range(60)]) == 60
    assert allowed([lim.try_acquire([slow], 0, T0) for _ in range(6)]) == 6
    refused = lim.try_acquire([fast, slow], 0, T0)
    assert (refused.reason, refused.scope, refused.retry_after) == ("rpm", slow, 10.0)


# -- tokens per minute -----------------------------------------------------------------------


def test_tpm_charge_correct_refund_and_debit() -> None:
    lim = LocalLimiter()
    scopes = [tenant(tpm=1000)]
    first = lim.try_acquire(scopes, 600, T0)
    assert first.allowed and first.grant is not None
    assert first.snapshot.tokens == Window(limit=1000, remaining=400, reset=36.0)
    refused = lim.try_acquire(scopes, 600, T0)
    assert (refused.reason, refused.retry_after) == ("tpm", 12.0)

    # The reply used 100 tokens: 500 come back, so 600 now fit (400 + 500 = 900).
    lim.correct(first.grant, 100, T0)
    lim.correct(first.grant, 0, T0)  # idempotent: a second correction changes nothing
    second = lim.try_acquire(scopes, 600, T0)
    assert second.allowed and second.snapshot.tokens is not None
    assert second.snapshot.tokens.remaining == 300
    assert second.grant is not None

    # Extra debit: 1500 used against 600 charged takes the bucket to 300 - 900 = -600.
    lim.correct(second.grant, 1500, T0)
    refused = lim.try_acquire(scopes, 1, T0)
    assert refused.reason == "tpm"
    assert refused.retry_after == pytest.approx(601 * 60 / 1000)
    assert refused.snapshot.tokens == Window(limit=1000, remaining=0, reset=pytest.approx(96.0))
    assert lim.try_acquire(scopes, 1, T0 + 601 * 60 / 1000).allowed


def test_a_refund_never_fills_past_capacity() -> None:
    lim = LocalLimiter()
    scopes = [tenant(tpm=1000)]
    d = lim.try_acquire(scopes, 100, T0)
    assert d.grant is not None
    # 60 s later the bucket is full again; refunding the 100 must not make it 1100.
    lim.correct(d.grant, 0, T0 + 60)
    assert lim.try_acquire(scopes, 1000, T0 + 60).allowed
    assert not lim.try_acquire(scopes, 1, T0 + 60).allowed


def test_a_request_larger_than_the_limit_never_passes() -> None:
    lim = LocalLimiter()
    d = lim.try_acquire([tenant(rpm=5, tpm=1000)], 1001, T0)
    assert (d.allowed, d.reason, d.retry_after, d.never_passes) == (False, "tpm", None, True)
    # It dominates every other refusal and charged nothing.
    assert lim.try_acquire([tenant(rpm=5, tpm=1000)], 1000, T0).allowed


# -- concurrency and all-or-nothing -----------------------------------------------------------


def test_concurrency_slots_and_idempotent_release() -> None:
    lim = LocalLimiter()
    scopes = [tenant(concurrency=2)]
    a, b = lim.try_acquire(scopes, 0, T0), lim.try_acquire(scopes, 0, T0)
    refused = lim.try_acquire(scopes, 0, T0)
    assert (refused.reason, refused.retry_after) == ("concurrency", 1.0)
    assert a.grant is not None and b.grant is not None
    lim.release(a.grant)
    lim.release(a.grant)  # a second release must not free b's slot
    assert lim.in_flight("tenant", "acme") == 1
    c = lim.try_acquire(scopes, 0, T0)
    assert c.allowed
    assert not lim.try_acquire(scopes, 0, T0).allowed
    assert c.grant is not None
    lim.release(b.grant)
    lim.release(c.grant)
    assert lim.in_flight("tenant", "acme") == 0


def test_all_or_nothing_across_scopes_and_kinds() -> None:
    lim = LocalLimiter()
    t = Scope("tenant", "acme", Limits(rpm=5, tpm=500, concurrency=10))
    m = Scope("model", "gpt", Limits(rpm=2))
    assert allowed([lim.try_acquire([t, m], 10, T0) for _ in range(4)]) == 2
    # The two refused calls charged neither the tenant's requests nor its tokens nor a slot.
    alone = lim.try_acquire([t], 10, T0)
    assert alone.snapshot.requests == Window(limit=5, remaining=2, reset=pytest.approx(36.0))
    assert alone.snapshot.tokens is not None and alone.snapshot.tokens.remaining == 470
    assert lim.in_flight("tenant", "acme") == 3

    # A refusal on concurrency leaves the other scope's buckets untouched too.
    lim2 = LocalLimiter()
    busy = Scope("key", "k1", Limits(concurrency=1))
    model = Scope("model", "gpt", Limits(rpm=1))
    assert lim2.try_acquire([busy], 0, T0).allowed
    assert lim2.try_acquire([busy, model], 0, T0).reason == "concurrency"
    assert lim2.try_acquire([model], 0, T0).allowed  # its one request was not spent


def test_scopes_of_different_kinds_with_the_same_id_are_separate() -> None:
    lim = LocalLimiter()
    assert lim.try_acquire([Scope("tenant", "x", Limits(rpm=1))], 0, T0).allowed
    assert lim.try_acquire([Scope("model", "x", Limits(rpm=1))], 0, T0).allowed


def test_no_scopes_is_always_allowed() -> None:
    lim = LocalLimiter()
    d = lim.try_acquire([], 10**9, T0)
    assert d.allowed and d.snapshot == RateSnapshot() and d.grant is not None
    assert len(lim) == 0


def test_snapshot_is_the_most_constraining_scope() -> None:
    lim = LocalLimiter()
    t = Scope("tenant", "acme", Limits(rpm=100, tpm=10_000))
    k = Scope("key", "k", Limits(rpm=10, tpm=50_000))
    d = lim.try_acquire([t, k], 1000, T0)
    assert d.snapshot.requests == Window(limit=10, remaining=9, reset=pytest.approx(6.0))
    assert d.snapshot.tokens == Window(limit=10_000, remaining=9000, reset=pytest.approx(6.0))


def test_idle_full_buckets_are_pruned_without_changing_answers() -> None:
    lim = LocalLimiter(max_buckets=50)
    for i in range(200):
        assert lim.try_acquire([Scope("tenant", f"t{i}", Limits(rpm=1))], 0, T0).allowed
    # All 200 are empty (busy), so none could go: pruning then waits until the table doubles.
    assert len(lim) == 200
    # A minute later every one of them is full again; new ids make the table grow past the
    # threshold and the full ones are dropped.
    for i in range(10):
        assert lim.try_acquire([Scope("tenant", f"fresh{i}", Limits(rpm=1))], 0, T0 + 60).allowed
    assert len(lim) < 20
    assert not lim.try_acquire([Scope("tenant", "fresh9", Limits(rpm=1))], 0, T0 + 60).allowed
    # A pruned id behaves like a full one, which it was.
    assert lim.try_acquire([Scope("tenant", "t7", Limits(rpm=1))], 0, T0 + 60).allowed
    assert not lim.try_acquire([Scope("tenant", "t7", Limits(rpm=1))], 0, T0 + 60).allowed


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=30),
    gaps=st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), min_size=1, max_size=120),
)
def test_no_window_ever_admits_more_than_the_bucket_allows(limit: int, gaps: list[float]) -> None:
    lim = LocalLimiter()
    scopes = [tenant(rpm=limit)]
    now = T0
    passed: list[float] = []
    for gap in gaps:
        now += gap
        d = lim.try_acquire(scopes, 0, now)
        if d.allowed:
            passed.append(now)
        else:
            # Exact, not merely safe: the refused call would have passed at now + retry_after.
            assert d.retry_after is not None and d.retry_after > 0
    for i in range(len(passed)):
        for j in range(i, len(passed)):
            window = passed[j] - passed[i]
            assert j - i + 1 <= limit + window * limit / 60 + 1e-6


# -- headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0001, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723, "1h2m3s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_format_reset_like_openai(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "1"), (0.1, "1"), (6.0, "6"), (6.2, "7"), (59.5, "60")])
def test_retry_after_header(seconds: float, text: str) -> None:
    assert retry_after_header(seconds) == text


SNAP = RateSnapshot(
    requests=Window(limit=60, remaining=59, reset=1.0),
    tokens=Window(limit=150_000, remaining=149_984, reset=360),
)


def test_openai_headers() -> None:
    assert openai_headers(SNAP) == [
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "59"),
        ("x-ratelimit-reset-requests", "1s"),
        ("x-ratelimit-limit-tokens", "150000"),
        ("x-ratelimit-remaining-tokens", "149984"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ]
    assert openai_headers(RateSnapshot(tokens=SNAP.tokens))[0] == ("x-ratelimit-limit-tokens", "150000")
    assert openai_headers(RateSnapshot()) == []


def test_anthropic_headers_reset_is_an_rfc3339_time() -> None:
    now = calendar.timegm((2026, 12, 6, 23, 59, 0)) + 0.25
    snap = RateSnapshot(requests=Window(50, 49, 29.5), tokens=Window(40_000, 0, 0.1))
    assert anthropic_headers(snap, now) == [
        ("anthropic-ratelimit-requests-limit", "50"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", "2026-12-06T23:59:30Z"),
        ("anthropic-ratelimit-tokens-limit", "40000"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", "2026-12-06T23:59:01Z"),
    ]


def test_estimate_request_tokens() -> None:
    assert estimate_request_tokens(120, 300, 4096) == 420
    assert estimate_request_tokens(120, None, 4096) == 4216
    assert estimate_request_tokens(120, 0, 4096) == 120
    assert estimate_request_tokens(-5, None, 10) == 10


# -- config -----------------------------------------------------------------------------------


def parse(text: str) -> RateLimitsConfig:
    r = Reader("c.yaml")
    node = r.compose(text)
    assert node is not None
    section = parse_rate_limits(r, node, "rate_limits", None)
    r.raise_for_problems()
    return section


def test_parse_section_and_scopes() -> None:
    cfg = parse(
        "default_max_tokens: 1000\n"
        "tenant: {rpm: 600, tpm: 200000}\n"
        "tenants:\n"
        "  batch: {rpm: 60, concurrency: 4}\n"
        "models:\n"
        "  gpt-4.1: {tpm: 2_000_000}\n"
    )
    assert cfg == RateLimitsConfig(
        default_max_tokens=1000,
        tenant=Limits(rpm=600, tpm=200_000),
        tenants={"batch": Limits(rpm=60, concurrency=4)},
        models={"gpt-4.1": Limits(tpm=2_000_000)},
    )
    assert cfg.enabled
    assert scopes_for(cfg, "batch", "k1", Limits(rpm=5), "gpt-4.1") == (
        Scope("tenant", "batch", Limits(rpm=60, tpm=200_000, concurrency=4)),  # merged over `tenant`
        Scope("key", "k1", Limits(rpm=5)),
        Scope("model", "gpt-4.1", Limits(tpm=2_000_000)),
    )
    assert scopes_for(cfg, "other", "k1", Limits(), "unknown-model") == (
        Scope("tenant", "other", Limits(rpm=600, tpm=200_000)),
    )
    assert scopes_for(RateLimitsConfig(), "t", None, None, "m") == ()
    assert not RateLimitsConfig().enabled
    assert parse("{}") == RateLimitsConfig()


def test_parse_errors_have_locations() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            "default_max_tokens: 0\n"
            "tenant: {rpm: 0, burst: 3}\n"
            "tenants:\n"
            "  acme: {tpm: lots}\n"
            "models: [gpt]\n"
            "modles: {}\n"
        )
    assert [str(p) for p in info.value.problems] == [
        "c.yaml:1:21: rate_limits.default_max_tokens: must be at least 1, got 0",
        "c.yaml:2:15: rate_limits.tenant.rpm: must be at least 1, got 0",
        'c.yaml:2:18: rate_limits.tenant.burst: unknown key "burst" (known keys: rpm, tpm, concurrency)',
        'c.yaml:4:15: rate_limits.tenants.acme.tpm: expected an integer, got string "lots"',
        "c.yaml:5:9: rate_limits.models: expected a mapping of model names to limits, got a list",
        'c.yaml:6:1: rate_limits.modles: unknown key "modles"; did you mean "models"?',
    ]
