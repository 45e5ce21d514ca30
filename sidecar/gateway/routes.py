"""Routes: which upstreams serve a call, in which order, and which model version.

A *route* maps a requested model (names or ``fnmatch`` globs) and/or a path (prefixes
of the path after the upstream's mount) to one or more *targets*, each naming an
upstream of the ``upstreams:`` section (which holds its URL, provider key and
timeouts). This module decides, without doing any of it:

- **the order of attempts** (:func:`plan`): targets by ascending ``priority``; among
  targets of one priority the first is drawn at random in proportion to ``weight``,
  the others follow as fallbacks by descending weight (file order on ties). A weight
  of 0 makes a target a fallback only. Upstreams whose circuit breaker is open are
  left out; when none is left the plan is empty and the proxy answers 503
  ``circuit_open``.
- **whether to try the next attempt** (:func:`should_retry`): only for the failures
  the route lists (``connect_error``, ``timeout`` before the first byte, ``5xx``,
  ``429``). What this module cannot see, the proxy enforces: never once a byte went
  to the client, and no new attempt after ``retry.deadline`` from the call's start.
- **the canary split**: ``canary.weight`` percent of calls go to the candidate
  model. With ``sticky: tenant`` the draw is a hash of route name and tenant, so a
  tenant always sees the same version, and raising the weight only moves tenants
  from primary to candidate, never back. The candidate runs on the first-choice
  target; when that attempt fails the call **falls back to the primary model** on
  the route's normal order, because the client must get an answer and the
  candidate is the suspect. Every :class:`Attempt` carries its variant, so metrics,
  spans and ledger rows say which version served the call.
- **rollback state** (:class:`CanaryState`): a rule named in ``canary.rollback_on``
  firing (or an admin) sets the candidate's weight to 0 until the route is promoted
  again; the state is a frozen value replaced by :func:`rollback`,
  :func:`promote` and :func:`set_weight`, and serialised with :func:`dumps` /
  :func:`loads` so a rollback survives a restart. A rollback remembers the
  candidate model it stopped: once the config names a new candidate, the old
  rollback no longer applies to it.

Config (``routes:`` is a list; ``circuit_breakers:`` the breaker defaults)::

    routes:
      - name: chat                        required; [a-z0-9][a-z0-9_-]*; unique
        match:                            required; at least one of models, paths
          models: [gpt-4o, "gpt-4o-*"]    requested model: names or fnmatch globs
          paths: [/v1/chat/completions]   path prefixes after the mount (whole segments)
        targets:                          required; at least one
          - upstream: openai              required; a name from upstreams:
            priority: 0                   lower is tried first
            weight: 1                     >= 0; first-choice share among equal priority
            model: gpt-4o-2024-08-06      optional; the request's model is rewritten to it
        retry:
          attempts: <all>                 1..10; default: one per target (+1 with a canary)
          deadline: 60s                   no new attempt starts after it
          on: [connect_error, timeout, 5xx, 429]
        canary:                           optional
          model: gpt-4o-2024-11-20        required; the candidate model
          weight: 10                      required; percent 0..100 (a float is allowed)
          sticky: none                    none | tenant
          rollback_on: [chat-candidate-errors]   rule names
        breaker: {cooldown: 10s}          optional; overrides circuit_breakers: key by key
    circuit_breakers: {consecutive_failures: 5, error_ratio: 0.5, window: 60s,
                       min_calls: 20, cooldown: 30s}

Every target of a route must share one declared provider (one route, one API shape).
A breaker is per upstream: a route's ``breaker:`` applies to its targets' upstreams,
so two routes sharing an upstream may not override it differently.

Pure module: standard library, :mod:`sidecar.yamlspec` and
:mod:`sidecar.gateway.breaker` only. No I/O, no clock (``now`` is a parameter), no
hidden randomness (``rnd`` is a parameter).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, cast

from yaml.nodes import Node

from sidecar.gateway.breaker import BreakerOverride, BreakerSettings, parse_breaker, parse_breaker_override
from sidecar.yamlspec import Reader, index, join, suggest

__all__ = [
    "FAILURES",
    "MAX_ATTEMPTS",
    "Attempt",
    "Canary",
    "CanaryState",
    "Failure",
    "Match",
    "Plan",
    "RetryPolicy",
    "RollbackEvent",
    "RouteSpec",
    "Target",
    "Variant",
    "breaker_settings",
    "check_routes",
    "dumps",
    "effective_weight",
    "loads",
    "match_route",
    "parse_circuit_breakers",
    "parse_routes",
    "plan",
    "promote",
    "rollback",
    "rollback_message",
    "rollback_rules",
    "set_weight",
    "should_retry",
]

#: Which model version served a call: the route's own, or the canary's candidate.
Variant = Literal["primary", "candidate"]
#: A failed attempt, as the proxy classifies it.
Failure = Literal["connect_error", "timeout", "5xx", "429"]
#: Every failure a route may retry on, in the order the config documents them.
FAILURES: tuple[Failure, ...] = ("connect_error", "timeout", "5xx", "429")
#: The most attempts one call may make: each one can cost a full first-byte timeout.
MAX_ATTEMPTS = 10

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_STICKY = ("none", "tenant")
_ROUTE_KEYS = ("name", "match", "targets", "retry", "canary", "breaker")
_TARGET_KEYS = ("upstream", "priority", "weight", "model")
_STATE_VERSION = 1


# -- model ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """What a call must ask for to take a route; an empty tuple does not constrain."""

    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()

    def matches(self, model: str | None, sub_path: str) -> bool:
        """Models (if given) and paths (if given) both match; a match with neither matches nothing."""
        if not self.models and not self.paths:
            return False
        if self.models and (model is None or not any(fnmatch.fnmatchcase(model, p) for p in self.models)):
            return False
        return not self.paths or any(_under(sub_path, prefix) for prefix in self.paths)


def _under(path: str, prefix: str) -> bool:
    # Whole segments, as mounts match: /v1/chat covers /v1/chat/completions, not /v1/chatty.
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream a route may send a call to."""

    upstream: str
    priority: int = 0
    weight: int = 1
    model: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How far a call may fall back; ``attempts=None`` means one per planned attempt."""

    attempts: int | None = None
    deadline: float = 60.0
    on: tuple[Failure, ...] = FAILURES


@dataclass(frozen=True, slots=True)
class Canary:
    """A candidate model taking ``weight`` percent of a route's calls."""

    model: str
    weight: float
    sticky: Literal["none", "tenant"] = "none"
    rollback_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One entry of ``routes:``."""

    name: str
    match: Match
    targets: tuple[Target, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    canary: Canary | None = None
    breaker: BreakerOverride | None = None

    @property
    def max_attempts(self) -> int:
        """The cap on attempts: ``retry.attempts``, else every target (plus the candidate's)."""
        if self.retry.attempts is not None:
            return self.retry.attempts
        return len(self.targets) + (1 if self.canary is not None else 0)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try: the upstream, the model to rewrite the request to (None: as sent), the version."""

    upstream: str
    model: str | None
    variant: Variant


@dataclass(frozen=True, slots=True)
class Plan:
    """The attempts for one call, in order; ``variant`` is the version the call was assigned.

    Empty ``attempts`` means every target's breaker is open.
    """

    route: str
    variant: Variant
    attempts: tuple[Attempt, ...]


# -- spec -----------------------------------------------------------------------


def _path_prefix(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError('must start with "/"')
    if any(c.isspace() or c in "?#" for c in text):
        raise ValueError("must be a plain path (no spaces, query or fragment)")
    return text.rstrip("/") or "/"


def _parse_match(r: Reader, node: Node, path: str) -> Match:
    m = r.mapping(node, path, ("models", "paths"), what="a match mapping (models, paths)")
    if m is None:
        return Match()
    models = r.string_list(m.get("models"), join(path, "models"), [])
    paths: list[str] = []
    paths_node = m.get("paths")
    items = [] if paths_node is None else r.sequence(paths_node, join(path, "paths"), "a list of paths")
    for i, item in enumerate(items or []):
        prefix = r.convert(item, index(join(path, "paths"), i), _path_prefix, what="path")
        if prefix is not None:
            paths.append(prefix)
    return Match(models=tuple(models), paths=tuple(paths))


def _parse_target(r: Reader, node: Node, path: str) -> Target:
    m = r.mapping(node, path, _TARGET_KEYS, required=("upstream",), what="a target mapping")
    if m is None:
        return Target(upstream="")
    return Target(
        upstream=r.string(m.get("upstream"), join(path, "upstream"), ""),
        priority=r.integer(m.get("priority"), join(path, "priority"), 0),
        weight=r.integer(m.get("weight"), join(path, "weight"), 1, minimum=0),
        model=r.string(m.get("model"), join(path, "model")),
    )


def _parse_retry(r: Reader, node: Node, path: str) -> RetryPolicy:
    m = r.mapping(node, path, ("attempts", "deadline", "on"), what="a retry mapping")
    d = RetryPolicy()
    if m is None:
        return d
    attempts = r.integer(m.get("attempts"), join(path, "attempts"), minimum=1)
    if attempts is not None and attempts > MAX_ATTEMPTS:
        r.problem(m["attempts"], join(path, "attempts"), f"must be at most {MAX_ATTEMPTS}, got {attempts}")
        attempts = None
    on: tuple[Failure, ...] = d.on
    on_node = m.get("on")
    if on_node is not None:
        items = r.sequence(on_node, join(path, "on"), "a list of failures")
        seen: set[str] = set()
        for i, item in enumerate(items or []):
            value = r.string(item, index(join(path, "on"), i), choices=FAILURES)
            if value is not None:
                seen.add(value)
        on = tuple(f for f in FAILURES if f in seen)
    return RetryPolicy(
        attempts=attempts,
        deadline=r.duration(m.get("deadline"), join(path, "deadline"), d.deadline, positive=True),
        on=on,
    )


def _parse_canary(r: Reader, node: Node, path: str) -> Canary | None:
    m = r.mapping(
        node,
        path,
        ("model", "weight", "sticky", "rollback_on"),
        required=("model", "weight"),
        what="a canary mapping",
    )
    if m is None:
        return None
    sticky = r.string(m.get("sticky"), join(path, "sticky"), "none", choices=_STICKY)
    return Canary(
        model=r.string(m.get("model"), join(path, "model"), ""),
        weight=r.number(m.get("weight"), join(path, "weight"), 0.0),
        sticky=cast(Literal["none", "tenant"], sticky),
        rollback_on=tuple(r.string_list(m.get("rollback_on"), join(path, "rollback_on"), [])),
    )


def _parse_route(r: Reader, node: Node, path: str) -> RouteSpec:
    m = r.mapping(node, path, _ROUTE_KEYS, required=("name", "match", "targets"), what="a route mapping")
    if m is None:  # a placeholder keeps the indexes of the routes after it right for check_routes
        return RouteSpec(name="", match=Match(), targets=())
    targets_path = join(path, "targets")
    target_nodes = m.get("targets")
    items = [] if target_nodes is None else r.sequence(target_nodes, targets_path, "a list of targets")
    match, retry, canary, breaker = m.get("match"), m.get("retry"), m.get("canary"), m.get("breaker")
    return RouteSpec(
        name=r.string(
            m.get("name"),
            join(path, "name"),
            "",
            pattern=_NAME,
            pattern_hint="must match [a-z0-9][a-z0-9_-]*",
        ),
        match=Match() if match is None else _parse_match(r, match, join(path, "match")),
        targets=tuple(_parse_target(r, t, index(targets_path, i)) for i, t in enumerate(items or [])),
        retry=RetryPolicy() if retry is None else _parse_retry(r, retry, join(path, "retry")),
        canary=None if canary is None else _parse_canary(r, canary, join(path, "canary")),
        breaker=None if breaker is None else parse_breaker_override(r, breaker, join(path, "breaker")),
    )


def parse_routes(r: Reader, node: Node, path: str, ctx: object = None) -> tuple[RouteSpec, ...]:
    """Read the ``routes:`` section (see the module docstring); ``ctx`` fits the section signature.

    Problems are recorded on ``r`` with their line and column; cross-route and
    cross-section rules are :func:`check_routes`'.
    """
    items = r.sequence(node, path, "a list of routes")
    return tuple(_parse_route(r, item, index(path, i)) for i, item in enumerate(items or []))


def parse_circuit_breakers(r: Reader, node: Node, path: str, ctx: object = None) -> BreakerSettings:
    """Read the ``circuit_breakers:`` section: the breaker settings of every upstream."""
    return parse_breaker(r, node, path)


# -- validation -------------------------------------------------------------------


def check_routes(
    routes: Sequence[RouteSpec], upstream_names: Mapping[str, str | None], path: str = "routes"
) -> list[tuple[str, str]]:
    """What the parsed routes break, as ``(field path, message)`` pairs.

    ``upstream_names`` maps each upstream's name to its declared provider (None:
    detected per call). Checked: a match with neither models nor paths, no targets,
    unknown upstreams, a target listed twice, targets of different providers, a
    canary weight outside 0..100, duplicate route names, and two routes overriding
    one upstream's breaker differently. Rule names in ``rollback_on`` live in the
    rule files: see :func:`rollback_rules`.
    """
    out: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    breakers: dict[str, tuple[int, BreakerOverride]] = {}
    for i, route in enumerate(routes):
        rp = index(path, i)
        if route.name and route.name in names:
            out.append(
                (join(rp, "name"), f'duplicate route name "{route.name}" (also {path}[{names[route.name]}])')
            )
        names.setdefault(route.name, i)
        if not route.match.models and not route.match.paths:
            out.append((join(rp, "match"), "needs models or paths (or both)"))
        if not route.targets:
            out.append((join(rp, "targets"), "at least one target is required"))
        out.extend(_check_targets(route, rp, upstream_names))
        if route.canary is not None and not 0 <= route.canary.weight <= 100:
            out.append(
                (
                    join(rp, "canary.weight"),
                    f"must be a percentage from 0 to 100, got {route.canary.weight:g}",
                )
            )
        if route.breaker is not None:
            for target in route.targets:
                first = breakers.setdefault(target.upstream, (i, route.breaker))
                if first[0] != i and first[1] != route.breaker:
                    out.append(
                        (
                            join(rp, "breaker"),
                            f'upstream "{target.upstream}" already has other breaker settings '
                            f"from {path}[{first[0]}]: a breaker is per upstream",
                        )
                    )
    return out


def _check_targets(
    route: RouteSpec, rp: str, upstream_names: Mapping[str, str | None]
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: dict[tuple[str, str | None], int] = {}
    provider_of: tuple[int, str] | None = None  # the first target declaring a provider
    for j, target in enumerate(route.targets):
        tp = index(join(rp, "targets"), j)
        if not target.upstream:
            continue
        if target.upstream not in upstream_names:
            close = suggest(target.upstream, upstream_names)
            hint = f'; did you mean "{close}"?' if close else f" (upstreams: {', '.join(upstream_names)})"
            out.append((join(tp, "upstream"), f'unknown upstream "{target.upstream}"{hint}'))
            continue
        key = (target.upstream, target.model)
        if key in seen:
            out.append((tp, f"same upstream and model as targets[{seen[key]}]: it would be tried twice"))
        seen.setdefault(key, j)
        provider = upstream_names[target.upstream]
        if provider is None:
            continue
        if provider_of is None:
            provider_of = (j, provider)
        elif provider != provider_of[1]:
            out.append(
                (
                    join(tp, "upstream"),
                    f'upstream "{target.upstream}" is {provider} but targets[{provider_of[0]}] is '
                    f"{provider_of[1]}: the targets of one route must speak one API",
                )
            )
    return out


def rollback_rules(routes: Iterable[RouteSpec]) -> dict[str, list[str]]:
    """Rule name → the routes whose canary it rolls back (the lead checks the names exist)."""
    out: dict[str, list[str]] = {}
    for route in routes:
        if route.canary is not None:
            for rule in route.canary.rollback_on:
                names = out.setdefault(rule, [])
                if route.name not in names:
                    names.append(route.name)
    return out


def breaker_settings(
    routes: Iterable[RouteSpec], upstreams: Iterable[str], defaults: BreakerSettings | None
) -> dict[str, BreakerSettings]:
    """The breaker settings of every upstream that has a breaker.

    With ``circuit_breakers:`` present (``defaults``) every upstream gets one;
    without it only route targets do, on the built-in defaults. A route's
    ``breaker:`` overrides the base for its targets (:func:`check_routes` makes
    sure no two routes disagree).
    """
    base = defaults or BreakerSettings()
    out: dict[str, BreakerSettings] = {}
    if defaults is not None:
        out = dict.fromkeys(upstreams, defaults)
    for route in routes:
        for target in route.targets:
            if route.breaker is not None:
                out[target.upstream] = route.breaker.apply(base)
            else:
                out.setdefault(target.upstream, base)
    return out


# -- routing --------------------------------------------------------------------


def match_route(routes: Iterable[RouteSpec], model: str | None, sub_path: str) -> RouteSpec | None:
    """The first route (in file order) matching the requested model and the path after the mount."""
    for route in routes:
        if route.match.matches(model, sub_path):
            return route
    return None


def should_retry(route: RouteSpec, failure: str) -> bool:
    """Whether ``failure`` lets the call go on to its next attempt (the proxy checks the rest)."""
    if failure not in FAILURES:
        raise ValueError(f"unknown failure {failure!r}: expected one of {', '.join(FAILURES)}")
    return failure in route.retry.on


def _sticky_draw(route: str, tenant: str) -> float:
    """A uniform number in [0, 1) fixed by route and tenant (the same in every process)."""
    digest = hashlib.blake2b(f"{route}\0{tenant}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _order(targets: Sequence[Target], u: float) -> list[Target]:
    """Targets by priority; in each priority a weighted draw first, the rest by weight.

    ``u`` is uniform in [0, 1). After each draw it is rescaled within the slice
    that was drawn, which leaves it uniform and independent of the choice, so the
    next priority's draw is not tied to this one's.
    """
    out: list[Target] = []
    priorities = sorted({t.priority for t in targets})
    for priority in priorities:
        group = [t for t in targets if t.priority == priority]
        by_weight = sorted(range(len(group)), key=lambda k: -group[k].weight)  # stable: file order on ties
        total = sum(t.weight for t in group)
        first = by_weight[0]
        if total > 0:
            x = u * total
            acc = 0
            for k, t in enumerate(group):
                if t.weight and x < acc + t.weight:
                    first = k
                    u = min(max((x - acc) / t.weight, 0.0), math.nextafter(1.0, 0.0))
                    break
                acc += t.weight
        out.append(group[first])
        out.extend(group[k] for k in by_weight if k != first)
    return out


def plan(
    route: RouteSpec,
    *,
    tenant: str,
    rnd: float,
    canary_weight: float,
    allowed: Callable[[str], bool],
) -> Plan:
    """The attempts for one call on ``route``.

    ``rnd`` is one uniform draw in [0, 1) (the proxy passes ``random.random()``);
    it decides the canary split (unless sticky) and then the weighted choices,
    rescaled in between so they stay independent. ``canary_weight`` is the
    effective percentage (:func:`effective_weight`, 0 once rolled back).
    ``allowed(upstream)`` must not take a half-open breaker's probe
    (:meth:`~sidecar.gateway.breaker.CircuitBreaker.available`): a plan lists
    upstreams the call may never reach; the proxy calls ``allow()`` right before
    each attempt it makes and skips the attempt when that says no.

    A candidate call makes its first attempt with the canary model on the
    first-choice target, then falls back to the primary model in the normal
    order. The attempts are capped at :attr:`RouteSpec.max_attempts`.
    """
    if not 0.0 <= rnd < 1.0:
        raise ValueError(f"rnd must be in [0, 1), got {rnd!r}")
    u = rnd
    candidate = False
    canary = route.canary
    share = 0.0 if canary is None else min(max(canary_weight / 100.0, 0.0), 1.0)
    if canary is not None and share > 0.0:
        if canary.sticky == "tenant":
            candidate = _sticky_draw(route.name, tenant) < share
        else:
            candidate = u < share
            # Rescale: u given the branch is uniform on its slice; map it back onto [0, 1).
            u = u / share if candidate else (u - share) / (1.0 - share)
            u = min(max(u, 0.0), math.nextafter(1.0, 0.0))
    verdicts: dict[str, bool] = {}  # ask once per upstream: one answer for the whole plan
    for t in route.targets:
        if t.upstream not in verdicts:
            verdicts[t.upstream] = allowed(t.upstream)
    usable = [t for t in route.targets if verdicts[t.upstream]]
    ordered = _order(usable, u) if usable else []
    attempts = [Attempt(t.upstream, t.model, "primary") for t in ordered]
    if candidate and canary is not None and ordered:
        attempts.insert(0, Attempt(ordered[0].upstream, canary.model, "candidate"))
    else:
        candidate = False
    return Plan(
        route=route.name,
        variant="candidate" if candidate else "primary",
        attempts=tuple(attempts[: route.max_attempts]),
    )


# -- canary state -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RollbackEvent:
    """Why and when a route's candidate was stopped.

    ``model`` is the candidate stopped: a rollback holds only while the route's
    canary still names it. ``value`` and ``threshold`` are the rule's (None when
    ``by == "admin"``).
    """

    route: str
    model: str
    rule: str
    value: float | None
    threshold: float | None
    at: float
    by: Literal["rule", "admin"]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class CanaryState:
    """Every route's canary state, replaced (never changed) by the functions below.

    ``weights`` holds admin-set weights that replace the configured one (none by
    default); ``rolled_back`` the routes whose candidate is stopped;
    ``promoted_at`` when each route was last promoted.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    rolled_back: Mapping[str, RollbackEvent] = field(default_factory=dict)
    promoted_at: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("weights", "rolled_back", "promoted_at"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


def rollback(
    state: CanaryState,
    route: RouteSpec,
    rule: str,
    value: float | None,
    threshold: float | None,
    now: float,
    by: Literal["rule", "admin"],
) -> CanaryState:
    """``state`` with ``route``'s candidate stopped; unchanged (the same object) if already so.

    The first rollback's cause is kept: a second rule firing later does not
    rewrite why the candidate was stopped. Callers notify only when the state
    changed (``new is not state``).
    """
    if route.canary is None:
        raise ValueError(f'route "{route.name}" has no canary to roll back')
    held = state.rolled_back.get(route.name)
    if held is not None and held.model == route.canary.model:
        return state
    event = RollbackEvent(route.name, route.canary.model, rule, value, threshold, now, by)
    return replace(state, rolled_back={**state.rolled_back, route.name: event})


def promote(state: CanaryState, route: str, now: float) -> CanaryState:
    """``state`` with ``route``'s rollback and admin weight cleared: the configured weight applies again.

    Promoting does not make the candidate the primary model: that is a config change.
    """
    return CanaryState(
        weights={k: v for k, v in state.weights.items() if k != route},
        rolled_back={k: v for k, v in state.rolled_back.items() if k != route},
        promoted_at={**state.promoted_at, route: now},
    )


def set_weight(state: CanaryState, route: str, weight: float) -> CanaryState:
    """``state`` with an admin weight (percent) replacing the configured one until promoted."""
    if not (math.isfinite(weight) and 0 <= weight <= 100):
        raise ValueError(f"canary weight must be a percentage from 0 to 100, got {weight!r}")
    return replace(state, weights={**state.weights, route: float(weight)})


def effective_weight(state: CanaryState, route: RouteSpec) -> float:
    """The candidate's percentage now: 0 without a canary or while rolled back."""
    canary = route.canary
    if canary is None:
        return 0.0
    held = state.rolled_back.get(route.name)
    if held is not None and held.model == canary.model:
        return 0.0
    return state.weights.get(route.name, canary.weight)


def rollback_message(event: RollbackEvent) -> str:
    """The notification text of a rollback."""
    if event.by == "admin":
        return f"rolled back {event.model} on route {event.route} by hand (admin)"
    return (
        f"rolled back {event.model} on route {event.route} because rule {event.rule} fired: "
        f"{_num(event.value)} vs {_num(event.threshold)}"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def dumps(state: CanaryState) -> str:
    """The state as JSON (stable key order), for the data directory."""
    doc = {
        "version": _STATE_VERSION,
        "weights": dict(state.weights),
        "rolled_back": {
            name: {
                "model": e.model,
                "rule": e.rule,
                "value": e.value,
                "threshold": e.threshold,
                "at": e.at,
                "by": e.by,
            }
            for name, e in state.rolled_back.items()
        },
        "promoted_at": dict(state.promoted_at),
    }
    return json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n"


def loads(text: str) -> CanaryState:
    """Read :func:`dumps`' JSON; anything else raises :class:`ValueError` saying what and where."""
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"canary state is not valid JSON: {exc}") from None
    top = _obj(doc, "canary state")
    unknown = set(top) - {"version", "weights", "rolled_back", "promoted_at"}
    if unknown:
        raise ValueError(f"canary state: unknown keys {', '.join(sorted(unknown))}")
    if top.get("version") != _STATE_VERSION:
        raise ValueError(
            f"canary state: unsupported version {top.get('version')!r} (expected {_STATE_VERSION})"
        )
    weights: dict[str, float] = {}
    for name, w in _obj(top.get("weights", {}), "weights").items():
        value = _finite(w, f"weights.{name}")
        if not 0 <= value <= 100:
            raise ValueError(f"canary state: weights.{name}: must be from 0 to 100, got {value:g}")
        weights[name] = value
    events: dict[str, RollbackEvent] = {}
    for name, raw in _obj(top.get("rolled_back", {}), "rolled_back").items():
        where = f"rolled_back.{name}"
        e = _obj(raw, where)
        keys = {"model", "rule", "value", "threshold", "at", "by"}
        if set(e) != keys:
            raise ValueError(f"canary state: {where}: expected keys {', '.join(sorted(keys))}")
        by = e["by"]
        if by not in ("rule", "admin"):
            raise ValueError(f'canary state: {where}.by: expected "rule" or "admin", got {by!r}')
        events[name] = RollbackEvent(
            route=name,
            model=_str(e["model"], f"{where}.model"),
            rule=_str(e["rule"], f"{where}.rule"),
            value=None if e["value"] is None else _finite(e["value"], f"{where}.value"),
            threshold=None if e["threshold"] is None else _finite(e["threshold"], f"{where}.threshold"),
            at=_finite(e["at"], f"{where}.at"),
            by=by,
        )
    promoted = {
        name: _finite(t, f"promoted_at.{name}")
        for name, t in _obj(top.get("promoted_at", {}), "promoted_at").items()
    }
    return CanaryState(weights=weights, rolled_back=events, promoted_at=promoted)


def _no_constant(name: str) -> Any:
    raise ValueError(f"canary state: {name} is not a number")


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"canary state: {where}: expected an object, got {type(value).__name__}")
    return cast(dict[str, Any], value)


def _finite(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"canary state: {where}: expected a finite number, got {value!r}")
    return float(value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"canary state: {where}: expected a non-empty string, got {value!r}")
    return value
