"""Background threads yield the CPU to the event loop.

The sidecar's blocking work (ledger writes, rule evaluation, call-log writes, token
estimates, notifications) runs in threads of its own so the event loop never waits on it.
On a pod's one core those threads still compete with the loop for the CPU: a burst of
ledger inserts would hold the core for a scheduler slice (milliseconds) while a call waits.
Each background thread lowers its own scheduling priority (a higher nice value, which needs
no privilege), so the kernel runs the event loop first whenever it has work.

Where the platform has no per-thread priorities this does nothing.
"""

from __future__ import annotations

import logging
import os
import threading

__all__ = ["BACKGROUND_NICE", "background"]

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
