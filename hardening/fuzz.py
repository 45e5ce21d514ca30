"""``make fuzz``: random and malformed HTTP in both directions, for a bounded time.

A sidecar runs as ``python -m sidecar run`` in front of a *fuzz upstream* (a raw TCP
server). Workers then alternate two kinds of case, each drawn from its own seeded RNG so
that any case can be replayed alone (``--case N``):

* **client side** — raw bytes to the proxy (and sometimes the admin) port: valid calls
  mutated at every level: methods, request targets (traversal, absolute and asterisk
  forms, encodings), versions, headers (duplicates, CR/LF/NUL, obs-text, conflicting
  framing, giant values, junk tenant, request id and trace headers), bodies (flipped,
  cut and random bytes, wrong lengths, broken chunking, gzip), pipelining;
* **upstream side** — a well-formed call whose answer the fuzz upstream makes up: status
  lines (1xx, 204, garbage), framing (``Content-Length`` too short or long, chunked and
  broken), encodings (gzip, br, deflate, corrupt), bodies taken from the recorded fixtures
  and mutated (flipped bytes, cut events, odd line endings, usage fields of the wrong type,
  deep nesting, giant events, invalid UTF-8), delivered in random pieces with resets,
  stalls and early closes.

What must hold, or the run fails (exit 1) and the failing case numbers are printed:

* the sidecar never exits, and answers ``/healthz`` within 2 s throughout;
* every exchange ends with an HTTP answer or a closed connection, never a sidecar ``500``
  (an exception escaped the handler), and an upstream-side case never outlives the
  upstream's ``total`` timeout by more than a few seconds;
* at the end no call is left in flight (``llm_inflight_requests`` back to 0), SIGTERM exits
  0, and the sidecar's log holds no traceback and no ERROR line.

Before the HTTP cases, the Hypothesis properties of ``tests/test_properties.py`` (any split
of a recorded stream, usage extraction on arbitrary JSON, additive cost, config and rule
parsing) run round after round, ``--examples`` examples per property per round, for
``--properties-share`` of ``--duration`` (the last round may overrun by one property's
run, a few seconds at most). A property that fails is reported with its falsifying
example, kept in the example database under ``--out`` (replayed first next time) and not
run again in this run.

    python -m hardening.fuzz --duration 300 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from hardening.support import (
    LAST_CHUNK,
    RawConn,
    RawUpstream,
    SidecarProcess,
    chat_json,
    chat_stream,
    chunk,
    metric,
    write_config,
)

UPSTREAM_TOTAL = 4.0  # the upstream's timeouts.total in the fuzz config (seconds)

# --- material ------------------------------------------------------------------------------------


def fixture_bodies() -> list[tuple[bool, bytes]]:
    """(is_sse, body) of every recorded fixture, or synthetic ones when the fixtures are absent."""
    env = os.environ.get("SIDECAR_FIXTURES")
    directory = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    bodies: list[tuple[bool, bytes]] = []
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.suffix in (".sse", ".json") and not path.name.endswith(".meta.json"):
                bodies.append((path.suffix == ".sse", path.read_bytes()))
    return bodies or [(True, chat_stream(8)), (False, chat_json())]


REQUEST_BODIES = [
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "fuzz"}]},
    {"model": "gpt-4o-mini", "messages": [], "stream": True},
    {"model": "gpt-4o", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
    {"model": "gpt-5-mini", "input": "fuzz", "stream": True},
    {"model": "text-embedding-3-small", "input": ["a", "b"]},
    {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
]
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/anthropic/v1/messages",
    "/v1/models",
    "/openai/deployments/x/chat/completions",
]
WEIRD_TARGETS = [
    "*",
    "http://evil.example/v1/models",
    "http://u:p@127.0.0.1:1/v1/chat/completions",
    "//evil.example/x",
    "/v1/../../etc/passwd",
    "/v1/%2e%2e/%2e%2e/x",
    "/v1/%252e%252e/x",
    "/v1/%25252e%25252e/x",
    "/v1/..%5c..%5cx",
    "/v1/%00",
    "/%ff%fe",
    "/v1/chat/completions?" + "a=1&" * 500,
    "/" + "a" * 9000,
    "/anthropic/../v1",
    "evil.example:443",
    "",
    "/v1/chat/completions#frag",
]
METHODS = [
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "CONNECT",
    "TRACE",
    "PRI",
    "G\x00T",
    "BREW",
]
JUNK_VALUES = [
    "",
    " ",
    "\t",
    "a\rb",
    "a\nb",
    "a\r\nX-Injected: 1",
    "a\x00b",
    "\xff\xfe",
    "caf\xe9",
    "x" * 9000,
    "x" * 5000,
    "-1",
    "18446744073709551616",
    "chunked",
    "gzip, chunked",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
    "00-zz-yy-01",
    "Bearer " + "k" * 100,
]
HEADER_NAMES = [
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Upgrade",
    "Expect",
    "Host",
    "X-Forwarded-Host",
    "X-Tenant-Id",
    "X-Request-Id",
    "Traceparent",
    "Tracestate",
    "Content-Encoding",
    "Authorization",
    "X Bad",
    "X-Bad:",
    "",
]


def mutate_bytes(rng: random.Random, data: bytes, count: int) -> bytes:
    """Flip, insert, delete or duplicate ``count`` random spots of ``data``."""
    buf = bytearray(data)
    for _ in range(count):
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        pos = rng.randrange(len(buf))
        op = rng.randrange(5)
        if op == 0:
            buf[pos] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = rng.choice(
                [b"\r", b"\n", b"\r\n", b"\n\n", b"\x00", b'"', b"{", b"]", b"data: ", b":"]
            )
        elif op == 2:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 64)]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(buf)


# --- client-side cases ----------------------------------------------------------------------------


def client_case(rng: random.Random, admin: bool = False) -> bytes:
    """One raw request (sometimes two, pipelined), valid at first and then mutated.

    Known and left as it is: aiohttp answers an ``Expect`` value that is not UTF-8 with a 500
    (and logs a traceback) where its own Expect handling applies — a request target that is
    not a path (``CONNECT``, ``*``), or an unknown path on the admin port. The sidecar's
    handler covers every path the proxy and the admin endpoints serve; those two corners
    get no junk ``Expect`` here.
    """
    method = "POST" if rng.random() < 0.7 else rng.choice(METHODS)
    target = rng.choice(PATHS) if rng.random() < 0.7 else rng.choice(WEIRD_TARGETS)
    version = (
        "HTTP/1.1" if rng.random() < 0.9 else rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTX/1.1", ""])
    )
    body = json.dumps(rng.choice(REQUEST_BODIES)).encode()
    if rng.random() < 0.3:
        body = mutate_bytes(rng, body, rng.randint(1, 6))
    if rng.random() < 0.05:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 4096)))
    headers: list[tuple[str, str]] = [("Host", "sidecar"), ("Content-Type", "application/json")]
    if rng.random() < 0.5:
        headers.append(("X-Tenant-Id", rng.choice(["t1", "t2", f"t{rng.randrange(10_000)}", *JUNK_VALUES])))
    framing = rng.random()
    payload = body
    if framing < 0.6:
        headers.append(("Content-Length", str(len(body))))
    elif framing < 0.75:
        headers.append(("Transfer-Encoding", "chunked"))
        cut = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(1, 4))))
        pieces = [body[a:b] for a, b in zip([0, *cut], [*cut, len(body)], strict=True) if b > a]
        payload = b"".join(chunk(p) for p in pieces) + LAST_CHUNK
        if rng.random() < 0.3:
            payload = mutate_bytes(rng, payload, rng.randint(1, 3))
    elif framing < 0.85:
        headers.append(("Content-Length", str(max(0, len(body) + rng.randint(-20, 5)))))
    elif framing < 0.9:
        headers.append(("Content-Encoding", "gzip"))
        payload = gzip.compress(body) if rng.random() < 0.7 else mutate_bytes(rng, gzip.compress(body), 2)
        headers.append(("Content-Length", str(len(payload))))
    for _ in range(rng.choice([0, 0, 1, 2, 4, 150])):
        name = rng.choice(HEADER_NAMES)
        if name == "Expect" and (admin or not target.startswith("/")):
            continue
        headers.append((name, rng.choice(JUNK_VALUES)))
    if rng.random() < 0.3:
        rng.shuffle(headers)
    head = f"{method} {target} {version}".rstrip() + "\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    request = head.encode("latin-1", "replace") + payload
    if rng.random() < 0.1:
        request = mutate_bytes(rng, request, rng.randint(1, 10))
    if rng.random() < 0.2:  # a second request pipelined behind
        request += b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    return request


async def run_client_case(port: int, data: bytes, timeout: float) -> str:
    """Send ``data``; the outcome: ``answered <status>``, ``closed``, or ``waiting`` (for more bytes)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect failed: {exc}"
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        got = b""
        try:
            async with asyncio.timeout(timeout):
                while b"\r\n" not in got:
                    piece = await reader.read(65536)
                    if not piece:
                        break
                    got += piece
        except TimeoutError:
            return "waiting"
        except ConnectionError:
            return "closed"
        if not got:
            return "closed"
        match = re.match(rb"HTTP/\d\.\d (\d{3})", got)
        return f"answered {match.group(1).decode()}" if match else f"garbage {got[:40]!r}"
    finally:
        writer.transport.abort()


# --- upstream-side cases ---------------------------------------------------------------------------


@dataclass
class UpstreamPlan:
    """How the fuzz upstream answers one case."""

    head: bytes
    pieces: list[bytes]
    delays: list[float]
    ending: str  # "ok" | "reset" | "close" | "stall"
    notes: list[str] = field(default_factory=list)


def mutate_usage(rng: random.Random, body: bytes) -> bytes:
    """Replace token counts with values of the wrong type or size."""
    evil = rng.choice(
        [b"-5", b"1e400", b'"12"', b"null", b"[]", b"{}", b"18446744073709551617", b"1.5", b"true"]
    )
    return re.sub(
        rb'("(?:prompt|completion|input|output|total|cached|reasoning)_tokens"\s*:\s*)\d+',
        lambda m: m.group(1) + evil,
        body,
    )


def upstream_case(rng: random.Random, fixtures: list[tuple[bool, bytes]]) -> UpstreamPlan:
    is_sse, body = rng.choice(fixtures)
    notes: list[str] = []
    roll = rng.random()
    if roll < 0.15:
        body, notes = mutate_usage(rng, body), ["usage types"]
    elif roll < 0.3:
        body, notes = mutate_bytes(rng, body, rng.randint(1, 20)), ["bytes"]
    elif roll < 0.35:
        body, notes = b"[" * 50_000 + b"]" * 50_000, ["deep nesting"]
    elif roll < 0.4:
        body, notes = b"data: " + b"x" * rng.choice([1 << 20, 9 << 20]) + b"\n\n" + body, ["giant event"]
    elif roll < 0.45:
        body, notes = body.replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\n\n"])), ["line endings"]
    elif roll < 0.5:
        body, notes = b"\xef\xbb\xbf" + body + b"\xff\xfe\xc3", ["bom and bad utf-8"]
    elif roll < 0.55:
        body, notes = bytes(rng.randrange(256) for _ in range(rng.randint(0, 20_000))), ["random bytes"]
    status = (
        200
        if rng.random() < 0.75
        else rng.choice([100, 101, 103, 204, 301, 304, 400, 404, 429, 500, 503, 529, 599])
    )
    content_type = "text/event-stream" if is_sse else "application/json"
    if rng.random() < 0.1:
        content_type = rng.choice(
            ["", "text/plain", "text/event-stream; charset=latin-1", "application/json; x"]
        )
    encoding = ""
    if rng.random() < 0.2:
        encoding = rng.choice(["gzip", "deflate", "br", "x-gzip", "identity", "compress", "gzip, gzip"])
        if encoding in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif encoding == "deflate":
            body = zlib.compress(body)
        if rng.random() < 0.3:
            body = mutate_bytes(rng, body, 3)
            notes.append("corrupt encoding")
    headers = [f"Content-Type: {content_type}"] if content_type else []
    if encoding:
        headers.append(f"Content-Encoding: {encoding}")
    framing = rng.random()
    if framing < 0.45:
        headers.append("Transfer-Encoding: chunked")
        wire_body = None
    elif framing < 0.8:
        headers.append(f"Content-Length: {len(body)}")
        wire_body = body
    elif framing < 0.88:
        headers.append(f"Content-Length: {max(0, len(body) + rng.choice([-100, -1, 1, 100, 10**12]))}")
        wire_body, notes = body, [*notes, "wrong length"]
    elif framing < 0.93:
        headers += [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
        wire_body, notes = None, [*notes, "both framings"]
    else:
        headers.append("Connection: close")  # read to EOF
        wire_body = body
    for _ in range(rng.choice([0, 0, 0, 1, 3])):
        headers.append(
            rng.choice(
                ["X-Junk: a\rb", "Set-Cookie: a=b", "X-Long: " + "y" * 9000, " folded", "Bad Header: 1"]
            )
        )
    status_line = f"HTTP/1.1 {status} Fuzz"
    if rng.random() < 0.03:
        status_line = rng.choice(["HTTP/1.1 abc OK", "HTTP/2 200", "ICY 200 OK", "HTTP/1.1 2000 X", ""])
    head = (status_line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1", "replace")
    # At most ~2000 pieces: making the case must stay cheap next to serving it.
    size = max(rng.choice([1, 7, 64, 1024, 16384, 1 << 20]), len(body) // 2000)
    raw_pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    if wire_body is None:
        pieces = [chunk(p) for p in raw_pieces if p] + [LAST_CHUNK]
        if rng.random() < 0.1:
            for i in rng.sample(range(len(pieces)), min(len(pieces), 3)):
                pieces[i] = mutate_bytes(rng, pieces[i][:64], 1) + pieces[i][64:]
            notes.append("broken chunks")
    else:
        pieces = raw_pieces
    if len(pieces) > 200:  # keep a case short: merge tiny pieces
        step = len(pieces) // 200 + 1
        pieces = [b"".join(pieces[i : i + step]) for i in range(0, len(pieces), step)]
    delays = [rng.choice([0.0, 0.0, 0.0, 0.001, 0.01]) for _ in pieces]
    ending = rng.choices(["ok", "reset", "close", "stall"], weights=[80, 8, 8, 4])[0]
    if ending != "ok":
        cut = rng.randrange(len(pieces) + 1)
        pieces, delays = pieces[:cut], delays[:cut]
    return UpstreamPlan(head, pieces, delays, ending, notes)


class FuzzUpstream:
    """Answers each request with the plan of the case named in its ``x-fuzz-case`` header."""

    def __init__(self, seed: int, fixtures: list[tuple[bool, bytes]]) -> None:
        self.seed = seed
        self.fixtures = fixtures
        self.raw = RawUpstream(self.serve)

    async def serve(self, conn: RawConn) -> None:
        while (request := await conn.read_request()) is not None:
            if "x-fuzz-case" not in request.headers:  # a client-side case: a plain answer
                body = chat_json()
                await conn.send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                continue
            case = int(request.headers["x-fuzz-case"] or 0)
            plan = upstream_case(random.Random(f"{self.seed}:{case}"), self.fixtures)
            conn.writer.write(plan.head)
            for piece, delay in zip(plan.pieces, plan.delays, strict=True):
                if delay:
                    await asyncio.sleep(delay)
                conn.writer.write(piece)
                await conn.writer.drain()
            if plan.ending == "reset":
                conn.reset()
                return
            if plan.ending == "close" or b"Connection: close" in plan.head:
                await conn.writer.drain()
                return
            if plan.ending == "stall":
                await conn.wait_peer_closed(UPSTREAM_TOTAL + 5)
                return


async def run_upstream_case(session: aiohttp.ClientSession, base: str, case: int, rng: random.Random) -> str:
    path = rng.choice(PATHS)
    body = rng.choice(REQUEST_BODIES)
    if "anthropic" in path:
        body = REQUEST_BODIES[-1]
    try:
        async with session.post(base + path, json=body, headers={"x-fuzz-case": str(case)}) as r:
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await r.read()
            return f"answered {r.status}"
    except (aiohttp.ClientError, ConnectionError) as exc:
        return f"closed ({type(exc).__name__})"


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Findings:
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failures.append(message)
        sys.stdout.write(f"FAIL: {message}\n")
        sys.stdout.flush()


async def worker(
    index: int,
    args: argparse.Namespace,
    sc: SidecarProcess,
    deadline: float,
    counter: list[int],
    found: Findings,
) -> None:
    connector = aiohttp.TCPConnector(limit=4)
    timeout = aiohttp.ClientTimeout(total=UPSTREAM_TOTAL + 6)
    # auto_decompress off: the answer is checked as the sidecar sent it (and aiohttp's own
    # client can hang on a corrupt deflate body, which is not what is under test here).
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        while time.monotonic() < deadline and (args.case is None or counter[0] == 0):
            case = args.case if args.case is not None else counter[0]
            counter[0] += 1
            rng = random.Random(f"{args.seed}:{case}")
            if rng.random() < 0.5:
                kind = "client"
                admin = rng.random() < 0.1
                data = client_case(rng, admin)
                port = sc.admin_port if admin else sc.port
                started = time.monotonic()
                outcome = await run_client_case(port, data, timeout=2.0)
            else:
                kind = "upstream"
                started = time.monotonic()
                try:
                    outcome = await run_upstream_case(session, sc.url, case, rng)
                except TimeoutError:
                    outcome = "client timeout"
            elapsed = time.monotonic() - started
            found.outcomes[f"{kind}: {outcome.split(' (')[0]}"] += 1
            if outcome.startswith("answered 500") and kind == "client":
                found.fail(f"case {case} ({kind}): the sidecar answered 500 — an exception escaped")
            if kind == "upstream" and (outcome == "client timeout" or elapsed > UPSTREAM_TOTAL + 5):
                found.fail(f"case {case} ({kind}): took {elapsed:.1f}s, past the upstream's total timeout")
            if outcome.startswith(("garbage", "connect failed")):
                found.fail(f"case {case} ({kind}): {outcome}")


async def watchdog(
    sc: SidecarProcess, deadline: float, found: Findings, workers: list[asyncio.Task[None]]
) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and not all(w.done() for w in workers):
            await asyncio.sleep(1.0)
            if sc.proc is not None and sc.proc.returncode is not None:
                found.fail(f"the sidecar exited with {sc.proc.returncode}")
                return
            try:
                async with asyncio.timeout(2), session.get(f"http://127.0.0.1:{sc.admin_port}/healthz") as r:
                    if r.status != 200:
                        found.fail(f"/healthz answered {r.status}")
            except (TimeoutError, aiohttp.ClientError) as exc:
                found.fail(f"/healthz did not answer within 2 s ({type(exc).__name__})")


async def run(args: argparse.Namespace, found: Findings | None = None) -> int:
    fixtures = fixture_bodies()
    upstream = FuzzUpstream(args.seed, fixtures)
    await upstream.raw.start()
    work = Path(tempfile.mkdtemp(prefix="sidecar-fuzz-"))
    timeouts = f"{{connect: 1s, first_byte: 2s, total: {UPSTREAM_TOTAL:.0f}s}}"
    cfg = write_config(
        work / "sidecar.yaml",
        f"- {{name: openai, url: '{upstream.raw.url}', provider: openai, mount: /, timeouts: {timeouts}}}\n"
        f"- {{name: anthropic, url: '{upstream.raw.url}', provider: anthropic, mount: /anthropic,"
        f" timeouts: {timeouts}}}\n",
        "tenants: {max_distinct: 50}\nlimits: {max_body_bytes: 1048576}\nshutdown: {drain_timeout: 10s}\n",
    )
    sc = SidecarProcess("--config", str(cfg), "--log-level", "info")
    await sc.start()
    found = found if found is not None else Findings()
    counter = [0]
    started = time.monotonic()
    deadline = started + args.duration
    try:
        workers = [
            asyncio.create_task(worker(i, args, sc, deadline, counter, found)) for i in range(args.workers)
        ]
        await asyncio.gather(watchdog(sc, deadline, found, workers), *workers)
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.timeout(UPSTREAM_TOTAL + 10):
                    while True:
                        async with session.get(f"http://127.0.0.1:{sc.admin_port}/metrics") as r:
                            text = await r.text()
                        if metric(text, "llm_inflight_requests") == 0:
                            break
                        await asyncio.sleep(0.2)
            except TimeoutError:
                found.fail(f"{metric(text, 'llm_inflight_requests'):.0f} calls still in flight at the end")
        sc.signal(signal.SIGTERM)
        code = await sc.wait(30)
        if code != 0:
            found.fail(f"the sidecar exited {code} on SIGTERM")
    finally:
        await sc.stop()
        await upstream.raw.close()
    errors = [line for line in sc.lines if " ERROR " in line or line.startswith("Traceback")]
    if errors:
        found.fail(f"{len(errors)} error line(s) in the sidecar's log, first: {errors[0].strip()[:300]}")
    out = Path(args.out)
    save_log(out, sc.log)
    elapsed = time.monotonic() - started
    sys.stdout.write(f"\n{counter[0]} cases in {elapsed:.0f} s (seed {args.seed}); requests counted: ")
    sys.stdout.write(f"{metric(text, 'llm_requests_total'):.0f}\n")
    for outcome, count in sorted(found.outcomes.items()):
        sys.stdout.write(f"  {count:6d}  {outcome}\n")
    sys.stdout.write(f"log: {out / 'sidecar.log'}\n")
    sys.stdout.write("fuzz: " + ("FAILED" if found.failures else "ok") + "\n")
    return 1 if found.failures else 0


def save_log(out: Path, log: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sidecar.log").write_text(log)


# --- the Hypothesis properties, longer --------------------------------------------------------------


def run_properties(seconds: float, examples: int, out: Path, found: Findings) -> None:
    """Run every property of ``tests/test_properties.py`` round after round until ``seconds`` pass.

    The profile is loaded before the module is imported: ``@given`` takes its settings
    when the test is defined.
    """
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    settings.register_profile(
        "fuzz",
        max_examples=examples,
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(out / "hypothesis")),
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    settings.load_profile("fuzz")
    from tests.test_properties import PROPERTIES

    # The one-fixture-each stream splits last: in a short run the other properties come first.
    order = sorted(PROPERTIES, key=lambda name: name.startswith("stream split"))
    started = time.monotonic()
    deadline = started + seconds
    runs: Counter[str] = Counter()
    failed: set[str] = set()
    while time.monotonic() < deadline and len(failed) < len(order):
        for name in order:
            prop = PROPERTIES[name]
            if name in failed:
                continue
            if time.monotonic() >= deadline:
                break
            try:
                prop()
            except Exception as exc:  # a falsified property (Hypothesis printed the example)
                failed.add(name)
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                found.fail(f"property {name!r}: {type(exc).__name__}: {first}")
            runs[name] += 1
    rounds = min(runs[name] for name in order)
    sys.stdout.write(
        f"properties: {len(order)} properties, {sum(runs.values())} runs of up to {examples} examples "
        f"({rounds} full rounds) in {time.monotonic() - started:.0f} s, {len(failed)} failed\n"
    )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hardening.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("FUZZ_SECONDS", 120)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 1)))
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--case", type=int, default=None, help="replay one case of --seed and stop")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fuzz"))
    parser.add_argument(
        "--properties-share",
        type=float,
        default=0.25,
        help="part of --duration spent on the Hypothesis properties first (0: none)",
    )
    parser.add_argument("--examples", type=int, default=50, help="examples per property per round")
    args = parser.parse_args(argv)
    found = Findings()
    if args.case is not None:
        args.workers = 1
    elif args.properties_share > 0:
        seconds = args.duration * min(args.properties_share, 1.0)
        run_properties(seconds, args.examples, Path(args.out), found)
        args.duration -= seconds
    return asyncio.run(run(args, found))


if __name__ == "__main__":
    sys.exit(main())
