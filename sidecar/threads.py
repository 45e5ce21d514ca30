"""Background threads yield the CPU to the event loop.

The sidecar's blocking work (ledger writes, rule evaluation, call-log writes, token
estimates, notifications) runs in threads of its own so the event loop never waits on it.
On a pod's one core those threads still compete with the loop for the CPU: a burst of
ledger inserts would hold the core for a scheduler slice (milliseconds) while a call waits.
Each background thread lowers its own scheduling priority (a higher nice value, which needs
no privilege), so the kernel runs the event loop first whenever it has work.

Where the platform has no per-thread priorities this does nothing.

A lower priority is not enough on its own: when the loop's socket becomes readable while a
background thread has the core, the kernel's scheduler (CFS, EEVDF) often lets that thread
run on to the end of its slice or to the next tick before it runs the loop. Measured with
``perf sched timehist`` at one client: the loop woken and kept waiting 3 to 4 ms while the
ledger writer inserted a batch, which set the sidecar's p99. A ``sched_yield`` does not
help (EEVDF picks the yielding thread again while the loop is not yet "eligible"). So a
background thread doing a long piece of work calls a :class:`Pacer` between two small
parts of it (a row, a record): after ``run`` seconds of work it lets go of the GIL and, if
the loop's thread is runnable on its core, sleeps ``pause`` seconds, which takes it off
the run queue so that the woken loop runs at once. It does not pause under a load that
keeps the loop busy anyway, nor when its own work piles up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

__all__ = [
    "BACKGROUND_NICE",
    "BUSY",
    "LOAD",
    "PAUSE",
    "RUN",
    "Pacer",
    "background",
    "loop_busy",
    "loop_waiting",
    "mark_loop_thread",
    "no_pace",
]

log = logging.getLogger("sidecar.threads")

#: How much lower than the event loop a background thread runs (nice increment).
BACKGROUND_NICE = 5


def background() -> None:
    """Lower the calling thread's priority; call it first thing in a background thread
    (or as a ``ThreadPoolExecutor`` initializer)."""
    setpriority = getattr(os, "setpriority", None)
    if setpriority is None:  # pragma: no cover - not on Linux
        return
    try:
        tid = threading.get_native_id()
        setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
    except OSError as exc:  # pragma: no cover - a sandbox that forbids it
        log.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


#: Stretch (seconds) a paced background thread works before it checks whether to step aside.
RUN = 100e-6
#: How long it pauses (seconds; the kernel adds its timer slack, 50 µs by default).
PAUSE = 20e-6


class _Load:
    """How many calls the event loop serves right now (the proxy counts them)."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0


#: The event loop's load, kept by the proxy (one integer, read by the pacers without a lock).
LOAD = _Load()
#: Calls in flight from which the loop counts as busy: pacers no longer pause.
BUSY = 4


def loop_busy() -> bool:
    """Whether the loop serves :data:`BUSY` calls or more. Then it always has work: the calls
    queue behind one another and a background thread's stretch delays them all alike,
    paced or not, so a pause would only cost switches (and starve the thread)."""
    return LOAD.calls >= BUSY


_loop_stat: int | None = None  # /proc/self/task/<tid>/stat of the event loop's thread, open
_getcpu: Callable[[], int] | None = None


def mark_loop_thread() -> None:
    """Record the calling thread as the event loop's (call it on the loop, at start), so
    that a :class:`Pacer` can see whether the loop waits for the CPU."""
    global _loop_stat, _getcpu
    try:
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - no /proc: pacers never pause
        return
    old, _loop_stat = _loop_stat, fd
    if old is not None:
        os.close(old)
    if _getcpu is None:
        try:
            import ctypes

            getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
            getcpu.restype = ctypes.c_int
            getcpu.argtypes = []
            _getcpu = getcpu
        except (OSError, AttributeError):  # pragma: no cover - a libc without sched_getcpu
            _getcpu = None


def loop_waiting() -> bool:
    """Whether the event loop's thread is runnable and queued on the CPU the calling thread
    holds, i.e. waiting for this thread to get off it (``False`` when unknown)."""
    fd = _loop_stat
    if fd is None:
        return False
    try:
        raw = os.pread(fd, 1024, 0)
    except OSError:  # pragma: no cover - the loop's thread is gone
        return False
    try:
        fields = raw[raw.rindex(b")") + 2 :].split()
        if fields[0] != b"R":  # field 3, the state: sleeping (S), or stopped
            return False
        return _getcpu is None or int(fields[36]) == _getcpu()  # field 39: the CPU it is queued on
    except (ValueError, IndexError):  # pragma: no cover - a /proc of another format
        return False


def no_pace() -> None:
    """A pacer that never pauses (work on the event loop, or in tests)."""


#: Let go of the GIL and of the core for a moment (nothing where the platform has no such call).
_sched_yield: Callable[[], None] = getattr(os, "sched_yield", no_pace)


class Pacer:
    """Keeps a background thread off the core while the event loop waits for it (see the
    module's docstring).

    Call it between two small parts of a long piece of work. Once ``run`` seconds have
    passed since the stretch began, it checks whether the loop's thread is runnable and
    queued on this thread's CPU (:func:`loop_waiting`, a read of ``/proc``): if so it
    sleeps ``pause`` seconds, which takes this thread off the run queue so the loop runs
    at once; if not (the loop is idle, or runs on another core) a new stretch simply
    begins. A sleep with nothing else to run costs this machine ~35 µs of CPU (the idle
    entry and exit of a virtual machine), so it pauses only when it hands the core over.

    It does not pause either while the loop is busy (:func:`loop_busy`). ``behind``
    (optional) says whether the thread's own work is piling up (the ledger's
    queue holds more than a batch): then it does not pause. Under a load that keeps the
    loop busy all the time, pausing whenever the loop waits would starve the thread (after
    each pause it waits for the kernel and then for the GIL): it would fall behind, and the
    ledger would spill to its journal. Behind, it runs at its scheduling share as before.

    A call costs a clock read, the check once per stretch ~6 µs. Owned by one thread.
    ``busy``, ``clock``, ``waiting``, ``sleep`` and ``yield_`` are parameters for tests.
    """

    __slots__ = (
        "_behind",
        "_busy",
        "_clock",
        "_pause",
        "_run",
        "_sleep",
        "_until",
        "_waiting",
        "_yield",
        "pauses",
    )

    def __init__(
        self,
        run: float = RUN,
        pause: float = PAUSE,
        *,
        behind: Callable[[], bool] | None = None,
        busy: Callable[[], bool] = loop_busy,
        clock: Callable[[], float] = time.perf_counter,
        waiting: Callable[[], bool] = loop_waiting,
        sleep: Callable[[float], None] = time.sleep,
        yield_: Callable[[], None] = _sched_yield,
    ) -> None:
        self._run = run
        self._behind = behind
        self._busy = busy
        self._yield = yield_
        self._pause = pause
        self._clock = clock
        self._waiting = waiting
        self._sleep = sleep
        self._until = clock() + run
        self.pauses = 0  # how many times it slept

    def __call__(self) -> None:
        if self._clock() < self._until:
            return
        if not self._busy() and (self._behind is None or not self._behind()):
            # Let go of the GIL for a moment: a loop waiting for it is woken (and then runnable).
            self._yield()
            if self._waiting():
                self._sleep(self._pause)
                self.pauses += 1
        self._until = self._clock() + self._run

    def restart(self) -> None:
        """A new stretch starts now (call after the thread waited: it has just been off the CPU)."""
        self._until = self._clock() + self._run
