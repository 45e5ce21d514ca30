"""Readings from ``/proc``: CPU time and RSS of a process, busy time of each core.

CPU time counts every thread of the process (user + system), in clock ticks of
``SC_CLK_TCK`` (100 per second on Linux): per-request figures come from thousands of
requests, so the 10 ms granularity does not matter.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU time of each thread of process ``pid``, by thread id ({} if it is gone)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def thread_name(pid: int, tid: int) -> str:
    """The kernel's name of a thread (``comm``; Python threads all show as ``python``)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class CoreTimes:
    """Busy and total ticks of one core since boot, and two parts of busy: ``steal`` (time the
    hypervisor gave the virtual CPU to another guest: the host's noise, which ``/proc`` shows,
    and which no process is charged for) and ``softirq`` (interrupt and softirq work, such as
    loopback TCP for the processes on the core). Without ``CONFIG_IRQ_TIME_ACCOUNTING`` (the
    machines this was written on) a tick spent in a softirq is also charged to the process
    that was running, so it is in that process's CPU time as well."""

    busy: int
    total: int
    softirq: int = 0
    steal: int = 0

    def busy_share(self, before: CoreTimes) -> float:
        """The fraction of the time between ``before`` and this reading that the core was busy."""
        return self._share(self.busy - before.busy, before)

    def softirq_share(self, before: CoreTimes) -> float:
        """The fraction of that time spent in interrupts and softirqs."""
        return self._share(self.softirq - before.softirq, before)

    def steal_share(self, before: CoreTimes) -> float:
        """The fraction of that time stolen by the hypervisor."""
        return self._share(self.steal - before.steal, before)

    def _share(self, ticks: int, before: CoreTimes) -> float:
        total = self.total - before.total
        return ticks / total if total > 0 else 0.0


def core_times(path: str = "/proc/stat") -> dict[int, CoreTimes]:
    """Per-core ticks from ``/proc/stat`` (idle and iowait count as not busy; irq, softirq and
    steal as busy)."""
    out: dict[int, CoreTimes] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            ticks = [int(v) for v in values]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            total = sum(ticks[:8])
            softirq = sum(ticks[5:7])
            steal = ticks[7] if len(ticks) > 7 else 0
            out[int(name[3:])] = CoreTimes(total - idle, total, softirq, steal)
    return out


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores_online": os.cpu_count() or 0,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
