"""Background threads run at a lower priority than the event loop (sidecar.threads)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from sidecar.threads import BACKGROUND_NICE, background


def test_a_background_thread_lowers_only_its_own_priority() -> None:
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(max_workers=1, initializer=background) as pool:
        worker = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert worker == min(19, main + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # the caller is untouched
