"""Immutable records that flow from the proxy to the sinks.

The proxy produces one :class:`CallRecord` per finished client call and hands it
to the pipeline; nothing mutates it afterwards (sinks that need a variant use
:func:`dataclasses.replace`).

Pure module: standard library only, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

#: The normalised token types, the same for every provider.
#:
#: - ``input``: all input tokens, cached and cache-written ones included
#: - ``cached_input``: the part of ``input`` read from a cache
#: - ``cache_write``: the part of ``input`` written to a cache (all TTLs)
#: - ``cache_write_1h``: the part of ``cache_write`` written with a one-hour TTL
#: - ``output``: all output tokens, reasoning included
#: - ``reasoning``: the part of ``output`` spent on reasoning
TOKEN_TYPES: tuple[str, ...] = ("input", "cached_input", "cache_write", "output", "reasoning")

#: Error types recorded on a call (``None`` means the call succeeded).
ERROR_TYPES: tuple[str, ...] = (
    "upstream_4xx",
    "upstream_5xx",
    "rate_limited",
    "timeout",
    "connect_error",
    "stream_interrupted",
    "client_abort",
    "proxy_error",
    # The sidecar's own refusals by policy: never in a rule's default "bad" set, so a
    # refusal by policy does not burn the availability SLO.
    "budget_exceeded",
    "unauthorized",
    "throttled",
    "circuit_open",
)

#: Outcomes of one upstream attempt (``llm_upstream_attempts_total{outcome}``); the
#: failure ones are also the ``reason`` of ``llm_fallbacks_total``.
ATTEMPT_OUTCOMES: tuple[str, ...] = ("success", "4xx", "429", "5xx", "connect_error", "timeout", "aborted")


@dataclass(frozen=True, slots=True)
class UpstreamAttempt:
    """One try of a call at one upstream (a call has several when it falls back)."""

    upstream: str
    outcome: str  # one of ATTEMPT_OUTCOMES
    offset_s: float  # when it started, seconds after the call started
    duration_s: float
    model: str | None = None  # the model it was sent with, when the route rewrote it


@dataclass(frozen=True, slots=True)
class GatewayEvent:
    """Something the gateway decided during a call (a breaker transition, a fallback): a span event."""

    name: str
    offset_s: float  # seconds after the call started
    attributes: tuple[tuple[str, str], ...] = ()


TokenSource = Literal["reported", "estimated"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call. ``None`` means *not reported*, which is not zero."""

    input: int | None = None
    cached_input: int | None = None
    cache_write: int | None = None
    cache_write_1h: int | None = None
    output: int | None = None
    reasoning: int | None = None

    def is_empty(self) -> bool:
        """True when no field was reported at all."""
        # Spelled out: a generator over the slots cost 1 % of the event loop per call (py-spy).
        return (
            self.input is None
            and self.cached_input is None
            and self.cache_write is None
            and self.cache_write_1h is None
            and self.output is None
            and self.reasoning is None
        )

    def merged_over(self, base: Usage) -> Usage:
        """Fields of ``self`` where set, else those of ``base`` (later events win)."""
        return Usage(
            **{
                name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                for name in self.__slots__
            }
        )

    def get(self, token_type: str) -> int | None:
        """The count of one normalised token type (see :data:`TOKEN_TYPES`)."""
        value: int | None = getattr(self, token_type)
        return value


@dataclass(frozen=True, slots=True)
class TokenCount:
    """One normalised token type's count and where it came from."""

    type: str
    count: int
    source: TokenSource


@dataclass(frozen=True, slots=True)
class CapturedContent:
    """The prompt and completion of one call, kept only when content capture is opted in.

    Raw, exactly as seen: the request body bytes the client sent and the generated text
    the provider observers collected. Only the tracing sink reads it, and it redacts and
    truncates it off the event loop before anything leaves the process; the ledger, the
    call log and the metrics ignore it. Never in a ``repr`` (see :attr:`CallRecord.content`).
    """

    request_body: bytes
    output_text: str

    @property
    def size(self) -> int:
        """Roughly the memory it holds (bytes of the body plus characters of the text)."""
        return len(self.request_body) + len(self.output_text)


@dataclass(frozen=True, slots=True)
class CallRecord:
    """Everything measured about one finished client call.

    ``usage`` holds what the upstream reported; ``estimated`` holds local tiktoken
    counts, only for types the upstream did not report. ``cost_usd`` is
    ``None`` when the model has no price (never silently free); it is exact (Decimal USD).
    """

    request_id: str
    started_at: float  # wall clock, seconds since the epoch
    tenant: str
    upstream: str
    provider: str  # "openai" | "anthropic" | "" when the path has no known shape
    operation: str  # "chat" | "text_completion" | "responses" | "embeddings" | "messages" | "other"
    method: str
    path: str
    stream: bool
    status: int  # the HTTP status the client got (499 for a client abort)
    error_type: str | None
    request_model: str | None
    response_model: str | None
    duration_s: float
    ttft_s: float | None = None
    overhead_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    estimated: Usage = field(default_factory=Usage)
    cost_usd: Decimal | None = None
    price_model: str | None = None  # the price-table entry that priced the call
    price_version: str = ""
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    service_tier: str | None = None
    malformed: bool = False  # the upstream's JSON or SSE could not be parsed (passed on unchanged)
    throttled: str | None = None  # why the sidecar refused the call itself ("budget", "rpm", ...)
    # Gateway control (issue 6): the route that planned the call ("" when none did), the
    # model version that served it ("primary" | "candidate", "" without a canary), every
    # upstream attempt in order (the last one served the call), and decisions made on the way.
    route: str = ""
    variant: str = ""
    attempts: tuple[UpstreamAttempt, ...] = ()
    events: tuple[GatewayEvent, ...] = ()
    server_address: str = ""
    server_port: int = 0
    # W3C trace context of the sidecar's span for this call (hex, lower case). The proxy
    # creates the ids when the call starts (so the upstream request can carry them);
    # the tracing sink builds the span from the finished record.
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None  # the client's span, when it sent a traceparent
    trace_sampled: bool = False
    tracestate: str | None = None
    finished_at: float = 0.0  # wall clock, seconds since the epoch
    # Prompt and completion, only when ``tracing.capture_content`` is on and the call's
    # trace is sampled; for the tracing sink alone. Kept out of ``repr`` so that no log
    # line or traceback that prints a record can show prompt text.
    content: CapturedContent | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        """The model the upstream answered with where it said, else the requested one."""
        return self.response_model or self.request_model or "unknown"

    def token_counts(self) -> list[TokenCount]:
        """Each token type with a count, reported where reported, else estimated."""
        out: list[TokenCount] = []
        for token_type in TOKEN_TYPES:
            reported = self.usage.get(token_type)
            if reported is not None:
                out.append(TokenCount(token_type, reported, "reported"))
                continue
            estimated = self.estimated.get(token_type)
            if estimated is not None:
                out.append(TokenCount(token_type, estimated, "estimated"))
        return out

    def effective_usage(self) -> Usage:
        """Reported counts, with estimates filling the types that were not reported."""
        return self.usage.merged_over(self.estimated)
