"""Background threads run at a lower priority than the event loop and keep off its core while
it waits for it (sidecar.threads)."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sidecar.threads import (
    BACKGROUND_NICE,
    BUSY,
    LOAD,
    Pacer,
    background,
    loop_busy,
    loop_waiting,
    mark_loop_thread,
)


def test_a_background_thread_lowers_only_its_own_priority() -> None:
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(max_workers=1, initializer=background) as pool:
        worker = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert worker == min(19, main + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # the caller is untouched


# -- Pacer: a background thread's stretches on the CPU stay short ------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pacer(
    waiting: list[bool], behind: list[bool] | None = None, busy: list[bool] | None = None
) -> tuple[Pacer, _Clock, list[str]]:
    clock = _Clock()
    events: list[str] = []

    def sleep(seconds: float) -> None:
        events.append(f"sleep {seconds:g}")
        clock.now += seconds

    pacer = Pacer(
        run=100e-6,
        pause=20e-6,
        clock=clock,
        waiting=lambda: waiting[0],
        behind=None if behind is None else (lambda: behind[0]),
        busy=(lambda: False) if busy is None else (lambda: busy[0]),
        sleep=sleep,
        yield_=lambda: events.append("yield"),
    )
    return pacer, clock, events


def test_a_pacer_pauses_after_a_stretch_only_when_the_loop_waits_for_the_core() -> None:
    waiting = [True]
    pacer, clock, events = _pacer(waiting)
    for _ in range(9):  # 90 µs of work: within the stretch, nothing happens
        clock.now += 10e-6
        pacer()
    assert events == []
    clock.now += 10e-6  # 100 µs: the stretch is over and the loop waits
    pacer()
    assert events == ["yield", "sleep 2e-05"] and pacer.pauses == 1
    events.clear()
    for _ in range(9):  # a new stretch began after the pause
        clock.now += 10e-6
        pacer()
    assert events == []
    waiting[0] = False  # the loop is idle (or on another core): the GIL is let go, no sleep
    clock.now += 20e-6
    pacer()
    assert events == ["yield"] and pacer.pauses == 1


def test_a_pacer_that_is_behind_neither_yields_nor_pauses() -> None:
    behind = [True]
    pacer, clock, events = _pacer([True], behind)
    for _ in range(50):
        clock.now += 10e-6
        pacer()
    assert events == [] and pacer.pauses == 0
    behind[0] = False
    clock.now += 100e-6
    pacer()
    assert events == ["yield", "sleep 2e-05"]


def test_a_pacer_does_not_pause_while_the_loop_is_busy() -> None:
    """With several calls in flight the loop is never idle: pausing would only cost switches."""
    busy = [True]
    pacer, clock, events = _pacer([True], busy=busy)
    for _ in range(50):
        clock.now += 10e-6
        pacer()
    assert events == []
    busy[0] = False
    clock.now += 100e-6
    pacer()
    assert events == ["yield", "sleep 2e-05"]


def test_the_loop_counts_as_busy_from_BUSY_calls_in_flight() -> None:
    assert LOAD.calls == 0 and not loop_busy()
    try:
        LOAD.calls = BUSY - 1
        assert not loop_busy()
        LOAD.calls = BUSY
        assert loop_busy()
    finally:
        LOAD.calls = 0


def test_restart_begins_a_new_stretch() -> None:
    pacer, clock, events = _pacer([True])
    clock.now += 1.0  # the thread waited a long time for work: it has not been on the CPU
    pacer.restart()
    pacer()
    assert events == []
    for _ in range(4):  # paced at 30, 60, 90 and 120 µs into the stretch: it ends at the last
        clock.now += 30e-6
        pacer()
    assert events == ["yield", "sleep 2e-05"]


def test_loop_waiting_reads_the_loop_threads_state_from_proc() -> None:
    """The real check: the loop's thread (here this test's) spinning on the same core as the
    asking thread is waiting for that core; blocked on an event, it is not."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/stat"):
        pytest.skip("no /proc")  # pragma: no cover - the CI runs on Linux
    before = os.sched_getaffinity(0)
    core = min(before)
    mark_loop_thread()
    try:
        os.sched_setaffinity(0, {core})  # this thread, and the worker below inherits it
        answers: list[bool] = []
        done = threading.Event()

        def ask(count: int) -> None:
            for _ in range(count):
                answers.append(loop_waiting())
            done.set()

        block = bytes(1 << 20)
        worker = threading.Thread(target=ask, args=(20,))
        worker.start()
        while not done.is_set():  # runnable the whole time, on the worker's core, mostly
            hashlib.sha256(block).digest()  # hashing without the GIL, so the worker can ask
        worker.join()
        assert answers.count(True) >= 10, answers

        answers.clear()
        done.clear()
        gate = threading.Event()

        def ask_while_blocked() -> None:
            gate.wait()
            answers.append(loop_waiting())
            done.set()

        worker = threading.Thread(target=ask_while_blocked)
        worker.start()
        gate.set()
        done.wait(5)  # this thread sleeps in the wait: not runnable
        worker.join()
        assert answers == [False]
    finally:
        os.sched_setaffinity(0, before)
