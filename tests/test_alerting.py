"""The alerting runtime: settings, the sink's tick, reload, incidents across a restart, notifications."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import yamlspec
from sidecar.alerting import (
    AlertingSettings,
    AlertingSink,
    RulesConfig,
    parse_notify_flag,
    parse_notify_section,
    parse_rules_section,
    settings_from,
)
from sidecar.errors import ConfigError
from sidecar.incidents import IncidentStore
from sidecar.rules.testing import call

T0 = 1_699_920_000


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Ctx:
    def __init__(self, base: Path) -> None:
        self.base = base

    def path(self, text: str) -> Path:
        p = Path(text)
        return p if p.is_absolute() else self.base / p


RULES = """\
version: sidecar/v1
defaults: {group_by: [tenant], notify: [oncall]}
rules:
  - {name: quiet, kind: absence, window: 1m, severity: page}
  - {name: errors, kind: error_rate, threshold: 10%, window: 1m, severity: ticket}
  - {name: cap, kind: budget, period: 1d, calendar: true, limit: 1, action: reject}
  - {name: mttr, kind: mttr, incidents_of: [quiet], window: 1d, threshold: 1m}
"""


def write_rules(tmp_path: Path, text: str = RULES) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def sink_for(
    tmp_path: Path, clock: Clock, rules: Path, **kw: object
) -> tuple[AlertingSink, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = AlertingSettings(
        rule_files=(rules,),
        notify_enabled=False,
        incident_merge_gap=60,
        watch_interval=0,
        **kw,  # type: ignore[arg-type]
    )
    return AlertingSink.create(settings, registry, tmp_path / "data", clock), registry


# -- settings ------------------------------------------------------------------------------


def read_section(text: str, parse, base: Path):  # type: ignore[no-untyped-def]
    r = yamlspec.Reader("sidecar.yaml")
    node = r.compose(textwrap.dedent(text))
    assert node is not None
    value = parse(r, node, "section", Ctx(base))
    return value, [str(p) for p in r.problems]


def test_rules_and_notify_sections(tmp_path: Path) -> None:
    rules, problems = read_section(
        "{files: [rules/, extra.yaml], incident_merge_gap: 10m, max_series_per_rule: 50}",
        parse_rules_section,
        tmp_path,
    )
    assert problems == []
    assert rules.files == (tmp_path / "rules", tmp_path / "extra.yaml") and rules.incident_merge_gap == 600
    assert settings_from(rules).max_series_per_rule == 50
    secret = tmp_path / "pager-url"
    secret.write_text("json://127.0.0.1:9/from-file\n")
    notify, problems = read_section(
        """
        enabled: true
        channels:
          oncall: ["json://127.0.0.1:9/literal"]
          pager: [{from_env: PAGER_URL}, {from_file: pager-url}]
        repeat_interval: 2h
        group_wait: 10s
        timeout: 5s
        """,
        parse_notify_section,
        tmp_path,
    )
    assert problems == []
    settings = settings_from(RulesConfig(), notify, env={"PAGER_URL": "json://127.0.0.1:9/env"})
    assert settings.channels == {
        "oncall": ("json://127.0.0.1:9/literal",),
        "pager": ("json://127.0.0.1:9/env", "json://127.0.0.1:9/from-file"),
    }
    assert (settings.repeat_interval, settings.group_wait, settings.send_timeout) == (7200, 10, 5)
    assert "json://" not in repr(settings)  # URLs are secrets
    with pytest.raises(ConfigError) as info:
        settings_from(RulesConfig(), notify, env={})
    assert [str(p) for p in info.value.problems] == [
        "config:1:1: section.channels.pager[0]: environment variable PAGER_URL is not set or empty"
    ]


def test_notify_section_problems_never_echo_urls(tmp_path: Path) -> None:
    _, problems = read_section(
        """
        channels:
          "bad name": ["json://x"]
          a: ["secret-token-without-scheme"]
          b: [{from_env: PAGER, from_file: x}]
          c: []
        enabled: maybe
        """,
        parse_notify_section,
        tmp_path,
    )
    assert not any("secret-token" in p for p in problems)
    assert problems == [
        "sidecar.yaml:3:3: section.channels.bad name: invalid channel name 'bad name' "
        "(letters, digits, '_', '-', '.')",
        "sidecar.yaml:4:7: section.channels.a[0]: expected an apprise URL (scheme://...)",
        "sidecar.yaml:4:6: section.channels.a: a channel needs at least one URL",
        "sidecar.yaml:5:7: section.channels.b[0]: give exactly one of from_env or from_file",
        "sidecar.yaml:5:6: section.channels.b: a channel needs at least one URL",
        "sidecar.yaml:6:6: section.channels.c: a channel needs at least one URL",
        'sidecar.yaml:7:10: section.enabled: expected true or false, got string "maybe"',
    ]


def test_notify_flags() -> None:
    assert parse_notify_flag("oncall=json://127.0.0.1:8080/hook") == ("oncall", "json://127.0.0.1:8080/hook")
    with pytest.raises(ValueError) as info:
        parse_notify_flag("oncall:json-secret")
    assert "json-secret" not in str(info.value)
    settings = settings_from(rule_flags=["rules/"], notify_flags=["a=json://h/1", "a=json://h/2"])
    assert settings.rule_files == (Path("rules/"),) and settings.channels == {
        "a": ("json://h/1", "json://h/2")
    }


def test_create_refuses_bad_rules_unknown_channels_and_bad_urls(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "version: sidecar/v1\nrules:\n  - {name: q, kind: absence, windw: 1m}\n")
    with pytest.raises(ConfigError) as info:
        AlertingSink.create(
            AlertingSettings(rule_files=(rules,), notify_enabled=False), CollectorRegistry(), tmp_path
        )
    assert [str(p) for p in info.value.problems] == [
        f'{rules}:3:5: rules[0].window: missing required key "window"',
        f'{rules}:3:30: rules[0].windw: unknown key "windw"; did you mean "window"?',
    ]
    rules = write_rules(
        tmp_path, "version: sidecar/v1\nrules:\n  - {name: q, kind: absence, window: 1m, notify: [pager]}\n"
    )
    settings = AlertingSettings(rule_files=(rules,), channels={"oncall": ("not-a-url-token",)})
    with pytest.raises(ConfigError) as info:
        AlertingSink.create(settings, CollectorRegistry(), tmp_path)
    messages = [str(p) for p in info.value.problems]
    assert messages == [
        f"{rules}:3:5: q.notify: unknown notification channel 'pager' (channels: oncall)",
        "notify:1:1: notify.channels: channel 'oncall': URL #1 is not a valid apprise URL",
    ]


# -- the tick, metrics, reject -------------------------------------------------------------


async def test_tick_fires_exposes_metrics_and_rejects(tmp_path: Path) -> None:
    clock = Clock(T0)
    sink, registry = sink_for(tmp_path, clock, write_rules(tmp_path))
    await sink.restore()
    await sink.handle([call(T0, tenant="acme", cost=2), call(T0, tenant="beta", error_type="timeout")])
    assert sink.budget_exceeded("acme", "openai", "gpt-4o", "openai")
    assert not sink.budget_exceeded("beta", "openai", "gpt-4o", "openai")
    fired = sink.tick(T0)
    assert sorted((t.rule, dict(t.labels)["tenant"]) for t in fired) == [("cap", "acme"), ("errors", "beta")]
    value = registry.get_sample_value
    assert value("llm_alerts_firing", {"rule": "errors", "severity": "ticket", "tenant": "beta"}) == 1
    assert value("llm_budget_spent", {"rule": "cap", "tenant": "acme"}) == 2
    assert value("llm_incidents_open", {"rule": "errors", "severity": "ticket"}) == 1
    assert value("llm_rule_evaluation_seconds_count") == 1
    assert value("llm_incident_duration_seconds_count", {"rule": "quiet", "severity": "page"}) == 0
    clock.t = T0 + 60
    await sink.handle([call(T0 + 60, tenant="beta")])
    out = sink.tick()
    assert sorted((t.rule, t.status) for t in out) == [("errors", "resolved"), ("quiet", "firing")]
    # quiet fired for acme: no call since T0
    assert value("llm_alerts_firing", {"rule": "errors", "severity": "ticket", "tenant": "beta"}) is None
    await sink.stop(5)


# -- incidents across a restart ------------------------------------------------------------


async def test_incidents_and_mttr_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock(T0)
    rules = write_rules(tmp_path)
    first, _ = sink_for(tmp_path, clock, rules)
    await first.restore()
    await first.handle([call(T0, tenant="acme")])
    first.tick(T0)
    clock.t = T0 + 60
    assert [t.status for t in first.tick() if t.rule == "quiet"] == ["firing"]
    (incident,) = first.engine.book.open_incidents(["quiet"])
    assert first.ack(incident.id, "ana")
    assert not first.ack("nope", "ana")
    await first.stop(5)  # writes the incidents

    stored = IncidentStore(tmp_path / "data").list()
    assert [(i.id, i.end, i.acked_by) for i in stored] == [(incident.id, None, "ana")]

    clock.t = T0 + 600  # restarted 9 minutes later
    second, registry = sink_for(tmp_path, clock, rules)
    await second.restore()
    # The open incident's alert fires again without a new firing transition.
    assert (
        registry.get_sample_value(
            "llm_alerts_firing", {"rule": "quiet", "severity": "page", "tenant": "acme"}
        )
        == 1
    )
    await second.handle([call(T0 + 600, tenant="acme")])
    out = second.tick()
    resolved = [t for t in out if t.rule == "quiet"]
    assert [(t.status, t.since, t.at) for t in resolved] == [("resolved", T0 + 60, T0 + 600)]
    # MTTR over the incident that started before the restart: 540 s > 1m.
    assert [(t.rule, t.status, t.value) for t in out if t.rule == "mttr"] == [("mttr", "firing", 540.0)]
    await second.stop(5)
    (final,) = [i for i in IncidentStore(tmp_path / "data").list() if i.rule == "quiet"]
    assert (final.id, final.start, final.end, final.acked_by) == (incident.id, T0 + 60, T0 + 600, "ana")


async def test_open_incident_of_a_removed_rule_is_closed_at_start(tmp_path: Path) -> None:
    clock = Clock(T0)
    rules = write_rules(tmp_path)
    first, _ = sink_for(tmp_path, clock, rules)
    await first.restore()
    await first.handle([call(T0, tenant="acme")])
    first.tick(T0)
    assert [t.rule for t in first.tick(T0 + 60)] == ["quiet"]
    await first.stop(5)
    write_rules(tmp_path, "version: sidecar/v1\nrules:\n  - {name: other, kind: absence, window: 1h}\n")
    clock.t = T0 + 120
    second, _ = sink_for(tmp_path, clock, rules)
    await second.restore()
    await second.stop(5)
    (closed,) = IncidentStore(tmp_path / "data").list()
    assert (closed.rule, closed.end) == ("quiet", T0 + 120)


# -- reload --------------------------------------------------------------------------------


async def test_reload_with_a_broken_file_keeps_the_old_rules_and_state(tmp_path: Path) -> None:
    clock = Clock(T0)
    rules = write_rules(tmp_path)
    sink, registry = sink_for(tmp_path, clock, rules)
    failures: list[list[object]] = []
    sink.on_reload_failure = failures.append  # type: ignore[assignment]
    await sink.restore()
    sink.tick(T0)
    clock.t = T0 + 60
    await sink.handle([call(T0 + 60, tenant="beta", error_type="timeout")])
    assert [t.rule for t in sink.tick(T0 + 75)] == ["errors"]
    rules.write_text(RULES.replace("window: 1m, severity: ticket", "windw: 1m, severity: ticket"))
    problems = sink.reload()
    assert problems and problems[0].startswith(f"{rules}:5:") and "windw" in " ".join(problems)
    assert len(failures) == 1
    assert sink.engine.rules.names == ("quiet", "errors", "cap", "mttr")  # the last good rules
    labels = {"rule": "errors", "severity": "ticket", "tenant": "beta"}
    assert registry.get_sample_value("llm_alerts_firing", labels) == 1
    # A good change to another rule: the errors alert keeps firing, no new transition.
    rules.write_text(RULES.replace("limit: 1,", "limit: 5,"))
    assert sink.reload() == []
    assert sink.tick(T0 + 90) == []
    assert registry.get_sample_value("llm_alerts_firing", labels) == 1
    await sink.stop(5)


async def test_reload_from_a_thread_swaps_on_the_loop(tmp_path: Path) -> None:
    clock = Clock(T0)
    rules = write_rules(tmp_path)
    sink, _ = sink_for(tmp_path, clock, rules)
    await sink.restore()
    rules.write_text(RULES + "  - {name: extra, kind: absence, window: 1h}\n")
    assert await asyncio.to_thread(sink.reload) == []
    await asyncio.sleep(0)  # the swap was scheduled on the loop
    await asyncio.sleep(0)
    assert "extra" in sink.engine.rules.names
    await sink.stop(5)


async def test_the_running_sink_watches_files_and_ticks_by_itself(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "version: sidecar/v1\nrules:\n  - {name: q, kind: absence, window: 1h}\n")
    settings = AlertingSettings(rule_files=(rules,), notify_enabled=False, watch_interval=0.05)
    registry = CollectorRegistry()
    sink = AlertingSink.create(settings, registry, tmp_path / "data")
    await sink.start()
    try:
        assert sink.offer(call(time.time(), tenant="acme"))
        rules.write_text(
            "version: sidecar/v1\nrules:\n"
            "  - {name: q2, kind: absence, window: 1s, evaluation_interval: 1s}\n"
        )
        for _ in range(100):  # bounded: 5 s
            if sink.engine.rules.names == ("q2",):
                break
            await asyncio.sleep(0.05)
        assert sink.engine.rules.names == ("q2",)
        for _ in range(100):
            if registry.get_sample_value("llm_alerts_firing", {"rule": "q2", "severity": "ticket"}) == 1:
                break
            await asyncio.sleep(0.05)
        assert registry.get_sample_value("llm_alerts_firing", {"rule": "q2", "severity": "ticket"}) == 1
    finally:
        await sink.stop(5)
    assert IncidentStore(tmp_path / "data").list(open_only=True)[0].rule == "q2"


# -- notifications end to end --------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[int, list[dict[str, object]], asyncio.Event]]:
    got: list[dict[str, object]] = []
    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/hang", hang)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1], got, release
    finally:
        release.set()
        await runner.cleanup()


async def test_firing_and_resolved_messages_reach_a_real_receiver_while_a_hung_channel_waits(
    tmp_path: Path, receiver: tuple[int, list[dict[str, object]], asyncio.Event]
) -> None:
    port, got, release = receiver
    rules = write_rules(
        tmp_path,
        "version: sidecar/v1\ndefaults: {group_by: [tenant]}\nrules:\n"
        "  - {name: errors, kind: error_rate, threshold: 10%, window: 1m, severity: page,\n"
        "     notify: [oncall, hung]}\n",
    )
    clock = Clock(T0)
    registry = CollectorRegistry()
    settings = AlertingSettings(
        rule_files=(rules,),
        channels={"oncall": (f"json://127.0.0.1:{port}/ok",), "hung": (f"json://127.0.0.1:{port}/hang",)},
        group_wait=0,
        send_timeout=0.3,
        send_retries=0,
        watch_interval=0,
    )
    sink = AlertingSink.create(settings, registry, tmp_path / "data", clock)
    await sink.restore()
    try:
        await sink.handle([call(T0, tenant=t, error_type="timeout") for t in ("acme", "beta")])
        sink.tick(T0)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        assert [m["title"] for m in got] == ["[FIRING:page] errors (2 alerts)"]
        # The hung channel holds its sends; records and ticks go on regardless.
        started = time.monotonic()
        assert sink.offer(call(T0 + 1))
        clock.t = T0 + 60
        await sink.handle([call(T0 + 60, tenant=t) for t in ("acme", "beta")])
        sink.tick()
        assert time.monotonic() - started < 0.2
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.02)
        assert got[1]["title"] == "[RESOLVED:page] errors (2 alerts)" and got[1]["type"] == "success"
        hung = {"channel": "hung", "outcome": "timeout"}
        for _ in range(100):
            if registry.get_sample_value("llm_notifications_total", hung) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        release.set()
        await sink.stop(5)
    value = registry.get_sample_value
    assert value("llm_notifications_total", {"channel": "oncall", "outcome": "sent"}) == 2
    assert value("llm_notifications_total", {"channel": "hung", "outcome": "timeout"}) == 2
