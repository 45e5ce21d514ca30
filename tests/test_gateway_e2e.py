"""Gateway control end to end (issue 6): real sidecar processes in front of real aiohttp upstreams.

Every test starts ``python -m sidecar run --config FILE`` (through
:func:`hardening.support.sidecar_process`, which waits for the ready line on stderr and keeps
the log) and upstream servers written here, whose answers each test sets:
:class:`Upstream` records every request it gets (path, headers, JSON body) and answers
with whatever :data:`Answer` the test put in ``upstream.answer``.

Covered here: virtual keys and their 401/403 shapes, key and provider-key rotation with
streams in flight, fallback on each failure kind, no retry once a byte went to the client,
and the budget refusal's shape. The breaker's timeline, a reload with broken routes, the
canary split and the automatic rollback are in ``test_gateway_canary_e2e.py``, which
reuses the helpers below.

Time: every wait is bounded (:func:`until`, ``asyncio.timeout``); nothing binds beyond
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from hardening.support import PYTHON, ROOT, SidecarProcess, metric, sidecar_process
from sidecar.gateway.keys import new_key

ADMIN_TOKEN = "admin-token-for-tests"

# --- upstreams -------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request an upstream received."""

    path: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None


Answer = Callable[["Upstream", web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class Upstream:
    """A real aiohttp server on 127.0.0.1 standing in for one provider endpoint.

    ``answer`` decides each response (default :func:`ok`); ``seen`` lists every request in
    arrival order. ``gate`` is set at close, so no sleeping answer outlives the test.
    """

    def __init__(self, name: str, provider: str = "openai") -> None:
        self.name = name
        self.provider = provider
        self.seen: list[Seen] = []
        self.answer: Answer = ok
        self.gate = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def models(self) -> list[str]:
        """The model of every request received ("" where it named none)."""
        return [s.model or "" for s in self.seen]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.path, headers, body if isinstance(body, dict) else {}))
        return await self.answer(self, request, body)

    async def start(self) -> Upstream:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self.gate.set()
        await self.runner.cleanup()


@asynccontextmanager
async def upstreams(*specs: tuple[str, str]) -> AsyncIterator[list[Upstream]]:
    """Started upstreams, one per ``(name, provider)``; closed on exit."""
    started = [await Upstream(name, provider).start() for name, provider in specs]
    try:
        yield started
    finally:
        for upstream in started:
            await upstream.close()


def answer_json(upstream: Upstream, body: dict[str, Any], text: str | None = None) -> web.Response:
    """A 200 in the upstream's provider shape, echoing the requested model; 10 + 5 tokens."""
    model = body.get("model", "unknown")
    text = text if text is not None else f"from {upstream.name}"
    if upstream.provider == "anthropic":
        payload: dict[str, Any] = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
    else:
        payload = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
    return web.json_response(payload)


async def ok(upstream: Upstream, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    return answer_json(upstream, body)


def status(code: int, delay: float = 0.0) -> Answer:
    """An error answer (after ``delay`` seconds)."""

    async def answer(upstream: Upstream, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if delay:
            await sleep_or_gate(upstream, delay)
        error = {"error": {"message": f"{upstream.name} says {code}", "type": "server_error", "code": None}}
        return web.json_response(error, status=code)

    return answer


def delayed(delay: float, then: Answer = ok) -> Answer:
    """``then``, after ``delay`` seconds (or when the upstream closes)."""

    async def answer(upstream: Upstream, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await sleep_or_gate(upstream, delay)
        return await then(upstream, request, body)

    return answer


def by_model(answers: dict[str, Answer], default: Answer = ok) -> Answer:
    """The answer for the requested model, ``default`` for any other."""

    async def answer(upstream: Upstream, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return await answers.get(str(body.get("model")), default)(upstream, request, body)

    return answer


async def sleep_or_gate(upstream: Upstream, delay: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(upstream.gate.wait(), delay)


def sse_chunk(content: str, model: str) -> bytes:
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def sse_usage(model: str, completion: int) -> bytes:
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion},
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def stream_body(model: str, chunks: int) -> list[bytes]:
    """The pieces of a whole Chat Completions stream with usage and ``[DONE]``."""
    return [sse_chunk(f"w{i} ", model) for i in range(chunks)] + [
        sse_usage(model, chunks),
        b"data: [DONE]\n\n",
    ]


def streaming(chunks: int, gap: float, cut_after: int | None = None) -> Answer:
    """An SSE stream of ``chunks`` content events ``gap`` seconds apart; with ``cut_after``,
    the connection is dropped after that many events (no terminating chunk)."""

    async def answer(upstream: Upstream, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, piece in enumerate(stream_body(str(body.get("model")), chunks)):
            if cut_after is not None and i == cut_after:
                await asyncio.sleep(0.05)  # the pieces sent reach the sidecar first
                assert request.transport is not None
                request.transport.abort()
                return response
            if i and i <= chunks:
                await sleep_or_gate(upstream, gap)
            await response.write(piece)
        await response.write_eof()
        return response

    return answer


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the sidecar -------------------------------------------------------------------------------


def upstream_item(upstream: Upstream | str, name: str | None = None, mount: str = "/", **extra: str) -> str:
    """One ``upstreams:`` item (YAML flow mapping) for a server (or a URL)."""
    url = upstream if isinstance(upstream, str) else upstream.url
    provider = "openai" if isinstance(upstream, str) else upstream.provider
    name = name or (upstream.name if isinstance(upstream, Upstream) else "x")
    fields = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"- {{name: {name}, url: '{url}', provider: {provider}, mount: {mount}{fields}}}"


def write_config(tmp: Path, items: list[str], extra: str = "", name: str = "sidecar.yaml") -> Path:
    """A sidecar config with ephemeral ports, an admin token, no call log, data in ``tmp/data``."""
    token = tmp / "admin-token"
    token.write_text(ADMIN_TOKEN + "\n")
    path = tmp / name
    text = (
        "version: sidecar/v1\n"
        "listen: 127.0.0.1:0\n"
        f"admin: {{listen: 127.0.0.1:0, token_file: {token}}}\n"
        "upstreams:\n" + "".join(f"  {item}\n" for item in items) + f"data_dir: {tmp / 'data'}\n"
        "logs: {enabled: false}\n"
        "shutdown: {drain_timeout: 10s}\n" + textwrap.dedent(extra)
    )
    replace_file(path, text)
    return path


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a watcher never reads half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` every 50 ms until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content(self) -> str:
        """The answer's text (Chat Completions or Messages)."""
        body = self.json()
        if "choices" in body:
            return str(body["choices"][0]["message"]["content"])
        return str(body["content"][0]["text"])

    @property
    def model(self) -> str:
        """The model the answer says served it (the upstreams here echo the one they were sent)."""
        return str(self.json()["model"])


async def call(
    s: aiohttp.ClientSession,
    sc: SidecarProcess,
    model: str = "gpt-4o-mini",
    *,
    key: str | None = None,
    tenant: str | None = None,
    path: str = "/v1/chat/completions",
    anthropic_key: bool = False,
    stream: bool = False,
) -> Reply:
    """One call through the sidecar (Chat Completions, or Messages under ``/anthropic``)."""
    headers: dict[str, str] = {}
    if key is not None:
        headers["x-api-key" if anthropic_key else "authorization"] = key if anthropic_key else f"Bearer {key}"
    if tenant is not None:
        headers["x-tenant-id"] = tenant
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if path.endswith("/messages"):
        body["max_tokens"] = 16
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    async with s.post(sc.url + path, json=body, headers=headers) as r:
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


async def admin_post(s: aiohttp.ClientSession, sc: SidecarProcess, path: str, token: str | None) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with s.post(f"http://127.0.0.1:{sc.admin_port}{path}", headers=headers) as r:
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


async def admin_get(s: aiohttp.ClientSession, sc: SidecarProcess, path: str) -> Reply:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with s.get(f"http://127.0.0.1:{sc.admin_port}{path}", headers=headers) as r:
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


async def settled(s: aiohttp.ClientSession, sc: SidecarProcess, calls: float, **labels: str) -> str:
    """A scrape once ``calls`` finished calls (labels matching) reached the metrics: records
    reach them a moment after the client got its answer."""
    deadline = time.monotonic() + 10
    while True:
        text = await sc.scrape(s)
        if metric(text, "llm_requests_total", **labels) >= calls:
            return text
        assert time.monotonic() < deadline, f"{calls} calls {labels} never reached the metrics"
        await asyncio.sleep(0.05)


def attempts(text: str, upstream: str, outcome: str | None = None) -> float:
    labels = {"upstream": upstream} if outcome is None else {"upstream": upstream, "outcome": outcome}
    return metric(text, "llm_upstream_attempts_total", **labels)


def fallbacks(text: str, source: str, to: str, reason: str) -> float:
    return metric(text, "llm_fallbacks_total", **{"from": source, "to": to, "reason": reason})


async def cli(*args: str) -> tuple[int, str, str]:
    """``python -m sidecar ARGS``: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ledger_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The ledger's rows, through ``cost export`` (run once the sidecar has stopped)."""
    code, out, err = await cli("cost", "export", "--data-dir", str(data_dir), "--format", "jsonl")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def stop(sc: SidecarProcess) -> None:
    """SIGTERM and wait: the ledger has written every record when this returns."""
    sc.signal(signal.SIGTERM)
    assert await sc.wait(20) == 0
    assert sc.tracebacks() == []


# --- 1. keys ---------------------------------------------------------------------------------------


def keys_file(*entries: str) -> str:
    return "version: sidecar/v1\nkeys:\n" + "".join(f"{entry}\n" for entry in entries)


async def key_from_cli(*args: str) -> tuple[str, str]:
    """``keys new ARGS``: the key it printed once, and its keys-file line."""
    code, out, err = await cli("keys", "new", *args)
    assert code == 0, err
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("sk-llmsc-"))
    entry = next(line for line in out.splitlines() if line.startswith("  - {"))
    assert key not in entry  # the entry holds the hash only
    return key, entry


def openai_401(reply: Reply, message: str) -> None:
    assert reply.status == 401, reply
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key", error
    assert message in error["message"]


async def test_virtual_keys_decide_access_and_tenant_and_never_reach_the_provider(tmp_path: Path) -> None:
    acme_key, acme_entry = await key_from_cli(
        "--tenant", "acme", "--name", "acme-app", "--models", "gpt-4o-mini*"
    )
    beta_key, beta_hash = new_key()
    old_key, old_hash = new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        keys_file(
            acme_entry,
            f"  - {{name: beta-backend, tenant: beta, sha256: {beta_hash}, trust_tenant_header: true}}",
            f"  - {{name: old, tenant: acme, sha256: {old_hash}, expires: 2020-01-01T00:00:00Z}}",
        )
    )
    (tmp_path / "openai-key").write_text("sk-provider-openai\n")
    (tmp_path / "anthropic-key").write_text("sk-ant-provider\n")
    async with upstreams(("openai", "openai"), ("anthropic", "anthropic")) as (oai, ant):
        cfg = write_config(
            tmp_path,
            [
                upstream_item(oai, api_key=f"{{from_file: {tmp_path / 'openai-key'}}}"),
                upstream_item(
                    ant, mount="/anthropic", api_key=f"{{from_file: {tmp_path / 'anthropic-key'}}}"
                ),
            ],
            f"keys: {{file: {keys}}}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            # Missing, unknown and expired keys: 401 in the OpenAI shape, nothing sent upstream.
            openai_401(await call(s, sc, tenant="acme"), "Missing API key")
            openai_401(await call(s, sc, key="sk-llmsc-not-a-key-of-ours", tenant="acme"), "Invalid API key")
            openai_401(await call(s, sc, key=old_key), "expired")
            # ... and in Anthropic's shape on the Anthropic upstream.
            for key in (None, "sk-llmsc-nope", old_key):
                reply = await call(
                    s, sc, "claude-3-5-haiku", key=key, path="/anthropic/v1/messages", anthropic_key=True
                )
                assert reply.status == 401
                body = reply.json()
                assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
            assert oai.seen == [] and ant.seen == []

            # The key names the tenant; the header is ignored unless the key is a trusted caller's.
            assert (await call(s, sc, key=acme_key, tenant="evil")).status == 200
            assert (await call(s, sc, key=acme_key)).status == 200
            assert (await call(s, sc, key=beta_key, tenant="gamma")).status == 200
            assert (await call(s, sc, key=beta_key)).status == 200
            reply = await call(
                s, sc, "claude-3-5-haiku", key=beta_key, path="/anthropic/v1/messages", anthropic_key=True
            )
            assert reply.status == 200 and reply.content == "from anthropic"
            # A model outside the key's list: 403.
            reply = await call(s, sc, "gpt-4o", key=acme_key)
            assert reply.status == 403 and "gpt-4o" in reply.json()["error"]["message"]
            assert [x.model for x in oai.seen] == ["gpt-4o-mini"] * 4

            await settled(s, sc, 2, tenant="acme", code="200")
            await settled(s, sc, 1, tenant="gamma", code="200")
            text = await settled(s, sc, 2, tenant="beta", code="200")
            assert metric(text, "llm_requests_total", tenant="acme", code="200") == 2
            assert metric(text, "llm_requests_total", tenant="evil") == 0
            assert metric(text, "llm_auth_failures_total", reason="missing") == 2
            assert metric(text, "llm_auth_failures_total", reason="unknown") == 2
            assert metric(text, "llm_auth_failures_total", reason="expired") == 2
            assert metric(text, "llm_auth_failures_total", reason="model_not_allowed") == 1

            # The providers saw their own keys, never a virtual one.
            for seen in oai.seen:
                assert seen.headers["authorization"] == "Bearer sk-provider-openai"
                assert "x-api-key" not in seen.headers
            for seen in ant.seen:
                assert seen.headers["x-api-key"] == "sk-ant-provider"
                assert "authorization" not in seen.headers
            virtual = (acme_key, beta_key)
            assert not any(
                k in v for seen in oai.seen + ant.seen for v in seen.headers.values() for k in virtual
            )


async def test_a_refused_call_is_not_counted_under_the_tenant_it_claims(tmp_path: Path) -> None:
    _, digest = new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_file(f"  - {{name: acme-app, tenant: acme, sha256: {digest}}}"))
    async with upstreams(("openai", "openai")) as (oai,):
        cfg = write_config(tmp_path, [upstream_item(oai)], f"keys: {{file: {keys}}}\n")
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            assert (await call(s, sc, tenant="acme")).status == 401
            assert (await call(s, sc, key="sk-llmsc-forged", tenant="victim")).status == 401
            text = await settled(s, sc, 2, code="401")
            assert oai.seen == []
    # Without a valid key nobody is authenticated: the tenant header proves nothing, so the
    # refusals are not charged to (nor can they mint label values for) the tenants they name.
    assert metric(text, "llm_requests_total", tenant="acme") == 0
    assert metric(text, "llm_requests_total", tenant="victim") == 0
    assert metric(text, "llm_requests_total", tenant="unknown", code="401") == 2


# --- 2. rotation with streams in flight --------------------------------------------------------


async def read_stream(s: aiohttp.ClientSession, sc: SidecarProcess, key: str, first: asyncio.Event) -> bytes:
    """A streamed call; ``first`` is set once its first bytes arrived."""
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    got = b""
    async with s.post(
        sc.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as r:
        assert r.status == 200
        async for piece in r.content.iter_any():
            got += piece
            first.set()
    return got


async def test_keys_and_provider_key_rotate_under_streams_in_flight(tmp_path: Path) -> None:
    key_a, hash_a = new_key()
    key_b, hash_b = new_key()
    keys = tmp_path / "keys.yaml"
    replace_file(keys, keys_file(f"  - {{name: app, tenant: acme, sha256: {hash_a}}}"))
    secret = tmp_path / "openai-key"
    replace_file(secret, "sk-provider-old\n")
    async with upstreams(("openai", "openai")) as (oai,):
        oai.answer = streaming(chunks=20, gap=0.05)
        cfg = write_config(
            tmp_path,
            [upstream_item(oai, api_key=f"{{from_file: {secret}}}")],
            f"keys: {{file: {keys}, reload_interval: 100ms, rotation_overlap: 1s}}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            firsts = [asyncio.Event() for _ in range(5)]
            streams = [asyncio.create_task(read_stream(s, sc, key_a, first)) for first in firsts]
            async with asyncio.timeout(10):
                await asyncio.gather(*(first.wait() for first in firsts))
            # Rotate while all five streams are running: A is replaced by B, the provider key changes.
            rotated_at = time.time()
            replace_file(keys, keys_file(f"  - {{name: app, tenant: acme, sha256: {hash_b}}}"))
            replace_file(secret, "sk-provider-new\n")

            async def b_passes() -> bool:
                return (await call(s, sc, key=key_b)).status == 200

            oai.answer = ok
            await until(b_passes, "key B to be accepted", timeout=5)
            assert not any(stream.done() for stream in streams)  # the reload came mid-stream
            # A is still good during the overlap ...
            assert (await call(s, sc, key=key_a)).status == 200

            async def a_refused() -> bool:
                return (await call(s, sc, key=key_a)).status == 401

            # ... and refused after it (1 s after the reload, which came after the write).
            await until(a_refused, "key A to be refused", timeout=6)
            refused_at = time.time()
            assert 1.0 <= refused_at - rotated_at < 4.0

            async with asyncio.timeout(15):
                bodies = await asyncio.gather(*streams)
            # Every stream started with A finished whole, after the rotation.
            whole = b"".join(stream_body("gpt-4o-mini", 20))
            assert bodies == [whole] * 5
            assert all(first.is_set() for first in firsts)

            async def new_provider_key() -> bool:
                await call(s, sc, key=key_b)
                return oai.seen[-1].headers["authorization"] == "Bearer sk-provider-new"

            await until(new_provider_key, "the new provider key upstream", timeout=5)
            for _ in range(3):
                assert (await call(s, sc, key=key_b)).status == 200
                assert oai.seen[-1].headers["authorization"] == "Bearer sk-provider-new"
            # The in-flight streams went out before the rotation, with the old provider key.
            assert [x.headers["authorization"] for x in oai.seen[:5]] == ["Bearer sk-provider-old"] * 5
            assert not any(k in v for x in oai.seen for v in x.headers.values() for k in (key_a, key_b))
            text = await sc.scrape(s)
            assert metric(text, "llm_keys_reloads_total", outcome="success") >= 2
            assert metric(text, "llm_keys_reloads_total", outcome="failure") == 0
            assert metric(text, "llm_requests_total", tenant="acme", code="200") >= 5


# --- 3. fallback on each failure kind ---------------------------------------------------------

FAILURE_KINDS = ("connect_error", "timeout", "5xx", "429")


async def test_fallback_on_each_failure_kind_gives_one_clean_answer(tmp_path: Path) -> None:
    async with upstreams(
        ("slow", "openai"), ("e5xx", "openai"), ("e429", "openai"), ("good", "openai")
    ) as ups:
        slow, e5xx, e429, good = ups
        slow.answer = delayed(3.0)  # past timeouts.first_byte
        e5xx.answer = status(503)
        e429.answer = status(429)
        failing = {"connect_error": "refused", "timeout": "slow", "5xx": "e5xx", "429": "e429"}
        routes = "".join(
            f"  - {{name: r-{kind.replace('_', '-')}, match: {{models: [m-{kind}]}}, "
            f"targets: [{{upstream: {failing[kind]}}}, {{upstream: good, priority: 1}}]}}\n"
            for kind in FAILURE_KINDS
        )
        cfg = write_config(
            tmp_path,
            [
                upstream_item(good),
                upstream_item(f"http://127.0.0.1:{closed_port()}", name="refused", mount="/refused"),
                upstream_item(slow, mount="/slow", timeouts="{first_byte: 300ms}"),
                upstream_item(e5xx, mount="/e5xx"),
                upstream_item(e429, mount="/e429"),
            ],
            "routes:\n" + routes,
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            for kind in FAILURE_KINDS:
                reply = await call(s, sc, f"m-{kind}", tenant="acme")
                # One clean answer, the second target's, whatever the first did.
                assert reply.status == 200, (kind, reply)
                clean = answer_json(good, {"model": f"m-{kind}"}).body
                assert isinstance(clean, bytes) and reply.body == clean
                assert reply.headers["content-type"].startswith("application/json")
            assert [x.model for x in good.seen] == [f"m-{kind}" for kind in FAILURE_KINDS]
            assert len(slow.seen) == len(e5xx.seen) == len(e429.seen) == 1

            text = await settled(s, sc, 4, upstream="good", code="200")
            for kind in FAILURE_KINDS:
                assert attempts(text, failing[kind]) == 1, kind
                assert attempts(text, failing[kind], kind) == 1, kind
                assert fallbacks(text, failing[kind], "good", kind) == 1, kind
                route = f"r-{kind.replace('_', '-')}"
                assert metric(text, "llm_requests_total", route=route, upstream="good", code="200") == 1
            assert attempts(text, "good") == attempts(text, "good", "success") == 4
            assert metric(text, "llm_upstream_attempts_total") == 8
            assert metric(text, "llm_fallbacks_total") == 4
            assert metric(text, "llm_requests_total") == 4
            assert metric(text, "llm_errors_total") == 0
            await stop(sc)
    # One ledger row per client call, served by the second target.
    rows = await ledger_rows(tmp_path / "data")
    assert len(rows) == 4, rows
    assert sorted(r["request_model"] for r in rows) == sorted(f"m-{kind}" for kind in FAILURE_KINDS)
    assert {(r["upstream"], r["status"], r["error_type"]) for r in rows} == {("good", 200, None)}
    assert all(r["input_tokens"] == 10 and r["output_tokens"] == 5 for r in rows)


# --- 4. no retry after the first byte -------------------------------------------------------------


async def test_no_retry_once_the_stream_has_started(tmp_path: Path) -> None:
    async with upstreams(("first", "openai"), ("second", "openai")) as (first, second):
        first.answer = streaming(chunks=10, gap=0.01, cut_after=2)
        cfg = write_config(
            tmp_path,
            [upstream_item(first), upstream_item(second, mount="/second")],
            "routes:\n  - {name: chat, match: {models: [gpt-4o-mini]}, "
            "targets: [{upstream: first}, {upstream: second, priority: 1}]}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            body = {
                "model": "gpt-4o-mini",
                "messages": [],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            got = b""
            cut: Exception | None = None
            async with s.post(sc.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                try:
                    async with asyncio.timeout(10):
                        async for piece in r.content.iter_any():
                            got += piece
                except aiohttp.ClientPayloadError as exc:
                    cut = exc
            # The client has the two events the first target sent, then a cut: no second answer.
            assert got == b"".join(stream_body("gpt-4o-mini", 10)[:2])
            assert cut is not None
            assert len(first.seen) == 1 and second.seen == []
            text = await settled(s, sc, 1)
            assert attempts(text, "first") == attempts(text, "first", "success") == 1
            assert metric(text, "llm_upstream_attempts_total") == 1
            assert metric(text, "llm_fallbacks_total") == 0
            assert metric(text, "llm_errors_total", upstream="first", error_type="stream_interrupted") == 1
            await asyncio.sleep(0.3)  # a late retry would show now
            assert second.seen == []


# --- 9. the budget refusal's shape ------------------------------------------------------------

BUDGET_RULES = """\
version: sidecar/v1
defaults: {evaluation_interval: 1s, group_by: [tenant], notify: []}
rules:
  - name: hard-cap
    kind: budget
    signal: tokens
    period: 1d
    calendar: true
    timezone: UTC
    limit: 30
    action: reject
    severity: ticket
"""


def next_utc_midnights(now: float) -> set[str]:
    """The reset times a daily UTC budget can name around ``now`` (tolerates crossing midnight)."""
    out = set()
    for t in (now - 60, now + 60):
        day = datetime.fromtimestamp(t, UTC).date() + timedelta(days=1)
        out.add(f"{day.isoformat()}T00:00:00Z")
    return out


async def test_a_spent_budget_refuses_in_the_shape_sdks_do_not_retry(tmp_path: Path) -> None:
    rules = tmp_path / "budget.yaml"
    rules.write_text(BUDGET_RULES)
    async with upstreams(("openai", "openai"), ("anthropic", "anthropic")) as (oai, ant):
        cfg = write_config(
            tmp_path,
            [upstream_item(oai), upstream_item(ant, mount="/anthropic")],
            f"rules: {{files: [{rules}]}}\n",
        )
        async with sidecar_process("--config", str(cfg)) as sc, aiohttp.ClientSession() as s:
            # 15 tokens a call: two calls spend the 30-token cap.
            for _ in range(2):
                assert (await call(s, sc, tenant="acme")).status == 200
            refused: list[Reply] = []

            async def refuses() -> bool:
                reply = await call(s, sc, tenant="acme")
                if reply.status == 429:
                    refused.append(reply)
                return reply.status == 429

            await until(refuses, "the budget to refuse", timeout=10)
            reply = refused[0]
            served = len(oai.seen)
            error = reply.json()["error"]
            assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota", error
            assert reply.headers["x-should-retry"] == "false"
            message = error["message"]
            found = re.fullmatch(
                r'budget "hard-cap" is exhausted: (\d+) of 30 input\+output tokens used; it resets at (\S+)',
                message,
            )
            assert found, message
            assert 30 <= int(found.group(1)) <= 15 * served and int(found.group(1)) % 15 == 0
            assert found.group(2) in next_utc_midnights(time.time())
            # The same tenant on the Anthropic upstream: Anthropic's rate_limit_error.
            reply = await call(s, sc, "claude-3-5-haiku", tenant="acme", path="/anthropic/v1/messages")
            assert reply.status == 429 and reply.headers["x-should-retry"] == "false"
            body = reply.json()
            assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
            assert body["error"]["message"].startswith('budget "hard-cap" is exhausted')
            assert ant.seen == [] and len(oai.seen) == served
            # Another tenant still passes.
            assert (await call(s, sc, tenant="beta")).status == 200
            text = await settled(s, sc, 2, tenant="acme", code="429")
            assert metric(text, "llm_throttled_requests_total", tenant="acme", reason="budget") == 2
            assert metric(text, "llm_errors_total", tenant="acme", error_type="budget_exceeded") == 2
