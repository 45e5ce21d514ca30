"""The sink protocol: how one finished-call record reaches metrics, traces, the ledger and rules.

A sink's :meth:`Sink.offer` is called on the event loop for every finished call and
must return at once: it either queues the record and returns ``True``, or refuses it
and returns ``False`` (the pipeline then counts ``llm_sink_dropped_total{sink}``).
A sink that may not lose records (the ledger) never returns ``False``: it spills to
its own journal instead.

:class:`QueueSink` is the usual shape: a bounded queue drained by one worker task
that hands batches to :meth:`QueueSink.handle`; exceptions are logged and counted,
never raised into the request.

May import asyncio, logging and time; no third-party library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from sidecar.model import CallRecord

log = logging.getLogger("sidecar.sinks")


class Sink(Protocol):
    """A consumer of finished-call records."""

    name: str

    def offer(self, record: CallRecord) -> bool:
        """Queue ``record`` without waiting; ``False`` means it was dropped."""

    async def start(self) -> None:
        """Start background work (called once, on the running loop)."""

    async def stop(self, timeout: float) -> None:
        """Flush what is queued (up to ``timeout`` seconds) and stop."""


#: Seconds of work a sink does on the event loop before it lets the loop serve calls again.
BUDGET = 100e-6
#: Records in the first slice of a batch (later slices are sized from its cost).
FIRST_SLICE = 4
#: Most records in one slice, however cheap they are (while the sink keeps up).
MAX_SLICE = 256
#: Records waiting in a sink up to which a slice gets :data:`BUDGET`; past it, the budget
#: grows in proportion to the backlog.
BACKLOG_KNEE = 256


async def in_slices(
    records: list[CallRecord],
    budget: float = BUDGET,
    clock: Callable[[], float] = time.perf_counter,
    waiting: Callable[[], int] | None = None,
    limit: int = 0,
) -> AsyncIterator[list[CallRecord]]:
    """``records`` in slices of about ``budget`` seconds of work, yielding to the loop between two.

    A sink that works on the loop (metrics, call-log formatting) gets up to a few hundred
    records at once after a burst or a linger; done in one go, that holds every call in
    flight for a millisecond or more. Between slices the loop serves what is ready, so a
    call waits for at most one slice per turn of the loop. The first slice has
    :data:`FIRST_SLICE` records; each next one is sized from what the last one cost
    (the time the consumer took between two slices), within 1 and :data:`MAX_SLICE`.

    A fixed budget per turn of the loop is a fixed rate: on a loop saturated with calls,
    each turn finishes more calls than the sink handles in one budget, and its queue
    fills until records are dropped. So ``waiting`` (optional: how many records wait in
    the sink's queue, besides the rest of this batch) scales the budget with the backlog:
    past :data:`BACKLOG_KNEE` records waiting, a slice gets ``budget * backlog / KNEE``
    (1,000 waiting: ~4 slices' worth). Once the backlog reaches half of ``limit`` (the
    queue's bound; 0: none) the rest of the batch goes in one slice, with no turn of the
    loop in between; a sink whose worker awaits nothing else (metrics) then takes its next
    batch at once too, until it is back under half: calls wait (they are what makes
    records) rather than have their records dropped.
    """
    start, size, total = 0, FIRST_SLICE, len(records)
    while start < total:
        began = clock()
        part = records[start : start + size]
        yield part
        start += len(part)
        if start >= total:
            break
        spent = clock() - began
        share = budget
        if waiting is not None:
            backlog = waiting() + total - start
            if limit and backlog * 2 >= limit:
                size = total - start  # draining: the rest now, no turn of the loop in between
                continue
            share = budget * max(1.0, backlog / BACKLOG_KNEE)
        cap = MAX_SLICE if share <= budget else total
        size = cap if spent <= 0 else max(1, min(cap, round(share * len(part) / spent)))
        await asyncio.sleep(0)


class QueueSink:
    """A bounded queue and one worker handing batches to :meth:`handle`.

    Subclasses implement :meth:`handle`; blocking work inside it must go through
    ``asyncio.to_thread`` (or an executor) so the loop never waits on it.

    The queue is a plain deque, offered to and drained on the event loop only: an
    ``asyncio.Queue`` costs six Python calls per record (the put, the get and
    ``task_done``, each with its checks and wake-ups), on every call and for every sink.
    """

    name = "sink"
    #: Seconds the worker waits after a small batch so that the next one gathers more
    #: (one thread hand-off per batch instead of per record); 0: none.
    linger = 0.0

    def __init__(self, maxsize: int = 10_000, batch: int = 256) -> None:
        if maxsize < 1 or batch < 1:
            raise ValueError(f"a sink needs maxsize and batch of at least 1, got {maxsize} and {batch}")
        self._records: deque[CallRecord] = deque()
        self._maxsize = maxsize
        self._batch = batch
        self._taken = 0  # records the worker has taken and not handled yet
        self._ready: asyncio.Future[None] | None = None  # what the idle worker waits on
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # batches whose handle() raised

    def offer(self, record: CallRecord) -> bool:
        records = self._records
        if len(records) >= self._maxsize:
            return False
        records.append(record)
        ready = self._ready
        if ready is not None:
            self._ready = None
            if not ready.done():
                ready.set_result(None)
        return True

    @property
    def pending(self) -> int:
        """Records queued and not yet taken by the worker (the batch in its hands is not counted)."""
        return len(self._records)

    async def drained(self) -> None:
        """Return once every record offered so far has been handled (queued and in-flight)."""
        if not self._records and not self._taken:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def handle(self, records: list[CallRecord]) -> None:
        """Consume one batch (in arrival order)."""
        raise NotImplementedError

    def slices(self, records: list[CallRecord]) -> AsyncIterator[list[CallRecord]]:
        """:func:`in_slices` of a batch, the budget scaled by this sink's backlog (for a
        :meth:`handle` that works on the loop)."""
        return in_slices(records, waiting=self._records.__len__, limit=self._maxsize)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"sink:{self.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        records = self._records
        while True:
            if not records:
                ready = self._ready = loop.create_future()
                await ready
                continue
            count = min(len(records), self._batch)
            batch = [records.popleft() for _ in range(count)]
            self._taken = count
            try:
                await self.handle(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.failures += 1
                log.exception("sink %s failed on a batch of %d records", self.name, len(batch))
            finally:
                self._taken = 0
                if not records and self._drain_waiters:
                    waiters, self._drain_waiters = self._drain_waiters, []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
            if self.linger and len(batch) < self._batch // 4:
                await asyncio.sleep(self.linger)

    async def stop(self, timeout: float) -> None:
        """Wait until the queue is drained (bounded by ``timeout``), then stop the worker."""
        if self._task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.drained(), timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
