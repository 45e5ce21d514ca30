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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sidecar.metrics import Metrics
from sidecar.model import CallRecord, Usage
from sidecar.pricing import PriceTable, cost
from sidecar.providers import Shape
from sidecar.sinks import Sink
from sidecar.tokens import Estimator

log = logging.getLogger("sidecar.pipeline")


@dataclass(frozen=True, slots=True)
class EstimateRequest:
    """What to count locally for a call whose usage was (partly) not reported.

    The request body is kept as bytes and only parsed for prompt text in the
    estimation thread, so the request path never parses it twice.
    """

    shape: Shape
    request_body: bytes | None  # None when input tokens were reported
    output_text: str | None  # None when output tokens were reported


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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-tokens")
        self._task: asyncio.Task[None] | None = None
        self._logged_models: set[str] = set()
        self.submitted = 0

    # --- the request path -------------------------------------------------------
    def submit(self, record: CallRecord, estimate: EstimateRequest | None = None) -> None:
        """Hand one finished call on; returns at once."""
        self.submitted += 1
        if estimate is not None:
            try:
                self._estimates.put_nowait((record, estimate))
                return
            except asyncio.QueueFull:
                self.metrics.sink_dropped.labels("estimator").inc()
        self._dispatch(self._priced(record))

    # --- internals --------------------------------------------------------------
    def _priced(self, record: CallRecord) -> CallRecord:
        usage = record.effective_usage()
        if usage.is_empty():
            return dataclasses.replace(record, price_version=self.prices.version)
        model = record.model
        match = self.prices.lookup(model)
        if match is None:
            self._log_once(
                logging.WARNING, model, "no price for model %r: its calls are counted as unpriced", model
            )
            return dataclasses.replace(record, price_version=self.prices.version)
        if match.kind != "exact":
            self._log_once(
                logging.INFO, model, "model %r priced as %r (%s match)", model, match.name, match.kind
            )
        return dataclasses.replace(
            record,
            cost_usd=cost(usage, match.price, record.service_tier),
            price_model=match.name,
            price_version=self.prices.version,
        )

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
        prompt = request.shape.prompt_text(request.request_body) if request.request_body is not None else None
        return self.estimator.estimate(record.model, prompt, request.output_text)

    async def _run_estimates(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            record, request = await self._estimates.get()
            try:
                estimated = await loop.run_in_executor(self._executor, self._estimate, record, request)
                record = dataclasses.replace(record, estimated=estimated)
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
