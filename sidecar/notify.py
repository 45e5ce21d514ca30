"""Notifications through apprise: pure message formatting and grouping, thin sending.

- :func:`format_alert` and :func:`format_group` build the apprise title and body of
  a message (pure). Titles read ``[FIRING:page] availability tenant=acme``, or
  ``[FIRING:page] errors (3 alerts)`` for a group; ``RESOLVED`` when over. Notify
  types: a firing ``page`` is ``failure``, a firing ``ticket`` ``warning``, a firing
  ``info`` ``info``, anything resolved ``success``.
- :class:`Dispatcher` (pure, time as a parameter) decides *when*: transitions of the
  same rule, severity and status wait ``group_wait`` and go out as one message; a
  still-firing alert is notified again every ``repeat_interval``; a resolved alert
  is notified only if its firing was; an alert that fires and resolves within the
  group wait is never sent.
- :class:`Notifier` does the sending: one apprise object per channel, each send in
  a dedicated thread pool (apprise blocks), bounded by a timeout, retried with
  exponential backoff, its final outcome (``sent``, ``failed``, ``timeout``) handed
  to a counter callback. Channels send independently, so a failing or hanging one
  never delays another, and nothing here runs on the request path.

Apprise URLs carry secrets: they are never logged (only channel names are), and the
``apprise`` logger is capped at WARNING, whose messages name hosts at most.

Imports apprise and asyncio; no other third-party library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import apprise

with warnings.catch_warnings(), contextlib.suppress(ImportError):
    # apprise's e-mail plugin imports the standard imghdr module, deprecated since Python
    # 3.11, when its plugins load (at the first send). Importing it here once, quietly,
    # keeps that DeprecationWarning out of the logs and out of warnings-as-errors runs.
    warnings.simplefilter("ignore", DeprecationWarning)
    import imghdr  # noqa: F401

from sidecar.rules.engine import describe_duration
from sidecar.rules.state import LabelSet, Transition
from sidecar.threads import background

__all__ = [
    "Dispatcher",
    "Message",
    "Notifier",
    "Outgoing",
    "format_alert",
    "format_group",
    "notify_type",
    "validate_channels",
]

log = logging.getLogger("sidecar.notify")

# Notification URLs are secrets (tokens in the userinfo, the path or the query), and the
# libraries under apprise print them: apprise logs the URLs it loads (DEBUG) and the tokens
# it finds malformed (WARNING), and urllib3 logs every request line, webhook path included
# (DEBUG). Their records are dropped, from import on; the sidecar reports channel problems
# itself, without the URL ("notify channel X: a URL is not a valid apprise URL").
logging.getLogger("apprise").setLevel(logging.CRITICAL + 1)
logging.getLogger("urllib3").setLevel(logging.WARNING)

_FIRING_TYPES = {"page": "failure", "ticket": "warning", "info": "info"}


@dataclass(frozen=True, slots=True)
class Message:
    """One apprise notification: title, body and notify type."""

    title: str
    body: str
    notify_type: str  # failure | warning | info | success


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message and the channels it goes to."""

    channels: tuple[str, ...]
    message: Message
    alerts: tuple[Transition, ...] = ()


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _labels(labels: LabelSet) -> str:
    return " ".join(f"{k}={v}" for k, v in labels)


def notify_type(status: str, severity: str) -> str:
    """The apprise notify type for an alert of ``severity`` in ``status``."""
    if status == "resolved":
        return "success"
    return _FIRING_TYPES.get(severity, "info")


def format_alert(alert: Transition, now: float) -> str:
    """The body lines for one alert: labels, value against threshold, since when, links, budget."""
    head = f"{alert.rule} {_labels(alert.labels)}".rstrip()
    lines = [head]
    summary = alert.annotation("summary")
    if summary:
        lines.append(f"  {summary}")
    if alert.status == "resolved":
        lasted = describe_duration(max(0.0, alert.at - alert.since))
        lines.append(
            f"  resolved after {lasted} (firing since {_when(alert.since)}, resolved {_when(alert.at)})"
        )
        if alert.value_text:
            lines.append(f"  last value: {alert.value_text}")
    else:
        if alert.value_text:
            lines.append(f"  value: {alert.value_text}")
        if alert.threshold_text:
            lines.append(f"  threshold: {alert.threshold_text}")
        ago = describe_duration(max(0.0, now - alert.since))
        lines.append(f"  since: {_when(alert.since)} ({ago} ago)")
        if alert.budget_remaining is not None and math.isfinite(alert.budget_remaining):
            lines.append(f"  error budget left: {alert.budget_remaining * 100:.1f}%")
    description = alert.annotation("description")
    if description:
        lines.append(f"  {description}")
    for key, label in (("runbook_url", "runbook"), ("dashboard_url", "dashboard")):
        url = alert.annotation(key)
        if url:
            lines.append(f"  {label}: {url}")
    return "\n".join(lines)


def format_group(alerts: Sequence[Transition], now: float, repeat: bool = False) -> Message:
    """One message for alerts of the same rule, severity and status."""
    if not alerts:
        raise ValueError("format_group needs at least one alert")
    first = alerts[0]
    state = "RESOLVED" if first.status == "resolved" else "FIRING"
    if len(alerts) == 1:
        title = f"[{state}:{first.severity}] {first.rule} {_labels(first.labels)}".rstrip()
    else:
        title = f"[{state}:{first.severity}] {first.rule} ({len(alerts)} alerts)"
    body = "\n\n".join(format_alert(a, now) for a in alerts)
    if repeat:
        body = "Still firing.\n\n" + body
    return Message(title, body, notify_type(first.status, first.severity))


# -- when to send ---------------------------------------------------------------------


@dataclass
class _Group:
    deadline: float
    alerts: dict[tuple[str, str, LabelSet], Transition] = field(default_factory=dict)


class Dispatcher:
    """Group wait and repeat interval, with time as a parameter."""

    def __init__(self, group_wait: float = 30.0, repeat_interval: float = 4 * 3600.0) -> None:
        self.group_wait = group_wait
        self.repeat_interval = repeat_interval
        self._pending: dict[tuple[str, str, str], _Group] = {}
        self._notified: dict[tuple[str, str, LabelSet], float] = {}  # firing alerts sent, and when

    def add(self, transitions: Sequence[Transition], now: float) -> None:
        """Queue firing and resolved transitions (they go out when their group is due)."""
        for t in transitions:
            if t.status == "resolved":
                firing = self._pending.get((t.rule, t.severity, "firing"))
                if firing is not None and firing.alerts.pop(t.key, None) is not None:
                    if not firing.alerts:
                        del self._pending[(t.rule, t.severity, "firing")]
                    if t.key not in self._notified:
                        continue  # fired and resolved within the group wait: nothing to say
                if t.key not in self._notified:
                    continue  # its firing was never sent (notifications were off, or it was restored)
            group = self._pending.setdefault((t.rule, t.severity, t.status), _Group(now + self.group_wait))
            group.alerts[t.key] = t

    def restored(self, keys: Sequence[tuple[str, str, LabelSet]], now: float) -> None:
        """Alerts put back to firing after a restart count as notified at ``now`` (no burst)."""
        for key in keys:
            self._notified.setdefault(key, now)

    def next_due(self) -> float:
        """When the next pending group is due (``inf`` if none; repeats are checked at each call)."""
        return min((g.deadline for g in self._pending.values()), default=math.inf)

    def due(self, now: float, firing: Sequence[Transition] | None = None) -> list[Outgoing]:
        """Messages to send at ``now``.

        ``firing`` is every alert firing now: with it, still-firing alerts due for a
        repeat are sent again and alerts gone without a resolved transition are
        forgotten; without it (``None``) only pending groups are looked at.
        """
        out: list[Outgoing] = []
        for gkey, group in list(self._pending.items()):
            if group.deadline > now:
                continue
            del self._pending[gkey]
            alerts = list(group.alerts.values())
            for a in alerts:
                if a.status == "firing":
                    self._notified[a.key] = now
                else:
                    self._notified.pop(a.key, None)
            if alerts and alerts[0].channels:
                out.append(Outgoing(alerts[0].channels, format_group(alerts, now), tuple(alerts)))
        if firing is None:
            return out
        waiting = {k for g in self._pending.values() for k in g.alerts}
        current = {t.key for t in firing}
        for key in [k for k in self._notified if k not in current and k not in waiting]:
            del self._notified[key]  # no longer firing (e.g. its rule was removed)
        repeats: dict[tuple[str, str], list[Transition]] = {}
        for t in firing:
            last = self._notified.get(t.key)
            if last is not None and now - last >= self.repeat_interval and t.key not in waiting:
                repeats.setdefault((t.rule, t.severity), []).append(t)
        for alerts in repeats.values():
            for a in alerts:
                self._notified[a.key] = now
            if alerts[0].channels:
                out.append(
                    Outgoing(alerts[0].channels, format_group(alerts, now, repeat=True), tuple(alerts))
                )
        return out


# -- sending --------------------------------------------------------------------------


def _asset() -> apprise.AppriseAsset:
    try:  # apprise >= 1.9 keeps a persistent cache on disk unless told not to
        return apprise.AppriseAsset(storage_mode="memory")
    except TypeError:  # pragma: no cover - older apprise
        return apprise.AppriseAsset()


def validate_channels(channels: Mapping[str, Sequence[str]]) -> list[str]:
    """Problems with channel URLs, naming the channel and URL position only (URLs are secrets)."""
    problems: list[str] = []
    asset = _asset()
    for name, urls in channels.items():
        if not urls:
            problems.append(f"channel {name!r} has no URL")
        for i, url in enumerate(urls):
            if apprise.Apprise.instantiate(url, asset=asset) is None:
                problems.append(f"channel {name!r}: URL #{i + 1} is not a valid apprise URL")
    return problems


class Notifier:
    """Sends messages to named channels of apprise URLs, off the event loop.

    ``count(channel, outcome)`` is called once per message and channel with the
    final outcome: ``sent``, ``failed`` (every attempt failed) or ``timeout`` (the
    last attempt timed out).
    """

    def __init__(
        self,
        channels: Mapping[str, Sequence[str]],
        count: Callable[[str, str], None],
        *,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._count = count
        self._channels: dict[str, apprise.Apprise] = {}
        asset = _asset()
        for name, urls in channels.items():
            obj = apprise.Apprise(asset=asset)
            for url in urls:
                plugin = apprise.Apprise.instantiate(url, asset=asset)
                if plugin is None:
                    log.error("notify channel %s: a URL is not a valid apprise URL; it is left out", name)
                    continue
                # A hung service must free its thread soon after we stop waiting for it.
                plugin.socket_connect_timeout = min(plugin.socket_connect_timeout, timeout)
                plugin.socket_read_timeout = min(plugin.socket_read_timeout, timeout + 1.0)
                obj.add(plugin)
            self._channels[name] = obj
        self._executor = ThreadPoolExecutor(
            max_workers=max(4, 2 * len(self._channels)),
            thread_name_prefix="sidecar-notify",
            initializer=background,
        )
        self._tasks: set[asyncio.Task[str]] = set()

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel names, in config order."""
        return tuple(self._channels)

    @property
    def in_flight(self) -> int:
        """Sends started and not finished (retries included)."""
        return len(self._tasks)

    def submit(self, outgoing: Outgoing) -> list[asyncio.Task[str]]:
        """Start sending ``outgoing`` to each of its channels; returns at once."""
        tasks: list[asyncio.Task[str]] = []
        for channel in outgoing.channels:
            task = asyncio.create_task(self.send(channel, outgoing.message), name=f"notify:{channel}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            tasks.append(task)
        return tasks

    def _notify_sync(self, channel: str, message: Message) -> bool:
        obj = self._channels[channel]
        return bool(obj.notify(body=message.body, title=message.title, notify_type=message.notify_type))

    async def send(self, channel: str, message: Message) -> str:
        """Deliver one message to one channel with retries; returns and counts the outcome."""
        if channel not in self._channels:
            log.error("notify channel %s is not configured; message %r dropped", channel, message.title)
            self._count(channel, "failed")
            return "failed"
        loop = asyncio.get_running_loop()
        outcome = "failed"
        for attempt in range(self.retries + 1):
            try:
                future = loop.run_in_executor(self._executor, self._notify_sync, channel, message)
                ok = await asyncio.wait_for(future, self.timeout)
                outcome = "sent" if ok else "failed"
            except TimeoutError:
                outcome = "timeout"
            except Exception as exc:  # apprise raising is a failed send, not a crash
                log.warning("notify channel %s: %s while sending", channel, type(exc).__name__)
                outcome = "failed"
            if outcome == "sent":
                break
            if attempt < self.retries:
                delay = min(self.backoff * 2**attempt, self.max_backoff)
                log.warning(
                    "notify channel %s: attempt %d %s; retrying in %.1fs",
                    channel,
                    attempt + 1,
                    outcome,
                    delay,
                )
                await asyncio.sleep(delay)
        if outcome == "sent":
            log.info("notify channel %s: sent %r", channel, message.title)
        else:
            log.error(
                "notify channel %s: %s after %d attempts: %r",
                channel,
                outcome,
                self.retries + 1,
                message.title,
            )
        self._count(channel, outcome)
        return outcome

    async def close(self, timeout: float) -> None:
        """Let sends in flight finish (up to ``timeout`` s), cancel the rest, free the threads."""
        pending = set(self._tasks)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.gather(*still, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
