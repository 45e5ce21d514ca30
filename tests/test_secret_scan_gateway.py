"""Issue 8: the gateway's secrets never leak into any output.

:func:`test_gateway_secrets_never_leak_anywhere` starts a real sidecar process at
``--log-level debug`` with every gateway secret configured at once: virtual keys (a keys file
holding the SHA-256 of two keys made with :func:`sidecar.gateway.keys.new_key`, one of them
expired), provider keys read ``from_file`` (the OpenAI one rotated mid-test), an apprise
``json://user:TOKEN@...`` channel to a real receiver here (a rule and the breaker both
notify), a Redis ``state.url`` with a password on a closed port (the fail-open warning is logged), an admin
token, rate limits, a route with fallback, a failing route and a circuit breaker. Calls go
through every path (success JSON and stream, unknown / expired key, the key as ``x-api-key``,
over the rate limit, fallback, upstream 5xx, circuit open, a model the key may not use). Then
every output is grepped for every secret (whole, and distinctive pieces of it): stdout and
stderr, ``/metrics`` (text and OpenMetrics), ``GET /routes``, the ledger (``cost export`` csv
and jsonl), every body the client got, every notification the receiver got, every request the
upstreams got (virtual keys must never reach them; the provider key must, as the injected
header) and the CLI (``config check``, ``keys check``, ``rules check``). Each output is first
shown to be real (debug lines, one call line and one ledger row per call, the notifications
and the Redis warning are there), so an empty output cannot pass the scan.

The smaller tests cover what that scan cannot: apprise URLs whose tokens sit outside the
password (a custom ``+Header=``, the path, the query) in the debug log; a channel URL apprise
rejects at start; config mistakes that put a secret where ``config check`` quotes the value
(literal, or through ``${VAR}``); and the ``keys`` CLI. Each of those leaked when the
test was written (apprise and urllib3 debug lines, an apprise warning quoting a malformed
token, config problems quoting the value) and is fixed.

Only 127.0.0.1 is used; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.cli import main as cli_main
from sidecar.gateway.keys import KEY_PREFIX, hash_key, new_key
from tests.test_e2e_observability import OPENMETRICS, Proc, scrape, sidecar_process
from tests.test_gateway_e2e import (
    Upstream,
    answer_json,
    cli,
    closed_port,
    replace_file,
    status,
    streaming,
    upstreams,
)

# -- the secrets ---------------------------------------------------------------------------------

PROVIDER_KEY_A = "sk-proj-PROVKEYALPHA-7c1e9a2b4d6f8091a3b5c7d9e1f20304"
PROVIDER_KEY_B = "sk-proj-PROVKEYBRAVO-0f9e8d7c6b5a49382716a5b4c3d2e1f0"
ANTHROPIC_KEY = "sk-ant-api03-PROVKEYANTHRO-5a6b7c8d9e0f1a2b3c4d5e6f"
REDIS_PASSWORD = "REDISPW-3f1c0b9e8d7a6c5b"
APPRISE_USER = "hookuser"
APPRISE_TOKEN = "APPRISETOK-8e2d4c6a0b1f3e5d"
ADMIN_TOKEN = "ADMINTOK-c0ffee1234567890abcd"


def pieces(key: str) -> list[str]:
    """A virtual key, its random part and two distinctive 12-character pieces of it."""
    body = key.removeprefix(KEY_PREFIX)
    return [key, body, body[:12], body[-12:]]


# -- a notification receiver -----------------------------------------------------------------------


class Receiver:
    """An apprise ``json://`` endpoint on 127.0.0.1 that keeps every message with its headers."""

    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, str], bytes]] = []
        self.got = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook{tail:.*}", self.hook)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        self.port = 0

    async def hook(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        headers["x-path"] = request.path_qs  # where the message was sent (tokens may be in it)
        self.messages.append((headers, await request.read()))
        self.got.set()
        return web.json_response({})

    async def start(self) -> Receiver:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    def titles(self) -> list[str]:
        return [str(json.loads(body).get("title", "")) for _, body in self.messages]

    async def wait_for(self, prefix: str, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not any(t.startswith(prefix) for t in self.titles()):
                self.got.clear()
                await self.got.wait()


# -- upstream answers ------------------------------------------------------------------------------

STREAM = streaming(chunks=3, gap=0.01)


async def json_or_stream(
    upstream: Upstream, request: web.Request, body: dict[str, Any]
) -> web.StreamResponse:
    if body.get("stream"):
        return await STREAM(upstream, request, body)
    return answer_json(upstream, body)


def seen_text(upstream: Upstream) -> str:
    """Everything an upstream received: paths, header values and JSON bodies."""
    return "\n".join(
        f"{seen.path} {json.dumps(seen.headers)} {json.dumps(seen.body)}" for seen in upstream.seen
    )


RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, group_by: [tenant], notify: [oncall]}
rules:
  - name: errors
    kind: error_rate
    bad: {error_type: [upstream_5xx]}
    threshold: 1%
    window: 30s
    min_requests: 1
    for: 0s
    severity: page
    annotations: {summary: "{{ $labels.tenant }} calls fail"}
"""


class SecretLeak(AssertionError):
    """A secret found in an output (apart from other failures: a timeout, a changed message)."""


def no_leak(leaks: list[str]) -> None:
    if leaks:
        raise SecretLeak(leaks)


def leaks_in(outputs: Mapping[str, str], secrets: Mapping[str, list[str]]) -> list[str]:
    return [
        f"{what} ({needle[:24]}...) in {where}"
        for what, needles in secrets.items()
        for where, text in outputs.items()
        for needle in needles
        if needle in text
    ]


async def test_gateway_secrets_never_leak_anywhere(tmp_path: Path) -> None:
    started = time.monotonic()
    vk1, vk1_hash = new_key()
    vk2, vk2_hash = new_key()
    unknown, _ = new_key()  # a well-formed key that is in no keys file
    keys = tmp_path / "keys.yaml"
    replace_file(
        keys,
        "version: sidecar/v1\nkeys:\n"
        f"  - {{name: acme-app, tenant: acme, sha256: {vk1_hash}, models: ['gpt-4o*', 'm-*', 'claude-*']}}\n"
        f"  - {{name: acme-old, tenant: acme, sha256: {vk2_hash}, expires: 2020-01-01T00:00:00Z}}\n",
    )
    openai_key = tmp_path / "openai-key"
    replace_file(openai_key, PROVIDER_KEY_A + "\n")
    anthropic_key = tmp_path / "anthropic-key"
    replace_file(anthropic_key, ANTHROPIC_KEY + "\n")
    admin_token = tmp_path / "admin-token"
    admin_token.write_text(ADMIN_TOKEN + "\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    data = tmp_path / "data"
    receiver = await Receiver().start()
    hook_url = f"json://{APPRISE_USER}:{APPRISE_TOKEN}@127.0.0.1:{receiver.port}/hook"
    basic = base64.b64encode(f"{APPRISE_USER}:{APPRISE_TOKEN}".encode()).decode()
    secrets = {
        "virtual key VK1": pieces(vk1),
        "virtual key VK2 (expired)": pieces(vk2),
        "unknown virtual key": pieces(unknown),
        "provider key A": [PROVIDER_KEY_A, "PROVKEYALPHA", PROVIDER_KEY_A[-16:]],
        "provider key B": [PROVIDER_KEY_B, "PROVKEYBRAVO", PROVIDER_KEY_B[-16:]],
        "anthropic provider key": [ANTHROPIC_KEY, "PROVKEYANTHRO", ANTHROPIC_KEY[-16:]],
        "redis password": [REDIS_PASSWORD, "REDISPW", REDIS_PASSWORD[-10:]],
        "apprise token": [APPRISE_TOKEN, "APPRISETOK", APPRISE_TOKEN[-10:], basic],
        "admin token": [ADMIN_TOKEN, "ADMINTOK", ADMIN_TOKEN[-10:]],
    }
    redis_port = closed_port()
    replies: list[tuple[str, int, str]] = []  # (call, status, body)
    try:
        async with upstreams(("openai", "openai"), ("broken", "openai"), ("anthropic", "anthropic")) as ups:
            oai, broken, ant = ups
            oai.answer = json_or_stream
            broken.answer = status(503)
            config = tmp_path / "sidecar.yaml"
            config.write_text(
                textwrap.dedent(
                    f"""\
                    version: sidecar/v1
                    listen: 127.0.0.1:0
                    admin: {{listen: 127.0.0.1:0, token_file: {admin_token}}}
                    upstreams:
                      - {{name: openai, url: '{oai.url}', provider: openai, mount: /,
                          api_key: {{from_file: {openai_key}}}}}
                      - {{name: broken, url: '{broken.url}', provider: openai, mount: /broken,
                          api_key: {{from_file: {openai_key}}}}}
                      - {{name: anthropic, url: '{ant.url}', provider: anthropic, mount: /anthropic,
                          api_key: {{from_file: {anthropic_key}}}}}
                    data_dir: {data}
                    logs: {{level: debug}}
                    shutdown: {{drain_timeout: 10s}}
                    keys: {{file: {keys}, reload_interval: 200ms}}
                    rate_limits:
                      models: {{gpt-4o-rl: {{rpm: 1}}}}
                    state:
                      url: 'redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0'
                      on_error: fail_open
                      timeout: 250ms
                      retry_interval: 1s
                    circuit_breakers: {{consecutive_failures: 2, cooldown: 60s}}
                    routes:
                      - name: fb
                        match: {{models: [m-fallback]}}
                        targets: [{{upstream: broken}}, {{upstream: openai, priority: 1}}]
                      - {{name: failing, match: {{models: [m-fail]}}, targets: [{{upstream: broken}}]}}
                    rules: {{files: [{rules}]}}
                    notify:
                      group_wait: 0s
                      timeout: 5s
                      channels: {{oncall: ['{hook_url}']}}
                    """
                )
            )
            async with asyncio.timeout(120):
                async with (
                    sidecar_process(config, "--log-level", "debug") as proc,
                    aiohttp.ClientSession() as s,
                ):
                    base = f"http://127.0.0.1:{proc.port}"

                    async def call(
                        name: str,
                        model: str,
                        key: str | None,
                        *,
                        as_x_api_key: bool = False,
                        path: str = "/v1/chat/completions",
                        stream: bool = False,
                    ) -> int:
                        headers = {"x-tenant-id": "acme"}
                        if key is not None:
                            if as_x_api_key:
                                headers["x-api-key"] = key
                            else:
                                headers["authorization"] = f"Bearer {key}"
                        body: dict[str, Any] = {
                            "model": model,
                            "messages": [{"role": "user", "content": "hi"}],
                        }
                        if path.endswith("/messages"):
                            body["max_tokens"] = 16
                        if stream:
                            body["stream"] = True
                            body["stream_options"] = {"include_usage": True}
                        async with s.post(base + path, json=body, headers=headers) as r:
                            text = (await r.read()).decode(errors="replace")
                            replies.append((name, r.status, json.dumps(dict(r.headers)) + "\n" + text))
                            return r.status

                    assert await call("success", "gpt-4o-mini", vk1) == 200
                    assert await call("stream", "gpt-4o-mini", vk1, stream=True) == 200
                    assert await call("unknown key", "gpt-4o-mini", unknown) == 401
                    assert await call("expired key", "gpt-4o-mini", vk2) == 401
                    assert await call("missing key", "gpt-4o-mini", None) == 401
                    assert await call("x-api-key (openai)", "gpt-4o-mini", vk1, as_x_api_key=True) == 200
                    assert (
                        await call(
                            "x-api-key (anthropic)",
                            "claude-haiku-4-5",
                            vk1,
                            as_x_api_key=True,
                            path="/anthropic/v1/messages",
                        )
                        == 200
                    )
                    assert await call("model not allowed", "o3-mini", vk1) == 403
                    assert await call("rate limit (first)", "gpt-4o-rl", vk1) == 200
                    assert await call("rate limit (over)", "gpt-4o-rl", vk1) == 429
                    served_with_a = len(oai.seen)
                    assert served_with_a == 4

                    # Rotate the provider key: the file is re-read within about a second.
                    replace_file(openai_key, PROVIDER_KEY_B + "\n")
                    deadline = time.monotonic() + 20
                    rotation_calls = 0
                    while oai.seen[-1].headers.get("authorization") != f"Bearer {PROVIDER_KEY_B}":
                        assert time.monotonic() < deadline, (
                            "the rotated provider key never reached the upstream"
                        )
                        await asyncio.sleep(0.2)
                        rotation_calls += 1
                        assert await call(f"after rotation {rotation_calls}", "gpt-4o-mini", vk1) == 200

                    # Fallback (broken answers 503: one breaker failure), then a call with no
                    # fallback (the second failure: the breaker opens), then one refused by it.
                    assert await call("fallback", "m-fallback", vk1) == 200
                    assert await call("upstream 5xx", "m-fail", vk1) == 503
                    assert await call("circuit open", "m-fail", vk1) == 503

                    await receiver.wait_for("[CIRCUIT OPEN] upstream broken", timeout=30)
                    await receiver.wait_for("[FIRING:page] errors", timeout=30)

                    # The admin API and the metrics, then a clean stop (the ledger is complete).
                    async with s.get(
                        f"http://127.0.0.1:{proc.admin}/routes",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    ) as r:
                        assert r.status == 200
                        routes_body = await r.text()
                    _, metrics_text = await scrape(s, proc.admin)
                    _, metrics_om = await scrape(s, proc.admin, OPENMETRICS)
                    proc.process.send_signal(signal.SIGTERM)
                    assert await asyncio.wait_for(proc.process.wait(), 30) == 0
                output = proc_output(proc)
    finally:
        await receiver.runner.cleanup()

    calls = len(replies)
    # -- the secrets went where they belong ---------------------------------------------------------
    openai_auth = [seen.headers.get("authorization") for seen in oai.seen]
    assert openai_auth[:served_with_a] == [f"Bearer {PROVIDER_KEY_A}"] * served_with_a
    assert openai_auth[-1] == f"Bearer {PROVIDER_KEY_B}"
    assert set(openai_auth) == {f"Bearer {PROVIDER_KEY_A}", f"Bearer {PROVIDER_KEY_B}"}
    assert all("x-api-key" not in seen.headers for seen in oai.seen + broken.seen)
    assert [seen.headers.get("x-api-key") for seen in ant.seen] == [ANTHROPIC_KEY]
    assert all("authorization" not in seen.headers for seen in ant.seen)
    assert len(broken.seen) == 2 and {seen.headers["authorization"] for seen in broken.seen} == {
        f"Bearer {PROVIDER_KEY_B}"
    }
    assert receiver.messages, "no notification arrived"
    for headers, _ in receiver.messages:
        assert headers["authorization"] == f"Basic {basic}"

    # -- the CLI, the ledger --------------------------------------------------------------------------
    cli_outputs: dict[str, str] = {}
    for name, args in {
        "config check": ("config", "check", str(config)),
        "keys check": ("keys", "check", str(keys)),
        "rules check": ("rules", "check", str(rules)),
        "cost export jsonl": ("cost", "export", "--data-dir", str(data), "--format", "jsonl"),
        "cost export csv": ("cost", "export", "--data-dir", str(data), "--format", "csv"),
    }.items():
        code, out, err = await cli(*args)
        assert code == 0, (name, out, err)
        cli_outputs[name] = out + err
    assert cli_outputs["config check"].strip() == f"{config}: ok (3 upstream(s))"
    assert cli_outputs["keys check"].strip() == f"{keys}: ok (2 keys, 1 expired)"
    assert cli_outputs["rules check"].strip() == "ok: 1 rule(s) in 1 file(s)"

    outputs: dict[str, str] = {
        "stdout+stderr (debug)": output,
        "/metrics (text)": metrics_text,
        "/metrics (OpenMetrics)": metrics_om,
        "GET /routes": routes_body,
        **cli_outputs,
        **{f"client reply: {name} ({code})": body for name, code, body in replies},
        **{
            f"notification {i}: {json.loads(body)['title']}": body.decode()
            for i, (_, body) in enumerate(receiver.messages)
        },
        # The upstreams may see provider keys (each its own): virtual keys and the rest, never.
        "requests to the openai upstream (minus its key)": seen_text(oai)
        .replace(PROVIDER_KEY_A, "")
        .replace(PROVIDER_KEY_B, ""),
        "requests to the broken upstream (minus its key)": seen_text(broken).replace(PROVIDER_KEY_B, ""),
        "requests to the anthropic upstream (minus its key)": seen_text(ant).replace(ANTHROPIC_KEY, ""),
    }

    # -- the outputs are real ---------------------------------------------------------------------------
    assert " DEBUG " in output
    assert output.count('"event":"llm_call"') == calls, (output.count('"event":"llm_call"'), calls)
    assert len(cli_outputs["cost export jsonl"].splitlines()) == calls
    assert len(cli_outputs["cost export csv"].splitlines()) == calls + 1  # a header line
    assert f"state backend redis://:***@127.0.0.1:{redis_port}/0 unreachable" in output
    assert "provider key from file" in output and "changed: the new value is in use" in output
    assert "circuit breaker of upstream broken: open" in output
    assert "notify channel oncall: sent" in output
    assert 'llm_auth_failures_total{reason="expired"}' in metrics_text
    assert "llm_state_backend_up 0.0" in metrics_text
    assert "llm_throttled_requests_total" in metrics_text
    assert [route["name"] for route in json.loads(routes_body)["routes"]] == ["fb", "failing"]
    stream_reply = next(body for name, _, body in replies if name == "stream")
    assert stream_reply.rstrip().endswith("data: [DONE]")
    titles = receiver.titles()
    assert any(t.startswith("[CIRCUIT OPEN] upstream broken") for t in titles), titles
    assert any(t.startswith("[FIRING:page] errors") for t in titles), titles
    statuses = sorted({code for _, code, _ in replies})
    assert statuses == [200, 401, 403, 429, 503], statuses

    # -- and none of them holds a secret -----------------------------------------------------------
    leaks = leaks_in(outputs, secrets)
    no_leak(leaks)
    # The keys file holds SHA-256 hashes. They are not secrets, but by design nothing prints them
    # either: logs and Redis name a key by its entry's name, `keys check` prints counts only.
    hashes = {"hash of VK1": [vk1_hash], "hash of VK2": [vk2_hash]}
    no_leak(leaks_in(outputs, hashes))
    print(f"\nsecret scan: {calls} calls, {len(outputs)} outputs, {time.monotonic() - started:.1f}s")


def proc_output(proc: Proc) -> str:
    return proc.output().decode(errors="replace")


# -- apprise URLs in the debug log -------------------------------------------------------------------

HEADER_TOKEN = "HOOKHDRTOK-71a3c5e7f9b2d4e6"
PATH_TOKEN = "HOOKPATHTOK-2b4d6f8a0c1e3a5c"
QUERY_TOKEN = "HOOKQUERYTOK-9d8c7b6a5f4e3d2c"


async def notifying_sidecar_output(tmp_path: Path, hook_url: str, receiver: Receiver) -> str:
    """A sidecar at debug level whose one upstream answers 503: one call opens the breaker and
    fires the rule, and both notifications go to ``hook_url``. Everything it wrote."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    async with upstreams(("broken", "openai")) as (broken,):
        broken.answer = status(503)
        config = tmp_path / "sidecar.yaml"
        config.write_text(
            "version: sidecar/v1\n"
            "listen: 127.0.0.1:0\n"
            "admin: {listen: 127.0.0.1:0}\n"
            f"upstreams:\n  - {{name: broken, url: '{broken.url}', provider: openai}}\n"
            f"data_dir: {tmp_path / 'data'}\n"
            "circuit_breakers: {consecutive_failures: 1, cooldown: 60s}\n"
            f"rules: {{files: [{rules}]}}\n"
            "notify:\n"
            "  group_wait: 0s\n"
            "  timeout: 5s\n"
            f"  channels: {{oncall: ['{hook_url}']}}\n"
        )
        async with asyncio.timeout(90):
            async with sidecar_process(config, "--log-level", "debug") as proc, aiohttp.ClientSession() as s:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                async with s.post(
                    f"http://127.0.0.1:{proc.port}/v1/chat/completions",
                    json=body,
                    headers={"x-tenant-id": "acme"},
                ) as r:
                    assert r.status == 503
                await receiver.wait_for("[CIRCUIT OPEN] upstream broken", timeout=30)
                await receiver.wait_for("[FIRING:page] errors", timeout=30)
                proc.process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.process.wait(), 30) == 0
    return proc_output(proc)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(
            "header",
        ),
        pytest.param(
            "path and query",
        ),
    ],
)
async def test_debug_log_shows_no_part_of_an_apprise_url(tmp_path: Path, where: str) -> None:
    """Tokens carried in an apprise URL's custom header (``+Name=value``), path or query reach
    the receiver, and appear in no line of the sidecar's output, even at debug level."""
    receiver = await Receiver().start()
    try:
        if where == "header":
            hook_url = f"json://127.0.0.1:{receiver.port}/hook?+X-Hook-Token={HEADER_TOKEN}"
            tokens = [HEADER_TOKEN, "HOOKHDRTOK"]
        else:
            hook_url = f"json://127.0.0.1:{receiver.port}/hook/{PATH_TOKEN}?-sig={QUERY_TOKEN}"
            tokens = [PATH_TOKEN, "HOOKPATHTOK", QUERY_TOKEN, "HOOKQUERYTOK"]
        output = await notifying_sidecar_output(tmp_path, hook_url, receiver)
    finally:
        await receiver.runner.cleanup()
    # The tokens went through, and the output is real.
    assert receiver.messages
    assert " DEBUG " in output and "notify channel oncall: sent" in output
    if where == "header":
        assert all(headers["x-hook-token"] == HEADER_TOKEN for headers, _ in receiver.messages)
    else:
        assert all(
            headers["x-path"] == f"/hook/{PATH_TOKEN}?sig={QUERY_TOKEN}" for headers, _ in receiver.messages
        )
    leaked = [line for line in output.splitlines() if any(token in line for token in tokens)]
    no_leak(leaked)


MISTYPED_TOKEN = "x7Kp2Qm9Vb4Rt6Yw1Zs3Nd5F"  # random-looking, as real webhook tokens are
SLACK_TOKEN = "TIiajkdnl!azkdnmqdfls8f3k"  # a real-looking third Slack token, with a stray "!"


@pytest.mark.parametrize(
    ("url", "token"),
    [
        pytest.param(
            # A generic webhook whose path holds its secret, with the scheme mistyped.
            f"jsno://127.0.0.1:9/hook/{MISTYPED_TOKEN}/notify",
            MISTYPED_TOKEN,
            id="mistyped scheme (apprise masks the token)",
        ),
        pytest.param(
            f"slack://T1JJ3T3L2/A1BRTD4JD/{SLACK_TOKEN}",
            SLACK_TOKEN,
            id="slack token with a stray character",
        ),
    ],
)
async def test_a_rejected_apprise_url_is_reported_without_its_token(
    tmp_path: Path, url: str, token: str
) -> None:
    """A channel URL apprise rejects stops the sidecar at start with a problem naming the
    channel and the URL's position; the token the URL carries is in no line of the output."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        f"upstreams:\n  - {{name: openai, url: 'http://127.0.0.1:{closed_port()}', provider: openai}}\n"
        f"data_dir: {tmp_path / 'data'}\n"
        f"rules: {{files: [{rules}]}}\n"
        f"notify: {{channels: {{oncall: ['{url}']}}}}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = (out + err).decode(errors="replace")
    assert process.returncode == 2, output
    assert "notify.channels: channel 'oncall': URL #1 is not a valid apprise URL" in output
    leaked = [
        line for line in output.splitlines() if token in line or token[:10] in line or token[-10:] in line
    ]
    no_leak(leaked)


# -- config and keys-file mistakes: the CLI never echoes a misplaced secret -------------------------

ENV_SECRET = "sk-proj-ENVSECRET-6d5c4b3a29180f7e6d5c4b3a"
LITERAL_SECRET = "sk-proj-LITERALSECRET-0a9b8c7d6e5f4a3b2c1d"
UPSTREAM = "  - {name: openai, url: 'http://127.0.0.1:9', provider: openai}\n"


CONFIG_MISTAKES = [
    pytest.param(
        "upstreams:\n  - name: openai\n    url: http://127.0.0.1:9\n    provider: openai\n"
        f"    api_key: {LITERAL_SECRET}\n",
        "upstreams[0].api_key",
        id="provider key pasted as api_key",
    ),
    pytest.param(
        "upstreams:\n  - name: openai\n    url: http://127.0.0.1:9\n    provider: openai\n"
        "    api_key:\n      from_env: ${LEAK_SECRET}\n",
        "upstreams[0].api_key.from_env",
        id="api_key.from_env given the key through ${VAR}",
    ),
    pytest.param(
        "upstreams:\n  - name: openai\n    url: http://user:${LEAK_SECRET}@127.0.0.1:9\n"
        "    provider: openai\n",
        "upstreams[0].url",
        id="credentials in an upstream URL",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}tracing:\n  endpoint: http://127.0.0.1:9/v1/traces\n"
        f"  headers: 'Bearer {LITERAL_SECRET}'\n",
        "tracing.headers",
        id="tracing.headers as a string",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}state: 'redis://:{LITERAL_SECRET}@127.0.0.1:6379/0'\n",
        "state",
        id="state as a URL string",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}state:\n  url: 'redis://:${{LEAK_SECRET}}@127.0.0.1:6379/db'\n",
        "state.url",
        id="state.url invalid (redacted by design)",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}notify:\n  channels:\n    oncall: 'json://user:{LITERAL_SECRET}@127.0.0.1:9/hook'\n",
        "notify.channels.oncall",
        id="notify channel as a string",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}notify:\n  channels:\n    oncall:\n      - from_env: ${{LEAK_SECRET}}\n",
        "notify.channels.oncall[0].from_env",
        id="notify from_env given the URL through ${VAR}",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}notify:\n  channels:\n    oncall: ['{LITERAL_SECRET}']\n",
        "notify.channels.oncall[0]",
        id="notify URL without a scheme (never echoed by design)",
    ),
    pytest.param(
        f"upstreams:\n{UPSTREAM}keys:\n  entries:\n"
        f"    - {{name: app, tenant: acme, sha256: {LITERAL_SECRET}}}\n",
        "keys.entries[0].sha256",
        id="keys.entries with a key instead of its hash (never echoed by design)",
    ),
]


@pytest.mark.parametrize(("body", "field"), CONFIG_MISTAKES)
def test_config_check_never_echoes_a_misplaced_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], body: str, field: str
) -> None:
    """``config check`` (the same parser the sidecar runs at start and reload) reports the
    problem at the secret's field, and quotes neither the literal secret nor one from ``${VAR}``."""
    monkeypatch.setenv("LEAK_SECRET", ENV_SECRET)
    config = tmp_path / "sidecar.yaml"
    config.write_text("version: sidecar/v1\nlisten: 127.0.0.1:0\n" + body)
    assert cli_main(["config", "check", str(config)]) == 1
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert f": {field}: " in output, output  # the problem is reported, at that field
    needles = (ENV_SECRET, "ENVSECRET", LITERAL_SECRET, "LITERALSECRET")
    leaked = [line for line in output.splitlines() if any(n in line for n in needles)]
    no_leak(leaked)


async def test_keys_cli_never_prints_a_key(tmp_path: Path) -> None:
    """``keys hash`` prints the entry (the hash) but never the key it read; ``keys check``
    reports a key pasted where its hash belongs without quoting it."""
    key, digest = new_key()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "keys",
        "hash",
        "--tenant",
        "acme",
        "--name",
        "acme-app",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(key.encode() + b"\n"), 60)
    assert process.returncode == 0, err
    assert digest == hash_key(key) and digest in out.decode()  # the entry, by design
    for text in (out.decode(), err.decode()):
        assert not any(piece in text for piece in pieces(key)), text

    keys = tmp_path / "keys.yaml"
    keys.write_text(f"version: sidecar/v1\nkeys:\n  - {{name: acme-app, tenant: acme, sha256: {key}}}\n")
    code, out_text, err_text = await cli("keys", "check", str(keys))
    assert code == 1
    assert "keys[0].sha256: this is a key, not its hash" in err_text
    assert not any(piece in out_text + err_text for piece in pieces(key)), out_text + err_text
