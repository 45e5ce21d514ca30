"""Routes in motion end to end (issue 6): the breaker's timeline, a route reload, and canaries.

Real sidecar processes in front of real aiohttp upstreams (helpers are
``test_gateway_e2e.py``'s): the circuit breaker opening, probing and closing; a reload
with broken routes keeping the last good ones; the canary split between model versions;
and the automatic rollback of a candidate whose rule fires. The upstreams echo the model
they were asked for, so each answer says which version served it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
from collections.abc import Awaitable
from pathlib import Path

import aiohttp

from hardening.support import metric, sidecar_process
from tests.test_e2e_alerting import Receiver
from tests.test_gateway_e2e import (
    ADMIN_TOKEN,
    Upstream,
    admin_get,
    admin_post,
    attempts,
    by_model,
    call,
    delayed,
    fallbacks,
    ledger_rows,
    ok,
    settled,
    status,
    stop,
    until,
    upstream_item,
    upstreams,
    write_config,
)

# --- 5. the circuit breaker's timeline --------------------------------------------------------------


async def test_breaker_opens_probes_and_closes(tmp_path: Path) -> None:
    async with upstreams(("primary", "openai"), ("secondary", "openai")) as (primary, secondary):
        primary.answer = status(500)
        cfg = write_config(
            tmp_path,
            [upstream_item(primary), upstream_item(secondary, mount="/secondary")],
            "routes:\n  - {name: chat, match: {models: [gpt-4o-mini]}, "
            "targets: [{upstream: primary}, {upstream: secondary, priority: 1}]}\n"
            "circuit_breakers: {consecutive_failures: 3, cooldown: 1s}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:

            async def state() -> float:
                return metric(await sc.scrape(s), "llm_upstream_state", upstream="primary")

            async def served(n: int, by: Upstream) -> None:
                replies = await asyncio.gather(*(call(s, sc) for _ in range(n)))
                for reply in replies:
                    assert reply.status == 200, reply
                    assert reply.content == f"from {by.name}"

            assert await state() == 0
            # Closed: two failures fall back, the breaker stays closed; the third opens it.
            await served(1, secondary)
            await served(1, secondary)
            assert await state() == 0
            await served(1, secondary)
            assert await state() == 2
            assert (len(primary.seen), len(secondary.seen)) == (3, 3)
            # Open: calls go straight to the secondary, the primary receives nothing.
            await served(2, secondary)
            assert (len(primary.seen), len(secondary.seen)) == (3, 5)
            assert await state() == 2

            # After the cool-down: half-open, and one probe reaches the primary; it fails: open again.
            await until(lambda: _equals(state(), 1), "half-open", timeout=5)
            assert len(primary.seen) == 3
            await served(1, secondary)
            assert (len(primary.seen), len(secondary.seen)) == (4, 6)
            assert await state() == 2

            # The primary recovers. Half-open again: of three calls at once, only the probe reaches
            # it (it answers slowly, so the others arrive while the probe is out).
            primary.answer = delayed(0.3)
            await until(lambda: _equals(state(), 1), "half-open again", timeout=5)
            replies = await asyncio.gather(*(call(s, sc) for _ in range(3)))
            assert sorted(r.content for r in replies) == [
                "from primary",
                "from secondary",
                "from secondary",
            ]
            assert (len(primary.seen), len(secondary.seen)) == (5, 8)
            assert await state() == 0
            # Closed: traffic is back on the primary.
            primary.answer = ok
            await served(3, primary)
            assert (len(primary.seen), len(secondary.seen)) == (8, 8)

            text = await settled(s, sc, 12)
            assert metric(text, "llm_requests_total", code="200") == 12
            transitions = {
                state: metric(text, "llm_circuit_breaker_transitions_total", upstream="primary", state=state)
                for state in ("open", "half_open", "closed")
            }
            assert transitions == {"open": 2, "half_open": 2, "closed": 1}
            assert attempts(text, "primary", "5xx") == 4
            assert attempts(text, "primary", "success") == 4
            assert fallbacks(text, "primary", "secondary", "5xx") == 4
            assert metric(text, "llm_requests_total", upstream="secondary", route="chat") == 8


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


# --- 8. a reload with broken routes keeps the last good ones -------------------------------------

ROUTES_TO = """\
routes:
  - name: chat
    match: {{models: [gpt-4o-mini]}}
    targets:
      - upstream: {target}
"""


async def test_a_broken_routes_reload_keeps_the_last_good_routes(tmp_path: Path) -> None:
    async with upstreams(("a", "openai"), ("b", "openai")) as (a, b):
        items = [upstream_item(a), upstream_item(b, mount="/b")]
        cfg = write_config(tmp_path, items, ROUTES_TO.format(target="a"))
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            assert (await call(s, sc)).content == "from a"

            write_config(tmp_path, items, ROUTES_TO.format(target="nope"))
            line = cfg.read_text().splitlines().index("      - upstream: nope") + 1
            sc.signal(signal.SIGHUP)

            async def rejected() -> bool:
                return metric(await sc.scrape(s), "llm_config_reload_failures_total") >= 1

            await until(rejected, "the broken reload to be rejected", timeout=10)
            where = re.compile(rf"{re.escape(str(cfg))}:{line}:\d+: .*unknown upstream \"nope\"")

            async def logged() -> bool:
                return where.search(sc.log) is not None

            await until(logged, "the problem with its file:line:col in the log", timeout=5)
            for _ in range(3):  # the old routes still hold
                assert (await call(s, sc)).content == "from a"
            assert len(a.seen) == 4 and b.seen == []

            write_config(tmp_path, items, ROUTES_TO.format(target="b"))
            sc.signal(signal.SIGHUP)

            async def switched() -> bool:
                return (await call(s, sc)).content == "from b"

            await until(switched, "the good reload to switch the route", timeout=10)
            for _ in range(3):
                assert (await call(s, sc)).content == "from b"
            text = await sc.scrape(s)
            assert metric(text, "llm_config_reload_failures_total") == 1
            assert metric(text, "llm_config_reload_failures_total", file=str(cfg)) == 1
            assert sc.tracebacks() == []


# --- 6. the split ---------------------------------------------------------------------------------

SPLIT_ROUTES = """\
routes:
  - {name: split, match: {models: [m-split]}, targets: [{upstream: echo}], canary: {model: cand, weight: 20}}
  - name: sticky
    match: {models: [m-sticky]}
    targets: [{upstream: echo}]
    canary: {model: cand, weight: 20, sticky: tenant}
"""
SHARE = 0.20
BOUND = 0.05
# The served share of n independent draws with p = 0.2 has a standard deviation of
# sqrt(p(1-p)/n). For the +-5 point bound to be 4.5 of those (a correct split then fails
# about once in 150,000 runs) n must be 1,300: at n = 500 the deviation is 1.79 points
# and +-5 points is only 2.8 deviations (a false failure once in ~190 runs).
CALLS = 1300
assert 4.5 * math.sqrt(SHARE * (1 - SHARE) / CALLS) <= BOUND


async def test_canary_split_is_within_statistical_bounds_and_sticky_per_tenant(tmp_path: Path) -> None:
    async with upstreams(("echo", "openai")) as (echo,):
        cfg = write_config(tmp_path, [upstream_item(echo)], SPLIT_ROUTES)
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            served: list[str] = []
            queue = list(range(CALLS))

            async def worker() -> None:
                while queue:
                    queue.pop()
                    reply = await call(s, sc, "m-split", tenant="acme")
                    assert reply.status == 200
                    served.append(reply.model)

            async with asyncio.timeout(40):
                await asyncio.gather(*(worker() for _ in range(8)))
            assert len(served) == CALLS and set(served) <= {"cand", "m-split"}
            share = served.count("cand") / CALLS
            assert abs(share - SHARE) <= BOUND, (share, BOUND)
            # The upstream saw exactly the versions the client was told about.
            assert sorted(echo.models()) == sorted(served)

            # Sticky per tenant: every call of a tenant gets the same version.
            by_tenant: dict[str, set[str]] = {}
            for round_ in range(20):
                replies = await asyncio.gather(
                    *(call(s, sc, "m-sticky", tenant=f"tenant-{t}") for t in range(10))
                )
                for t, reply in enumerate(replies):
                    assert reply.status == 200, (round_, reply)
                    by_tenant.setdefault(f"tenant-{t}", set()).add(reply.model)
            assert all(len(models) == 1 for models in by_tenant.values()), by_tenant
            # The draw is a hash of route and tenant: these ten tenants land on both sides.
            assert {next(iter(m)) for m in by_tenant.values()} == {"cand", "m-sticky"}, by_tenant

            text = await settled(s, sc, CALLS, route="split")
            assert metric(text, "llm_requests_total", route="split", model="cand") == served.count("cand")
            assert metric(text, "llm_canary_weight_percent", route="split") == 20


# --- 7. automatic rollback ---------------------------------------------------------------------------

ROLLBACK_RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, notify: [hook]}
rules:
  - name: cand-errors
    kind: error_rate
    match: {model: cand}
    bad: {error_type: [upstream_5xx]}
    threshold: 50%
    window: 2s
    min_requests: 3
    for: 0s
    severity: page
"""


def rollback_config(tmp: Path, echo: Upstream, receiver: Receiver, retry: str) -> Path:
    rules = tmp / "canary-rules.yaml"
    rules.write_text(ROLLBACK_RULES)
    return write_config(
        tmp,
        [upstream_item(echo)],
        "routes:\n"
        "  - name: chat\n"
        "    match: {models: [gpt-4o-mini]}\n"
        "    targets: [{upstream: echo}]\n"
        f"{retry}"
        "    canary: {model: cand, weight: 50, rollback_on: [cand-errors]}\n"
        f"rules: {{files: [{rules}]}}\n"
        "notify:\n"
        "  group_wait: 0s\n"
        "  timeout: 2s\n"
        f"  channels: {{hook: ['json://127.0.0.1:{receiver.port}/good']}}\n",
    )


async def test_a_failing_candidate_is_rolled_back_and_stays_so_until_promoted(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        async with upstreams(("echo", "openai")) as (echo,):
            echo.answer = by_model({"cand": status(500)})
            # The candidate's 500s reach the client (5xx is not retried) so that the rule, which
            # sees what the client got, counts them; and a failing candidate must not open the
            # breaker of the upstream the primary model shares.
            retry = (
                "    retry: {on: [connect_error, timeout]}\n"
                "    breaker: {consecutive_failures: 1000, min_calls: 1000}\n"
            )
            cfg = rollback_config(tmp_path, echo, receiver, retry)
            async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
                assert metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 50

                async def rolled_back() -> bool:
                    for _ in range(5):
                        await call(s, sc, tenant="acme")
                    return metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 0

                await until(rolled_back, "the rule to roll the candidate back", timeout=15)
                tried = echo.models().count("cand")
                assert tried >= 3
                for _ in range(30):
                    reply = await call(s, sc, tenant="acme")
                    assert reply.status == 200 and reply.model == "gpt-4o-mini"
                assert echo.models().count("cand") == tried  # no more calls go to the candidate

                message = await receiver.wait_for("[ROLLBACK] route chat", timeout=10)
                assert "rolled back cand on route chat because rule cand-errors fired" in message["message"]
                text = await sc.scrape(s)
                assert metric(text, "llm_canary_rollbacks_total", route="chat", by="rule") == 1
                assert metric(text, "llm_canary_rollbacks_total") == 1
                routes = (await admin_get(s, sc, "/routes")).json()["routes"]
                canary = next(r for r in routes if r["name"] == "chat")["canary"]
                assert canary["weight"] == 0 and canary["configured_weight"] == 50
                assert (
                    canary["rolled_back"]["rule"] == "cand-errors" and canary["rolled_back"]["by"] == "rule"
                )
                await stop(sc)
            state = json.loads((tmp_path / "data" / "canary-state.json").read_text())
            assert state["rolled_back"]["chat"]["model"] == "cand"

            # A new process on the same data directory keeps the candidate stopped.
            echo.answer = ok  # the candidate is fixed; only a promotion brings it back
            async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
                assert metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 0
                for _ in range(20):
                    assert (await call(s, sc, tenant="acme")).model == "gpt-4o-mini"
                assert echo.models().count("cand") == tried

                assert (await admin_post(s, sc, "/routes/chat/promote", None)).status == 401
                assert (await admin_post(s, sc, "/routes/chat/promote", "wrong")).status == 401
                assert metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 0
                reply = await admin_post(s, sc, "/routes/chat/promote", ADMIN_TOKEN)
                assert reply.status == 200, reply
                assert (
                    reply.json()["canary"]["weight"] == 50 and reply.json()["canary"]["rolled_back"] is None
                )
                assert metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 50

                async def candidate_back() -> bool:
                    return (await call(s, sc, tenant="acme")).model == "cand"

                await until(candidate_back, "a call served by the candidate", timeout=10)
    finally:
        receiver.release.set()
        await receiver.runner.cleanup()


async def test_a_candidate_hidden_by_fallback_is_still_rolled_back(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        async with upstreams(("echo", "openai")) as (echo,):
            echo.answer = by_model({"cand": status(500)})
            cfg = rollback_config(tmp_path, echo, receiver, retry="")  # the default: 5xx falls back
            async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:

                async def rolled_back() -> bool:
                    for _ in range(5):
                        reply = await call(s, sc, tenant="acme")
                        assert reply.status == 200 and reply.model == "gpt-4o-mini"
                    return metric(await sc.scrape(s), "llm_canary_weight_percent", route="chat") == 0

                # Every call is answered (the fallback hides the candidate from the client), yet the
                # candidate fails every time it is tried: the rule scoped to it must fire.
                # Three evaluations: a rule that sees the failures fires at the first or second.
                await until(rolled_back, "the rule to roll the candidate back", timeout=3)
                assert echo.models().count("cand") >= 3
    finally:
        receiver.release.set()
        await receiver.runner.cleanup()


async def test_a_call_that_fell_back_from_the_candidate_records_the_model_it_asked_for(
    tmp_path: Path,
) -> None:
    async with upstreams(("echo", "openai")) as (echo,):
        echo.answer = by_model({"cand": status(500)})
        cfg = write_config(
            tmp_path,
            [upstream_item(echo)],
            "routes:\n  - {name: chat, match: {models: [gpt-4o-mini]}, targets: [{upstream: echo}], "
            "canary: {model: cand, weight: 100}}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            reply = await call(s, sc, tenant="acme")
            assert reply.status == 200 and reply.model == "gpt-4o-mini"
            assert echo.models() == ["cand", "gpt-4o-mini"]
            await settled(s, sc, 1)
            await stop(sc)
    rows = await ledger_rows(tmp_path / "data")
    assert len(rows) == 1
    row = rows[0]
    assert (row["status"], row["response_model"]) == (200, "gpt-4o-mini")
    assert row["request_model"] == "gpt-4o-mini", row  # the primary served it, as the client asked
