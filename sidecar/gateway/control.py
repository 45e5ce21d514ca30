"""The gateway at run time: what the proxy asks before and after each upstream attempt.

One :class:`Gateway` per process holds the live state of issue 6's features, each off
unless its config section is present:

- ``keys``: virtual keys (:mod:`sidecar.gateway.keys`), the keys file re-read off the loop
  (:mod:`sidecar.gateway.secrets`); the tenant comes from the key.
- provider keys: ``upstreams[].api_key`` files watched off the loop, injected per attempt.
- ``rate_limits`` (+ ``state`` for a fleet): token buckets charged before the call and
  corrected when its usage is known (:mod:`sidecar.gateway.ratelimit`,
  :mod:`sidecar.gateway.sharedstate`).
- ``routes`` and ``circuit_breakers``: the attempt plan, fallback and breakers
  (:mod:`sidecar.gateway.routes`, :mod:`sidecar.gateway.breaker`).
- canaries: the split, automatic rollback when a rule named by the route fires, and
  promote/rollback by hand; the state is kept in ``data_dir/canary-state.json`` so a
  rollback survives a restart.

The request path only reads in-memory state here (no file, no lock, no thread); Redis is
the one awaited call, bounded by ``state.timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sidecar.config import ApiKeyConfig, Config, UpstreamConfig
from sidecar.gateway import keys as keys_mod
from sidecar.gateway import ratelimit, routes
from sidecar.gateway.breaker import BreakerState, CircuitBreaker, Transition
from sidecar.gateway.secrets import KeysFileWatcher, SecretFiles
from sidecar.metrics import Metrics
from sidecar.model import Usage
from sidecar.providers.base import output_cap

if TYPE_CHECKING:
    from sidecar.gateway.budgets import SharedBudgets
    from sidecar.gateway.sharedstate import SharedLimiter
    from sidecar.providers import Shape
    from sidecar.proxy import _Call

log = logging.getLogger("sidecar.gateway")

CANARY_STATE_FILE = "canary-state.json"
_NO_LIMITS = ratelimit.RateLimitsConfig()
#: Outcomes that count against an upstream's breaker. A 429 is the provider's quota
#: signal with its own Retry-After, and a 4xx is the client's doing: neither opens it.
BREAKER_FAILURES = frozenset({"5xx", "connect_error", "timeout"})


@dataclass(frozen=True, slots=True)
class Target:
    """One planned attempt: the upstream, the model it is sent with, and the retry policy."""

    upstream: str
    model: str | None
    variant: str
    deadline: float  # seconds after the call started; no attempt starts after it
    retryable: frozenset[str]

    def retry_on(self, outcome: str) -> bool:
        """Whether a failure with this outcome may move on to the next target."""
        return outcome in self.retryable


@dataclass(frozen=True, slots=True)
class Planned:
    """The attempts a route planned for one call (empty: every breaker is open)."""

    route: str
    targets: list[Target]
    retry_after: float = 0.0  # with no target: seconds until a breaker lets a probe through


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal by policy: the answer's status, reason label, message and extra headers."""

    status: int
    reason: str  # llm_throttled_requests_total{reason}
    message: str
    code: str
    headers: tuple[tuple[str, str], ...] = ()


class Admission:
    """What the gateway granted one call: its key, tenant and rate-limit charge."""

    __slots__ = ("charged", "entry", "grant", "limiter", "refusal", "released", "settled", "tenant")

    def __init__(
        self,
        tenant: str,
        entry: keys_mod.KeyEntry | None = None,
        refusal: tuple[int, str, str] | None = None,
    ) -> None:
        self.tenant = tenant
        self.entry = entry
        self.refusal = refusal  # (status, reason, message) when authentication failed
        self.grant: Any = None
        self.limiter: Any = None
        self.charged = 0
        self.released = False
        self.settled = False

    def allows_model(self, model: str | None) -> bool:
        """Whether the key may use ``model`` (keys without a model list may use any)."""
        if self.entry is None or not self.entry.models:
            return True
        return model is not None and any(fnmatchcase(model, pattern) for pattern in self.entry.models)


def _key_value(key: ApiKeyConfig, secrets: SecretFiles) -> str | None:
    if key.from_env:
        return os.environ.get(key.from_env) or None
    if key.from_file:
        return secrets.value(key.from_file)
    return None


class Gateway:
    """Keys, limits, routes, breakers and canaries for one sidecar process."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.config = config
        self.secrets = SecretFiles(on_reload=self._count_reload)
        self.keys_watcher: KeysFileWatcher | None = None
        self.shared: SharedLimiter | None = None
        self.local = ratelimit.LocalLimiter()
        self.estimator: Callable[[Shape, bytes, str | None], int] | None = None
        self.breakers: dict[str, CircuitBreaker] = {}
        self.canary = routes.CanaryState()
        self.canary_path: Path | None = None
        self.notify: Callable[[str, str], None] | None = None  # (title, body) to the notify channels
        self._poll_task: asyncio.Task[None] | None = None
        #: Reject budgets summed across the fleet in Redis (set by the app when state is shared).
        self.shared_budgets: SharedBudgets | None = None
        self._apply(config)

    # -- configuration ------------------------------------------------------------------
    @property
    def keys_enabled(self) -> bool:
        return self.config.keys is not None

    @property
    def active(self) -> bool:
        """False when no gateway section is configured (the proxy then skips the gateway)."""
        c = self.config
        return bool(
            c.keys is not None
            or c.rate_limits is not None
            or c.routes
            or c.circuit_breakers is not None
            or (c.state is not None and bool(c.state.url))  # shared reject budgets
            or any(u.api_key is not None and u.api_key.from_file for u in c.upstreams)
        )

    def _apply(self, config: Config) -> None:
        """Take a (validated) config: breakers for the new upstreams, secret files to watch."""
        self.config = config
        self.routes = config.routes
        self.rollback_rules = routes.rollback_rules(config.routes)
        wanted = routes.breaker_settings(
            config.routes, [u.name for u in config.upstreams], config.circuit_breakers
        )
        kept: dict[str, CircuitBreaker] = {}
        for name, settings in wanted.items():
            old = self.breakers.get(name)
            kept[name] = old if old is not None and old.settings == settings else CircuitBreaker(settings)
            self.metrics.upstream_state.labels(name).set(int(kept[name].state(self.clock())))
        self.breakers = kept
        self.secrets.watch(
            [u.api_key.from_file for u in config.upstreams if u.api_key and u.api_key.from_file]
        )
        for route in config.routes:
            if route.canary is not None:
                self.metrics.canary_weight.labels(route.name).set(routes.effective_weight(self.canary, route))

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: new routes and limits apply to calls that start from now on.

        Runs on the event loop. A ``keys`` section added by the reload starts its watcher;
        until the keys file is read, calls get 401 (never an unauthenticated pass).
        """
        self._apply(config)
        if config.keys is None:
            return
        if self.keys_watcher is not None:
            self.keys_watcher.reconfigure(config.keys)
        else:
            self.keys_watcher = KeysFileWatcher(config.keys, on_reload=self._count_reload)
            task = asyncio.ensure_future(self.keys_watcher.start(strict=False))
            task.add_done_callback(_log_failure)

    async def start(self, data_dir: Path, *, strict: bool = True) -> None:
        """Read secret files, the keys file and the canary state (in threads); connect Redis.

        ``strict``: a keys file that cannot be read raises :class:`ConfigError` (at process
        start); otherwise (a reload) its problems are logged and calls get 401 until it is fixed.
        """
        await self.secrets.start()
        if self.config.keys is not None:
            self.keys_watcher = KeysFileWatcher(self.config.keys, on_reload=self._count_reload)
            await self.keys_watcher.start(strict=strict)
        self.canary_path = data_dir / CANARY_STATE_FILE
        self.canary = await asyncio.to_thread(self._load_canary, self.canary_path)
        self._apply(self.config)
        if self.config.state is not None and self.config.state.url:
            from sidecar.gateway.sharedstate import SharedLimiter

            # A concurrency slot's lease outlives the longest call, so a replica that dies
            # holding slots frees them after at most this long.
            lease = max([600.0, *(u.timeouts.total for u in self.config.upstreams)]) + 60.0
            self.shared = SharedLimiter.from_config(
                self.config.state,
                self.local,
                lease=lease,
                on_state=lambda up: self.metrics.state_backend_up.set(1 if up else 0),
                on_error=lambda op: self.metrics.state_backend_errors.labels(op).inc(),
            )
            await self.shared.start()
        self._poll_task = asyncio.create_task(self._poll(), name="gateway:breakers")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.poll_breakers()
            except Exception:
                log.exception("gateway: polling the circuit breakers failed")

    async def stop(self) -> None:
        """Stop the watchers and the breaker poll; close the Redis connections."""
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
            self._poll_task = None
        await self.secrets.stop()
        if self.keys_watcher is not None:
            await self.keys_watcher.stop()
        if self.shared is not None:
            await self.shared.aclose()

    def _count_reload(self, outcome: str) -> None:
        self.metrics.keys_reloads.labels(outcome).inc()

    # -- keys -----------------------------------------------------------------------------
    def authenticate(self, headers: Mapping[str, str], header_tenant: str | None) -> Admission:
        """The call's key checked: its tenant, or the 401 to answer."""
        watcher = self.keys_watcher
        if watcher is None or watcher.store is None:
            return Admission("", refusal=(401, "unknown", "the sidecar's keys are not loaded yet"))
        result = watcher.store.authenticate(keys_mod.presented_key(headers), self.clock())
        if isinstance(result, keys_mod.AuthFailure):
            return Admission("", refusal=(401, result.reason, result.message))
        tenant = result.tenant
        if result.trust_tenant_header and header_tenant:
            tenant = header_tenant
        return Admission(tenant, entry=result)

    def provider_key(self, upstream: UpstreamConfig) -> tuple[str, str] | None:
        """The provider key header for an attempt at ``upstream`` (read from memory, no I/O)."""
        key = upstream.api_key
        if key is None:
            return None
        return key.header_for(_key_value(key, self.secrets))

    # -- rate limits ------------------------------------------------------------------------
    async def admit(self, call: _Call, body: bytes) -> Refusal | None:
        """Charge the call's rate limits up front; a Refusal when one of them is spent."""
        # Key limits (the keys file's limits:) hold without a rate_limits section too.
        limits = self.config.rate_limits or _NO_LIMITS
        entry = call.admission.entry if call.admission is not None else None
        scopes = ratelimit.scopes_for(
            limits,
            call.tenant,
            entry.name if entry is not None else None,
            entry.limits if entry is not None else None,
            call.request_model,
        )
        if not scopes:
            return None
        tokens = 0
        if any(s.limits.tpm is not None for s in scopes):
            tokens = await self._token_estimate(call, body, limits.default_max_tokens)
        # Buckets run on the monotonic clock (the wall clock may step); Redis uses its own TIME.
        limiter: Any
        if self.shared is not None:
            limiter = self.shared
            decision = await self.shared.try_acquire(scopes, tokens, time.monotonic())
        else:
            limiter = self.local
            decision = self.local.try_acquire(scopes, tokens, time.monotonic())
        if not decision.allowed:
            return self._refusal(call, decision)
        if call.admission is None:
            call.admission = Admission(call.tenant)
        call.admission.grant = decision.grant
        call.admission.limiter = limiter
        call.admission.charged = tokens
        return None

    async def _token_estimate(self, call: _Call, body: bytes, default_max_tokens: int) -> int:
        shape = call.shape
        prompt = 0
        if shape is not None and self.estimator is not None:
            prompt = await asyncio.to_thread(self.estimator, shape, body, call.request_model)
        # The shape read the output cap when it parsed the request; only a body no shape
        # parsed (an unknown path) is read here.
        cap = call.max_tokens if shape is not None else requested_max_tokens(body)
        return ratelimit.estimate_request_tokens(prompt, cap, default_max_tokens)

    def _refusal(self, call: _Call, decision: Any) -> Refusal:
        reason = decision.reason or "rpm"
        scope = decision.scope
        where = f"{scope.kind} {scope.id}" if scope is not None else "this caller"
        provider = call.provider or "openai"
        headers: list[tuple[str, str]] = []
        if decision.snapshot is not None:
            if provider == "anthropic":
                headers.extend(ratelimit.anthropic_headers(decision.snapshot, self.clock()))
            else:
                headers.extend(ratelimit.openai_headers(decision.snapshot))
        if reason == "state_unavailable":
            wait = decision.retry_after or 1.0
            headers.append(("retry-after", ratelimit.retry_after_header(wait)))
            return Refusal(
                503, reason, "rate-limit state is unavailable", "state_unavailable", tuple(headers)
            )
        if decision.never_passes:
            message = f"this request needs more tokens than the {reason} limit of {where} allows at all"
        else:
            wait = decision.retry_after or 1.0
            message = f"rate limit reached for {where}: {reason}; retry after {wait:.1f}s"
            headers.append(("retry-after", ratelimit.retry_after_header(wait)))
        code = "rate_limit_exceeded"
        return Refusal(429, reason, message, code, tuple(headers))

    def release(self, admission: Admission) -> None:
        """The call is over: free its concurrency slots (once)."""
        if admission.released or admission.grant is None:
            return
        admission.released = True
        limiter = admission.limiter
        if limiter is self.local:
            self.local.release(admission.grant)
        elif limiter is not None:
            task = asyncio.ensure_future(limiter.release(admission.grant))
            task.add_done_callback(_log_failure)

    def settle(self, admission: Admission, usage: Usage) -> None:
        """The call's real usage is known: correct the token charge (once)."""
        if admission.settled or admission.grant is None or not admission.charged:
            return
        admission.settled = True
        if usage.input is None and usage.output is None:
            return  # nothing reported: the up-front estimate stands
        actual = (usage.input or 0) + (usage.output or 0)
        limiter = admission.limiter
        if limiter is self.local:
            self.local.correct(admission.grant, actual, time.monotonic())
        elif limiter is not None:
            task = asyncio.ensure_future(limiter.correct(admission.grant, actual, time.monotonic()))
            task.add_done_callback(_log_failure)

    # -- routes and breakers ----------------------------------------------------------------
    def plan(
        self, model: str | None, sub_path: str, mounted: str, tenant: str, shape: Shape | None
    ) -> Planned | None:
        """The attempts for this call, or None when no route matches (the mount's upstream then
        serves it alone, behind its breaker when it has one)."""
        now = self.clock()
        route = routes.match_route(self.routes, model, sub_path) if self.routes else None
        if route is None:
            breaker = self.breakers.get(mounted)
            if breaker is None:
                return None
            if not breaker.available(now):
                return Planned("", [], breaker.retry_after(now))
            return Planned("", [Target(mounted, None, "", float("inf"), frozenset())])
        weight = routes.effective_weight(self.canary, route)
        plan = routes.plan(
            route,
            tenant=tenant,
            rnd=self.rng.random(),
            canary_weight=weight,
            allowed=self._probe_allowed(now),
        )
        retry = route.retry
        retryable = frozenset(retry.on)
        targets = [
            Target(
                a.upstream, a.model, a.variant if route.canary is not None else "", retry.deadline, retryable
            )
            for a in plan.attempts
        ]
        if not targets:
            waits = [
                self.breakers[t.upstream].retry_after(now)
                for t in route.targets
                if t.upstream in self.breakers
            ]
            return Planned(route.name, [], min(waits, default=1.0))
        return Planned(route.name, targets)

    def _probe_allowed(self, now: float) -> Callable[[str], bool]:
        # available(), not allow(): planning must not take a half-open probe for a target
        # that may never be tried.
        def allowed(upstream: str) -> bool:
            breaker = self.breakers.get(upstream)
            return breaker is None or breaker.available(now)

        return allowed

    def allow(self, upstream: str) -> bool:
        """Whether an attempt at ``upstream`` may start now (takes the half-open probe)."""
        breaker = self.breakers.get(upstream)
        return breaker is None or breaker.allow(self.clock())

    def retry_after(self, upstream: str) -> float:
        """Seconds until an open breaker lets a probe through (for the 503's Retry-After)."""
        breaker = self.breakers.get(upstream)
        return breaker.retry_after(self.clock()) if breaker is not None else 0.0

    def poll_breakers(self) -> None:
        """Report open → half-open transitions that happen by time alone (called every second)."""
        now = self.clock()
        for upstream, breaker in self.breakers.items():
            transition = breaker.poll(now)
            if transition is not None:
                self._transitioned(upstream, transition, None)

    def record_attempt(self, call: _Call, upstream: str, outcome: str) -> None:
        """An attempt ended: feed its upstream's breaker and note any transition on the call."""
        breaker = self.breakers.get(upstream)
        if breaker is None:
            return
        now = self.clock()
        if outcome == "aborted":
            breaker.cancel_probe()
            return
        if outcome == "429":
            return
        if outcome == "5xx" and call.variant == "candidate":
            # A candidate's errors are its model version's, not the upstream's (the primary
            # version on the same upstream may be fine): the canary's rollback rules judge them.
            return
        transition = breaker.record(outcome not in BREAKER_FAILURES, now)
        if transition is not None:
            self._transitioned(upstream, transition, call)

    def _transitioned(self, upstream: str, transition: Transition, call: _Call | None) -> None:
        state = transition.new
        self.metrics.upstream_state.labels(upstream).set(int(state))
        self.metrics.breaker_transitions.labels(upstream, state.name.lower()).inc()
        if call is not None:
            call.event(
                "circuit_breaker",
                upstream=upstream,
                state=state.name.lower(),
                previous=transition.old.name.lower(),
                reason=transition.reason,
            )
        level = logging.WARNING if state is BreakerState.OPEN else logging.INFO
        log.log(
            level, "circuit breaker of upstream %s: %s (%s)", upstream, state.name.lower(), transition.reason
        )
        if self.notify is not None:
            self.notify(
                f"[CIRCUIT {state.name}] upstream {upstream}",
                f"circuit breaker of upstream {upstream} is now {state.name.lower()}: {transition.reason}",
            )

    # -- canaries ----------------------------------------------------------------------------
    def route(self, name: str) -> routes.RouteSpec | None:
        return next((r for r in self.routes if r.name == name), None)

    def rollback(
        self, name: str, rule: str, value: float | None, threshold: float | None, by: Literal["rule", "admin"]
    ) -> routes.RouteSpec | None:
        """Send none of ``name``'s calls to its candidate until it is promoted again."""
        spec = self.route(name)
        if spec is None or spec.canary is None:
            return None
        old = self.canary
        self.canary = routes.rollback(old, spec, rule, value, threshold, self.clock(), by)
        if self.canary is old:
            return spec  # rolled back already: the first cause stands, nothing new to tell
        self._canary_changed(spec)
        event = self.canary.rolled_back[name]
        message = routes.rollback_message(event)
        log.warning("canary: %s", message)
        self.metrics.canary_rollbacks.labels(name, by).inc()
        if self.notify is not None:
            self.notify(f"[ROLLBACK] route {name}", message)
        return spec

    def promote(self, name: str) -> routes.RouteSpec | None:
        """Clear a rollback: the route's configured canary weight applies again."""
        spec = self.route(name)
        if spec is None or spec.canary is None:
            return None
        self.canary = routes.promote(self.canary, name, self.clock())
        self._canary_changed(spec)
        log.info("canary: route %s promoted; its candidate gets %.4g%% again", name, spec.canary.weight)
        return spec

    def on_alert(self, rule: str, value: float, threshold: float | None) -> None:
        """A rule fired: roll back every route that names it."""
        for name in self.rollback_rules.get(rule, ()):
            self.rollback(name, rule, value, threshold, "rule")

    def describe_route(self, spec: routes.RouteSpec) -> dict[str, Any]:
        """A route's live state for the admin API (``GET /routes``, promote, rollback)."""
        now = self.clock()
        out: dict[str, Any] = {
            "name": spec.name,
            "targets": [
                {
                    "upstream": t.upstream,
                    "priority": t.priority,
                    "weight": t.weight,
                    "model": t.model,
                    "breaker": BreakerState(self.breakers[t.upstream].state(now)).name.lower()
                    if t.upstream in self.breakers
                    else None,
                }
                for t in spec.targets
            ],
        }
        if spec.canary is not None:
            event = self.canary.rolled_back.get(spec.name)
            out["canary"] = {
                "model": spec.canary.model,
                "configured_weight": spec.canary.weight,
                "weight": routes.effective_weight(self.canary, spec),
                "rolled_back": None
                if event is None
                else {
                    "rule": event.rule,
                    "value": event.value,
                    "threshold": event.threshold,
                    "at": event.at,
                    "by": event.by,
                },
            }
        return out

    def describe_routes(self) -> list[dict[str, Any]]:
        return [self.describe_route(spec) for spec in self.routes]

    def _canary_changed(self, spec: routes.RouteSpec) -> None:
        self.metrics.canary_weight.labels(spec.name).set(routes.effective_weight(self.canary, spec))
        path = self.canary_path
        if path is None:
            return
        text = routes.dumps(self.canary)
        task = asyncio.ensure_future(asyncio.to_thread(_write_atomically, path, text))
        task.add_done_callback(_log_failure)

    @staticmethod
    def _load_canary(path: Path) -> routes.CanaryState:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return routes.CanaryState()
        try:
            return routes.loads(text)
        except ValueError as exc:
            log.error(
                "canary state %s is unreadable (%s): every canary starts at its configured weight", path, exc
            )
            return routes.CanaryState()


def requested_max_tokens(body: bytes) -> int | None:
    """The request's output cap (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return output_cap(payload) if isinstance(payload, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway background operation failed: %s", task.exception())
