"""W3C Trace Context for the sidecar's span of each call (pure: no I/O, no OTel import).

The proxy calls :func:`start` when a call arrives: it continues the client's trace
when a valid ``traceparent`` came with the request, or starts a new one, and picks a
new span id for the sidecar's own span. The ``traceparent`` sent upstream names that
span, so a trace reads client → sidecar → upstream. The tracing sink later builds the
span from the finished record with the same ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_HEX = frozenset("0123456789abcdef")
_rng = random.SystemRandom()


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


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX and value != "0" * length


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """``(trace_id, parent_span_id, sampled)`` from a header value, or None if invalid."""
    if not value:
        return None
    parts = value.strip().lower().split("-")
    version = parts[0]
    if len(parts) < 4 or len(version) != 2 or not set(version) <= _HEX or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    trace_id, span_id, flags = parts[1], parts[2], parts[3]
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16)):
        return None
    if len(flags) != 2 or not set(flags) <= _HEX:
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
