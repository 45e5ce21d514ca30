"""The sidecar process: proxy listener, admin listener, pipeline and sinks, and their lifecycle.

:class:`Sidecar` wires the parts together from a :class:`~sidecar.config.Config`:
one shared upstream ``ClientSession`` (no cookie jar: clients never share cookies,
no decompression: bodies pass byte for byte), the :class:`~sidecar.proxy.Proxy`
handler on the proxy port, ``/metrics``, ``/healthz`` and ``/readyz`` on the separate
admin port, and the :class:`~sidecar.pipeline.Pipeline` feeding the sinks.

Stopping drains: the proxy port stops accepting, in-flight calls (streams included)
get up to ``shutdown.drain_timeout`` to finish, then the sinks are flushed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from sidecar import config as config_mod
from sidecar import pricing
from sidecar.alerting import AlertingSettings, AlertingSink
from sidecar.calllog import CallLogSink, LogSettings
from sidecar.config import Config
from sidecar.errors import ConfigError, Problem
from sidecar.gateway.budgets import SharedBudgets, SharedSpendSink
from sidecar.gateway.control import Gateway
from sidecar.http_server import HttpServer
from sidecar.ledger import Ledger, LedgerSettings
from sidecar.metrics import Metrics, MetricsSink
from sidecar.pipeline import Pipeline
from sidecar.providers import Shape
from sidecar.proxy import Proxy, ProxySettings
from sidecar.rules.state import Transition
from sidecar.sinks import Sink
from sidecar.threads import mark_loop_thread
from sidecar.tokens import Estimator
from sidecar.tracing import TracingSection, TracingSink, resolve_tracing
from sidecar.upstream_client import UpstreamClient
from sidecar.usagelogs import UsageLogsSink, resolve_usage_logs
from sidecar.yamlspec import Reader, locate

log = logging.getLogger("sidecar.app")


class _OneLineParserErrors(logging.Filter):
    """Requests aiohttp's HTTP parser refused (answered 400), and malformed bodies it met while
    discarding what a handler left unread: one line each, no traceback.

    aiohttp logs each with a traceback at ERROR; a malformed request costs a client a few
    bytes, so any client could fill the log with them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            exc = exc.__cause__
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())[:200]
            record.args = (record.getMessage(), exc.code, reason)
            record.msg = "%s: refused with %d (%s)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: The listeners' server log (aiohttp's, with parser errors on one line).
HTTP_LOG = logging.getLogger("sidecar.http")
HTTP_LOG.addFilter(_OneLineParserErrors())

#: The longest history read back from the ledger at start to refill rule windows.
REFILL_MAX_SECONDS = 31 * 86400.0
SIDECAR_KEY: web.AppKey[Sidecar] = web.AppKey("sidecar")


def load_prices(config: Config) -> pricing.PriceTable:
    """The price table named by the config, or the packaged default catalogue."""
    if config.pricing.file:
        return pricing.load_file(config.pricing.file)
    return pricing.default_table()


class Sidecar:
    """One running sidecar: build with a config, then :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        extra_sinks: list[Sink] | None = None,
        reload_config: Callable[[], Config] | None = None,
        alerting: AlertingSettings | None = None,
        alerting_for: Callable[[Config], AlertingSettings] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, max_tenants=config.tenants.max_distinct)
        self.prices: pricing.PriceTable | None = None  # loaded in start(), off the event loop
        self.estimator = Estimator()
        self.tracing, warnings = resolve_tracing(config.tracing or TracingSection(), os.environ)
        for warning in warnings:
            log.warning("tracing: %s", warning)
        ledger_settings = config.ledger or LedgerSettings()
        self.ledger = Ledger(ledger_settings, config.data_dir, registry=self.registry)
        #: ``ledger.enabled: false``: no ledger (a benchmark, a node whose fleet keeps usage
        #: through usage logs); budgets and SLO windows then start empty after a restart.
        self.ledger_enabled = ledger_settings.enabled
        self.sinks: list[Sink] = [MetricsSink(self.metrics, maxsize=config.sinks.queue_size)]
        if self.ledger_enabled:
            self.sinks.append(self.ledger)
        if self.tracing.enabled:
            self.sinks.append(TracingSink(self.tracing, registry=self.registry))
        self.usage_logs, warnings = resolve_usage_logs(
            config.usage_logs, os.environ, self.tracing.service_name, self.tracing.resource_attributes
        )
        for warning in warnings:
            log.warning("usage logs: %s", warning)
        if self.usage_logs.enabled:
            self.sinks.append(UsageLogsSink(self.usage_logs, registry=self.registry))
        logs = config.logs or LogSettings()
        if logs.enabled:
            self.sinks.append(CallLogSink(logs, registry=self.registry))
        # A fleet's reject budgets: every replica's spend summed in Redis (see gateway.budgets).
        self.shared_spend: SharedSpendSink | None = None
        if config.state is not None and config.state.url:
            self.shared_spend = SharedSpendSink(maxsize=config.sinks.queue_size)
            self.sinks.append(self.shared_spend)
        self.sinks.extend(extra_sinks or [])
        self._reload_config = reload_config
        self.alerting_settings = alerting
        self._alerting_for = alerting_for
        self.alerting: AlertingSink | None = None
        self.pipeline: Pipeline | None = None
        self.proxy: Proxy | None = None
        self.gateway: Gateway | None = None
        self.client: UpstreamClient | None = None
        self._proxy_server: HttpServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self.proxy_port = 0
        self.admin_port = 0
        self.ready = False
        self.admin_token: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task[None]] = set()

    @staticmethod
    def _read_admin_token(config: Config) -> str | None:
        if not config.admin.token_file:
            return None
        try:
            token = Path(config.admin.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                [_problem_at(config, "admin.token_file", f"cannot read: {exc.strerror}")]
            ) from None
        return token or None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind both listeners and start the pipeline."""
        self._loop = asyncio.get_running_loop()
        mark_loop_thread()  # background threads yield the core when this thread waits for it
        self.prices = await asyncio.to_thread(load_prices, self.config)
        self.admin_token = await asyncio.to_thread(self._read_admin_token, self.config)
        if self.alerting_settings is not None and self.alerting_settings.rule_files:
            self.alerting = await asyncio.to_thread(
                AlertingSink.create, self.alerting_settings, self.registry, self.config.data_dir
            )
            self.alerting.on_reload_failure = self._count_reload_failures
            self.sinks.insert(2, self.alerting)
        self.client = UpstreamClient()
        self.pipeline = Pipeline(self.sinks, self.metrics, self.prices, self.estimator)
        await self.pipeline.start()  # the ledger replays its journal here
        if self.alerting is not None:
            await self._refill_rule_windows(self.alerting)
        self.proxy = Proxy(self._proxy_settings(self.config), self.client, self.pipeline, self.metrics)
        self.proxy.body_read_timeout = self.config.limits.body_read_timeout
        if self.alerting is not None:
            self.proxy.budget_breach = self.alerting.budget_breach
        await self._start_gateway(self.config)

        # Every request goes to the proxy, whatever its target looks like (authority-form
        # CONNECT targets included), so each one is answered in the provider's shape and counted.
        self._proxy_server = HttpServer(self.proxy.handle, HTTP_LOG)
        host, port = self.config.listen
        self.proxy_port = await self._proxy_server.start(host, port)

        admin_app = web.Application()
        admin_app[SIDECAR_KEY] = self
        expect = _expect_continue  # not aiohttp's, which fails with a 500 on a value that is not UTF-8
        admin_app.router.add_get("/metrics", self._metrics, expect_handler=expect)
        admin_app.router.add_get("/healthz", self._healthz, expect_handler=expect)
        admin_app.router.add_get("/readyz", self._readyz, expect_handler=expect)
        admin_app.router.add_post("/-/reload", self._reload_endpoint, expect_handler=expect)
        admin_app.router.add_post("/incidents/{id}/ack", self._ack_endpoint, expect_handler=expect)
        admin_app.router.add_post("/routes/{name}/promote", self._promote_endpoint, expect_handler=expect)
        admin_app.router.add_post("/routes/{name}/rollback", self._rollback_endpoint, expect_handler=expect)
        admin_app.router.add_get("/routes", self._routes_endpoint, expect_handler=expect)
        self._admin_runner = web.AppRunner(admin_app, access_log=None, logger=HTTP_LOG)
        await self._admin_runner.setup()
        admin_host, admin_port = self.config.admin.listen
        await web.TCPSite(self._admin_runner, admin_host, admin_port, reuse_address=True).start()
        self.admin_port = _bound_port(self._admin_runner)
        self.ready = True
        log.info(
            "sidecar listening on %s:%d (admin %s:%d), upstreams: %s",
            host,
            self.proxy_port,
            admin_host,
            self.admin_port,
            ", ".join(f"{u.name} at {u.mount}" for u in self.config.upstreams),
        )

    async def stop(self) -> None:
        """Drain in-flight calls, flush the sinks and close everything."""
        self.ready = False
        if self.proxy is not None:
            self.proxy.draining = True
        if self._proxy_server is not None:
            # Stops accepting, waits for in-flight calls, then cancels what is left.
            await self._proxy_server.shutdown(self.config.shutdown.drain_timeout)
            self._proxy_server = None
        if self.pipeline is not None:
            await self.pipeline.stop(timeout=max(1.0, self.config.shutdown.drain_timeout))
        if self.gateway is not None:
            await self.gateway.stop()
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None

    async def _start_gateway(self, config: Config, *, reloading: bool = False) -> None:
        """Keys, limits, routes, breakers and canaries, when any of their sections is configured.

        On a reload that adds the first gateway section, the proxy consults the gateway at
        once: until its keys file is read, calls get 401, never an unauthenticated pass.
        """
        if self.gateway is not None or self.proxy is None:
            return
        gateway = Gateway(config, self.metrics)
        if not gateway.active:
            return
        estimator = self.estimator

        def prompt_tokens(shape: Shape, body: bytes, model: str | None) -> int:
            return estimator.estimate(model, shape.prompt_text(body), None).input or 0

        gateway.estimator = prompt_tokens
        if reloading:
            self.gateway = gateway
            self.proxy.gateway = gateway
        await gateway.start(config.data_dir, strict=not reloading)
        alerting = self.alerting
        if alerting is not None:
            gateway.notify = alerting.notify_event

            def on_transition(t: Transition) -> None:
                if t.status == "firing" and t.rule in gateway.rollback_rules:
                    rule = next((r for r in alerting.engine.rules if r.name == t.rule), None)
                    threshold = getattr(rule, "threshold", None)
                    gateway.on_alert(
                        t.rule, t.value, threshold if isinstance(threshold, int | float) else None
                    )

            alerting.on_transition = on_transition
            if gateway.shared is not None and self.shared_spend is not None:
                budgets = SharedBudgets(gateway.shared, lambda: alerting.engine.rules.rules)
                self.shared_spend.budgets = budgets
                gateway.shared_budgets = budgets
            alerting.engine.attempt_rules = frozenset(gateway.rollback_rules)
        self.gateway = gateway
        self.proxy.gateway = gateway

    async def _refill_rule_windows(self, alerting: AlertingSink) -> None:
        """Refill the rule windows from the ledger, so a restart does not reset budgets and SLOs."""
        horizon = alerting.horizon()
        if horizon <= 0:
            return
        since = time.time() - min(horizon, REFILL_MAX_SECONDS)
        if not self.ledger_enabled:
            return
        try:
            records = await self.ledger.recent(since)
        except Exception:
            log.exception("could not read the ledger to refill the rule windows; they start empty")
            return
        filed = alerting.refill(records)
        log.info("rule windows refilled with %d calls from the ledger", filed)

    def _proxy_settings(self, config: Config) -> ProxySettings:
        return ProxySettings.from_config(
            config,
            tracing=self.tracing.enabled,
            sample_ratio=self.tracing.sample_ratio,
            capture_content=self.tracing.enabled and self.tracing.capture_content,
        )

    # -- reload ---------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config and price table; keep the last good ones on any error."""
        if self._reload_config is None:
            return False
        source = self.config_path or "config"
        try:
            new_config = self._reload_config()
        except ConfigError as exc:
            files = {p.file for p in exc.problems} or {source}
            for file in files:
                self.metrics.reload_failures.labels(file).inc()
            log.error("config reload rejected, keeping the running config:\n%s", exc)
            return False
        try:
            new_prices = load_prices(new_config)
        except ConfigError as exc:
            self.metrics.reload_failures.labels(new_config.pricing.file or "prices").inc()
            log.error("price table reload rejected, keeping the running config:\n%s", exc)
            return False
        if self.alerting is not None:
            rule_files = self._alerting_for(new_config).rule_files if self._alerting_for else None
            if self.alerting.reload(rule_files):
                return False  # counted and logged through on_reload_failure; last good rules keep running
        if new_config.listen != self.config.listen or new_config.admin.listen != self.config.admin.listen:
            log.warning("listen addresses changed in the config: they take effect on restart only")
        self.config = new_config
        self.prices = new_prices
        if self.pipeline is not None:
            self.pipeline.prices = new_prices
        if self.proxy is not None:
            self.proxy.settings = self._proxy_settings(new_config)
            self.proxy.body_read_timeout = new_config.limits.body_read_timeout
        self._reconfigure_gateway(new_config)
        log.info("config reloaded from %s (price table %s)", source, new_prices.version)
        return True

    def _reconfigure_gateway(self, config: Config) -> None:
        """Hand the gateway its new config on the event loop (reload runs in a thread)."""
        loop = self._loop
        if loop is None:
            return

        def apply() -> None:
            if self.gateway is not None:
                self.gateway.reconfigure(config)
                if self.alerting is not None:
                    self.alerting.engine.attempt_rules = frozenset(self.gateway.rollback_rules)
            else:
                task = loop.create_task(self._start_gateway(config, reloading=True))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

        loop.call_soon_threadsafe(apply)

    def _count_reload_failures(self, problems: list[Problem]) -> None:
        for file in {p.file for p in problems} or {"rules"}:
            self.metrics.reload_failures.labels(file).inc()

    # -- admin endpoints ------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        if self.admin_token is None:
            return False  # state-changing endpoints are off without a token
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode())

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.config.admin.metrics_require_token and not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "not ready", "reason": "starting or draining"}, status=503)
        if self.ledger_enabled and not self.ledger.healthy():
            reason = self.ledger.status().reason
            return web.json_response({"status": "not ready", "reason": f"ledger: {reason}"}, status=503)
        return web.json_response({"status": "ready"})

    async def _ack_endpoint(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.alerting is None:
            return web.json_response({"error": "no alert rules are loaded"}, status=404)
        incident = request.match_info["id"]
        by = request.query.get("by") or request.headers.get("X-Acked-By") or "admin"
        if not self.alerting.ack(incident, by=by[:128]):
            return web.json_response({"error": f"unknown incident {incident[:64]}"}, status=404)
        return web.json_response({"acknowledged": incident, "by": by[:128]})

    async def _routes_endpoint(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        gateway = self.gateway
        if gateway is None:
            return web.json_response({"routes": []})
        return web.json_response({"routes": gateway.describe_routes()})

    async def _promote_endpoint(self, request: web.Request) -> web.Response:
        return self._canary_endpoint(request, promote=True)

    async def _rollback_endpoint(self, request: web.Request) -> web.Response:
        return self._canary_endpoint(request, promote=False)

    def _canary_endpoint(self, request: web.Request, *, promote: bool) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        name = request.match_info["name"][:128]
        gateway = self.gateway
        spec = None
        if gateway is not None:
            if promote:
                spec = gateway.promote(name)
            else:
                by = (request.query.get("by") or request.headers.get("X-Acked-By") or "admin")[:128]
                log.warning("canary of route %s rolled back by hand (%s)", name, by)
                spec = gateway.rollback(name, "manual", None, None, "admin")
        if spec is None:
            return web.json_response({"error": f"no route with a canary is called {name}"}, status=404)
        assert gateway is not None
        return web.json_response(gateway.describe_route(spec))

    async def _reload_endpoint(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        ok = await asyncio.to_thread(self.reload)
        return web.json_response({"reloaded": ok}, status=200 if ok else 422)


async def _expect_continue(request: web.BaseRequest) -> None:
    """``Expect: 100-continue`` gets its interim ``100``; any other expectation goes upstream as sent.

    aiohttp's own handler answers other values with a 417 that echoes them, and fails with a
    500 and a traceback on one that is not UTF-8.
    """
    if (
        request.version == aiohttp.HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response's start


def _problem_at(config: Config, field: str, message: str) -> Problem:
    """A problem found after parsing, located at ``field`` in the config file (1:1 when the
    file cannot be read again or has no such key: a flag set it)."""
    line = column = 1
    if config.source and not config.source.startswith("<"):
        try:
            text = Path(config.source).read_text(encoding="utf-8")
            reader = Reader(config.source)
            node = locate(reader.compose(text), field)
        except (OSError, ConfigError, UnicodeDecodeError):
            node = None
        if node is not None:
            line, column = node.start_mark.line + 1, node.start_mark.column + 1
    return Problem(config.source, line, column, field, message)


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0


def config_reloader(path: str) -> Callable[[], Config]:
    """A function that re-reads the config file at ``path``."""
    return lambda: config_mod.load_file(path)
