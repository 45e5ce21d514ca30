"""Notifications: message layout, group wait and repeat, and real sends through apprise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest
from aiohttp import web

from sidecar.notify import (
    Dispatcher,
    Message,
    Notifier,
    Outgoing,
    format_alert,
    format_group,
    validate_channels,
)
from sidecar.rules.state import Transition

T0 = 1_699_920_000


def alert(
    rule: str = "availability",
    tenant: str = "acme",
    severity: str = "page",
    status: str = "firing",
    at: float = T0 + 720,
    since: float = T0,
    **kw: object,
) -> Transition:
    base = Transition(
        rule=rule,
        kind="slo",
        severity=severity,
        labels=(("tenant", tenant),),
        status=status,
        at=at,
        since=since,
        value=0.0182,
        peak=0.02,
        value_text="error ratio 1.82% over 1h (burn rate 18.2x)",
        threshold_text="burn rate 14.4x (error ratio 1.44%)",
        channels=("pager",),
        annotations=(
            ("summary", "acme burns its budget"),
            ("runbook_url", "https://runbooks/avail"),
            ("dashboard_url", "https://grafana/slo"),
        ),
        budget_remaining=0.812,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# -- layout ------------------------------------------------------------------------------


def test_single_firing_message_layout() -> None:
    msg = format_group([alert()], now=T0 + 720)
    assert msg.title == "[FIRING:page] availability tenant=acme"
    assert msg.notify_type == "failure"
    assert msg.body == (
        "availability tenant=acme\n"
        "  acme burns its budget\n"
        "  value: error ratio 1.82% over 1h (burn rate 18.2x)\n"
        "  threshold: burn rate 14.4x (error ratio 1.44%)\n"
        "  since: 2023-11-14 00:00:00 UTC (12m ago)\n"
        "  error budget left: 81.2%\n"
        "  runbook: https://runbooks/avail\n"
        "  dashboard: https://grafana/slo"
    )


def test_group_and_resolved_layout_and_types() -> None:
    group = format_group([alert(tenant=t, rule="errors") for t in ("a", "b", "c")], now=T0)
    assert group.title == "[FIRING:page] errors (3 alerts)"
    assert group.body.count("errors tenant=") == 3
    ticket = format_group([alert(severity="ticket")], now=T0)
    assert ticket.notify_type == "warning"
    assert format_group([alert(severity="info")], now=T0).notify_type == "info"
    resolved = format_group([alert(status="resolved", at=T0 + 2520)], now=T0 + 2520)
    assert resolved.title == "[RESOLVED:page] availability tenant=acme"
    assert resolved.notify_type == "success"
    assert "resolved after 42m (firing since 2023-11-14 00:00:00 UTC, resolved 2023-11-14 00:42:00 UTC)" in (
        resolved.body
    )
    assert "error budget left" not in resolved.body
    bare = format_alert(alert(labels=(), annotations=(), budget_remaining=None), now=T0)
    assert bare.splitlines()[0] == "availability" and "runbook" not in bare
    with pytest.raises(ValueError):
        format_group([], now=T0)


# -- group wait and repeat ---------------------------------------------------------------


def test_group_wait_gathers_a_burst_into_one_message() -> None:
    d = Dispatcher(group_wait=30, repeat_interval=3600)
    d.add([alert(rule="errors", tenant="a", at=T0)], T0)
    d.add(
        [alert(rule="errors", tenant="b", at=T0 + 10), alert(rule="errors", tenant="c", at=T0 + 10)], T0 + 10
    )
    assert d.due(T0 + 29) == []
    assert d.next_due() == T0 + 30
    (out,) = d.due(T0 + 30)
    assert out.message.title == "[FIRING:page] errors (3 alerts)" and out.channels == ("pager",)
    assert d.next_due() == float("inf")


def test_separate_groups_per_rule_severity_and_status() -> None:
    d = Dispatcher(group_wait=0)
    d.add([alert(rule="a"), alert(rule="b"), alert(rule="a", severity="ticket")], T0)
    titles = sorted(o.message.title for o in d.due(T0))
    assert titles == [
        "[FIRING:page] a tenant=acme",
        "[FIRING:page] b tenant=acme",
        "[FIRING:ticket] a tenant=acme",
    ]


def test_fired_and_resolved_within_the_wait_sends_nothing() -> None:
    d = Dispatcher(group_wait=30)
    d.add([alert(at=T0)], T0)
    d.add([alert(status="resolved", at=T0 + 15)], T0 + 15)
    assert d.due(T0 + 60, firing=[]) == []


def test_resolved_is_sent_only_after_the_firing_was() -> None:
    d = Dispatcher(group_wait=30)
    d.add([alert(status="resolved")], T0)  # never notified as firing
    assert d.due(T0 + 60, firing=[]) == []
    d.add([alert(at=T0 + 60)], T0 + 60)
    assert [o.message.title for o in d.due(T0 + 90, firing=[alert()])] == [
        "[FIRING:page] availability tenant=acme"
    ]
    d.add([alert(status="resolved", at=T0 + 100)], T0 + 100)
    (out,) = d.due(T0 + 130, firing=[])
    assert out.message.title == "[RESOLVED:page] availability tenant=acme"
    assert out.message.notify_type == "success"


def test_repeat_interval_for_still_firing_alerts() -> None:
    d = Dispatcher(group_wait=0, repeat_interval=4 * 3600)
    firing = [alert(tenant="a"), alert(tenant="b")]
    d.add(firing, T0)
    assert len(d.due(T0, firing=firing)) == 1
    assert d.due(T0 + 4 * 3600 - 1, firing=firing) == []
    (repeat,) = d.due(T0 + 4 * 3600, firing=firing)
    assert repeat.message.title == "[FIRING:page] availability (2 alerts)"
    assert repeat.message.body.startswith("Still firing.")
    assert d.due(T0 + 4 * 3600 + 60, firing=firing) == []
    # Only b still fires: a is forgotten, b repeats alone.
    (again,) = d.due(T0 + 8 * 3600, firing=firing[1:])
    assert again.message.title == "[FIRING:page] availability tenant=b"


def test_restored_alerts_are_not_sent_again_at_once() -> None:
    d = Dispatcher(group_wait=0, repeat_interval=3600)
    restored = alert()
    d.restored([restored.key], T0)
    assert d.due(T0 + 10, firing=[restored]) == []
    assert len(d.due(T0 + 3600, firing=[restored])) == 1
    d.add([alert(status="resolved", at=T0 + 4000)], T0 + 4000)
    assert [o.message.notify_type for o in d.due(T0 + 4000, firing=[])] == ["success"]


def test_alerts_without_channels_are_tracked_but_not_sent() -> None:
    d = Dispatcher(group_wait=0)
    d.add([alert(channels=())], T0)
    assert d.due(T0, firing=[]) == []


# -- sending through apprise, to a real receiver -----------------------------------------


@dataclass
class Receiver:
    port: int
    ok: list[dict[str, object]] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)
    failed_hits: int = 0
    hang_hits: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"json://127.0.0.1:{self.port}/{path}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state: dict[str, Receiver] = {}

    async def ok(request: web.Request) -> web.Response:
        rec = state["r"]
        rec.ok.append(await request.json())
        rec.ok_times.append(time.monotonic())
        rec.arrived.set()
        return web.Response(text="ok")

    async def fail(request: web.Request) -> web.Response:
        state["r"].failed_hits += 1
        return web.Response(status=500, text="boom")

    async def hang(request: web.Request) -> web.Response:
        rec = state["r"]
        rec.hang_hits += 1
        await rec.release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_post("/fail", fail)
    app.router.add_post("/hang", hang)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state["r"] = Receiver(port)
    try:
        yield state["r"]
    finally:
        state["r"].release.set()
        await runner.cleanup()


async def test_real_apprise_sends_and_a_failing_or_hanging_channel_delays_nothing(receiver: Receiver) -> None:
    counts: dict[tuple[str, str], int] = {}

    def count(channel: str, outcome: str) -> None:
        counts[(channel, outcome)] = counts.get((channel, outcome), 0) + 1

    channels = {
        "hung": [receiver.url("hang")],
        "broken": [receiver.url("fail")],
        "oncall": [receiver.url("ok")],
    }
    assert validate_channels(channels) == []
    notifier = Notifier(channels, count, timeout=0.5, retries=1, backoff=0.05)
    msg = format_group([alert()], now=T0 + 720)
    start = time.monotonic()
    try:
        tasks = notifier.submit(Outgoing(("hung", "broken", "oncall"), msg))
        await asyncio.wait_for(receiver.arrived.wait(), 5)
        # The good channel got its message well before the hung one's first timeout.
        assert receiver.ok_times[0] - start < 0.5
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        receiver.release.set()
        await notifier.close(5)
    assert outcomes == ["timeout", "failed", "sent"]
    assert counts == {("hung", "timeout"): 1, ("broken", "failed"): 1, ("oncall", "sent"): 1}
    assert receiver.failed_hits == 2 and receiver.hang_hits == 2  # one retry each
    (payload,) = receiver.ok
    assert payload["title"] == "[FIRING:page] availability tenant=acme"
    assert payload["type"] == "failure"
    assert "error budget left: 81.2%" in str(payload["message"])


async def test_unknown_channel_and_invalid_urls_are_reported_without_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "json://user:s3cret-token@127.0.0.1:9/hook"
    problems = validate_channels({"bad": ["not a url at all", secret], "empty": []})
    assert problems == ["channel 'bad': URL #1 is not a valid apprise URL", "channel 'empty' has no URL"]
    counts: list[tuple[str, str]] = []
    notifier = Notifier({"x": [secret]}, lambda c, o: counts.append((c, o)), timeout=0.2, retries=0)
    try:
        assert await notifier.send("nope", Message("t", "b", "info")) == "failed"
        # Port 9 (discard) on loopback refuses: a failed send, logged by channel name only.
        assert await notifier.send("x", Message("t", "b", "info")) == "failed"
    finally:
        await notifier.close(1)
    assert counts == [("nope", "failed"), ("x", "failed")]
    assert "s3cret" not in caplog.text
