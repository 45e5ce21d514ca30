"""Routes: parsing with locations, checks, matching, attempt plans, canary splits and rollback state."""

from __future__ import annotations

import collections
import json
import random
import textwrap

import pytest

from sidecar.gateway import routes as rt
from sidecar.gateway.breaker import BreakerOverride, BreakerSettings
from sidecar.gateway.routes import (
    Attempt,
    Canary,
    CanaryState,
    Match,
    RetryPolicy,
    RouteSpec,
    Target,
)
from sidecar.yamlspec import Reader, locate

FULL = """\
routes:
  - name: chat
    match:
      models: [gpt-4o, "gpt-4o-*"]
      paths: [/v1/chat/completions/]
    targets:
      - {upstream: openai, priority: 0, weight: 3}
      - {upstream: azure, weight: 1, model: gpt-4o-2024-08-06}
      - {upstream: backup, priority: 1}
    retry: {attempts: 3, deadline: 20s, on: [5xx, connect_error]}
    canary: {model: gpt-4o-2024-11-20, weight: 12.5, sticky: tenant, rollback_on: [chat-errors, chat-slo]}
    breaker: {cooldown: 10s}
  - name: embeddings
    match: {paths: [/v1/embeddings]}
    targets: [{upstream: openai}]
"""

UPSTREAMS: dict[str, str | None] = {
    "openai": "openai",
    "azure": "openai",
    "backup": None,
    "claude": "anthropic",
}


def parse(text: str) -> tuple[tuple[RouteSpec, ...], list[str]]:
    """Parse the ``routes:`` section of a config text; problems sorted by position, as the loader does."""
    r = Reader("cfg.yaml")
    root = r.compose(textwrap.dedent(text))
    node = locate(root, "routes")
    assert node is not None and node is not root
    routes = rt.parse_routes(r, node, "routes", None)
    return routes, [str(p) for p in sorted(r.problems, key=lambda p: (p.line, p.column))]


def route(*targets: Target, canary: Canary | None = None, attempts: int | None = None) -> RouteSpec:
    return RouteSpec(
        name="chat",
        match=Match(models=("gpt-4o",)),
        targets=targets,
        retry=RetryPolicy(attempts=attempts),
        canary=canary,
    )


def always(_: str) -> bool:
    return True


# -- parsing ----------------------------------------------------------------------


def test_parse_full_example() -> None:
    routes, problems = parse(FULL)
    assert problems == []
    assert routes == (
        RouteSpec(
            name="chat",
            match=Match(models=("gpt-4o", "gpt-4o-*"), paths=("/v1/chat/completions",)),
            targets=(
                Target("openai", 0, 3),
                Target("azure", 0, 1, "gpt-4o-2024-08-06"),
                Target("backup", 1, 1),
            ),
            retry=RetryPolicy(attempts=3, deadline=20.0, on=("connect_error", "5xx")),
            canary=Canary("gpt-4o-2024-11-20", 12.5, "tenant", ("chat-errors", "chat-slo")),
            breaker=BreakerOverride(cooldown=10.0),
        ),
        RouteSpec(name="embeddings", match=Match(paths=("/v1/embeddings",)), targets=(Target("openai"),)),
    )
    assert rt.check_routes(routes, UPSTREAMS) == []
    assert routes[1].retry == RetryPolicy() and routes[1].retry.on == (
        "connect_error",
        "timeout",
        "5xx",
        "429",
    )


def test_parse_errors_each_at_its_own_line_and_column() -> None:
    _, problems = parse(
        """\
        routes:
          - name: Chat
            match: {models: gpt-4o, paths: [v1/chat], modles: [x]}
            targets:
              - {upstream: openai, priority: high, weight: -1, model: 5}
              - openai
              - {priority: 1}
            retry: {attempts: 11, deadline: 0s, on: [5xx, teapot]}
            canary: {model: gpt-4o-new, weight: ten, sticky: user, rollback_on: rule}
            breaker: {cooldown: never}
            extra: 1
          - name: second
            match: {paths: [/v1]}
        """
    )
    assert problems == [
        'cfg.yaml:2:11: routes[0].name: invalid value "Chat": must match [a-z0-9][a-z0-9_-]*',
        'cfg.yaml:3:21: routes[0].match.models: expected a list of strings, got string "gpt-4o"',
        'cfg.yaml:3:37: routes[0].match.paths[0]: invalid path "v1/chat": must start with "/"',
        'cfg.yaml:3:47: routes[0].match.modles: unknown key "modles"; did you mean "models"?',
        'cfg.yaml:5:38: routes[0].targets[0].priority: expected an integer, got string "high"',
        "cfg.yaml:5:52: routes[0].targets[0].weight: must be at least 0, got -1",
        "cfg.yaml:5:63: routes[0].targets[0].model: expected a string, got number 5",
        'cfg.yaml:6:9: routes[0].targets[1]: expected a target mapping, got string "openai"',
        'cfg.yaml:7:9: routes[0].targets[2].upstream: missing required key "upstream"',
        "cfg.yaml:8:23: routes[0].retry.attempts: must be at most 10, got 11",
        "cfg.yaml:8:37: routes[0].retry.deadline: must be greater than 0s",
        'cfg.yaml:8:51: routes[0].retry.on[1]: invalid value "teapot": expected one of '
        'connect_error, timeout, 5xx, 429; did you mean "timeout"?',
        'cfg.yaml:9:41: routes[0].canary.weight: expected a finite number, got string "ten"',
        'cfg.yaml:9:54: routes[0].canary.sticky: invalid value "user": expected one of none, tenant',
        'cfg.yaml:9:73: routes[0].canary.rollback_on: expected a list of strings, got string "rule"',
        'cfg.yaml:10:25: routes[0].breaker.cooldown: invalid duration "never": expected <integer><unit> '
        "parts such as 30s, 1h30m, 500ms (units y, w, d, h, m, s, ms)",
        'cfg.yaml:11:5: routes[0].extra: unknown key "extra"; did you mean "retry"?',
        'cfg.yaml:12:5: routes[1].targets: missing required key "targets"',
    ]


def test_parse_routes_not_a_list_and_route_not_a_mapping() -> None:
    routes, problems = parse("routes: {name: chat}\n")
    assert routes == ()
    assert problems == ["cfg.yaml:1:9: routes: expected a list of routes, got a mapping"]
    routes, problems = parse(
        "routes: [chat, {name: b, match: {paths: [/]}, targets: [{upstream: openai}]}]\n"
    )
    assert problems == ['cfg.yaml:1:10: routes[0]: expected a route mapping, got string "chat"']
    # A placeholder keeps the next route at index 1, so its findings point at the right place.
    assert [r.name for r in routes] == ["", "b"]


def test_parse_canary_requires_model_and_weight() -> None:
    _, problems = parse(
        """\
        routes:
          - name: chat
            match: {models: [a]}
            targets: [{upstream: openai}]
            canary: {sticky: tenant}
        """
    )
    assert problems == [
        'cfg.yaml:5:13: routes[0].canary.model: missing required key "model"',
        'cfg.yaml:5:13: routes[0].canary.weight: missing required key "weight"',
    ]


def test_parse_circuit_breakers_section() -> None:
    r = Reader("cfg.yaml")
    node = r.compose("{consecutive_failures: 2, window: 30s}")
    assert node is not None
    assert rt.parse_circuit_breakers(r, node, "circuit_breakers", None) == BreakerSettings(
        consecutive_failures=2, window=30.0
    )
    assert r.problems == []


# -- checks -----------------------------------------------------------------------

BAD = """\
routes:
  - name: chat
    match: {}
    targets:
      - {upstream: openai}
      - {upstream: opnai}
      - {upstream: claude}
      - {upstream: openai}
    canary: {model: x, weight: 101}
    breaker: {cooldown: 10s}
  - name: chat
    match: {paths: [/v1]}
    targets: []
  - name: other
    match: {paths: [/v2]}
    targets: [{upstream: openai}, {upstream: backup}]
    breaker: {cooldown: 20s}
"""


def test_check_routes_findings_and_their_locations() -> None:
    routes, problems = parse(BAD)
    assert problems == []
    findings = rt.check_routes(routes, UPSTREAMS)
    assert findings == [
        ("routes[0].match", "needs models or paths (or both)"),
        ("routes[0].targets[1].upstream", 'unknown upstream "opnai"; did you mean "openai"?'),
        (
            "routes[0].targets[2].upstream",
            'upstream "claude" is anthropic but targets[0] is openai: '
            "the targets of one route must speak one API",
        ),
        ("routes[0].targets[3]", "same upstream and model as targets[0]: it would be tried twice"),
        ("routes[0].canary.weight", "must be a percentage from 0 to 100, got 101"),
        ("routes[1].name", 'duplicate route name "chat" (also routes[0])'),
        ("routes[1].targets", "at least one target is required"),
        (
            "routes[2].breaker",
            'upstream "openai" already has other breaker settings from routes[0]: a breaker is per upstream',
        ),
    ]
    # Each path maps back to a line in the file, as config.load does with its CHECKS.
    root = Reader("cfg.yaml").compose(BAD)
    lines = [locate(root, path).start_mark.line + 1 for path, _ in findings]  # type: ignore[union-attr]
    assert lines == [3, 6, 7, 8, 9, 11, 13, 17]


def test_check_routes_same_upstream_with_another_model_is_a_fallback_not_a_duplicate() -> None:
    spec = route(Target("openai", model="gpt-4o"), Target("openai", priority=1, model="gpt-4o-mini"))
    assert rt.check_routes([spec], UPSTREAMS) == []


def test_check_routes_unknown_upstream_without_a_close_name_lists_them() -> None:
    spec = route(Target("zzz"))
    assert rt.check_routes([spec], {"a": None, "b": None}) == [
        ("routes[0].targets[0].upstream", 'unknown upstream "zzz" (upstreams: a, b)')
    ]


def test_rollback_rules_and_breaker_settings() -> None:
    routes, _ = parse(FULL)
    assert rt.rollback_rules(routes) == {"chat-errors": ["chat"], "chat-slo": ["chat"]}
    # Without circuit_breakers: only route targets get a breaker, on the built-in defaults.
    settings = rt.breaker_settings(routes, ["openai", "azure", "backup", "claude"], None)
    assert settings == {
        "openai": BreakerSettings(cooldown=10.0),
        "azure": BreakerSettings(cooldown=10.0),
        "backup": BreakerSettings(cooldown=10.0),
    }
    # With it: every upstream, the route's override on top of the section's defaults.
    defaults = BreakerSettings(consecutive_failures=2)
    settings = rt.breaker_settings(routes, ["openai", "azure", "backup", "claude"], defaults)
    assert settings["claude"] == defaults
    assert settings["openai"] == BreakerSettings(consecutive_failures=2, cooldown=10.0)


# -- matching and retry ------------------------------------------------------------


def test_match_route_first_match_wins_and_both_constraints_apply() -> None:
    routes, _ = parse(FULL)
    assert rt.match_route(routes, "gpt-4o", "/v1/chat/completions") is routes[0]
    assert rt.match_route(routes, "gpt-4o-mini", "/v1/chat/completions") is routes[0]  # glob
    assert rt.match_route(routes, "gpt-4o", "/v1/embeddings") is routes[1]  # path of 0 fails
    assert rt.match_route(routes, "GPT-4O", "/v1/chat/completions") is None  # case-sensitive
    assert rt.match_route(routes, None, "/v1/chat/completions") is None  # models given, none sent
    assert rt.match_route(routes, None, "/v1/embeddings/x") is routes[1]
    assert rt.match_route(routes, None, "/v1/embeddingsx") is None  # whole segments only
    assert Match(paths=("/",)).matches(None, "/anything")
    assert not Match().matches("gpt-4o", "/v1")


def test_should_retry() -> None:
    spec = RouteSpec("r", Match(paths=("/",)), (Target("a"),), retry=RetryPolicy(on=("timeout", "429")))
    assert rt.should_retry(spec, "timeout") and rt.should_retry(spec, "429")
    assert not rt.should_retry(spec, "5xx") and not rt.should_retry(spec, "connect_error")
    with pytest.raises(ValueError, match="unknown failure 'oops'"):
        rt.should_retry(spec, "oops")


# -- plans ------------------------------------------------------------------------


def test_plan_priorities_and_weight_order() -> None:
    spec = route(Target("a", 0, 3), Target("b", 0, 1, "m-b"), Target("c", 1), Target("d", 0, 5))
    # Cumulative weights in file order: a [0, 3), b [3, 4), d [4, 9) of 9.
    first = {0.0: "a", 0.34: "b", 0.5: "d", 0.999: "d"}
    for rnd, name in first.items():
        p = rt.plan(spec, tenant="t", rnd=rnd, canary_weight=0, allowed=always)
        rest = [u for u in ("d", "a", "b") if u != name]  # by weight, highest first
        assert [a.upstream for a in p.attempts] == [name, *rest, "c"]
        assert p.variant == "primary" and {a.variant for a in p.attempts} == {"primary"}
    p = rt.plan(spec, tenant="t", rnd=0.34, canary_weight=0, allowed=always)
    assert p.attempts[0] == Attempt("b", "m-b", "primary")


def test_plan_weighted_first_choice_frequencies() -> None:
    spec = route(Target("a", 0, 3), Target("b", 0, 1), Target("c", 1, 1), Target("d", 1, 1))
    rng = random.Random(1234)
    n = 20_000
    firsts: collections.Counter[str] = collections.Counter()
    pairs: collections.Counter[tuple[str, str]] = collections.Counter()
    for _ in range(n):
        attempts = rt.plan(spec, tenant="t", rnd=rng.random(), canary_weight=0, allowed=always).attempts
        firsts[attempts[0].upstream] += 1
        pairs[attempts[0].upstream, attempts[2].upstream] += 1
    assert abs(firsts["a"] / n - 0.75) < 0.015  # 5 standard deviations
    # The second priority's draw is independent of the first's: c first half the time, after a or b.
    assert abs(pairs["a", "c"] / firsts["a"] - 0.5) < 0.025
    assert abs(pairs["b", "c"] / firsts["b"] - 0.5) < 0.04


def test_plan_weight_zero_is_a_fallback_only() -> None:
    spec = route(Target("a", 0, 0), Target("b", 0, 1))
    for rnd in (0.0, 0.5, 0.999):
        assert [
            a.upstream for a in rt.plan(spec, tenant="", rnd=rnd, canary_weight=0, allowed=always).attempts
        ] == [
            "b",
            "a",
        ]
    only_zero = route(Target("a", 0, 0), Target("b", 0, 0))
    attempts = rt.plan(only_zero, tenant="", rnd=0.9, canary_weight=0, allowed=always).attempts
    assert [a.upstream for a in attempts] == ["a", "b"]


def test_plan_skips_open_breakers_and_asks_once_per_upstream() -> None:
    spec = route(Target("a", 0, 1), Target("b", 1), Target("a", 2, model="small"), Target("c", 3))
    asked: list[str] = []

    def allowed(upstream: str) -> bool:
        asked.append(upstream)
        return upstream != "a"

    p = rt.plan(spec, tenant="t", rnd=0.0, canary_weight=0, allowed=allowed)
    assert [a.upstream for a in p.attempts] == ["b", "c"]
    assert sorted(asked) == ["a", "b", "c"]
    empty = rt.plan(spec, tenant="t", rnd=0.0, canary_weight=0, allowed=lambda _: False)
    assert empty.attempts == () and empty.variant == "primary"


def test_plan_is_capped_at_the_attempts() -> None:
    targets = [Target(f"u{i}", priority=i) for i in range(5)]
    assert len(rt.plan(route(*targets), tenant="", rnd=0.1, canary_weight=0, allowed=always).attempts) == 5
    capped = route(*targets, attempts=2)
    assert [
        a.upstream for a in rt.plan(capped, tenant="", rnd=0.1, canary_weight=0, allowed=always).attempts
    ] == [
        "u0",
        "u1",
    ]


def test_plan_rejects_rnd_out_of_range() -> None:
    with pytest.raises(ValueError, match="rnd must be in"):
        rt.plan(route(Target("a")), tenant="", rnd=1.0, canary_weight=0, allowed=always)


CANARY = Canary(model="cand", weight=10.0)


def test_candidate_goes_first_then_falls_back_to_the_primary_model() -> None:
    spec = route(Target("a", 0, 1, "prim"), Target("b", 1), canary=CANARY)
    p = rt.plan(spec, tenant="t", rnd=0.05, canary_weight=10, allowed=always)
    assert p.variant == "candidate"
    assert p.attempts == (
        Attempt("a", "cand", "candidate"),
        Attempt("a", "prim", "primary"),
        Attempt("b", None, "primary"),
    )
    assert spec.max_attempts == 3  # default: every target plus the candidate's attempt
    p = rt.plan(spec, tenant="t", rnd=0.5, canary_weight=10, allowed=always)
    assert p.variant == "primary" and p.attempts == (
        Attempt("a", "prim", "primary"),
        Attempt("b", None, "primary"),
    )
    # Rolled back (weight 0): never the candidate.
    assert rt.plan(spec, tenant="t", rnd=0.0, canary_weight=0, allowed=always).variant == "primary"
    # Candidate on the first target the breaker allows.
    p = rt.plan(spec, tenant="t", rnd=0.05, canary_weight=10, allowed=lambda u: u == "b")
    assert p.attempts == (Attempt("b", "cand", "candidate"), Attempt("b", None, "primary"))


def test_canary_split_ratio_and_independent_target_choice() -> None:
    spec = route(Target("a", 0, 3), Target("b", 0, 1), canary=CANARY)
    rng = random.Random(99)
    n = 20_000
    variants: collections.Counter[str] = collections.Counter()
    a_first: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        p = rt.plan(spec, tenant="t", rnd=rng.random(), canary_weight=10, allowed=always)
        variants[p.variant] += 1
        a_first[p.variant] += p.attempts[0].upstream == "a"
    assert abs(variants["candidate"] / n - 0.10) < 0.01
    # Candidates and primaries both spread 3:1 over a and b (the draw was rescaled, not reused).
    assert abs(a_first["candidate"] / variants["candidate"] - 0.75) < 0.05
    assert abs(a_first["primary"] / variants["primary"] - 0.75) < 0.02


def test_sticky_tenant_always_gets_the_same_variant() -> None:
    sticky = Canary(model="cand", weight=10.0, sticky="tenant")
    spec = route(Target("a"), canary=sticky)
    rng = random.Random(7)
    n = 20_000
    chosen = {
        t: rt.plan(spec, tenant=f"tenant-{t}", rnd=rng.random(), canary_weight=10, allowed=always).variant
        for t in range(n)
    }
    share = sum(v == "candidate" for v in chosen.values()) / n
    assert abs(share - 0.10) < 0.01
    for t in range(0, n, 97):  # whatever rnd says, the tenant keeps its variant
        for rnd in (0.0, 0.3, 0.99):
            assert (
                rt.plan(spec, tenant=f"tenant-{t}", rnd=rnd, canary_weight=10, allowed=always).variant
                == chosen[t]
            )
    # Raising the weight only moves tenants to the candidate.
    for t in range(0, n, 13):
        if chosen[t] == "candidate":
            assert (
                rt.plan(spec, tenant=f"tenant-{t}", rnd=0.5, canary_weight=30, allowed=always).variant
                == "candidate"
            )
    # The draw is per route: another route splits tenants differently.
    other = RouteSpec("other", spec.match, spec.targets, canary=sticky)
    others = [
        rt.plan(other, tenant=f"tenant-{t}", rnd=0.5, canary_weight=10, allowed=always).variant
        for t in range(2000)
    ]
    assert others != [chosen[t] for t in range(2000)]


# -- canary state -----------------------------------------------------------------

CANARY_ROUTE = route(Target("a"), canary=CANARY)


def test_rollback_and_promote() -> None:
    state = CanaryState()
    assert rt.effective_weight(state, CANARY_ROUTE) == 10.0
    assert rt.effective_weight(state, route(Target("a"))) == 0.0  # no canary
    rolled = rt.rollback(state, CANARY_ROUTE, "chat-errors", 0.062, 0.05, 100.0, "rule")
    assert rt.effective_weight(rolled, CANARY_ROUTE) == 0.0
    event = rolled.rolled_back["chat"]
    assert event == rt.RollbackEvent("chat", "cand", "chat-errors", 0.062, 0.05, 100.0, "rule")
    assert (
        rt.rollback_message(event)
        == "rolled back cand on route chat because rule chat-errors fired: 0.062 vs 0.05"
    )
    # Already rolled back: the first cause is kept and the state is the same object.
    assert rt.rollback(rolled, CANARY_ROUTE, "chat-slo", 1, 2, 200.0, "rule") is rolled
    promoted = rt.promote(rolled, "chat", 300.0)
    assert rt.effective_weight(promoted, CANARY_ROUTE) == 10.0
    assert promoted.promoted_at == {"chat": 300.0} and promoted.rolled_back == {}
    assert state == CanaryState()  # nothing was changed in place
    with pytest.raises(TypeError):
        rolled.rolled_back["x"] = event  # type: ignore[index]


def test_a_rollback_does_not_stop_a_new_candidate() -> None:
    rolled = rt.rollback(CanaryState(), CANARY_ROUTE, "admin", None, None, 1.0, "admin")
    assert rt.rollback_message(rolled.rolled_back["chat"]) == "rolled back cand on route chat by hand (admin)"
    new_candidate = route(Target("a"), canary=Canary(model="cand-2", weight=10.0))
    assert rt.effective_weight(rolled, new_candidate) == 10.0
    again = rt.rollback(rolled, new_candidate, "r", 1, 2, 5.0, "rule")
    assert again.rolled_back["chat"].model == "cand-2"


def test_rollback_without_canary_and_set_weight() -> None:
    with pytest.raises(ValueError, match="no canary"):
        rt.rollback(CanaryState(), route(Target("a")), "r", 1, 2, 0, "rule")
    state = rt.set_weight(CanaryState(), "chat", 50)
    assert rt.effective_weight(state, CANARY_ROUTE) == 50.0
    assert rt.effective_weight(rt.promote(state, "chat", 1.0), CANARY_ROUTE) == 10.0
    for bad in (-1, 101, float("nan")):
        with pytest.raises(ValueError, match="percentage"):
            rt.set_weight(CanaryState(), "chat", bad)


def test_state_round_trip() -> None:
    state = rt.set_weight(CanaryState(), "other", 25)
    state = rt.rollback(state, CANARY_ROUTE, "chat-errors", 0.5, 0.1, 1700000000.25, "rule")
    state = rt.rollback(
        state,
        RouteSpec("emb", Match(paths=("/",)), (Target("a"),), canary=CANARY),
        "admin",
        None,
        None,
        3.0,
        "admin",
    )
    state = rt.promote(state, "old", 2.0)
    text = rt.dumps(state)
    assert rt.loads(text) == state
    assert rt.dumps(rt.loads(text)) == text
    assert rt.loads(rt.dumps(CanaryState())) == CanaryState()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[]", "canary state: canary state: expected an object, got list"),
        ('{"weights": {}}', "unsupported version None"),
        ('{"version": 2}', "unsupported version 2"),
        ('{"version": 1, "extra": 1}', "unknown keys extra"),
        ('{"version": 1, "weights": {"a": 150}}', "weights.a: must be from 0 to 100"),
        ('{"version": 1, "weights": {"a": NaN}}', "NaN is not a number"),
        ('{"version": 1, "weights": {"a": "10"}}', "weights.a: expected a finite number"),
        ('{"version": 1, "weights": []}', "weights: expected an object, got list"),
        ('{"version": 1, "rolled_back": {"a": {"model": "m"}}}', "rolled_back.a: expected keys"),
        ('{"version": 1, "promoted_at": {"a": true}}', "promoted_at.a: expected a finite number"),
    ],
)
def test_loads_garbage_raises_a_clear_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        rt.loads(text)


def test_loads_bad_rollback_fields() -> None:
    good = {"model": "m", "rule": "r", "value": 1.0, "threshold": None, "at": 5, "by": "rule"}
    assert rt.loads(json.dumps({"version": 1, "rolled_back": {"a": good}})).rolled_back["a"].at == 5.0
    for key, value, message in [
        ("by", "robot", "rolled_back.a.by"),
        ("model", "", "rolled_back.a.model"),
        ("at", None, "rolled_back.a.at"),
        ("value", "high", "rolled_back.a.value"),
    ]:
        with pytest.raises(ValueError, match=message):
            rt.loads(json.dumps({"version": 1, "rolled_back": {"a": {**good, key: value}}}))
