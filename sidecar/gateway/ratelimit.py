"""Rate limits: token buckets for requests and tokens per minute, and concurrent calls.

Owns the ``rate_limits:`` config section, the bucket arithmetic, the in-process
:class:`LocalLimiter`, and the providers' rate-limit response headers. The Redis
adapter (:mod:`sidecar.gateway.sharedstate`) runs the same arithmetic in Lua and
hands its levels to :func:`evaluate`, so one node and a fleet decide alike.

The model
---------
Every limit is a token bucket whose capacity is the limit and whose refill is the
limit per minute, continuously (``limit / 60`` per second). A fresh bucket is full,
so a burst of up to ``limit`` passes at once; after that one unit comes back every
``60 / limit`` seconds. Over any window of ``w`` seconds at most
``limit + limit * w / 60`` units pass, and a full bucket is indistinguishable from a
missing one, which is what lets idle buckets be dropped (memory stays bounded).

A call is checked against every :class:`Scope` that applies to it (its tenant, its
virtual key, its model) and every kind of limit at once, all or nothing: one
request from each RPM bucket, the estimated tokens from each TPM bucket, one slot
from each concurrency limit. If any of them says no, nothing is charged. Tokens
are charged up front from an estimate (:func:`estimate_request_tokens`) and
corrected (:meth:`LocalLimiter.correct`) once the real usage is known; an extra
debit may take a bucket below zero, so the overrun is paid back by waiting.

Example::

    rate_limits:
      default_max_tokens: 4096          # output tokens charged when the body sets none
      tenant: {rpm: 600, tpm: 200000}   # every tenant, each with its own buckets
      tenants:
        batch: {rpm: 60, concurrency: 4}   # merged over `tenant`: batch keeps tpm 200000
      models:
        gpt-4o: {tpm: 2000000}          # one bucket per model, shared by all tenants

Keys, with their defaults::

    rate_limits.default_max_tokens = 4096  output tokens charged up front when the request
                                           has no max_tokens / max_completion_tokens /
                                           max_output_tokens; >= 1
    rate_limits.tenant = {}                limits (rpm, tpm, concurrency) applied to every
                                           tenant separately; none: unlimited
    rate_limits.tenants = {}               tenant name -> limits; each key set there replaces
                                           the same key of `tenant` for that tenant
    rate_limits.models = {}                model name -> limits, one bucket per model shared
                                           across every tenant

Pure module: the standard library, :mod:`sidecar.yamlspec` and
:mod:`sidecar.gateway.model` only; no asyncio, no I/O, and time is always a
parameter (``now``, seconds; any clock, used consistently).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from yaml.nodes import Node

from sidecar.gateway.model import Limits, parse_limits
from sidecar.yamlspec import Reader, join

__all__ = [
    "CONCURRENCY_RETRY_AFTER",
    "DEFAULT_MAX_TOKENS",
    "EPSILON",
    "REASONS",
    "SCOPE_KINDS",
    "Decision",
    "Grant",
    "LocalLimiter",
    "RateLimitsConfig",
    "RateSnapshot",
    "Scope",
    "ScopeLevels",
    "Window",
    "anthropic_headers",
    "estimate_request_tokens",
    "evaluate",
    "format_reset",
    "openai_headers",
    "parse_rate_limits",
    "refill",
    "retry_after_header",
    "scopes_for",
]

#: Output tokens charged up front when a request does not say how many it wants.
DEFAULT_MAX_TOKENS = 4096

#: What a scope limits: a tenant, a virtual key, a model (shared by every tenant).
SCOPE_KINDS = ("tenant", "key", "model")

#: Why a call was refused; ``state_unavailable`` comes from the shared-state front
#: (:mod:`sidecar.gateway.sharedstate`) when Redis is down and it fails closed.
REASONS = ("rpm", "tpm", "concurrency", "state_unavailable")

#: Slack on every "is there enough in the bucket" comparison, so that float refill
#: (``6 s * 10 / 60``) that lands a hair under a whole unit still counts as that unit.
#: A millionth of a request or token changes no count. The Lua script uses the same.
EPSILON = 1e-6

#: Retry-After for a call refused on concurrency: a slot frees when some call
#: ends, which no clock predicts, so this is a hint to come back soon.
CONCURRENCY_RETRY_AFTER = 1.0

_MINUTE = 60.0


# -- config -------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimitsConfig:
    """The ``rate_limits`` section: see the module docstring for the keys."""

    default_max_tokens: int = DEFAULT_MAX_TOKENS
    tenant: Limits = field(default_factory=Limits)
    tenants: Mapping[str, Limits] = field(default_factory=dict)
    models: Mapping[str, Limits] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        """True when any tenant or model limit is configured (virtual keys carry their own)."""
        return (
            not self.tenant.empty
            or any(not limits.empty for limits in self.tenants.values())
            or any(not limits.empty for limits in self.models.values())
        )

    def tenant_limits(self, tenant: str) -> Limits:
        """The limits of one tenant: its own entry merged key by key over ``tenant``.

        Merging (rather than replacing) means an entry in ``tenants`` that only
        raises ``rpm`` cannot silently lift the default ``tpm``.
        """
        own = self.tenants.get(tenant)
        if own is None:
            return self.tenant
        base = self.tenant
        return Limits(
            rpm=own.rpm if own.rpm is not None else base.rpm,
            tpm=own.tpm if own.tpm is not None else base.tpm,
            concurrency=own.concurrency if own.concurrency is not None else base.concurrency,
        )


_KEYS = ("default_max_tokens", "tenant", "tenants", "models")


def _limits_by_name(r: Reader, node: Node | None, path: str, what: str) -> dict[str, Limits]:
    if node is None:
        return {}
    pairs = r.entries(node, path, what=f"a mapping of {what} names to limits")
    if pairs is None:
        return {}
    return {name: parse_limits(r, value, join(path, name)) for name, _key, value in pairs}


def parse_rate_limits(r: Reader, node: Node, path: str, ctx: object = None) -> RateLimitsConfig:
    """Parse the ``rate_limits`` section; every problem is recorded on ``r`` with its location.

    A wrong value falls back to its default so the rest is still checked. ``ctx``
    is accepted for the config loader's section signature.
    """
    d = RateLimitsConfig()
    m = r.mapping(node, path, _KEYS)
    if m is None:
        return d
    tenant = m.get("tenant")
    return RateLimitsConfig(
        default_max_tokens=r.integer(
            m.get("default_max_tokens"), join(path, "default_max_tokens"), d.default_max_tokens, minimum=1
        ),
        tenant=d.tenant if tenant is None else parse_limits(r, tenant, join(path, "tenant")),
        tenants=_limits_by_name(r, m.get("tenants"), join(path, "tenants"), "tenant"),
        models=_limits_by_name(r, m.get("models"), join(path, "models"), "model"),
    )


# -- scopes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of buckets a call is charged to: ``kind`` is one of :data:`SCOPE_KINDS`."""

    kind: str
    id: str
    limits: Limits


def scopes_for(
    config: RateLimitsConfig,
    tenant: str,
    key_name: str | None,
    key_limits: Limits | None,
    model: str | None,
) -> tuple[Scope, ...]:
    """The scopes a call is checked against, in the order tenant, key, model.

    Only scopes with at least one limit are returned, so an unconfigured sidecar
    gets ``()`` and a limiter never touches its tables (or Redis) for the call.
    """
    out: list[Scope] = []
    tenant_limits = config.tenant_limits(tenant)
    if not tenant_limits.empty:
        out.append(Scope("tenant", tenant, tenant_limits))
    if key_name is not None and key_limits is not None and not key_limits.empty:
        out.append(Scope("key", key_name, key_limits))
    if model is not None:
        model_limits = config.models.get(model)
        if model_limits is not None and not model_limits.empty:
            out.append(Scope("model", model, model_limits))
    return tuple(out)


def estimate_request_tokens(prompt_tokens: int, body_max_tokens: int | None, default_max_tokens: int) -> int:
    """Tokens charged up front: the prompt counted locally plus the most the reply may use.

    ``body_max_tokens`` is the request's ``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens``; without one, ``default_max_tokens`` stands in. Charging
    the ceiling and refunding later is what keeps a burst of long replies from
    overshooting the limit before any usage is known.
    """
    output = body_max_tokens if body_max_tokens is not None and body_max_tokens >= 0 else default_max_tokens
    return max(0, prompt_tokens) + output


# -- decisions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as the response headers show it: ``reset`` is seconds until the bucket is full."""

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class RateSnapshot:
    """The most constraining request and token limits of a call (``None``: no such limit)."""

    requests: Window | None = None
    tokens: Window | None = None


class Grant:
    """What one allowed call was charged, so it can be corrected and released exactly once.

    ``origin`` says which limiter holds the charge (``"local"`` or ``"redis"``): a
    grant taken locally during a Redis outage must be returned locally. The
    ``corrected`` and ``released`` flags make :meth:`LocalLimiter.correct` and
    :meth:`LocalLimiter.release` idempotent.
    """

    __slots__ = ("corrected", "id", "origin", "released", "scopes", "tokens")

    def __init__(self, id: str, scopes: tuple[Scope, ...], tokens: int, origin: str = "local") -> None:
        self.id = id
        self.scopes = scopes
        self.tokens = tokens
        self.origin = origin
        self.corrected = False
        self.released = False

    @property
    def holds_slots(self) -> bool:
        """True when the grant took a concurrency slot somewhere (it must be released)."""
        return any(s.limits.concurrency is not None for s in self.scopes)

    def __repr__(self) -> str:
        where = ", ".join(f"{s.kind}:{s.id}" for s in self.scopes)
        return f"Grant({self.id!r}, [{where}], tokens={self.tokens}, origin={self.origin!r})"


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of a limiter.

    Allowed: ``grant`` records the charge. Refused: ``reason`` (one of
    :data:`REASONS`) and ``scope`` name the limit that said no and ``retry_after``
    the seconds until the call would pass (the largest wait over every refusing
    limit, since all must pass). ``retry_after`` is ``None`` when it never can: the
    call's tokens exceed a TPM limit's capacity. ``snapshot`` feeds the rate-limit
    headers (after the charge when allowed, as found when refused).
    """

    allowed: bool
    reason: str | None = None
    scope: Scope | None = None
    retry_after: float | None = None
    snapshot: RateSnapshot = RateSnapshot()
    grant: Grant | None = None

    @property
    def never_passes(self) -> bool:
        """Refused for good: the request alone is larger than a token limit."""
        return not self.allowed and self.retry_after is None


@dataclass(frozen=True, slots=True)
class ScopeLevels:
    """A scope's bucket levels refilled to now, before any charge (``None``: no such limit)."""

    rpm: float | None
    tpm: float | None
    in_flight: int = 0


def refill(level: float, last: float, now: float, limit: int) -> float:
    """A bucket's level at ``now``: ``limit / 60`` per second since ``last``, capped at ``limit``.

    Multiplying before dividing keeps whole-second refills exact (``6 * 10 / 60`` is
    exactly 1.0). A clock that went backwards refills nothing.
    """
    elapsed = now - last
    if elapsed <= 0:
        return min(level, float(limit))
    return min(float(limit), level + elapsed * limit / _MINUTE)


def _wait(level: float, need: float, limit: int) -> float:
    """Seconds until a bucket at ``level`` holds ``need``."""
    return max(0.0, (need - level) * _MINUTE / limit)


def _window(limit: int, level: float) -> Window:
    remaining = max(0, min(limit, math.floor(level + EPSILON)))
    return Window(limit=limit, remaining=remaining, reset=_wait(level, float(limit), limit))


def _tightest(current: Window | None, candidate: Window) -> Window:
    if current is None:
        return candidate
    return min(current, candidate, key=lambda w: (w.remaining, w.limit, -w.reset))


def _snapshot(scopes: Sequence[Scope], levels: Sequence[ScopeLevels]) -> RateSnapshot:
    requests: Window | None = None
    tokens: Window | None = None
    for scope, lv in zip(scopes, levels, strict=True):
        if scope.limits.rpm is not None and lv.rpm is not None:
            requests = _tightest(requests, _window(scope.limits.rpm, lv.rpm))
        if scope.limits.tpm is not None and lv.tpm is not None:
            tokens = _tightest(tokens, _window(scope.limits.tpm, lv.tpm))
    return RateSnapshot(requests=requests, tokens=tokens)


def evaluate(scopes: Sequence[Scope], levels: Sequence[ScopeLevels], tokens: int) -> Decision:
    """Decide a call from its scopes' levels (refilled to now, before charging); charges nothing.

    Shared by :class:`LocalLimiter` and the Redis adapter (whose Lua script returns
    the same levels), so both refuse for the same reason with the same Retry-After
    and headers. The denial reported is the one that can never pass, else the one
    with the longest wait. An allowed decision's snapshot is the levels after the
    charge; the caller attaches the :class:`Grant`.
    """
    worst: tuple[float, str, Scope] | None = None  # (wait, reason, scope); wait inf: never
    for scope, lv in zip(scopes, levels, strict=True):
        lim = scope.limits
        found: list[tuple[float, str]] = []
        if lim.rpm is not None and lv.rpm is not None and lv.rpm + EPSILON < 1:
            found.append((_wait(lv.rpm, 1.0, lim.rpm), "rpm"))
        if lim.tpm is not None and lv.tpm is not None:
            if tokens > lim.tpm:
                found.append((math.inf, "tpm"))
            elif lv.tpm + EPSILON < tokens:
                found.append((_wait(lv.tpm, float(tokens), lim.tpm), "tpm"))
        if lim.concurrency is not None and lv.in_flight >= lim.concurrency:
            found.append((CONCURRENCY_RETRY_AFTER, "concurrency"))
        for wait, reason in found:
            if worst is None or wait > worst[0]:
                worst = (wait, reason, scope)
    if worst is not None:
        wait, reason, scope = worst
        return Decision(
            allowed=False,
            reason=reason,
            scope=scope,
            retry_after=None if math.isinf(wait) else wait,
            snapshot=_snapshot(scopes, levels),
        )
    after = [
        ScopeLevels(
            rpm=None if lv.rpm is None else lv.rpm - 1,
            tpm=None if lv.tpm is None else lv.tpm - tokens,
            in_flight=lv.in_flight + 1,
        )
        for lv in levels
    ]
    return Decision(allowed=True, snapshot=_snapshot(scopes, after))


# -- the in-process limiter ------------------------------------------------------------


class _Bucket:
    """A bucket's state: its level at ``last``, and the limit it was last refilled with."""

    __slots__ = ("last", "level", "limit")

    def __init__(self, level: float, last: float, limit: int) -> None:
        self.level = level
        self.last = last
        self.limit = limit


class LocalLimiter:
    """Token buckets and concurrency counters of one process; used from one thread (the event loop).

    Buckets are keyed by ``(kind, id, "rpm" | "tpm")``. When the table grows past
    ``max_buckets`` every bucket that is full again is dropped (a full bucket is
    the same as a new one); the next pruning waits until the table has doubled, so
    a table made of busy buckets costs no more than amortised constant time.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self._in_flight: dict[tuple[str, str], int] = {}
        self._max_buckets = max_buckets
        self._prune_at = max_buckets
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        """Buckets currently held (for tests and memory checks)."""
        return len(self._buckets)

    def in_flight(self, kind: str, id: str) -> int:
        """Concurrency slots held by a scope."""
        return self._in_flight.get((kind, id), 0)

    def _bucket(self, kind: str, id: str, measure: str, limit: int, now: float) -> _Bucket:
        """The bucket refilled to ``now`` (created full), with the scope's current limit."""
        key = (kind, id, measure)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(limit), now, limit)
            self._buckets[key] = bucket
            return bucket
        bucket.level = refill(bucket.level, bucket.last, now, limit)
        bucket.last = max(bucket.last, now)
        bucket.limit = limit
        return bucket

    def _levels(self, scope: Scope, now: float) -> ScopeLevels:
        lim = scope.limits
        rpm = None if lim.rpm is None else self._bucket(scope.kind, scope.id, "rpm", lim.rpm, now).level
        tpm = None if lim.tpm is None else self._bucket(scope.kind, scope.id, "tpm", lim.tpm, now).level
        return ScopeLevels(rpm=rpm, tpm=tpm, in_flight=self.in_flight(scope.kind, scope.id))

    def _prune(self, now: float) -> None:
        if len(self._buckets) <= self._prune_at:
            return
        full = [
            key
            for key, b in self._buckets.items()
            if refill(b.level, b.last, now, b.limit) + EPSILON >= b.limit
        ]
        for key in full:
            del self._buckets[key]
        self._prune_at = max(self._max_buckets, 2 * len(self._buckets))

    def try_acquire(self, scopes: Sequence[Scope], tokens: int, now: float) -> Decision:
        """Check and charge every scope at once; if any limit refuses, nothing is charged."""
        self._prune(now)
        levels = [self._levels(scope, now) for scope in scopes]
        decision = evaluate(scopes, levels, tokens)
        if not decision.allowed:
            return decision
        for scope in scopes:
            lim = scope.limits
            if lim.rpm is not None:
                self._buckets[(scope.kind, scope.id, "rpm")].level -= 1
            if lim.tpm is not None:
                self._buckets[(scope.kind, scope.id, "tpm")].level -= tokens
            if lim.concurrency is not None:
                slot = (scope.kind, scope.id)
                self._in_flight[slot] = self._in_flight.get(slot, 0) + 1
        grant = Grant(f"local-{next(self._ids)}", tuple(scopes), tokens)
        return replace(decision, grant=grant)

    def correct(self, grant: Grant, actual_tokens: int, now: float) -> None:
        """Settle the up-front token charge against the real usage; only the first call counts.

        A refund never fills a bucket past its capacity; an extra debit may take it
        below zero, so later calls wait until the overrun has been paid back.
        """
        if grant.corrected:
            return
        grant.corrected = True
        delta = max(0, actual_tokens) - grant.tokens
        if delta == 0:
            return
        for scope in grant.scopes:
            if scope.limits.tpm is None:
                continue
            bucket = self._bucket(scope.kind, scope.id, "tpm", scope.limits.tpm, now)
            bucket.level = min(float(scope.limits.tpm), bucket.level - delta)

    def release(self, grant: Grant) -> None:
        """Give back the grant's concurrency slots; only the first call counts."""
        if grant.released:
            return
        grant.released = True
        for scope in grant.scopes:
            if scope.limits.concurrency is None:
                continue
            slot = (scope.kind, scope.id)
            left = self._in_flight.get(slot, 0) - 1
            if left > 0:
                self._in_flight[slot] = left
            else:
                self._in_flight.pop(slot, None)


# -- response headers ------------------------------------------------------------------


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI writes ``x-ratelimit-reset-*``: ``6m0s``, ``1s``, ``20ms``, ``1h2m3s``.

    OpenAI's values are Go's ``time.Duration`` strings (its documented samples are
    ``1s`` and ``6m0s``; live responses show ``20ms`` and ``8.64s``): below a
    second in whole milliseconds, otherwise hours and minutes once a larger unit is
    present, then seconds with up to three decimals. Rounded up to the
    millisecond so a client never retries early.
    """
    ms = math.ceil(seconds * 1000 - 1e-6) if seconds > 0 else 0
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up and at least 1 (0 would invite a hot loop)."""
    return str(max(1, math.ceil(seconds - 1e-6)))


def openai_headers(snapshot: RateSnapshot) -> list[tuple[str, str]]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` as OpenAI sends them."""
    out: list[tuple[str, str]] = []
    for name, window in (("requests", snapshot.requests), ("tokens", snapshot.tokens)):
        if window is None:
            continue
        out.append((f"x-ratelimit-limit-{name}", str(window.limit)))
        out.append((f"x-ratelimit-remaining-{name}", str(window.remaining)))
        out.append((f"x-ratelimit-reset-{name}", format_reset(window.reset)))
    return out


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anthropic_headers(snapshot: RateSnapshot, now_wall: float) -> list[tuple[str, str]]:
    """``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` as Anthropic sends them.

    Anthropic's reset is the moment the bucket is full again, as an RFC 3339 UTC
    time (``2026-12-06T23:59:30Z``); ``now_wall`` is the wall clock (``time.time()``),
    and the moment is rounded up to the second so it is never early.
    """
    out: list[tuple[str, str]] = []
    for name, window in (("requests", snapshot.requests), ("tokens", snapshot.tokens)):
        if window is None:
            continue
        out.append((f"anthropic-ratelimit-{name}-limit", str(window.limit)))
        out.append((f"anthropic-ratelimit-{name}-remaining", str(window.remaining)))
        out.append((f"anthropic-ratelimit-{name}-reset", _rfc3339(math.ceil(now_wall + window.reset))))
    return out
