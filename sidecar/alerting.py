"""The alerting runtime: rules, evaluation tick, notifications and incidents in one sink.

:class:`AlertingSink` is a :class:`~sidecar.sinks.QueueSink`: finished-call records
reach :meth:`~sidecar.rules.engine.Engine.observe` through its queue, never on the
request path. Besides it runs

- an evaluation tick (:meth:`AlertingSink.tick`) when a rule is due, which steps
  the engine, hands transitions to the notification :class:`~sidecar.notify.Dispatcher`
  (group wait, repeat interval) and the :class:`~sidecar.notify.Notifier` (apprise in
  threads), and refreshes the gauges the metrics collector serves;
- an incident writer: changed incidents go to SQLite (:mod:`sidecar.incidents`)
  through ``asyncio.to_thread``; at start the recent ones are read back, so MTTR and
  open incidents survive a restart (alerts of open incidents resume firing);
- an optional rule-file watcher (polling mtimes) that reloads on change, as SIGHUP
  does through :meth:`AlertingSink.reload`; a broken file keeps the last good rules.

Config sections (parse helpers for ``sidecar.config``'s section table)::

    rules:  {files: [rules/], incident_merge_gap: 5m, watch_interval: 5s, max_series_per_rule: 10000}
    notify: {enabled: true, channels: {oncall: ["json://..."], pager: [{from_env: PAGER_URL}]},
             repeat_interval: 4h, group_wait: 30s, timeout: 10s}

Metrics (registered on the registry given to :meth:`AlertingSink.create`):
``llm_alerts_firing``, ``llm_slo_error_budget_remaining_ratio``, ``llm_slo_burn_rate``,
``llm_budget_spent``, ``llm_budget_limit``, ``llm_incidents_open``,
``llm_incident_open_age_seconds`` (gauges with per-rule labels, from a collector),
``llm_rule_evaluation_seconds``, ``llm_incident_duration_seconds{rule,severity}``
(histograms) and ``llm_notifications_total{channel,outcome}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from yaml.nodes import MappingNode, Node, ScalarNode

from sidecar import yamlspec
from sidecar.errors import ConfigError, Problem
from sidecar.incidents import IncidentStore
from sidecar.model import CallRecord
from sidecar.notify import Dispatcher, Message, Notifier, Outgoing, validate_channels
from sidecar.rules.engine import BudgetBreach, Engine, Sample
from sidecar.rules.incidents import Incident
from sidecar.rules.loader import check_channels, expand, load_files
from sidecar.rules.model import IncidentAgeRule, MttrRule, RuleSet
from sidecar.rules.state import Transition
from sidecar.sinks import QueueSink
from sidecar.threads import Pacer, background

__all__ = [
    "AlertingSettings",
    "AlertingSink",
    "NotifyConfig",
    "RulesConfig",
    "UrlRef",
    "parse_notify_flag",
    "parse_notify_section",
    "parse_rules_section",
    "settings_from",
]

log = logging.getLogger("sidecar.alerting")

_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CHANNEL = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_INCIDENT_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 604800)
_EVAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_OUTCOMES = ("sent", "failed", "timeout")
_MIN_RETENTION = 7 * 86400.0


# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertingSettings:
    """Everything the alerting sink needs from the config and the command line.

    ``channels`` maps a channel name to its apprise URLs, already resolved (they are
    secrets: left out of ``repr``).
    """

    rule_files: tuple[Path, ...] = ()
    notify_enabled: bool = True
    channels: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    repeat_interval: float = 4 * 3600.0
    group_wait: float = 30.0
    send_timeout: float = 10.0
    incident_merge_gap: float = 300.0
    watch_interval: float = 5.0  # seconds between rule-file change checks; 0 turns watching off
    send_retries: int = 2  # attempts after the first, with exponential backoff
    max_series_per_rule: int = (
        10_000  # groups (label sets) one rule tracks; calls of further ones are counted
    )
    retry_backoff: float = 1.0  # seconds before the first retry (doubling, at most 30 s)


@dataclass(frozen=True)
class RulesConfig:
    """The config file's ``rules`` section."""

    files: tuple[Path, ...] = ()
    incident_merge_gap: float = 300.0
    watch_interval: float = 5.0
    max_series_per_rule: int = 10_000


@dataclass(frozen=True)
class UrlRef:
    """One apprise URL of a channel: written out, or read from an environment variable or a file."""

    url: str | None = field(default=None, repr=False)
    from_env: str | None = None
    from_file: Path | None = None
    field_path: str = ""

    def resolve(self, env: Mapping[str, str]) -> str:
        """The URL; :class:`ValueError` (never quoting the URL) when it cannot be read."""
        if self.url is not None:
            return self.url
        if self.from_env is not None:
            value = env.get(self.from_env, "").strip()
            if not value:
                raise ValueError(f"environment variable {self.from_env} is not set or empty")
            return value
        assert self.from_file is not None
        try:
            value = self.from_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read {self.from_file}: {exc.strerror or exc}") from None
        if not value:
            raise ValueError(f"{self.from_file} is empty")
        return value


@dataclass(frozen=True)
class NotifyConfig:
    """The config file's ``notify`` section (URLs not resolved yet)."""

    enabled: bool = True
    channels: tuple[tuple[str, tuple[UrlRef, ...]], ...] = ()
    repeat_interval: float = 4 * 3600.0
    group_wait: float = 30.0
    timeout: float = 10.0


class _PathContext(Protocol):
    def path(self, text: str) -> Path: ...


def parse_rules_section(r: yamlspec.Reader, node: Node, path: str, ctx: _PathContext) -> RulesConfig:
    """The ``rules`` section: files, incident_merge_gap, watch_interval, max_series_per_rule."""
    m = r.mapping(node, path, ("files", "incident_merge_gap", "watch_interval", "max_series_per_rule"))
    d = RulesConfig()
    if m is None:
        return d
    files = r.string_list(m.get("files"), yamlspec.join(path, "files"), [])
    return RulesConfig(
        files=tuple(ctx.path(f) for f in files),
        incident_merge_gap=r.duration(
            m.get("incident_merge_gap"), yamlspec.join(path, "incident_merge_gap"), d.incident_merge_gap
        ),
        watch_interval=r.duration(
            m.get("watch_interval"), yamlspec.join(path, "watch_interval"), d.watch_interval
        ),
        max_series_per_rule=r.integer(
            m.get("max_series_per_rule"),
            yamlspec.join(path, "max_series_per_rule"),
            d.max_series_per_rule,
            minimum=1,
        ),
    )


def parse_notify_section(r: yamlspec.Reader, node: Node, path: str, ctx: _PathContext) -> NotifyConfig:
    """``notify: {enabled, channels: {name: [url | {from_env} | {from_file}]}, repeat_interval, ...}``."""
    m = r.mapping(node, path, ("enabled", "channels", "repeat_interval", "group_wait", "timeout"))
    d = NotifyConfig()
    if m is None:
        return d
    channels: list[tuple[str, tuple[UrlRef, ...]]] = []
    cpath = yamlspec.join(path, "channels")
    entries = r.entries(m["channels"], cpath) if "channels" in m else []
    for name, key_node, value in entries or []:
        npath = yamlspec.join(cpath, name)
        if not re.fullmatch(_CHANNEL, name):
            r.problem(key_node, npath, f"invalid channel name {name!r} (letters, digits, '_', '-', '.')")
            continue
        refs: list[UrlRef] = []
        for i, item in enumerate(r.sequence(value, npath, "a list of apprise URLs") or []):
            ipath = yamlspec.index(npath, i)
            if isinstance(item, MappingNode):
                sub = r.mapping(item, ipath, ("from_env", "from_file"))
                if sub is None:
                    continue
                if len(sub) != 1:
                    r.problem(item, ipath, "give exactly one of from_env or from_file")
                    continue
                env = r.string(
                    sub.get("from_env"),
                    yamlspec.join(ipath, "from_env"),
                    pattern=re.compile(_ENV_NAME),
                    pattern_hint="not an environment variable name",
                )
                file = r.string(sub.get("from_file"), yamlspec.join(ipath, "from_file"))
                if env is not None:
                    refs.append(UrlRef(from_env=env, field_path=ipath))
                elif file is not None:
                    refs.append(UrlRef(from_file=ctx.path(file), field_path=ipath))
            elif isinstance(item, ScalarNode):
                url = r.string(item, ipath)
                if url is not None:
                    if "://" not in url:
                        r.problem(item, ipath, "expected an apprise URL (scheme://...)")  # never echo it
                        continue
                    refs.append(UrlRef(url=url, field_path=ipath))
            else:
                r.problem(item, ipath, "expected an apprise URL or {from_env: NAME} / {from_file: PATH}")
        if not refs:
            r.problem(value, npath, "a channel needs at least one URL")
            continue
        channels.append((name, tuple(refs)))
    return NotifyConfig(
        enabled=r.boolean(m.get("enabled"), yamlspec.join(path, "enabled"), d.enabled),
        channels=tuple(channels),
        repeat_interval=r.duration(
            m.get("repeat_interval"), yamlspec.join(path, "repeat_interval"), d.repeat_interval, positive=True
        ),
        group_wait=r.duration(m.get("group_wait"), yamlspec.join(path, "group_wait"), d.group_wait),
        timeout=r.duration(m.get("timeout"), yamlspec.join(path, "timeout"), d.timeout, positive=True),
    )


def parse_notify_flag(text: str) -> tuple[str, str]:
    """``--notify NAME=URL`` → ``(name, url)``; :class:`ValueError` (without the URL) when malformed."""
    name, sep, url = text.partition("=")
    if not sep or not re.fullmatch(_CHANNEL, name.strip()) or "://" not in url:
        raise ValueError("expected NAME=APPRISE_URL, e.g. oncall=json://127.0.0.1:8080/hook")
    return name.strip(), url.strip()


def settings_from(
    rules: RulesConfig | None = None,
    notify: NotifyConfig | None = None,
    *,
    rule_flags: Sequence[str] = (),
    notify_flags: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AlertingSettings:
    """Settings from the config sections plus ``--rules PATH`` and ``--notify NAME=URL`` flags.

    Flags add to the config (a flag's channel name adds a URL to that channel).
    URL references are resolved here (environment, secret files); a
    :class:`ConfigError` lists every one that cannot be.
    """
    rules = rules or RulesConfig()
    notify = notify or NotifyConfig()
    env = os.environ if env is None else env
    problems: list[Problem] = []
    channels: dict[str, list[str]] = {}
    for name, refs in notify.channels:
        for ref in refs:
            try:
                channels.setdefault(name, []).append(ref.resolve(env))
            except ValueError as exc:
                problems.append(Problem("config", 1, 1, ref.field_path, str(exc)))
    for flag in notify_flags:
        try:
            name, url = parse_notify_flag(flag)
        except ValueError as exc:
            problems.append(Problem("--notify", 1, 1, "", str(exc)))
            continue
        channels.setdefault(name, []).append(url)
    if problems:
        raise ConfigError(problems)
    return AlertingSettings(
        rule_files=tuple(rules.files) + tuple(Path(p) for p in rule_flags),
        notify_enabled=notify.enabled,
        channels={k: tuple(v) for k, v in channels.items()},
        repeat_interval=notify.repeat_interval,
        group_wait=notify.group_wait,
        send_timeout=notify.timeout,
        incident_merge_gap=rules.incident_merge_gap,
        watch_interval=rules.watch_interval,
        max_series_per_rule=rules.max_series_per_rule,
    )


# -- metrics --------------------------------------------------------------------------

_GAUGES: dict[str, str] = {
    "llm_alerts_firing": "1 for each alert firing, by rule, severity and group labels",
    "llm_slo_error_budget_remaining_ratio": "Error budget left over the SLO period (< 0: overspent)",
    "llm_slo_burn_rate": "Error ratio over a window divided by the error budget (1: on schedule)",
    "llm_budget_spent": "Spend in the current budget period, this sidecar only (USD or tokens)",
    "llm_budget_limit": "The budget limit of a group",
    "llm_incidents_open": "Open incidents by rule and severity",
    "llm_incident_open_age_seconds": "Age of each open incident",
}


class _AlertingCollector(Collector):
    """Serves the gauges of the latest evaluation (a snapshot: never reads the live engine)."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def collect(self) -> Iterable[Metric]:
        samples = self.samples  # one reference read: the tick replaces the list, never mutates it
        families = {name: Metric(name, doc, "gauge") for name, doc in _GAUGES.items()}
        for s in samples:
            family = families.get(s.name)
            if family is not None:
                family.add_sample(s.name, dict(s.labels), s.value)
        return list(families.values())

    def describe(self) -> Iterable[Metric]:
        return [Metric(name, doc, "gauge") for name, doc in _GAUGES.items()]


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.collector = _AlertingCollector()
        registry.register(self.collector)
        self.evaluation = Histogram(
            "llm_rule_evaluation_seconds",
            "Time to evaluate the rules due at one tick",
            buckets=_EVAL_BUCKETS,
            registry=registry,
        )
        self.notifications = Counter(
            "llm_notifications_total",
            "Notifications by channel and final outcome (sent, failed, timeout)",
            ["channel", "outcome"],
            registry=registry,
        )
        self.incident_duration = Histogram(
            "llm_incident_duration_seconds",
            "Duration of incidents, observed once final (merge gap passed)",
            ["rule", "severity"],
            buckets=_INCIDENT_BUCKETS,
            registry=registry,
        )

    def prepare(self, rules: RuleSet, channels: Iterable[str]) -> None:
        """Create zero-valued series up front, so rate() and increase() count the first event."""
        for rule in rules:
            for severity in rule.severities():
                self.incident_duration.labels(rule.name, severity)
        for channel in channels:
            for outcome in _OUTCOMES:
                self.notifications.labels(channel, outcome)


# -- the sink -------------------------------------------------------------------------


def _fingerprint(files: Sequence[Path]) -> tuple[tuple[str, float, int], ...]:
    out: list[tuple[str, float, int]] = []
    for path in expand(files):
        try:
            st = path.stat()
            out.append((str(path), st.st_mtime, st.st_size))
        except OSError:
            out.append((str(path), -1.0, -1))
    return tuple(out)


@dataclass(frozen=True)
class _Evaluation:
    """What one evaluation hands from the engine thread to the loop."""

    transitions: list[Transition]
    changed: list[Incident]
    finalized: list[Incident]
    firing: list[Any]
    samples: list[Sample]
    series_dropped: int


class AlertingSink(QueueSink):
    """Evaluates rules over finished calls, notifies, and keeps incidents; see the module docstring."""

    name = "alerting"
    linger = 0.05  # each batch is one hand-off to the engine thread: fewer, larger ones

    def __init__(
        self,
        settings: AlertingSettings,
        rules: RuleSet,
        registry: CollectorRegistry,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
        maxsize: int = 10_000,
    ) -> None:
        super().__init__(maxsize=maxsize)
        self.settings = settings
        self.clock = clock
        self.engine = Engine(
            rules, clock(), merge_gap=settings.incident_merge_gap, max_series=settings.max_series_per_rule
        )
        self.store = IncidentStore(data_dir)
        self.metrics = _Metrics(registry)
        self.metrics.prepare(rules, settings.channels if settings.notify_enabled else ())
        self.dispatcher = Dispatcher(settings.group_wait, settings.repeat_interval)
        self.notifier: Notifier | None = None
        if settings.notify_enabled and settings.channels:
            self.notifier = Notifier(
                settings.channels,
                lambda channel, outcome: self.metrics.notifications.labels(channel, outcome).inc(),
                timeout=settings.send_timeout,
                retries=settings.send_retries,
                backoff=settings.retry_backoff,
            )
        #: Called with the problems of every failed reload (SIGHUP or a watched file change);
        #: may run in a worker thread (the file watcher reloads in one).
        self.on_reload_failure: Callable[[list[Problem]], None] | None = None
        #: Called on the loop with every firing or resolved alert (the gateway's canary rollback).
        self.on_transition: Callable[[Transition], None] | None = None
        self.last_problems: list[Problem] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._writes: asyncio.Queue[list[Incident]] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._fingerprint = _fingerprint(settings.rule_files)
        self._last_prune = 0.0
        self._dropped_logged = 0
        # The engine's work (filing calls, evaluating rules) runs on one thread of its own, so
        # an evaluation over many groups never stalls the proxy; the lock serialises it with
        # the rare engine calls made on the loop (reload, ack, tests' tick()).
        self._engine_lock = threading.Lock()
        self._engine_thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sidecar-rules", initializer=background
        )
        # The engine thread steps aside every ~100 µs of work when the loop waits for the core
        # (see sidecar.threads): a call never waits for a whole batch or a whole evaluation.
        self._pace = Pacer(behind=lambda: self.pending >= self._batch)

    @classmethod
    def create(
        cls,
        settings: AlertingSettings,
        registry: CollectorRegistry,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> AlertingSink:
        """Load and check the rule files and channels; :class:`ConfigError` with every problem."""
        rules, problems = load_files(settings.rule_files)
        if settings.notify_enabled:
            problems += check_channels(rules, settings.channels)
            problems += [
                Problem("notify", 1, 1, "notify.channels", p) for p in validate_channels(settings.channels)
            ]
        if problems:
            raise ConfigError(problems)
        return cls(settings, rules, registry, Path(data_dir), clock)

    # -- records ------------------------------------------------------------------

    async def handle(self, records: list[CallRecord]) -> None:
        now = self.clock()
        await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._observe, records, now)

    def _observe(self, records: list[CallRecord], now: float) -> None:
        pace = self._pace
        with self._engine_lock:
            pace.restart()
            for record in records:
                pace()
                self.engine.observe(record, now)

    def horizon(self) -> float:
        """Seconds of past calls the rules' windows and periods look at (0: none)."""
        spans = [
            float(getattr(rule, "period", 0.0) or getattr(rule, "window", 0.0) or 0.0)
            for rule in self.engine.rules
            if not isinstance(rule, MttrRule | IncidentAgeRule)  # those look at incidents, not calls
        ]
        return max(spans, default=0.0)

    def refill(self, records: Iterable[CallRecord]) -> int:
        """Put past calls (e.g. the ledger's recent rows) back into the windows at their own times.

        Called once at start, before live records arrive, so a restart does not reset an
        SLO's error budget or a budget rule's spend. Returns how many were filed.
        """
        count = 0
        with self._engine_lock:
            for record in sorted(records, key=lambda r: r.finished_at):
                self.engine.observe(record, record.finished_at)
                count += 1
        return count

    def notify_event(self, title: str, body: str, notify_type: str = "warning") -> None:
        """Send a gateway event (a breaker opening, a canary rolled back) to every channel."""
        if not self.settings.notify_enabled or self.notifier is None:
            return
        channels = self.notifier.channels
        if channels:
            self.notifier.submit(Outgoing(channels, Message(title, body, notify_type)))

    def budget_exceeded(self, tenant: str, provider: str, model: str, upstream: str) -> bool:
        """True when an ``action: reject`` budget of this call's group is spent (a dict lookup)."""
        return self.engine.budget_exceeded(tenant, provider, model, upstream)

    def budget_breach(self, tenant: str, provider: str, model: str, upstream: str) -> BudgetBreach | None:
        """The spent ``action: reject`` budget of this call's group, with its figures, or None."""
        return self.engine.budget_breach(tenant, provider, model, upstream, self.clock())

    # -- lifecycle ----------------------------------------------------------------

    def _retention(self) -> float:
        windows = [r.window for r in self.engine.rules if isinstance(r, MttrRule)]
        return max([_MIN_RETENTION, *windows]) + self.settings.incident_merge_gap

    async def restore(self) -> None:
        """Read recent incidents back (open ones resume firing); part of :meth:`start`."""
        self._loop = asyncio.get_running_loop()
        if self._writes is None:
            self._writes = asyncio.Queue()
        now = self.clock()
        incidents = await asyncio.to_thread(self.store.recent, now - self._retention())
        with self._engine_lock:
            self.engine.restore(incidents, now)
            firing = self.engine.firing(now)
            changed = self.engine.book.drain_changes()  # incidents closed because their rule is gone
        self.dispatcher.restored([t.key for t in firing], now)
        self._enqueue(changed)
        self._refresh(now)
        if incidents:
            log.info("alerting: %d recent incidents restored", len(incidents))

    async def start(self) -> None:
        """Restore incidents, then run the record worker, the tick, the writer and the watcher."""
        await self.restore()
        await super().start()
        self._writer_task = asyncio.create_task(self._write_incidents(), name="alerting:incidents")
        self._tick_task = asyncio.create_task(self._run_ticks(), name="alerting:tick")
        if self.settings.watch_interval > 0 and self.settings.rule_files:
            self._watch_task = asyncio.create_task(self._watch(), name="alerting:watch")

    async def stop(self, timeout: float) -> None:
        """Drain queued records, stop the tasks, write pending incidents, let sends finish."""
        deadline = time.monotonic() + timeout
        await super().stop(timeout)
        for task in (self._tick_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tick_task = self._watch_task = None
        with self._engine_lock:  # waits for an evaluation still running on the engine thread
            changed = self.engine.book.drain_changes()
        self._enqueue(changed)
        self._engine_thread.shutdown(wait=False)
        if self._writer_task is not None and self._writes is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._writes.join(), max(0.1, deadline - time.monotonic()))
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        elif self._writes is not None:
            await self.flush_incidents()
        if self.notifier is not None:
            await self.notifier.close(max(0.1, deadline - time.monotonic()))

    async def flush_incidents(self) -> None:
        """Write every pending incident change now (when the writer task is not running)."""
        if self._writes is None:
            return
        while not self._writes.empty():
            batch = self._writes.get_nowait()
            await asyncio.to_thread(self.store.save, batch)
            self._writes.task_done()

    # -- the tick -----------------------------------------------------------------

    async def _run_ticks(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            try:
                evaluation = await loop.run_in_executor(self._engine_thread, self._evaluate, now)
                self._deliver(evaluation, now)
            except Exception:
                log.exception("alerting: evaluation tick failed")
            wake = min(self.engine.next_due(), self.dispatcher.next_due())
            await asyncio.sleep(min(1.0, max(0.05, wake - self.clock())) if math.isfinite(wake) else 1.0)

    def tick(self, now: float | None = None) -> list[Transition]:
        """Evaluate due rules at ``now``; notify, store incidents, refresh gauges.

        The runtime does the evaluation on the engine thread and the rest on the loop;
        this synchronous form (for tests and tools) does both in the caller's thread.
        """
        now = self.clock() if now is None else now
        evaluation = self._evaluate(now)
        self._deliver(evaluation, now)
        return evaluation.transitions if evaluation is not None else []

    def _evaluate(self, now: float) -> _Evaluation | None:
        """The engine's part of a tick (any thread; takes the engine lock). None: nothing was due."""
        with self._engine_lock:
            if self.engine.next_due() > now:
                return None
            started = time.perf_counter()
            self._pace.restart()
            transitions = self.engine.evaluate(now, self._pace)
            self.metrics.evaluation.observe(time.perf_counter() - started)
            return self._collect(transitions, now)

    def _collect(self, transitions: list[Transition], now: float) -> _Evaluation:
        """What the loop needs from the engine after ``transitions`` (engine lock held)."""
        if now - self._last_prune > 3600:
            self.engine.book.prune(now, self._retention())
            self._last_prune = now
        return _Evaluation(
            transitions=transitions,
            changed=self.engine.book.drain_changes(),
            finalized=self.engine.book.drain_finalized(now),
            firing=self.engine.firing(now),
            samples=self.engine.samples(now),
            series_dropped=self.engine.series_dropped,
        )

    def _deliver(self, evaluation: _Evaluation | None, now: float) -> None:
        """The loop's part of a tick: logs, incident writes, metrics and notifications."""
        if evaluation is None:
            # Nothing to evaluate: only groups whose wait ended go out (repeats are checked
            # when rules are evaluated, so this stays cheap however many alerts fire).
            if self.settings.notify_enabled and self.dispatcher.next_due() <= now:
                for outgoing in self.dispatcher.due(now):
                    if self.notifier is not None:
                        self.notifier.submit(outgoing)
            return
        transitions = evaluation.transitions
        for t in transitions:
            labels = " ".join(f"{k}={v}" for k, v in t.labels)
            log.info("alert %s %s [%s] %s: %s", t.status, t.rule, t.severity, labels, t.value_text)
            if self.on_transition is not None:
                try:
                    self.on_transition(t)
                except Exception:
                    log.exception("alerting: the transition hook failed for rule %s", t.rule)
        self._enqueue(evaluation.changed)
        for inc in evaluation.finalized:
            if inc.end is not None:
                self.metrics.incident_duration.labels(inc.rule, inc.severity).observe(inc.end - inc.start)
        dropped = evaluation.series_dropped
        self._dropped_logged = min(self._dropped_logged, dropped)  # a reload starts the counts again
        if dropped > self._dropped_logged:
            log.warning(
                "alerting: %d calls not counted: a rule already tracks %d groups (max_series_per_rule)",
                dropped - self._dropped_logged,
                self.settings.max_series_per_rule,
            )
            self._dropped_logged = dropped
        if self.settings.notify_enabled:
            self.dispatcher.add(transitions, now)
            for outgoing in self.dispatcher.due(now, evaluation.firing):
                if self.notifier is not None:
                    self.notifier.submit(outgoing)
        self.metrics.collector.samples = evaluation.samples

    def _refresh(self, now: float) -> None:
        with self._engine_lock:
            samples = self.engine.samples(now)
        self.metrics.collector.samples = samples

    # -- incidents ----------------------------------------------------------------

    def _enqueue(self, changed: list[Incident]) -> None:
        if changed and self._writes is not None:
            self._writes.put_nowait(changed)

    async def _write_incidents(self) -> None:
        assert self._writes is not None
        while True:
            batch = await self._writes.get()
            try:
                await asyncio.to_thread(self.store.save, batch)
            except Exception:
                log.exception("alerting: could not store %d incident(s)", len(batch))
            finally:
                self._writes.task_done()

    def ack(self, incident_id: str, by: str) -> bool:
        """Acknowledge an open or recent incident (for MTTA); ``False`` when unknown. On the loop."""
        with self._engine_lock:
            ok = self.engine.ack(incident_id, by, self.clock())
            changed = self.engine.book.drain_changes() if ok else []
        self._enqueue(changed)
        return ok

    # -- reload -------------------------------------------------------------------

    def reload(self, rule_files: Sequence[Path] | None = None) -> list[str]:
        """Load the rule files again; keep the last good rules when any has a problem.

        Returns the problems (empty on success). Safe to call from a thread (the
        swap then happens on the loop). Alert state of unchanged rules is kept;
        firing alerts of removed or changed rules resolve.
        """
        files = tuple(rule_files) if rule_files is not None else self.settings.rule_files
        rules, problems = load_files(files)
        if self.settings.notify_enabled:
            problems += check_channels(rules, self.settings.channels)
        self._fingerprint = _fingerprint(files)
        self.last_problems = problems
        if problems:
            for p in problems:
                log.error("rule reload rejected, the last good rules keep running: %s", p)
            if self.on_reload_failure is not None:
                self.on_reload_failure(problems)
            return [str(p) for p in problems]
        if rule_files is not None:
            self.settings = _replace_files(self.settings, files)
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is not None and not on_loop and loop.is_running():
            loop.call_soon_threadsafe(self._swap, rules)
        else:
            self._swap(rules)
        return []

    def _swap(self, rules: RuleSet) -> None:
        now = self.clock()
        with self._engine_lock:
            transitions = self.engine.replace_rules(rules, now)
            evaluation = self._collect(transitions, now)
        self.metrics.prepare(rules, ())
        log.info("rules reloaded: %d rules", len(rules))
        self._deliver(evaluation, now)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            current = await asyncio.to_thread(_fingerprint, self.settings.rule_files)
            if current != self._fingerprint:
                log.info("rule files changed: reloading")
                await asyncio.to_thread(self.reload)


def _replace_files(settings: AlertingSettings, files: tuple[Path, ...]) -> AlertingSettings:
    return replace(settings, rule_files=files)


def describe_settings(settings: AlertingSettings) -> dict[str, Any]:
    """A loggable view of the settings: channel names and URL counts, never the URLs."""
    return {
        "rule_files": [str(p) for p in settings.rule_files],
        "notify_enabled": settings.notify_enabled,
        "channels": {name: f"{len(urls)} URL(s)" for name, urls in settings.channels.items()},
        "repeat_interval": settings.repeat_interval,
        "group_wait": settings.group_wait,
        "send_timeout": settings.send_timeout,
        "incident_merge_gap": settings.incident_merge_gap,
    }
