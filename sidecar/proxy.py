"""The forwarding handler: every call goes to its configured upstream unchanged, and is measured.

Habits (see STYLE.md): *forward first, look second, finish once*. Each upstream chunk
is written to the client before it is inspected; usage is read from a decoded copy;
end of stream, client abort and upstream error all go through one ``_Call.finish``
guarded by a flag, which hands one immutable :class:`~sidecar.model.CallRecord` to the
pipeline. The proxy knows nothing of sinks.

Security: the destination is always the configured upstream of the longest matching
mount; the client's ``Host``, absolute-form targets and forwarding headers never change
it, and paths with dot segments are refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import ssl
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from sidecar import tracecontext
from sidecar.config import Config, UpstreamConfig
from sidecar.http_server import InvalidBody, Request, Response
from sidecar.metrics import Cell, Metrics
from sidecar.model import CallRecord, CapturedContent, GatewayEvent, UpstreamAttempt, Usage
from sidecar.pipeline import EstimateRequest, Pipeline
from sidecar.providers import ResponseInfo, Shape, StreamObserver, detect
from sidecar.providers.base import UNPARSED_RESPONSE
from sidecar.tenants import UNKNOWN, clean_tenant
from sidecar.threads import LOAD
from sidecar.upstream_client import Origin, UpstreamClient, UpstreamResponse

if TYPE_CHECKING:
    from sidecar.gateway.control import Admission, Gateway, Refusal, Target
    from sidecar.rules.engine import BudgetBreach

log = logging.getLogger("sidecar.proxy")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
MAX_PARSE_BYTES = 16 * 1024 * 1024  # decoded bytes of a JSON body kept for usage parsing
ABORT_STATUS = 499
# Longest wait for the next piece of a request body (nginx's client_body_timeout): a client
# that stalls longer gets 408 instead of holding its handler open forever.
BODY_READ_TIMEOUT = 60.0
# Model names and response ids longer than this are client or upstream garbage; they are
# cut so that no record, log line or ledger row carries megabytes of it.
MAX_RECORDED_TEXT = 256
# The whole request header block. The server's parser refuses a line over 8 KiB and more than
# 128 headers, which still lets 1 MiB of headers through to the upstream.
MAX_HEADER_BYTES = 64 * 1024
# A token count past this is garbage from the upstream (no float holds it exactly, and past
# 2**63 no SQLite INTEGER does): it is treated as not reported.
MAX_TOKEN_COUNT = 2**53 - 1


# --- routing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One configured upstream, ready to forward to."""

    config: UpstreamConfig
    host: str  # as the records name it (server.address)
    port: int
    timeout: aiohttp.ClientTimeout
    origin: Origin  # where the upstream client sends its calls (scheme, host, port, path, TLS)

    @property
    def name(self) -> str:
        return self.config.name

    def api_key_header(self) -> tuple[str, str] | None:
        """The provider key header from the environment. A key read from a file always goes
        through the gateway, which reads it off the event loop (``Gateway.provider_key``)."""
        key = self.config.api_key
        if key is None or not key.from_env:
            return None
        return key.header_for(os.environ.get(key.from_env))


def _route(upstream: UpstreamConfig) -> Route:
    url = URL(upstream.url)
    t = upstream.timeouts
    timeout = aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.first_byte)
    ssl_ctx: ssl.SSLContext | bool = True
    if upstream.tls is not None:
        if not upstream.tls.verify:
            ssl_ctx = False
        elif upstream.tls.ca_file:
            ssl_ctx = ssl.create_default_context(cafile=upstream.tls.ca_file)
    host, port = url.host or "", url.port or 0
    origin = Origin(url.scheme, url.raw_host or "", port, url.raw_path, ssl_ctx)
    return Route(upstream, host, port, timeout, origin)


class Router:
    """Longest-mount-wins routing of a request path to a :class:`Route`."""

    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        routes = [_route(u) for u in upstreams]
        self._by_mount = sorted(
            ((u.mount.rstrip("/"), r) for u, r in zip(upstreams, routes, strict=True)),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        self.routes = routes
        self.by_name = {r.name: r for r in routes}

    def match(self, path: str) -> tuple[Route, str] | None:
        """The route and the path left after its mount, or None."""
        for mount, route in self._by_mount:
            if not mount:
                return route, path
            if path == mount or path.startswith(mount + "/"):
                return route, path[len(mount) :] or "/"
        return None


def unsafe_path(raw_path: str) -> bool:
    """True for targets that could escape the upstream's base path.

    Anything but an origin-form path (``OPTIONS *`` would be appended to the upstream's
    authority), dot segments percent-encoded up to three times, anything encoded more
    often than that, NUL and backslash.
    """
    if not raw_path.startswith("/"):
        return True
    if "%" not in raw_path:  # the usual target: nothing to decode
        if "\x00" in raw_path or "\\" in raw_path:
            return True
        # A dot segment follows a "/": without "/." there is none.
        return "/." in raw_path and any(segment in (".", "..") for segment in raw_path.split("/"))
    decoded = raw_path
    for _ in range(3):
        decoded = unquote(decoded)
    if unquote(decoded) != decoded:
        return True  # still encoded after three passes: no client of an LLM API does that
    if "\x00" in decoded or "\\" in decoded:
        return True
    return any(segment in (".", "..") for segment in decoded.split("/"))


def rewrite_model(body: bytes, model: str) -> bytes | None:
    """``body`` with its JSON ``model`` set to ``model`` (a route's target or canary version).

    None when the body is not a JSON object: it is then sent as it came.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    payload["model"] = model
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def recorded_text(value: str | None) -> str | None:
    """``value`` fit for a record: cut to :data:`MAX_RECORDED_TEXT`, lone surrogates replaced.

    A JSON ``"\\ud800"`` escape decodes to a string no UTF-8 encoder (ledger, logs, spans)
    accepts.
    """
    if value is None:
        return None
    value = value[:MAX_RECORDED_TEXT]
    return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")


# --- settings swapped on reload ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The part of the config the request path reads, replaced whole on reload."""

    router: Router
    tenant_header: str
    tenant_required: bool
    tenant_max_length: int
    max_body_bytes: int
    tracing: bool
    sample_ratio: float
    capture_content: bool = False  # keep prompt and completion on records of sampled calls

    @classmethod
    def from_config(
        cls, config: Config, tracing: bool = False, sample_ratio: float = 1.0, capture_content: bool = False
    ) -> ProxySettings:
        return cls(
            router=Router(config.upstreams),
            tenant_header=config.tenants.header,
            tenant_required=config.tenants.required,
            tenant_max_length=config.tenants.max_length,
            max_body_bytes=config.limits.max_body_bytes,
            tracing=tracing,
            sample_ratio=sample_ratio,
            capture_content=capture_content,
        )


# --- decoding a copy of compressed bodies -----------------------------------------------


#: Largest piece a compressed body is decoded into at a time: a few hundred bytes of brotli
#: can hold hundreds of MiB, and the copy must never hold more than this at once.
DECODE_PIECE = 256 * 1024
#: Decoded bytes of one compressed response read for usage; past it the copy stops (its
#: usage is not read and the call counts as malformed). The client still gets every byte.
MAX_DECODED_BYTES = 64 * 1024 * 1024

Decoder = Callable[[bytes], Iterator[bytes]]


def identity_decoder(data: bytes) -> Iterator[bytes]:
    """The decoder of a body sent without a content encoding (the relay skips calling it)."""
    yield data


class DecodedTooLarge(zlib.error):
    """The decoded copy of a compressed body passed :data:`MAX_DECODED_BYTES`."""


def make_decoder(encoding: str, limit: int = MAX_DECODED_BYTES) -> Decoder | None:
    """An incremental decoder for a ``Content-Encoding``; None when it cannot be decoded.

    It yields the decoded bytes of each chunk in pieces of at most :data:`DECODE_PIECE`
    and raises :class:`DecodedTooLarge` (a ``zlib.error``) once more than ``limit``
    decoded bytes came out of a compressed body. Every decoding error is a ``zlib.error``.
    """
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return identity_decoder
    total = 0

    def counted(piece: bytes) -> bytes:
        nonlocal total
        total += len(piece)
        if total > limit:
            raise DecodedTooLarge(f"decoded copy over {limit} bytes")
        return piece

    if encoding in ("gzip", "x-gzip", "deflate"):
        state: dict[str, Any] = {}
        if encoding != "deflate":
            state["obj"] = zlib.decompressobj(16 + zlib.MAX_WBITS)

        def inflate(data: bytes) -> Iterator[bytes]:
            obj = state.get("obj")
            if obj is None:
                # RFC 9110 deflate is zlib-wrapped; some servers send raw deflate.
                wrapped = len(data) >= 2 and (data[0] * 256 + data[1]) % 31 == 0 and data[0] & 0x0F == 8
                obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
                state["obj"] = obj
            out: bytes = obj.decompress(data, DECODE_PIECE)
            yield counted(out)
            # A full piece may leave output pending even with all input taken.
            while obj.unconsumed_tail or len(out) == DECODE_PIECE:
                out = obj.decompress(obj.unconsumed_tail, DECODE_PIECE)
                if not out and not obj.unconsumed_tail:
                    break
                yield counted(out)

        return inflate
    if encoding == "br":
        try:
            import brotli
        except ImportError:  # pragma: no cover - brotli is a dependency
            return None
        decompressor = brotli.Decompressor()

        def unbrotli(data: bytes) -> Iterator[bytes]:
            try:
                yield counted(bytes(decompressor.process(data, output_buffer_limit=DECODE_PIECE)))
                while not decompressor.can_accept_more_data():
                    yield counted(bytes(decompressor.process(b"", output_buffer_limit=DECODE_PIECE)))
            except brotli.error as exc:  # one error type for every undecodable body: zlib's
                raise zlib.error(f"brotli: {exc}") from exc

        return unbrotli
    return None


def plausible(usage: Usage) -> Usage:
    """``usage`` without counts past :data:`MAX_TOKEN_COUNT` (those become *not reported*)."""
    wild = {name: None for name in usage.__slots__ if (getattr(usage, name) or 0) > MAX_TOKEN_COUNT}
    return dataclasses.replace(usage, **wild) if wild else usage


# --- error bodies in the provider's shape ---------------------------------------------------


def error_body(provider: str, status: int, message: str, code: str) -> bytes:
    """A JSON error body shaped like the provider's own."""
    if provider == "anthropic":
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            504: "timeout_error",
        }.get(status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = {401: "invalid_request_error", 429: "requests"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return json.dumps(body).encode()


def error_type_for_status(status: int) -> str | None:
    """The ``error_type`` of an upstream answer (None for success)."""
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "upstream_5xx"
    if status >= 400:
        return "upstream_4xx"
    return None


# --- one call -----------------------------------------------------------------------


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected."""

    def __init__(self, response: Response) -> None:
        super().__init__("client disconnected")
        self.response = response


async def _write(response: Response, data: bytes, end: bool = False) -> None:
    try:
        if end:
            await response.write_eof(data)
        else:
            await response.write(data)
    except ConnectionError as exc:  # the server's "client disconnected"
        raise _ClientGone(response) from exc


class _Call:
    """The state of one call while it is forwarded; :meth:`finish` runs once."""

    __slots__ = (
        "admission",
        "attempts",
        "body",
        "client_model",
        "client_wait",
        "error_type",
        "events",
        "finished",
        "ids",
        "info",
        "max_tokens",
        "observer",
        "provider",
        "request",
        "request_id",
        "request_model",
        "route",
        "route_name",
        "shape",
        "started",
        "started_wall",
        "status",
        "stream",
        "tenant",
        "throttled",
        "ttft",
        "upstream_called",
        "upstream_wait",
        "variant",
    )

    def __init__(self, request: Request, started: float) -> None:
        self.request = request
        self.started = started
        self.started_wall = time.time()
        self.request_id = recorded_text(request.headers.get("x-request-id")) or tracecontext.random_id()
        self.route: Route | None = None
        self.shape: Shape | None = None
        self.provider = ""
        self.tenant = UNKNOWN
        self.body: bytes | None = None
        self.request_model: str | None = None
        self.client_model: str | None = None  # the model the client asked for (before any rewrite)
        self.stream = False
        self.max_tokens: int | None = None  # the request's output cap, when its shape read it
        self.status = 0
        self.error_type: str | None = None
        self.ttft: float | None = None
        self.throttled: str | None = None
        self.observer: StreamObserver | None = None
        self.info: ResponseInfo | None = None
        self.ids: tracecontext.SpanIds | None = None
        self.upstream_wait = 0.0
        self.client_wait = 0.0
        self.upstream_called = False
        self.finished = False
        self.route_name = ""
        self.variant = ""
        self.attempts: list[UpstreamAttempt] = []
        self.events: list[GatewayEvent] = []
        self.admission: Admission | None = None

    def event(self, name: str, **attributes: str) -> None:
        """Note a gateway decision on this call (it becomes a span event)."""
        self.events.append(GatewayEvent(name, perf_counter() - self.started, tuple(attributes.items())))


class Proxy:
    """The request handler (see :mod:`sidecar.http_server`) that forwards and measures every call."""

    def __init__(
        self,
        settings: ProxySettings,
        client: UpstreamClient,
        pipeline: Pipeline,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.client = client
        self.pipeline = pipeline
        self.metrics = metrics
        self.draining = False
        #: ``(tenant, provider, model, upstream) -> BudgetBreach | None``: a budget rule with
        #: ``action: reject`` is spent for this group (lookups into the rule engine's state).
        self.budget_breach: Callable[[str, str, str, str], BudgetBreach | None] | None = None
        #: Gateway control (keys, limits, routes, breakers, canaries); None: pure pass-through.
        self.gateway: Gateway | None = None
        #: Longest wait for the next piece of a request body (seconds).
        self.body_read_timeout = BODY_READ_TIMEOUT
        self._inflight: dict[str, Cell] = {}  # upstream name -> its llm_inflight_requests series

    # -- entry point --------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        call = _Call(request, perf_counter())
        settings = self.settings
        try:
            return await self._handle(call, settings)
        except asyncio.CancelledError:
            # The client went away (the server cancels the handler) or shutdown gave up.
            self._finish(call, ABORT_STATUS, "client_abort")
            raise
        except Exception:
            log.exception("proxy error on request %s", call.request_id)
            self._finish(call, 500, "proxy_error")
            raise

    async def _handle(self, call: _Call, settings: ProxySettings) -> Response:
        request = call.request
        raw_path = request.raw_path
        if request.method == "CONNECT" or unsafe_path(raw_path):
            return self._reject(call, 400, "invalid request target", "invalid_request_target")
        if sum(len(name) + len(value) for name, value in request.raw_headers) > MAX_HEADER_BYTES:
            return self._reject(call, 431, "request headers too large", "request_headers_too_large")
        matched = settings.router.match(raw_path)
        if matched is None:
            return self._reject(call, 404, "no upstream is mounted at this path", "not_found")
        route, sub_path = matched
        call.route = route
        call.shape = detect(sub_path, route.config.provider) if request.method == "POST" else None
        call.provider = call.shape.provider if call.shape else (route.config.provider or "")

        header_value = request.headers.get(settings.tenant_header)
        call.tenant = clean_tenant(header_value, settings.tenant_max_length)
        gateway = self.gateway
        if gateway is not None and gateway.keys_enabled:
            # With virtual keys the tenant is the key's: a client-supplied header is ignored
            # unless the key is a trusted caller's.
            admission = gateway.authenticate(
                request.headers, call.tenant if header_value is not None else None
            )
            if admission.refusal is not None:
                # Never the tenant it claims: an unauthenticated caller must not be able to
                # charge refusals to a tenant, nor create tenant labels.
                call.tenant = UNKNOWN
                status, reason, message = admission.refusal
                self.metrics.auth_failures.labels(reason).inc()
                return self._reject(call, status, message, "invalid_api_key", "unauthorized")
            call.admission = admission
            call.tenant = admission.tenant
        elif settings.tenant_required and header_value is None:
            return self._reject(
                call, 400, f"missing tenant header {settings.tenant_header}", "missing_tenant"
            )

        if request.content_length is not None and request.content_length > settings.max_body_bytes:
            return self._reject(call, 413, "request body too large", "request_too_large")
        try:
            body = await self._read_body(request, settings.max_body_bytes)
        except TimeoutError:
            rejected = self._reject(call, 408, "request body not received in time", "request_timeout")
            rejected.force_close()  # the rest of the body may still come: never parse it as a request
            return rejected
        except InvalidBody:
            rejected = self._reject(call, 400, "invalid request body framing", "invalid_request_body")
            rejected.force_close()  # the server reads nothing more from this connection
            return rejected
        if body is None:
            return self._reject(call, 413, "request body too large", "request_too_large")
        call.body = body

        wants_usage = True
        if call.shape is not None:
            info = call.shape.parse_request(body)
            call.request_model = call.client_model = recorded_text(info.model)
            call.stream = info.stream
            call.max_tokens = info.max_tokens
            wants_usage = info.wants_usage

        if call.admission is not None and not call.admission.allows_model(call.request_model):
            self.metrics.auth_failures.labels("model_not_allowed").inc()
            return self._reject(
                call,
                403,
                f"this key may not use model {call.request_model or '(none)'}",
                "model_not_allowed",
                "unauthorized",
            )

        budget = self.budget_breach
        if budget is not None:
            model = call.request_model or "unknown"
            breach = budget(call.tenant, call.provider, model, route.name)
            if breach is None and gateway is not None and gateway.shared_budgets is not None:
                # A fleet: the spend of every replica, from Redis (cached for a second).
                breach = await gateway.shared_budgets.breach(call.tenant, call.provider, model, route.name)
            if breach is not None:
                return self._refuse_budget(call, breach)

        targets: list[Target] | None = None
        if gateway is not None:
            planned = gateway.plan(call.request_model, sub_path, route.name, call.tenant, call.shape)
            if planned is not None:
                call.route_name = planned.route
                targets = planned.targets
                if not targets:
                    what = (
                        f"every upstream of route {planned.route}"
                        if planned.route
                        else f"upstream {route.name}"
                    )
                    refused = self._reject(
                        call, 503, f"{what} is unavailable (circuit open)", "circuit_open", "circuit_open"
                    )
                    refused.headers["retry-after"] = str(max(1, math.ceil(planned.retry_after)))
                    return refused
            refusal = await gateway.admit(call, body)
            if refusal is not None:
                return self._throttle(call, refusal)

        headers = self._upstream_headers(request, call, settings)
        query = request.query_string
        suffix = sub_path + ("?" + query if query else "")
        try:
            if targets is None:
                response = await self._exchange(call, route, None, suffix, headers, body, wants_usage, True)
                assert response is not None  # the last attempt always answers
                return response
            return await self._fallback(call, targets, suffix, headers, body, wants_usage)
        finally:
            if gateway is not None and call.admission is not None:
                gateway.release(call.admission)

    async def _fallback(
        self,
        call: _Call,
        targets: list[Target],
        suffix: str,
        headers: CIMultiDict[str],
        body: bytes,
        wants_usage: bool,
    ) -> Response:
        """Try the planned targets in order until one answers (see :meth:`_exchange`'s ``last``)."""
        gateway = self.gateway
        assert gateway is not None
        deadline = call.started + targets[0].deadline
        for i, target in enumerate(targets):
            last = i == len(targets) - 1 or perf_counter() >= deadline
            if not gateway.allow(target.upstream):
                # Its breaker is open (it opened while earlier targets were tried, or its one
                # half-open probe is out): skip it as the planner would have.
                if not last:
                    call.event(
                        "fallback",
                        **{"from": target.upstream, "to": targets[i + 1].upstream, "reason": "circuit_open"},
                    )
                    continue
                refusal = self._reject(
                    call,
                    503,
                    f"upstream {target.upstream} is unavailable (circuit open)",
                    "circuit_open",
                    "circuit_open",
                )
                refusal.headers["retry-after"] = str(max(1, math.ceil(gateway.retry_after(target.upstream))))
                return refusal
            route = self.settings.router.by_name[target.upstream]
            call.route = route
            call.variant = target.variant
            call.provider = call.shape.provider if call.shape else (route.config.provider or call.provider)
            response = await self._exchange(call, route, target, suffix, headers, body, wants_usage, last)
            if response is not None:
                return response
            failed = call.attempts[-1]
            call.event(
                "fallback",
                **{"from": failed.upstream, "to": targets[i + 1].upstream, "reason": failed.outcome},
            )
        raise AssertionError("unreachable: the last target always answers")  # pragma: no cover

    async def _read_body(self, request: Request, limit: int) -> bytes | None:
        """The request body, None past ``limit``; TimeoutError when the client stalls between pieces."""
        content = request.content
        pieces: list[bytes] = []
        size = 0
        while True:
            if content.ready:  # arrived already (the whole body, usually, with the head)
                piece = await content.readany()
            else:
                async with asyncio.timeout(self.body_read_timeout):
                    piece = await content.readany()
            if not piece:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                return None

    def _upstream_headers(self, request: Request, call: _Call, settings: ProxySettings) -> CIMultiDict[str]:
        """The client's headers as the upstream should see them (before the upstream's own key)."""
        connection_tokens = {
            token.strip().lower() for token in request.headers.get("Connection", "").split(",") if token
        }
        # A virtual key is the sidecar's, never the provider's: it does not leave the sidecar.
        strip_keys = call.admission is not None and call.admission.entry is not None
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_tokens or lower in ("host", "content-length"):
                continue
            if lower == "expect" and value.strip().lower() == "100-continue":
                # Met already: the whole body is here. Passed on, aiohttp would hold the body
                # back until the upstream says 100, and an upstream that never does hangs the call.
                continue
            if strip_keys and lower in ("authorization", "x-api-key"):
                continue
            headers.add(name, value)
        if settings.tracing:
            ids = tracecontext.start(
                request.headers.get("traceparent"), request.headers.get("tracestate"), settings.sample_ratio
            )
            call.ids = ids
            headers["traceparent"] = ids.traceparent()
        return headers

    # -- the upstream exchange --------------------------------------------------------------
    async def _exchange(
        self,
        call: _Call,
        route: Route,
        target: Target | None,
        suffix: str,
        headers: CIMultiDict[str],
        body: bytes,
        wants_usage: bool,
        last: bool,
    ) -> Response | None:
        """One attempt at ``route``. None when it failed in a way worth trying the next target
        (only when not ``last``, and only before anything was sent to the client)."""
        request = call.request
        provider = call.provider or "openai"
        gateway = self.gateway
        call.request_model = call.client_model
        if target is not None and target.model is not None and call.shape is not None:
            rewritten = rewrite_model(body, target.model)
            if rewritten is not None:
                body = rewritten
                call.request_model = recorded_text(target.model)
        strip_usage = False
        if call.stream and not wants_usage and route.config.inject_stream_usage and call.shape is not None:
            injected = call.shape.inject_stream_usage(body)
            if injected is not None:
                body = injected
                strip_usage = True
        key = route.api_key_header() if gateway is None else gateway.provider_key(route.config)
        if key is not None:
            if target is not None:
                headers = headers.copy()  # a fallback attempt may set another upstream's key header
            headers[key[0]] = key[1]
        call.upstream_called = True
        inflight = self._inflight.get(route.name)
        if inflight is None:
            inflight = self._inflight[route.name] = self.metrics.inflight.labels(route.name)
        inflight.value += 1
        LOAD.calls += 1
        t0 = perf_counter()
        model = target.model if target is not None else None
        recorded = False

        def attempted(outcome: str) -> None:
            # Recorded when the outcome is known (the answer's headers, or the failure), so the
            # call's record, built when it finishes, holds every attempt.
            nonlocal recorded
            recorded = True
            call.attempts.append(
                UpstreamAttempt(route.name, outcome, t0 - call.started, perf_counter() - t0, model)
            )
            if gateway is not None:
                gateway.record_attempt(call, route.name, outcome)

        def retry(outcome: str) -> bool:
            return not last and target is not None and target.retry_on(outcome)

        try:
            try:
                upstream = await self.client.request(
                    request.method, route.origin, suffix, headers.items(), body, route.timeout
                )
            except (TimeoutError, aiohttp.ServerTimeoutError):
                call.upstream_wait += perf_counter() - t0
                attempted("timeout")
                if retry("timeout"):
                    return None
                return self._reject(
                    call, 504, f"upstream {route.name} timed out", "upstream_timeout", "timeout"
                )
            except aiohttp.ClientError as exc:
                call.upstream_wait += perf_counter() - t0
                attempted("connect_error")
                log.warning("upstream %s unreachable: %s", route.name, type(exc).__name__)
                if retry("connect_error"):
                    return None
                return self._reject(
                    call,
                    502,
                    f"upstream {route.name} unreachable",
                    "upstream_unreachable",
                    "connect_error",
                    provider,
                )
            call.upstream_wait += perf_counter() - t0
            if upstream.status < 200:
                # Only a 101 gets here (aiohttp's client takes 100 and 103 itself). The sidecar never
                # asks for an upgrade (Upgrade is hop-by-hop), so relaying it would tell the client
                # that its connection switched protocols when it did not.
                upstream.close()
                attempted("5xx")
                log.warning("upstream %s answered %d to a plain request", route.name, upstream.status)
                return self._reject(
                    call,
                    502,
                    f"upstream {route.name} sent an invalid response",
                    "upstream_invalid_response",
                    "connect_error",
                    provider,
                )
            status = upstream.status
            outcome = (
                "success" if status < 400 else "429" if status == 429 else "5xx" if status >= 500 else "4xx"
            )
            attempted(outcome)
            if outcome in ("5xx", "429") and retry(outcome):
                upstream.close()  # nothing of it was sent: the next target answers instead
                return None
            try:
                return await self._relay(call, upstream, strip_usage)
            except _ClientGone as gone:
                # The client went away: stop reading the upstream (closing cancels its work).
                upstream.close()
                self._finish(call, ABORT_STATUS, "client_abort")
                return gone.response
            finally:
                upstream.release()
        finally:
            inflight.value -= 1
            LOAD.calls -= 1
            if not recorded:
                attempted("aborted")  # cancelled while waiting for the answer (client gone, shutdown)

    async def _relay(self, call: _Call, upstream: UpstreamResponse, strip_usage: bool) -> Response:
        request = call.request
        status = upstream.status
        call.status = status
        error_type = error_type_for_status(status)
        content_type = upstream.headers.get("Content-Type", "")
        encoding = upstream.headers.get("Content-Encoding", "")
        shape = call.shape
        is_sse = "text/event-stream" in content_type
        observer: StreamObserver | None = None
        json_copy: list[bytes] | None = None
        decoder: Decoder | None = None
        if shape is not None and status < 300:
            # Forwarded decoded (its usage chunk stripped), the stream is the client's answer and
            # is decoded whole, piece by piece; a copy read only for usage stops at the bound.
            forwarded_decoded = strip_usage and is_sse
            decoder = make_decoder(encoding, limit=sys.maxsize if forwarded_decoded else MAX_DECODED_BYTES)
            if decoder is not None:
                if is_sse:
                    observer = shape.stream_observer(strip_usage)
                    call.observer = observer
                else:
                    json_copy = []
        strip = strip_usage and observer is not None

        out_headers: CIMultiDict[str] = CIMultiDict()
        connection_tokens = {
            t.strip().lower() for t in upstream.headers.get("Connection", "").split(",") if t
        }
        for name, value in upstream.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_tokens:
                continue
            if strip and lower == "content-length":
                continue  # the body changes length: chunked instead
            if strip and lower == "content-encoding" and encoding.strip().lower() not in ("", "identity"):
                continue  # forwarded decoded, so it must not claim an encoding
            out_headers.add(name, value)
        response = Response(status, upstream.reason, out_headers)
        t = perf_counter()
        try:
            await response.prepare(request)
        except ConnectionError as exc:
            raise _ClientGone(response) from exc
        call.client_wait += perf_counter() - t

        copied = 0
        content = upstream.content
        try:
            while True:
                t = perf_counter()
                chunk = await content.readany()
                call.upstream_wait += perf_counter() - t
                if not chunk:
                    break
                if strip:
                    assert observer is not None and decoder is not None
                    for piece in decoder(chunk):
                        out = observer.feed(piece)
                        if out:
                            t = perf_counter()
                            await _write(response, out)
                            call.client_wait += perf_counter() - t
                else:
                    t = perf_counter()
                    if content.at_eof:
                        # The upstream's whole answer is here: its last piece and the end of the
                        # client's response go out in one write.
                        await _write(response, chunk, end=True)
                    else:
                        await _write(response, chunk)
                    call.client_wait += perf_counter() - t
                    try:
                        if observer is not None:
                            if decoder is identity_decoder:
                                observer.feed(chunk)
                            else:
                                assert decoder is not None
                                for piece in decoder(chunk):
                                    observer.feed(piece)
                        elif json_copy is not None and copied <= MAX_PARSE_BYTES:
                            assert decoder is not None
                            for piece in decoder(chunk):
                                copied += len(piece)
                                if copied > MAX_PARSE_BYTES:
                                    json_copy = None  # too large to parse: stop decoding at all
                                    break
                                json_copy.append(piece)
                    except zlib.error:
                        # A corrupt compressed body: the rest still reaches the client as sent;
                        # its usage cannot be read, and it counts as malformed.
                        log.warning(
                            "undecodable %s body from upstream on request %s", encoding, call.request_id
                        )
                        observer = call.observer = json_copy = None
                        call.info = UNPARSED_RESPONSE
                if call.ttft is None and observer is not None and observer.saw_content:
                    call.ttft = perf_counter() - call.started
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # The upstream broke off: end the client's response abruptly the same way, never cleanly.
            if strip and observer is not None:
                tail = observer.close()
                if tail:
                    await _write(response, tail)
            elif observer is not None:
                observer.close()
            call.info = observer.result() if observer is not None else None
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "stream_interrupted"
            self._finish(call, status, kind)
            if request.transport is not None:
                request.transport.close()
            return response
        except zlib.error:
            # Only a stream forwarded decoded (its usage chunk stripped) gets here: the client
            # has a decoded part and the rest cannot be decoded, so its response ends abruptly.
            log.warning("undecodable %s stream from upstream on request %s", encoding, call.request_id)
            call.info = observer.result() if observer is not None else None
            self._finish(call, status, "stream_interrupted")
            if request.transport is not None:
                request.transport.close()
            return response

        if observer is not None:
            tail = observer.close()
            if strip and tail:
                await _write(response, tail)
            call.info = observer.result()
            if error_type is None and not call.info.complete:
                error_type = "stream_interrupted"
        elif json_copy is not None and shape is not None and copied <= MAX_PARSE_BYTES:
            call.info = shape.parse_response(b"".join(json_copy))
        t = perf_counter()
        try:
            await response.write_eof()
        except ConnectionError as exc:
            raise _ClientGone(response) from exc
        call.client_wait += perf_counter() - t
        self._finish(call, status, error_type)
        return response

    # -- finishing -------------------------------------------------------------------------
    def _reject(
        self,
        call: _Call,
        status: int,
        message: str,
        code: str,
        error_type: str | None = None,
        provider: str | None = None,
    ) -> Response:
        body = error_body(provider or call.provider or "openai", status, message, code)
        self._finish(call, status, error_type)
        return Response(status, body=body, content_type="application/json")

    def _refuse_budget(self, call: _Call, breach: BudgetBreach) -> Response:
        """429 for a spent ``action: reject`` budget, in the shape the official SDKs do not retry."""
        call.throttled = "budget"
        provider = call.provider or "openai"
        message = breach.message()
        if provider == "anthropic":
            body = error_body("anthropic", 429, message, "budget_exceeded")
        else:
            payload = {
                "error": {
                    "message": message,
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            }
            body = json.dumps(payload).encode()
        self._finish(call, 429, "budget_exceeded")
        response = Response(429, body=body, content_type="application/json")
        response.headers["x-should-retry"] = "false"
        return response

    def _throttle(self, call: _Call, refusal: Refusal) -> Response:
        """The gateway's refusal (a rate limit, or the shared state being down with fail_closed)."""
        call.throttled = refusal.reason
        body = error_body(call.provider or "openai", refusal.status, refusal.message, refusal.code)
        self._finish(call, refusal.status, "throttled")
        response = Response(refusal.status, body=body, content_type="application/json")
        for name, value in refusal.headers:
            response.headers[name] = value
        return response

    def _finish(self, call: _Call, status: int, error_type: str | None) -> None:
        if call.finished:
            return
        call.finished = True
        now = perf_counter()
        duration = now - call.started
        info = call.info
        if info is None and call.observer is not None:
            call.observer.close()
            info = call.observer.result()
        usage = plausible(info.usage) if info is not None else Usage()
        route = call.route
        ids = call.ids
        record = CallRecord(
            request_id=call.request_id,
            started_at=call.started_wall,
            finished_at=call.started_wall + duration,
            tenant=call.tenant,
            upstream=route.name if route else "",
            provider=call.provider,
            operation=call.shape.operation if call.shape else "other",
            method=call.request.method,
            path=call.request.raw_path,
            stream=call.stream,
            status=status,
            error_type=error_type,
            request_model=call.request_model,
            response_model=recorded_text(info.model) if info is not None else None,
            duration_s=duration,
            ttft_s=call.ttft,
            overhead_s=max(0.0, duration - call.upstream_wait - call.client_wait),
            usage=usage,
            response_id=recorded_text(info.response_id) if info is not None else None,
            finish_reasons=tuple(recorded_text(r) or "" for r in info.finish_reasons) if info else (),
            service_tier=recorded_text(info.service_tier) if info is not None else None,
            malformed=info.malformed if info is not None else False,
            throttled=call.throttled,
            route=call.route_name,
            variant=call.variant,
            attempts=tuple(call.attempts),
            events=tuple(call.events),
            server_address=route.host if route else "",
            server_port=route.port if route else 0,
            trace_id=ids.trace_id if ids else None,
            span_id=ids.span_id if ids else None,
            parent_span_id=ids.parent_span_id if ids else None,
            trace_sampled=ids.sampled if ids else False,
            tracestate=ids.tracestate if ids else None,
            content=self._captured(call, info),
        )
        if call.admission is not None and self.gateway is not None:
            self.gateway.settle(call.admission, usage)
        self.pipeline.submit(record, self._estimate_request(call, status, error_type, usage, info))

    def _captured(self, call: _Call, info: ResponseInfo | None) -> CapturedContent | None:
        """Prompt and completion for the span: only with capture on and the call's trace sampled.

        No copy and no parsing here: the body bytes and the text are shared as they are;
        the tracing sink redacts and truncates them off the event loop.
        """
        if not self.settings.capture_content or call.ids is None or not call.ids.sampled:
            return None
        if call.shape is None or call.shape.operation == "embeddings" or not call.body:
            return None
        return CapturedContent(call.body, info.output_text if info is not None else "")

    @staticmethod
    def _estimate_request(
        call: _Call, status: int, error_type: str | None, usage: Usage, info: ResponseInfo | None
    ) -> EstimateRequest | None:
        """What to count locally: only for calls the upstream served (or began to) without usage."""
        shape = call.shape
        if shape is None or not call.upstream_called:
            return None
        served = (status < 300 and call.status and call.status < 300) or error_type == "client_abort"
        if not served:
            return None
        need_input = usage.input is None
        need_output = usage.output is None and shape.operation != "embeddings"
        if not (need_input or need_output):
            return None
        return EstimateRequest(
            shape=shape,
            request_body=call.body if need_input else None,
            output_text=(info.text if info is not None else "") if need_output else None,
        )
