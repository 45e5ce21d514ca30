"""Hardening: the sidecar is never an open proxy, never smuggles, guards its admin port, verifies TLS.

A *canary* server stands where an attacker would like requests to go (its address in
absolute-form targets, ``Host``, ``X-Forwarded-Host``, ``CONNECT``): it must never see a
connection. Every other request must reach only the configured upstream, under its base
path, or be refused with 400. Request smuggling and header injection are refused by the
HTTP parser (400, connection closed) before the proxy sees them; what the proxy forwards it
re-frames itself. Admin endpoints that change state need the bearer token; TLS to the
upstream is verified unless its CA is configured.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from blockbuster import blockbuster_ctx
from prometheus_client import CollectorRegistry

from hardening.support import RawConn, RawUpstream, answer_json, chat_json
from sidecar import config as config_mod
from sidecar.app import Sidecar
from tests.harness import make_config, running_sidecar, sample

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def no_blocking_calls_in_sidecar() -> Iterator[None]:
    """Fail any test in which sidecar code makes a blocking call on the event loop."""
    with blockbuster_ctx("sidecar"):
        yield


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the sidecar closes the connection (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while piece := await reader.read(65536):
                got += piece
    except (TimeoutError, ConnectionError):
        pass
    writer.close()
    return got


def plain(url: str) -> config_mod.Config:
    return make_config(f"- {{name: openai, url: '{url}', mount: /}}\n")


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split()[1]) if answer else 0


# --- never an open proxy ----------------------------------------------------------------------


def target_cases(canary: str) -> list[tuple[str, bytes, int, str | None]]:
    """(name, raw request, expected status, path the upstream must see — None: not reached)."""
    close = b"Connection: close\r\n\r\n"

    def get(target: str, headers: str = "Host: x\r\n") -> bytes:
        return f"GET {target} HTTP/1.1\r\n{headers}".encode() + close

    return [
        ("absolute form", get(f"http://{canary}/v1/models"), 200, "/base/v1/models"),
        ("absolute form, userinfo", get(f"http://u:p@{canary}/v1/models"), 200, "/base/v1/models"),
        ("absolute form, https", get(f"https://{canary}/v1/models"), 200, "/base/v1/models"),
        ("Host", get("/v1/models", f"Host: {canary}\r\n"), 200, "/base/v1/models"),
        (
            "forwarding headers",
            get(
                "/v1/files",
                f"Host: x\r\nX-Forwarded-Host: {canary}\r\nForwarded: host={canary};proto=http\r\n"
                f"X-Forwarded-Proto: http\r\nX-Original-URL: http://{canary}/\r\n"
                f"X-Rewrite-URL: //{canary}/\r\n",
            ),
            200,
            "/base/v1/files",
        ),
        ("double slash authority", get(f"//{canary}/v1/models"), 200, f"/base//{canary}/v1/models"),
        ("double slashes inside", get("/v1//models"), 200, "/base/v1//models"),
        ("asterisk form", f"OPTIONS * HTTP/1.1\r\nHost: {canary}\r\n".encode() + close, 400, None),
        ("CONNECT", f"CONNECT {canary} HTTP/1.1\r\nHost: {canary}\r\n".encode() + close, 400, None),
        ("dot dot", get("/v1/../../x"), 400, None),
        ("dot", get("/v1/./models"), 400, None),
        ("encoded dot dot", get("/v1/%2e%2e/x"), 400, None),
        ("mixed-case encoded", get("/v1/%2E./x"), 400, None),
        ("encoded slash and dots", get("/v1/..%2f..%2fx"), 400, None),
        ("double encoded", get("/v1/%252e%252e/x"), 400, None),
        ("triple encoded", get("/v1/%25252e%25252e/x"), 400, None),
        ("encoded more than thrice", get("/v1/%2525252e%2525252e/x"), 400, None),
        ("encoded backslash", get("/v1/..%5cx"), 400, None),
        ("encoded NUL", get("/v1/models%00.json"), 400, None),
        ("mount escape", get("/anthropic/../v1/models"), 400, None),
        ("encoded mount escape", get("/anthropic%2f..%2fv1/models"), 400, None),
        ("mount prefix is not a mount", get("/anthropicx/v1/models"), 200, "/base/anthropicx/v1/models"),
        ("query is not a path", get("/v1/models?next=/../../x"), 200, "/base/v1/models?next=/../../x"),
    ]


async def test_no_request_target_or_header_reaches_anything_but_the_configured_upstream() -> None:
    async def canary_script(conn: RawConn) -> None:
        await conn.read_request()

    async with (
        RawUpstream(canary_script) as canary,
        RawUpstream(answer_json) as up,
        RawUpstream(answer_json) as ant,
    ):
        cfg = make_config(
            f"- {{name: openai, url: '{up.url}/base', provider: openai, mount: /}}\n"
            f"- {{name: anthropic, url: '{ant.url}', provider: anthropic, mount: /anthropic}}\n"
        )
        cases = target_cases(f"127.0.0.1:{canary.port}")
        async with running_sidecar(cfg) as (sc, collect):
            for name, request, expected, _ in cases:
                answer = await raw_exchange(sc.proxy_port, request)
                assert status_of(answer) == expected, (name, answer[:200])
            await collect.wait_for(len(cases))
            assert sample(sc, "llm_requests_total", code="400") == sum(1 for c in cases if c[2] == 400)
        seen = [(r.target, r.headers["host"]) for conn in up.conns for r in conn.requests]
        expected_paths = [path for _, _, status, path in cases if path is not None]
        assert [target for target, _ in seen] == expected_paths
        assert {host for _, host in seen} == {f"127.0.0.1:{up.port}"}  # Host is always the upstream's
        assert canary.conns == [] and ant.conns == []


# --- smuggling and header injection -------------------------------------------------------------

SMUGGLE_NEXT = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
POST = b"POST /v1/x HTTP/1.1\r\nHost: x\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
SMUGGLING = {
    "CL then TE": POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE then CL": POST + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
    "two different CL": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 36\r\n\r\n",
    "signed CL": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n",
    "TE not last chunked": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
    b"0\r\n\r\n",
    "TE lookalike": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "space before colon": b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n",
    "bare CR in a value": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n",
    "bare LF line end": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\nX-Injected: 1\r\n\r\n",
    "NUL in a value": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "chunk size overflow": CHUNKED + b"ffffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk without CRLF": CHUNKED + b"3\r\nabcX\r\n0\r\n\r\n",
    "space in header name": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "header line over 8 KiB": b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "more than 128 headers": b"GET /v1/x HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: v\r\n" % i for i in range(200))
    + b"\r\n",
}


async def test_request_smuggling_and_header_injection_are_refused() -> None:
    async with RawUpstream(answer_json) as up, running_sidecar(plain(up.url)) as (sc, _):
        for name, request in SMUGGLING.items():
            answer = await raw_exchange(sc.proxy_port, request + SMUGGLE_NEXT)
            # One 400 and the connection closed: the bytes after it are never read as a request.
            assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400"), name
            assert answer.count(b"HTTP/1.") == 1, name
        assert sample(sc, "llm_requests_total") == 0  # refused by the parser, before the proxy
        # Afterwards a pipelined chunked request and its follower arrive re-framed, one by one.
        body = json.dumps(CHAT).encode()
        chunked = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        follower = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await raw_exchange(sc.proxy_port, chunked + follower)
        assert answer.count(b"HTTP/1.1 200") == 2
    received = [r for conn in up.conns for r in conn.requests]
    assert [(r.method, r.target) for r in received] == [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]
    assert received[0].body == body and received[0].headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in received[0].headers


async def test_an_oversized_header_block_is_refused() -> None:
    """Each line under 8 KiB and fewer than 128 headers, yet 800 KiB in all: refused, never forwarded."""
    async with RawUpstream(answer_json) as up, running_sidecar(plain(up.url)) as (sc, collect):
        headers = "".join(f"X-Pad-{i}: {'v' * 8000}\r\n" for i in range(100))
        request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()
        answer = await raw_exchange(sc.proxy_port, request)
        assert status_of(answer) == 431
        (record,) = await collect.wait_for(1)
        assert record.status == 431 and sample(sc, "llm_requests_total", code="431") == 1
        assert up.conns == []
        # A large but sane block (16 headers of 2 KiB) still goes through.
        headers = "".join(f"X-Pad-{i}: {'v' * 2000}\r\n" for i in range(16))
        request = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode()
        assert status_of(await raw_exchange(sc.proxy_port, request)) == 200


async def test_non_utf8_header_values_break_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Found by the fuzzer: an ``Expect`` value that is not UTF-8 made aiohttp answer 500 with a
    traceback, and such an ``X-Request-Id`` crashed the ledger's writer for good."""
    async with RawUpstream(answer_json) as up, running_sidecar(plain(up.url)) as (sc, collect):
        post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
        for header in (b"Expect: caf\xe9", b"Expect: x-unknown", b"X-Request-Id: caf\xe9\xff"):
            answer = await raw_exchange(sc.proxy_port, post + header + b"\r\n\r\n{}")
            assert status_of(answer) == 200, header
        answer = await raw_exchange(sc.proxy_port, post + b"Expect: 100-continue\r\n\r\n{}")
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
        records = await collect.wait_for(4)
        assert records[2].request_id == "caf??"  # what the sinks can encode
        # Other expectations go upstream byte for byte (the raw upstream reads latin-1, so the
        # client's \xe9 shows as "é"); 100-continue, met by the sidecar, does not: the upstream
        # would be expected to answer 100 before the body.
        expects = [r.headers.get("expect") for c in up.conns for r in c.requests]
        assert expects == ["caf\xe9", "x-unknown", None, None]
        await sc.ledger.flush()
        assert sc.ledger.healthy(), sc.ledger.status()
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


# --- the admin port --------------------------------------------------------------------------


@asynccontextmanager
async def admin_sidecar(tmp_path: Path, upstream_url: str, admin: str) -> AsyncIterator[Sidecar]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "version: sidecar/v1\nlisten: 127.0.0.1:0\n"
        f"admin: {{listen: 127.0.0.1:0{admin}}}\n"
        f"upstreams:\n  - {{name: openai, url: '{upstream_url}', mount: /}}\n"
        f"data_dir: {tmp_path / 'data'}\n"
    )
    sc = Sidecar(
        await asyncio.to_thread(config_mod.load_file, str(path)),
        registry=CollectorRegistry(),
        config_path=str(path),
        reload_config=lambda: config_mod.load_file(str(path)),
    )
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


async def test_admin_endpoints_that_change_state_need_the_token(tmp_path: Path) -> None:
    token = "s3cret-admin-token"
    (tmp_path / "token").write_text(token + "\n")
    async with (
        RawUpstream(answer_json) as up,
        admin_sidecar(tmp_path, up.url, f", token_file: {tmp_path / 'token'}") as sc,
        aiohttp.ClientSession() as s,
    ):
        admin = f"http://127.0.0.1:{sc.admin_port}"
        refused = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": token},
            {"Authorization": f"Basic {token}"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Bearer {token[:-1]}"},
            {"X-Admin-Token": token},
        ]
        for headers in refused:
            for path in ("/-/reload", "/incidents/abc/ack"):
                async with s.post(admin + path, headers=headers) as r:
                    assert r.status == 401, (path, headers)
        async with s.post(f"{admin}/-/reload?token={token}") as r:
            assert r.status == 401  # never from the query string (it ends up in access logs)
        good = {"Authorization": f"Bearer {token}"}
        async with s.post(admin + "/-/reload", headers=good) as r:
            assert r.status == 200 and await r.json() == {"reloaded": True}
        async with s.post(admin + "/incidents/abc/ack", headers=good) as r:
            assert r.status == 404  # authorised; there is simply no rule and no incident
        async with s.get(admin + "/-/reload", headers=good) as r:
            assert r.status == 405  # state changes only on POST
        for path in ("/metrics", "/healthz", "/readyz"):
            async with s.get(admin + path) as r:
                assert r.status == 200, path
        # The proxy port does not serve the admin endpoints: the path is just forwarded.
        async with s.post(f"http://127.0.0.1:{sc.proxy_port}/-/reload", headers=good) as r:
            assert r.status == 200 and await r.read() == chat_json()
        assert sample(sc, "llm_config_reload_failures_total") == 0


async def test_admin_endpoints_are_off_without_a_token_file(tmp_path: Path) -> None:
    async with (
        RawUpstream(answer_json) as up,
        admin_sidecar(tmp_path, up.url, "") as sc,
        aiohttp.ClientSession() as s,
    ):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            async with s.post(f"http://127.0.0.1:{sc.admin_port}/-/reload", headers=headers) as r:
                assert r.status == 401


async def test_metrics_can_require_the_token(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("m-token")
    async with (
        RawUpstream(answer_json) as up,
        admin_sidecar(
            tmp_path, up.url, f", token_file: {tmp_path / 'token'}, metrics_require_token: true"
        ) as sc,
        aiohttp.ClientSession() as s,
    ):
        metrics = f"http://127.0.0.1:{sc.admin_port}/metrics"
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with s.get(metrics, headers=headers) as r:
                assert r.status == 401 and "llm_requests_total" not in await r.text()
        async with s.get(metrics, headers={"Authorization": "Bearer m-token"}) as r:
            assert r.status == 200 and "llm_requests_total" in await r.text()
        for path in ("/healthz", "/readyz"):  # probes stay open for the kubelet
            async with s.get(f"http://127.0.0.1:{sc.admin_port}{path}") as r:
                assert r.status == 200


# --- TLS to the upstream ------------------------------------------------------------------------


def self_signed(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``san``, made with the openssl CLI."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}"),
            *("-addext", f"subjectAltName={san}", "-addext", "basicConstraints=critical,CA:TRUE"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@asynccontextmanager
async def https_upstream(cert: Path, key: Path) -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTPS upstream on 127.0.0.1 answering chat JSON; yields its port and the paths it served."""
    served: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.Response(body=chat_json(), content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield runner.addresses[0][1], served
    finally:
        await runner.cleanup()


async def test_upstream_tls_is_verified_unless_its_ca_is_configured(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "upstream", "IP:127.0.0.1")
    other, _ = self_signed(tmp_path, "other", "IP:127.0.0.1")
    by_name, by_name_key = self_signed(tmp_path, "localhost-only", "DNS:localhost")

    async def call(port: int, tls: str) -> tuple[int, dict[str, object], str | None]:
        extra = f", tls: {tls}" if tls else ""
        cfg = make_config(
            f"- {{name: openai, url: 'https://127.0.0.1:{port}', provider: openai, mount: /{extra}}}\n"
        )
        async with running_sidecar(cfg) as (sc, collect), aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{sc.proxy_port}/v1/chat/completions", json=CHAT) as r:
                status, body = r.status, await r.json()
            (record,) = await collect.wait_for(1)
            assert sample(sc, "llm_requests_total", code=str(status)) == 1
            if record.error_type:
                assert sample(sc, "llm_errors_total", error_type=record.error_type) == 1
            return status, body, record.error_type

    async with https_upstream(cert, key) as (port, served):
        status, body, error = await call(port, "")  # verified against the system CAs: refused
        assert (status, error) == (502, "connect_error")
        assert body["error"]["code"] == "upstream_unreachable"  # type: ignore[index]
        assert (await call(port, f"{{ca_file: {other}}}"))[::2] == (502, "connect_error")
        assert served == []  # no request was sent over an unverified connection
        status, body, error = await call(port, f"{{ca_file: {cert}}}")
        assert (status, error) == (200, None) and body["usage"]["prompt_tokens"] == 12  # type: ignore[index]
        assert served == ["/v1/chat/completions"]
    async with https_upstream(by_name, by_name_key) as (port, served):
        # The right CA but a certificate for another name: the host name is checked too.
        assert (await call(port, f"{{ca_file: {by_name}}}"))[::2] == (502, "connect_error")
        assert served == []
