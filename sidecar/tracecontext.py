"""W3C Trace Context for the sidecar's span of each call (pure: no I/O, no OTel import).

The proxy calls :func:`start` when a call arrives: it continues the client's trace
when a valid ``traceparent`` came with the request, or starts a new one, and picks a
new span id for the sidecar's own span. The ``traceparent`` sent upstream names that
span, so a trace reads client → sidecar → upstream. The tracing sink later builds the
span from the finished record with the same ids.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

# version-traceid-parentid-flags, lower-case hex; a later version may append "-..." fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Ids need to be unique, not secret: a PRNG seeded from the OS (as OpenTelemetry's own
# RandomIdGenerator does) costs no system call per id, unlike SystemRandom. Reseeded in
# a forked child so that two processes never share a sequence.
_rng = random.Random(os.urandom(32))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _rng.seed(os.urandom(32)))


@dataclass(frozen=True, slots=True)
class SpanIds:
    """The ids of the sidecar's span and of its parent (the client's span, if any)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    sampled: bool
    tracestate: str | None

    def traceparent(self) -> str:
        """The ``traceparent`` header value naming the sidecar's span."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` from a header value, or None if invalid."""
    if not value:
        return None
    found = _TRACEPARENT.fullmatch(value.strip().lower())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def _ratio_sampled(trace_id: str, ratio: float) -> bool:
    # The same rule as OTel's TraceIdRatioBased: the low 64 bits of the trace id.
    if ratio >= 1.0:
        return True
    if ratio <= 0.0:
        return False
    return int(trace_id[16:], 16) < int(ratio * (1 << 64))


def start(traceparent: str | None, tracestate: str | None, sample_ratio: float) -> SpanIds:
    """Ids for the sidecar's span: parent-based sampling, ratio-based for new traces."""
    parent = parse_traceparent(traceparent)
    span_id = f"{_rng.getrandbits(64) or 1:016x}"
    if parent is not None:
        trace_id, parent_span_id, sampled = parent
        return SpanIds(trace_id, span_id, parent_span_id, sampled, tracestate or None)
    trace_id = f"{_rng.getrandbits(128) or 1:032x}"
    return SpanIds(trace_id, span_id, None, _ratio_sampled(trace_id, sample_ratio), None)


def random_id() -> str:
    """128 random bits as 32 hex digits (a request id when the client sent none): the same
    randomness as ``uuid4().hex``, from the seeded generator above, without a system call."""
    return f"{_rng.getrandbits(128):032x}"
