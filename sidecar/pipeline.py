"""The hand-off from the proxy to the sinks: finish, price, fan out — never waiting.

The proxy calls :meth:`Pipeline.submit` once per finished call. When the upstream
reported usage, the record is priced inline (a dict lookup and a few Decimal
multiplications) and offered to every sink. When some token types were not reported
(no usage in the response, a cut stream, a client abort), the record first goes
through a bounded estimation queue whose worker counts tokens with tiktoken in a
thread; a full estimation queue sends the record on unestimated and counts it as
``llm_sink_dropped_total{sink="estimator"}`` — the call itself is never lost.

Each sink has its own bounded queue (see :mod:`sidecar.sinks`); a sink that refuses a
record is counted in ``llm_sink_dropped_total{sink}``.

The pipeline takes each submitted record over: it fills in the fields only it knows
(``estimated``, ``cost_usd``, ``price_model``, ``price_version``) on that object before
any sink sees it, rather than copying a forty-field record with
:func:`dataclasses.replace` once or twice per call. That is the last step of building
the record, not a change to a published one: from the first :meth:`Sink.offer` on,
nothing touches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sidecar.metrics import Metrics
from sidecar.model import CallRecord, Usage
from sidecar.pricing import PriceTable, cost
from sidecar.providers import Shape
from sidecar.sinks import Sink
from sidecar.threads import background
from sidecar.tokens import Estimator

log = logging.getLogger("sidecar.pipeline")


@dataclass(frozen=True, slots=True)
class EstimateRequest:
    """What to count locally for a call whose usage was (partly) not reported.

    The request body is kept as bytes and only parsed for prompt text in the
    estimation thread, so the request path never parses it twice. ``output_text`` may
    be a function that builds the text (a stream's
    :attr:`~sidecar.providers.ResponseInfo.text`): it is called in that thread too.
    """

    shape: Shape
    request_body: bytes | None  # None when input tokens were reported
    output_text: str | Callable[[], str] | None  # None when output tokens were reported


class Pipeline:
    """Prices and estimates finished-call records and offers them to the sinks."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        metrics: Metrics,
        prices: PriceTable,
        estimator: Estimator,
        estimate_queue: int = 1000,
    ) -> None:
        self.sinks = list(sinks)
        self.metrics = metrics
        self.prices = prices
        self.estimator = estimator
        self._estimates: asyncio.Queue[tuple[CallRecord, EstimateRequest]] = asyncio.Queue(estimate_queue)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sidecar-tokens", initializer=background
        )
        self._task: asyncio.Task[None] | None = None
        self._logged_models: set[str] = set()
        self.submitted = 0

    # --- the request path -------------------------------------------------------
    def submit(self, record: CallRecord, estimate: EstimateRequest | None = None) -> None:
        """Hand one finished call on; returns at once.

        The record becomes the pipeline's (see the module docstring): the caller does
        not use it afterwards.
        """
        self.submitted += 1
        if estimate is not None:
            try:
                self._estimates.put_nowait((record, estimate))
                return
            except asyncio.QueueFull:
                self.metrics.sink_dropped.labels("estimator").inc()
        self._dispatch(self._priced(record, estimated=False))

    # --- internals --------------------------------------------------------------
    def _priced(self, record: CallRecord, estimated: bool = True) -> CallRecord:
        """The record with its price fields filled in (in place: no sink has it yet).

        ``estimated`` False says ``record.estimated`` is empty (no estimate was asked
        for), so the reported usage is the effective one.
        """
        usage = record.effective_usage() if estimated else record.usage
        _fill(record, "price_version", self.prices.version)
        if usage.is_empty():
            return record
        model = record.model
        match = self.prices.lookup(model)
        if match is None:
            self._log_once(
                logging.WARNING, model, "no price for model %r: its calls are counted as unpriced", model
            )
            return record
        if match.kind != "exact":
            self._log_once(
                logging.INFO, model, "model %r priced as %r (%s match)", model, match.name, match.kind
            )
        _fill(record, "cost_usd", cost(usage, match.price, record.service_tier))
        _fill(record, "price_model", match.name)
        return record

    def _log_once(self, level: int, model: str, message: str, *args: object) -> None:
        if model not in self._logged_models and len(self._logged_models) < 10_000:
            self._logged_models.add(model)
            log.log(level, message, *args)

    def _dispatch(self, record: CallRecord) -> None:
        for sink in self.sinks:
            try:
                accepted = sink.offer(record)
            except Exception:
                log.exception("sink %s raised in offer()", sink.name)
                accepted = False
            if not accepted:
                self.metrics.sink_dropped.labels(sink.name).inc()

    def _estimate(self, record: CallRecord, request: EstimateRequest) -> Usage:
        """Runs in the estimation thread: parse the prompt, build the output text, count."""
        prompt = request.shape.prompt_text(request.request_body) if request.request_body is not None else None
        output = request.output_text
        if output is not None and not isinstance(output, str):
            output = output()
        return self.estimator.estimate(record.model, prompt, output)

    async def _run_estimates(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            record, request = await self._estimates.get()
            try:
                estimated = await loop.run_in_executor(self._executor, self._estimate, record, request)
                _fill(record, "estimated", estimated)
            except asyncio.CancelledError:
                self._dispatch(self._priced(record))
                self._estimates.task_done()
                raise
            except Exception:
                log.exception("token estimation failed for request %s", record.request_id)
            self._dispatch(self._priced(record))
            self._estimates.task_done()

    # --- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        """Start the estimation worker and every sink."""
        for sink in self.sinks:
            await sink.start()
        if self._task is None:
            self._task = asyncio.create_task(self._run_estimates(), name="sidecar:estimates")

    async def stop(self, timeout: float) -> None:
        """Finish pending estimates, then flush and stop every sink (each within ``timeout``)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._estimates.join(), timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            # Anything still queued goes out unestimated rather than being lost.
            while not self._estimates.empty():
                record, _ = self._estimates.get_nowait()
                self._dispatch(self._priced(record))
        for sink in self.sinks:
            try:
                await sink.stop(timeout)
            except Exception:
                log.exception("sink %s failed to stop cleanly", sink.name)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _fill(record: CallRecord, name: str, value: object) -> None:
    """Set one of the fields the pipeline owns on a record no sink has seen yet.

    ``CallRecord`` is frozen so that nothing changes it once it is published; the
    pipeline is the one place that completes it before publishing (see the module
    docstring), and does so without a copy.
    """
    object.__setattr__(record, name, value)
