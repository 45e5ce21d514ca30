"""Structured call logs: one JSON line per finished call, written off the request path.

:func:`to_log_line` is pure: a :class:`~sidecar.model.CallRecord` in, one line of
JSON out (no newline). :func:`level_of` and :func:`keep` decide whether a record
is logged at all: successful calls are logged at ``info`` and may be sampled
(``sample_success``), failed calls at ``warning`` (the client's side of the
exchange: upstream 4xx, rate limits, client aborts) or ``error`` (everything else),
and are never sampled out. Calls below the configured ``level`` are not logged.

:class:`CallLogSink` is the pipeline sink: it filters in :meth:`~CallLogSink.offer`
(cheap), queues, formats a batch in its worker task and hands the text to a
single writer thread, because a write to a pipe (stdout read by a slow log
shipper) can block. Lines reach the thread in batches: after a small batch the
worker lingers (:data:`LINGER`) so that the next one gathers more. A stream that
blocks fills the queue, and further records are refused (counted by the pipeline
as ``llm_sink_dropped_total{sink="calllog"}``) rather than slowing any call.

Line fields (absent values are ``null``)::

    time            ISO 8601 UTC of the end of the call, millisecond precision
    level           info | warning | error
    event           "llm_call"
    request_id, trace_id, span_id, tenant, upstream, provider, operation, model,
    request_model, response_model, method, stream, status, error_type
    duration_s, ttft_s, overhead_s          seconds
    tokens          {"input": {"count": 12, "source": "reported"}, "output": {...}, ...}
                    only the types that have a count (see sidecar.model.TOKEN_TYPES)
    tokens_source   reported | estimated | mixed (null when no type has a count)
    cost_usd        number (the ledger keeps the exact decimal), null when unpriced
    price_version   content hash of the price table that priced the call

May import asyncio and the standard library (and prometheus_client for its counters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from yaml.nodes import Node

from sidecar.ledger import iso_utc
from sidecar.model import TOKEN_TYPES, CallRecord
from sidecar.sinks import QueueSink
from sidecar.threads import background
from sidecar.yamlspec import Reader, join

__all__ = [
    "LEVELS",
    "LINGER",
    "CallLogSink",
    "LogSettings",
    "keep",
    "level_of",
    "parse_logs",
    "to_log_line",
    "tokens_source",
]

log = logging.getLogger("sidecar.calllog")

#: Levels of call lines, lowest first.
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
_RANK = {name: i for i, name in enumerate(LEVELS)}

#: Seconds the sink waits after writing a small batch, so that lines go to the writer
#: thread in batches (see :meth:`CallLogSink.handle`); a line is written at most this
#: much later than it would be otherwise.
LINGER = 0.05

#: Error types that are about the client's side of the exchange: logged at warning.
_CLIENT_SIDE_ERRORS = frozenset({"upstream_4xx", "rate_limited", "client_abort"})


@dataclass(frozen=True)
class LogSettings:
    """The ``logs`` config section.

    ``stream`` is where lines go (``stdout`` or ``stderr``); ``level`` is the lowest
    level of call lines written; ``sample_success`` the fraction of successful calls
    written (0 to 1; errors are always written); ``queue_size`` bounds the sink's queue.
    """

    enabled: bool = True
    stream: str = "stdout"
    level: str = "info"
    sample_success: float = 1.0
    queue_size: int = 10_000


def parse_logs(r: Reader, node: Node, path: str, ctx: object = None) -> LogSettings:
    """Parse the ``logs`` section (``{enabled, stream, level, sample_success, queue_size}``).

    Problems are recorded on ``r`` with their location; a wrong value falls back to
    its default. ``ctx`` is accepted for the config loader's section signature.
    """
    d = LogSettings()
    m = r.mapping(node, path, ("enabled", "stream", "level", "sample_success", "queue_size"))
    if m is None:
        return d
    rate = r.number(m.get("sample_success"), join(path, "sample_success"), d.sample_success)
    if not 0.0 <= rate <= 1.0:
        r.problem(
            m.get("sample_success"), join(path, "sample_success"), f"must be between 0 and 1, got {rate}"
        )
        rate = d.sample_success
    return LogSettings(
        enabled=r.boolean(m.get("enabled"), join(path, "enabled"), d.enabled),
        stream=r.string(m.get("stream"), join(path, "stream"), d.stream, choices=("stdout", "stderr")),
        level=r.string(m.get("level"), join(path, "level"), d.level, choices=LEVELS),
        sample_success=rate,
        queue_size=r.integer(m.get("queue_size"), join(path, "queue_size"), d.queue_size, minimum=1),
    )


# -- pure formatting ------------------------------------------------------------------


def level_of(record: CallRecord) -> str:
    """The level of a call's line: ``info`` on success, ``warning`` or ``error`` on failure."""
    if record.error_type is None:
        return "info"
    return "warning" if record.error_type in _CLIENT_SIDE_ERRORS else "error"


def keep(record: CallRecord, settings: LogSettings) -> bool:
    """Whether the call is logged: at or above ``level``, and errors always, successes sampled.

    Sampling is deterministic per request id (a hash, not a coin toss), so a given
    call is either logged or not however often the decision is made.
    """
    level = level_of(record)
    if _RANK[level] < _RANK.get(settings.level, 1):
        return False
    if record.error_type is not None or settings.sample_success >= 1.0:
        return True
    if settings.sample_success <= 0.0:
        return False
    bucket = zlib.crc32(record.request_id.encode("utf-8", "replace")) / 2**32
    return bucket < settings.sample_success


def tokens_source(record: CallRecord) -> str | None:
    """``reported``, ``estimated`` or ``mixed``: where the call's token counts came from."""
    return _tokens(record)[1]


# Where the counts came from, by a bit mask: 1 = some reported, 2 = some estimated.
_SOURCES: tuple[str | None, ...] = (None, "reported", "estimated", "mixed")
_REPORTED = "reported"
_ESTIMATED = "estimated"


def _tokens(record: CallRecord) -> tuple[dict[str, dict[str, object]], str | None]:
    """The ``tokens`` object and ``tokens_source`` of a line, in one pass.

    Each token type with a count, reported where reported, else estimated: what
    :meth:`CallRecord.token_counts` gives, without building its objects.
    """
    usage = record.usage
    estimated = record.estimated
    tokens: dict[str, dict[str, object]] = {}
    sources = 0
    for token_type in TOKEN_TYPES:
        count = getattr(usage, token_type)
        if count is not None:
            tokens[token_type] = {"count": count, "source": _REPORTED}
            sources |= 1
            continue
        count = getattr(estimated, token_type)
        if count is not None:
            tokens[token_type] = {"count": count, "source": _ESTIMATED}
            sources |= 2
    return tokens, _SOURCES[sources]


#: A JSON string literal, non-ASCII kept as it is (the C function ``json.dumps`` uses with
#: ``ensure_ascii=False``).
_quote: Callable[[str], str] = json.encoder.encode_basestring


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def _number(value: float | None) -> str:
    """A float as ``json.dumps`` writes it (``repr``; ``NaN``/``Infinity`` as its default allows)."""
    if value is None:
        return "null"
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def _seconds(value: float | None) -> str:
    return "null" if value is None else _number(round(value, 6))


def _tokens_json(record: CallRecord) -> tuple[str, str | None]:
    """The ``tokens`` object as JSON text and ``tokens_source`` (see :func:`_tokens`)."""
    usage = record.usage
    estimated = record.estimated
    parts: list[str] = []
    sources = 0
    for token_type in TOKEN_TYPES:
        count = getattr(usage, token_type)
        if count is not None:
            parts.append(f'"{token_type}":{{"count":{count:d},"source":"reported"}}')
            sources |= 1
            continue
        count = getattr(estimated, token_type)
        if count is not None:
            parts.append(f'"{token_type}":{{"count":{count:d},"source":"estimated"}}')
            sources |= 2
    return "{" + ",".join(parts) + "}", _SOURCES[sources]


def to_log_line(record: CallRecord) -> str:
    """The call's JSON line (no trailing newline); see the module docstring for the fields.

    Written field by field rather than through ``json.dumps`` of a dict (three times the
    cost, once per call): the text is the same, compact, keys in this order, non-ASCII
    kept, which ``tests/test_calllog.py`` checks against ``json.dumps`` itself.
    """
    finished = record.finished_at or record.started_at + record.duration_s
    tokens, source = _tokens_json(record)
    error_type = record.error_type
    cost = record.cost_usd
    line = (
        f'{{"time":"{iso_utc(finished)}",'
        f'"level":"{"info" if error_type is None else level_of(record)}",'
        f'"event":"llm_call",'
        f'"request_id":{_quote(record.request_id)},'
        f'"trace_id":{_text(record.trace_id)},'
        f'"span_id":{_text(record.span_id)},'
        f'"tenant":{_quote(record.tenant)},'
        f'"upstream":{_quote(record.upstream)},'
        f'"provider":{_text(record.provider or None)},'
        f'"operation":{_quote(record.operation)},'
        f'"model":{_quote(record.model)},'
        f'"request_model":{_text(record.request_model)},'
        f'"response_model":{_text(record.response_model)},'
        f'"method":{_quote(record.method)},'
        f'"stream":{"true" if record.stream else "false"},'
        f'"status":{record.status:d},'
        f'"error_type":{_text(error_type)},'
        f'"duration_s":{_seconds(record.duration_s)},'
        f'"ttft_s":{_seconds(record.ttft_s)},'
        f'"overhead_s":{_seconds(record.overhead_s)},'
        f'"tokens":{tokens},'
        f'"tokens_source":{_text(source)},'
        f'"cost_usd":{_number(float(cost)) if cost is not None else "null"},'
        f'"price_version":{_text(record.price_version or None)}'
    )
    # Gateway control: only on calls it touched, so other lines stay as they were.
    if record.route:
        line += f',"route":{_quote(record.route)}'
        if record.variant:
            line += f',"variant":{_quote(record.variant)}'
    if record.throttled:
        line += f',"throttled":{_quote(record.throttled)}'
    if len(record.attempts) > 1:
        attempts = ",".join(_quote(f"{a.upstream}:{a.outcome}") for a in record.attempts)
        line += f',"attempts":[{attempts}]'
    return line + "}"


# -- the sink -------------------------------------------------------------------------


class _Counters(Collector):
    """``llm_calllog_*`` counters, read at scrape time."""

    def __init__(self, sink: CallLogSink) -> None:
        self.sink = sink

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "llm_calllog_lines", "Call log lines written", value=self.sink.lines_written
        )
        yield CounterMetricFamily(
            "llm_calllog_sampled_out",
            "Successful calls not logged because of sampling or the level",
            value=self.sink.filtered,
        )
        yield CounterMetricFamily(
            "llm_calllog_write_errors",
            "Batches of call log lines that could not be written",
            value=self.sink.write_errors,
        )


class CallLogSink(QueueSink):
    """Writes one JSON line per kept call to ``stream`` (``sys.stdout`` or ``sys.stderr`` by default).

    The stream is written from one dedicated thread, in arrival order, and flushed
    after each batch. ``registry`` (optional) gets the ``llm_calllog_*`` counters.
    """

    name = "calllog"

    def __init__(
        self,
        settings: LogSettings,
        stream: TextIO | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(maxsize=settings.queue_size)
        self.settings = settings
        if stream is None:
            stream = sys.stderr if settings.stream == "stderr" else sys.stdout
        self.stream = stream
        self._executor: ThreadPoolExecutor | None = None
        self.lines_written = 0
        self.filtered = 0
        self.write_errors = 0
        if registry is not None:
            registry.register(_Counters(self))

    def offer(self, record: CallRecord) -> bool:
        """Queue the record if it is to be logged; a record filtered out counts as accepted."""
        if not self.settings.enabled:
            return True
        if not keep(record, self.settings):
            self.filtered += 1
            return True
        return super().offer(record)

    async def start(self) -> None:
        """Start the writer thread and the worker task."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="sidecar-calllog", initializer=background
            )
        await super().start()

    async def handle(self, records: list[CallRecord]) -> None:
        """Format a batch and write it from the writer thread; after a small one, linger.

        Each hand-off to the thread (a future, a wake-up of the thread, a wake-up of the
        loop when it is done) costs more than formatting a line. At a few calls per
        millisecond the worker would hand over nearly every line on its own, so after a
        batch well under the limit it waits :data:`LINGER` seconds and the next batch
        takes what came meanwhile; at high rates batches are full and it never waits.
        Lines are formatted on the loop a slice at a time (:func:`~sidecar.sinks.in_slices`),
        so a lingered batch of a few hundred never holds the calls in flight.
        """
        lines: list[str] = []
        async for part in self.slices(records):
            lines.extend(map(to_log_line, part))
        lines.append("")
        text = "\n".join(lines)
        assert self._executor is not None, "start() first"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._write, text, len(records))
        if len(records) < self._batch // 2:
            await asyncio.sleep(LINGER)

    def _write(self, text: str, count: int) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self.write_errors += 1
            log.warning("cannot write %d call log lines: %s", count, exc)
            return
        self.lines_written += count

    async def stop(self, timeout: float) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the worker and the thread."""
        await super().stop(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
