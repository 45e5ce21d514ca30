"""Helpers for driving the rule engine on a fake clock (tests, examples, the docs).

:func:`call` builds a :class:`~sidecar.model.CallRecord` with only what rules read;
:func:`drive` replays traffic second by second and evaluates at every
``evaluation_interval``, collecting the transitions with their times.

Pure module: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal

from sidecar.model import CallRecord, Usage
from sidecar.rules.engine import Engine
from sidecar.rules.state import Transition

__all__ = ["call", "drive", "times"]


def call(
    t: float,
    *,
    tenant: str = "acme",
    upstream: str = "openai",
    provider: str = "openai",
    model: str = "gpt-4o",
    error_type: str | None = None,
    duration: float = 0.2,
    ttft: float | None = None,
    cost: Decimal | float | None = None,
    usage: Usage | None = None,
) -> CallRecord:
    """A finished call at time ``t`` (epoch seconds) with the given outcome."""
    return CallRecord(
        request_id=f"r{t}",
        started_at=t - duration,
        tenant=tenant,
        upstream=upstream,
        provider=provider,
        operation="chat",
        method="POST",
        path="/v1/chat/completions",
        stream=ttft is not None,
        status=200 if error_type is None else 502,
        error_type=error_type,
        request_model=model,
        response_model=model,
        duration_s=duration,
        ttft_s=ttft,
        cost_usd=Decimal(str(cost)) if cost is not None else None,
        usage=usage or Usage(),
        finished_at=t,
    )


def drive(
    engine: Engine,
    start: int,
    end: int,
    traffic: Callable[[int], Iterable[CallRecord]],
    *,
    interval: int = 15,
    step: int = 1,
) -> list[tuple[int, Transition]]:
    """Feed ``traffic(t)`` for ``t`` in ``[start, end)`` (every ``step`` s); evaluate every ``interval`` s.

    At an evaluation time the calls of that second are observed first.
    """
    out: list[tuple[int, Transition]] = []
    for t in range(start, end, step):
        for record in traffic(t):
            engine.observe(record, t)
        if (t - start) % interval == 0:
            out.extend((t, tr) for tr in engine.evaluate(t))
    return out


def times(
    events: list[tuple[int, Transition]], status: str, base: int = 0, rule: str | None = None
) -> list[int]:
    """The times (minus ``base``) of transitions with ``status`` (and ``rule``), in order."""
    return [t - base for t, tr in events if tr.status == status and (rule is None or tr.rule == rule)]
