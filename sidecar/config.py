"""The sidecar's configuration file (``version: sidecar/v1``): spec → model → validation.

Reading goes in three steps (see :mod:`sidecar.yamlspec`): the ``version`` key is
checked first (any other value stops there: the rest of the schema is unknown);
each top-level section is then mapped onto a frozen dataclass with defaults
merged, unknown keys and type errors recorded with their line and column; finally
:func:`validate` checks the model (ranges, unique names, cross-field rules) and
each of its findings is mapped back to the file. Every problem is reported at
once in one :class:`~sidecar.errors.ConfigError`.

Example::

    version: sidecar/v1
    listen: 127.0.0.1:8080
    admin: {listen: 127.0.0.1:9464, token_file: /run/secrets/admin-token, metrics_require_token: false}
    upstreams:
      - name: openai
        url: https://api.openai.com
        provider: openai
        mount: /
        inject_stream_usage: true
        api_key: {header: authorization, scheme: Bearer, from_env: OPENAI_API_KEY}
        timeouts: {connect: 5s, first_byte: 120s, total: 600s}
        tls: {ca_file: /path/ca.pem, verify: true}
      - {name: anthropic, url: https://api.anthropic.com, provider: anthropic, mount: /anthropic}
    tenants: {header: x-tenant-id, required: false, max_distinct: 1000, max_length: 128}
    pricing: {file: prices.yaml}
    limits: {max_body_bytes: 33554432}
    shutdown: {drain_timeout: 30s}
    data_dir: ./sidecar-data
    sinks: {queue_size: 10000}

Keys, with their defaults (durations are Prometheus strings such as ``30s``,
``1h30m``, ``500ms``, or a bare number of seconds)::

    version                                required; must be sidecar/v1 (checked first)
    listen = 127.0.0.1:8080                proxy address: host:port or [v6addr]:port (port 0: any free)
    admin.listen = 127.0.0.1:9464          admin and metrics address; must differ from listen
    admin.token_file = none                file holding the admin bearer token
    admin.metrics_require_token = false    /metrics needs the token too (requires token_file)
    upstreams                              required: a list of at least one; names and mounts unique
    upstreams[].name                       required; [a-z0-9][a-z0-9_-]*; the upstream's label
    upstreams[].url                        required; http or https with a host; a path is allowed
                                           (https://host/openai); no query, fragment or credentials
    upstreams[].provider = none            openai | anthropic; none: detected from each call's path
    upstreams[].mount = /                  path prefix routed to this upstream; must start with /;
                                           kept without a trailing /
    upstreams[].inject_stream_usage = true ask OpenAI streams for their final usage chunk
    upstreams[].api_key = none             key the sidecar injects (none: the client's is passed on)
      .header = authorization              header to set (x-api-key when provider is anthropic)
      .scheme = Bearer                     prefix before the key when header is authorization,
                                           else none; "" for none
      .from_env / .from_file               where the key is read from: exactly one of the two
    upstreams[].timeouts.connect = 5s      connecting (TCP and TLS); > 0 and <= total
    upstreams[].timeouts.first_byte = 120s until the response headers; > 0 and <= total
    upstreams[].timeouts.total = 600s      the whole call, streaming included; > 0
    upstreams[].tls.ca_file = none         CA bundle (PEM) trusted instead of the system's CAs
    upstreams[].tls.verify = true          verify the upstream's certificate
    tenants.header = x-tenant-id           request header naming the tenant
    tenants.required = false               reject calls without the header
    tenants.max_distinct = 1000            distinct tenants tracked (bounds label cardinality); >= 1
    tenants.max_length = 128               longest tenant value accepted; >= 1
    pricing.file = none                    price table (see sidecar.pricing); none: the packaged one
    limits.max_body_bytes = 33554432       largest request body accepted (32 MiB); >= 1
    limits.body_read_timeout = 60s         longest wait for the next piece of a request body (408); > 0
    shutdown.drain_timeout = 30s           how long calls in flight may finish at shutdown; >= 0
    data_dir = sidecar-data                directory for the ledger and other state
    sinks.queue_size = 10000               bound of each sink's queue (records past it are dropped)

Gateway control, each off when absent (their parsers live with their modules in
:mod:`sidecar.gateway`; README "Gateway control" has every key)::

    keys                                   virtual keys: {file, entries, rotation_overlap, reload_interval}
    rate_limits                            {default_max_tokens, tenant, tenants, models}: rpm tpm concurrency
    state                                  shared counters: {url, on_error, prefix, timeout, retry_interval}
    circuit_breakers                       {consecutive_failures, error_ratio, window, min_calls, cooldown}
    routes                                 [{name, match, targets, retry, canary, breaker}]

Relative paths written in the file (``pricing.file``, ``admin.token_file``,
``api_key.from_file``, ``tls.ca_file``, ``data_dir``) resolve against the config
file's directory; the defaults and command-line flags stay relative to the working
directory. ``${VAR}`` and ``${VAR:-default}`` are replaced in scalar values (see
:mod:`sidecar.yamlspec`).

Adding a top-level section: write one ``_parse_<name>(reader, node, path, ctx)``
function (here, or with its adapter and named through ``_lazy(module, function)``), add
one entry to :data:`SECTIONS`, and a field of the same name on :class:`Config`; a
model-level check is one more function in :data:`CHECKS`.

Pure module except :func:`load_file` (which reads the file); it may import
:mod:`sidecar.yamlspec` (hence PyYAML's node types), :mod:`sidecar.durations`,
:mod:`sidecar.errors` and the standard library only.
"""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from yaml.nodes import MappingNode, Node

from sidecar.durations import format_duration
from sidecar.errors import ConfigError, Problem
from sidecar.yamlspec import Reader, describe, index, join, locate

if TYPE_CHECKING:  # the sections of the sinks live with their adapters, imported when used
    from sidecar.alerting import NotifyConfig, RulesConfig
    from sidecar.calllog import LogSettings
    from sidecar.gateway.breaker import BreakerSettings
    from sidecar.gateway.keys import KeysConfig
    from sidecar.gateway.ratelimit import RateLimitsConfig
    from sidecar.gateway.routes import RouteSpec
    from sidecar.gateway.sharedstate import StateConfig
    from sidecar.ledger import LedgerSettings
    from sidecar.tracing import TracingSection
    from sidecar.usagelogs import UsageLogsSection

__all__ = [
    "CHECKS",
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_LISTEN",
    "PROVIDERS",
    "SECTIONS",
    "VERSION",
    "AdminConfig",
    "ApiKeyConfig",
    "Config",
    "HostPort",
    "LimitsConfig",
    "ParseContext",
    "PricingConfig",
    "Section",
    "ShutdownConfig",
    "SinksConfig",
    "TenantsConfig",
    "Timeouts",
    "TlsConfig",
    "UpstreamConfig",
    "default_config",
    "load",
    "load_file",
    "parse_listen",
    "parse_upstream_url",
    "validate",
]

#: Fields whose values may be secrets: a problem found there never quotes the value.
SECRET_FIELDS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        r"upstreams\[\d+\]\.api_key",
        r"tracing\.headers",
        r"usage_logs\.headers",
        r"state$",  # state.url itself is quoted with its password masked (sharedstate.redacted_url)
        r"notify\.channels",
        r"keys\.entries\[\d+\]\.sha256",
    )
)

#: The only config version this sidecar reads.
VERSION = "sidecar/v1"
#: Provider shapes an upstream may declare.
PROVIDERS: tuple[str, ...] = ("openai", "anthropic")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]+")
_FLAGS = "<flags>"


# -- model ----------------------------------------------------------------------


class HostPort(NamedTuple):
    """A listen address; ``str()`` gives ``host:port`` (``[::1]:8080`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: Default proxy and admin addresses.
DEFAULT_LISTEN = HostPort("127.0.0.1", 8080)
DEFAULT_ADMIN_LISTEN = HostPort("127.0.0.1", 9464)


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener: metrics, health and the admin API."""

    listen: HostPort = DEFAULT_ADMIN_LISTEN
    token_file: Path | None = None
    metrics_require_token: bool = False


@dataclass(frozen=True)
class ApiKeyConfig:
    """An upstream key the sidecar injects, read from an environment variable or a file."""

    header: str = "authorization"
    scheme: str | None = "Bearer"
    from_env: str | None = None
    from_file: Path | None = None

    def header_for(self, value: str | None) -> tuple[str, str] | None:
        """The header to set for the key ``value`` (None when there is no key to set)."""
        if not value:
            return None
        return self.header, f"{self.scheme} {value}" if self.scheme else value


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds."""

    connect: float = 5.0
    first_byte: float = 120.0
    total: float = 600.0


@dataclass(frozen=True)
class TlsConfig:
    """TLS towards one upstream."""

    ca_file: Path | None = None
    verify: bool = True


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream API, reached under ``mount``."""

    name: str
    url: str
    provider: str | None = None
    mount: str = "/"
    inject_stream_usage: bool = True
    api_key: ApiKeyConfig | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class TenantsConfig:
    """How a call's tenant is read and bounded."""

    header: str = "x-tenant-id"
    required: bool = False
    max_distinct: int = 1000
    max_length: int = 128


@dataclass(frozen=True)
class PricingConfig:
    """Where prices come from; ``file=None`` means the packaged catalogue."""

    file: Path | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits."""

    max_body_bytes: int = 32 * 1024 * 1024
    body_read_timeout: float = 60.0


@dataclass(frozen=True)
class ShutdownConfig:
    """Graceful shutdown."""

    drain_timeout: float = 30.0


@dataclass(frozen=True)
class SinksConfig:
    """The record pipeline's sinks."""

    queue_size: int = 10_000


@dataclass(frozen=True)
class Config:
    """The whole sidecar configuration; ``source`` is the file it was read from ("" if none)."""

    version: str = VERSION
    listen: HostPort = DEFAULT_LISTEN
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    data_dir: Path = Path("sidecar-data")
    sinks: SinksConfig = field(default_factory=SinksConfig)
    # Sections owned by the sink adapters (None: not in the file, the adapter's defaults apply).
    tracing: TracingSection | None = None
    logs: LogSettings | None = None
    ledger: LedgerSettings | None = None
    usage_logs: UsageLogsSection | None = None
    rules: RulesConfig | None = None
    notify: NotifyConfig | None = None
    # Gateway control (issue 6), each off when absent.
    keys: KeysConfig | None = None
    rate_limits: RateLimitsConfig | None = None
    state: StateConfig | None = None
    routes: tuple[RouteSpec, ...] = ()
    circuit_breakers: BreakerSettings | None = None
    source: str = ""

    def with_overrides(
        self,
        *,
        listen: str | None = None,
        admin_listen: str | None = None,
        upstream_url: str | None = None,
        pricing_file: str | Path | None = None,
        data_dir: str | Path | None = None,
        extra_upstreams: Iterable[tuple[str, str, str | None, str]] = (),
    ) -> Config:
        """This config with command-line flags applied (flags win over the file).

        ``upstream_url`` replaces the whole upstream list with one upstream named
        ``default`` mounted at ``/`` with no declared provider. ``extra_upstreams``
        are ``(name, url, provider, mount)`` tuples appended after that (the demo
        uses them). Paths given here are relative to the working directory. Raises
        :class:`ConfigError` (file ``<flags>``) for a malformed flag or a result
        that fails :func:`validate` (so at least one upstream must be set by then).
        """
        problems: list[Problem] = []

        def parsed(flag: str, text: str, parse: Callable[[str], object]) -> object:
            try:
                return parse(text)
            except ValueError as exc:
                problems.append(Problem(_FLAGS, 0, 0, flag, f'invalid value "{text}": {exc}'))
                return None

        changes: dict[str, Any] = {}
        if listen is not None:
            changes["listen"] = parsed("--listen", listen, parse_listen)
        if admin_listen is not None:
            address = parsed("--admin-listen", admin_listen, parse_listen)
            if isinstance(address, HostPort):
                changes["admin"] = dataclasses.replace(self.admin, listen=address)
        upstreams = list(self.upstreams)
        if upstream_url is not None:
            url = parsed("--upstream", upstream_url, parse_upstream_url)
            if isinstance(url, str):
                upstreams = [UpstreamConfig(name="default", url=url)]
        for name, extra_url, provider, mount in extra_upstreams:
            url, mount_path = parsed(name, extra_url, parse_upstream_url), parsed(name, mount, _mount)
            if provider is not None and provider not in PROVIDERS:
                problems.append(Problem(_FLAGS, 0, 0, name, f'unknown provider "{provider}"'))
            if isinstance(url, str) and isinstance(mount_path, str):
                upstreams.append(UpstreamConfig(name=name, url=url, provider=provider, mount=mount_path))
        changes["upstreams"] = tuple(upstreams)
        if pricing_file is not None:
            changes["pricing"] = PricingConfig(file=Path(pricing_file))
        if data_dir is not None:
            changes["data_dir"] = Path(data_dir)
        if problems:
            raise ConfigError(problems)
        result = dataclasses.replace(self, **changes)
        findings = validate(result)
        if findings:
            raise ConfigError([Problem(_FLAGS, 0, 0, path, message) for path, message in findings])
        return result


# -- values shared by the file and the flags --------------------------------------


def parse_listen(text: str) -> HostPort:
    """Parse ``host:port`` or ``[v6addr]:port``; raises :class:`ValueError`.

    Port 0 is accepted: the system then picks a free port (tests and the demo use it).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError("expected [address]:port, e.g. [::1]:8080")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing port: expected host:port, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets, e.g. [::1]:8080")
        if not host:
            raise ValueError("missing host: use 0.0.0.0:PORT to listen on every interface")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or IPv4 address")
    if not _PORT.fullmatch(port_text):
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return HostPort(host, port)


def parse_upstream_url(text: str) -> str:
    """Check an upstream base URL and return it without a trailing ``/``; raises :class:`ValueError`.

    ``http`` or ``https`` with a host; a path is allowed; credentials, a query or a
    fragment are not.
    """
    if any(c.isspace() for c in text):
        raise ValueError("must not contain spaces")
    parts = urlsplit(text)
    if not parts.scheme:
        raise ValueError("missing scheme: expected http://host or https://host")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r} is not supported (http or https only)")
    if not parts.hostname:
        raise ValueError("missing host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not allowed (use api_key)")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("a query or fragment is not allowed")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"invalid port ({exc})") from None
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _mount(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError('must start with "/"')
    if any(c.isspace() or c in "?#" for c in text):
        raise ValueError("must be a plain path (no spaces, query or fragment)")
    return text.rstrip("/") or "/"


def _header(text: str) -> str:
    if not _HEADER.fullmatch(text):
        raise ValueError("not a valid header name")
    return text.lower()


# -- spec: one parser per section -------------------------------------------------


@dataclass(frozen=True)
class ParseContext:
    """What a section parser needs besides its node: the directory relative paths start from."""

    base_dir: PurePath | None

    def path(self, text: str) -> Path:
        """A path written in the file, relative to the file's directory."""
        path = Path(text)
        if self.base_dir is None or path.is_absolute():
            return path
        return Path(self.base_dir, path)


def _path(r: Reader, node: Node | None, path: str, ctx: ParseContext) -> Path | None:
    text = r.string(node, path)
    return ctx.path(text) if text is not None else None


def _parse_listen(r: Reader, node: Node, path: str, ctx: ParseContext) -> HostPort:
    return r.convert(node, path, parse_listen, Config.listen, what="address")


def _parse_admin(r: Reader, node: Node, path: str, ctx: ParseContext) -> AdminConfig:
    m = r.mapping(node, path, ("listen", "token_file", "metrics_require_token"))
    if m is None:
        return AdminConfig()
    d = AdminConfig()
    return AdminConfig(
        listen=r.convert(m.get("listen"), join(path, "listen"), parse_listen, d.listen, what="address"),
        token_file=_path(r, m.get("token_file"), join(path, "token_file"), ctx),
        metrics_require_token=r.boolean(
            m.get("metrics_require_token"), join(path, "metrics_require_token"), d.metrics_require_token
        ),
    )


def _parse_api_key(r: Reader, node: Node, path: str, ctx: ParseContext, provider: str | None) -> ApiKeyConfig:
    m = r.mapping(node, path, ("header", "scheme", "from_env", "from_file"))
    if m is None:
        return ApiKeyConfig()
    default_header = "x-api-key" if provider == "anthropic" else "authorization"
    header = r.convert(m.get("header"), join(path, "header"), _header, default_header, what="header")
    scheme_default = "Bearer" if header == "authorization" else None
    scheme = r.string(m.get("scheme"), join(path, "scheme"), scheme_default, allow_empty=True)
    return ApiKeyConfig(
        header=header,
        scheme=scheme or None,
        from_env=r.string(
            m.get("from_env"),
            join(path, "from_env"),
            pattern=_ENV_NAME,
            pattern_hint="not an environment variable name",
        ),
        from_file=_path(r, m.get("from_file"), join(path, "from_file"), ctx),
    )


def _parse_timeouts(r: Reader, node: Node, path: str) -> Timeouts:
    m = r.mapping(node, path, ("connect", "first_byte", "total"))
    d = Timeouts()
    if m is None:
        return d
    return Timeouts(
        connect=r.duration(m.get("connect"), join(path, "connect"), d.connect),
        first_byte=r.duration(m.get("first_byte"), join(path, "first_byte"), d.first_byte),
        total=r.duration(m.get("total"), join(path, "total"), d.total),
    )


def _parse_tls(r: Reader, node: Node, path: str, ctx: ParseContext) -> TlsConfig:
    m = r.mapping(node, path, ("ca_file", "verify"))
    if m is None:
        return TlsConfig()
    return TlsConfig(
        ca_file=_path(r, m.get("ca_file"), join(path, "ca_file"), ctx),
        verify=r.boolean(m.get("verify"), join(path, "verify"), True),
    )


_UPSTREAM_KEYS = ("name", "url", "provider", "mount", "inject_stream_usage", "api_key", "timeouts", "tls")


def _parse_upstream(r: Reader, node: Node, path: str, ctx: ParseContext) -> UpstreamConfig | None:
    m = r.mapping(node, path, _UPSTREAM_KEYS, required=("name", "url"), what="an upstream mapping")
    if m is None:
        return None
    provider = r.string(m.get("provider"), join(path, "provider"), choices=PROVIDERS)
    api_key = m.get("api_key")
    timeouts = m.get("timeouts")
    tls = m.get("tls")
    return UpstreamConfig(
        name=r.string(m.get("name"), join(path, "name"), ""),
        url=r.convert(m.get("url"), join(path, "url"), parse_upstream_url, "", what="URL"),
        provider=provider,
        mount=r.convert(m.get("mount"), join(path, "mount"), _mount, "/", what="mount"),
        inject_stream_usage=r.boolean(m.get("inject_stream_usage"), join(path, "inject_stream_usage"), True),
        api_key=None if api_key is None else _parse_api_key(r, api_key, join(path, "api_key"), ctx, provider),
        timeouts=Timeouts() if timeouts is None else _parse_timeouts(r, timeouts, join(path, "timeouts")),
        tls=TlsConfig() if tls is None else _parse_tls(r, tls, join(path, "tls"), ctx),
    )


def _parse_upstreams(r: Reader, node: Node, path: str, ctx: ParseContext) -> tuple[UpstreamConfig, ...]:
    items = r.sequence(node, path, "a list of upstreams")
    if items is None:
        return ()
    parsed = (_parse_upstream(r, item, index(path, i), ctx) for i, item in enumerate(items))
    return tuple(u for u in parsed if u is not None)


def _parse_tenants(r: Reader, node: Node, path: str, ctx: ParseContext) -> TenantsConfig:
    m = r.mapping(node, path, ("header", "required", "max_distinct", "max_length"))
    d = TenantsConfig()
    if m is None:
        return d
    return TenantsConfig(
        header=r.convert(m.get("header"), join(path, "header"), _header, d.header, what="header"),
        required=r.boolean(m.get("required"), join(path, "required"), d.required),
        max_distinct=r.integer(m.get("max_distinct"), join(path, "max_distinct"), d.max_distinct),
        max_length=r.integer(m.get("max_length"), join(path, "max_length"), d.max_length),
    )


def _parse_pricing(r: Reader, node: Node, path: str, ctx: ParseContext) -> PricingConfig:
    m = r.mapping(node, path, ("file",))
    if m is None:
        return PricingConfig()
    return PricingConfig(file=_path(r, m.get("file"), join(path, "file"), ctx))


def _parse_limits(r: Reader, node: Node, path: str, ctx: ParseContext) -> LimitsConfig:
    m = r.mapping(node, path, ("max_body_bytes", "body_read_timeout"))
    d = LimitsConfig()
    if m is None:
        return d
    return LimitsConfig(
        max_body_bytes=r.integer(m.get("max_body_bytes"), join(path, "max_body_bytes"), d.max_body_bytes),
        body_read_timeout=r.duration(
            m.get("body_read_timeout"), join(path, "body_read_timeout"), d.body_read_timeout
        ),
    )


def _parse_shutdown(r: Reader, node: Node, path: str, ctx: ParseContext) -> ShutdownConfig:
    m = r.mapping(node, path, ("drain_timeout",))
    d = ShutdownConfig()
    if m is None:
        return d
    return ShutdownConfig(
        drain_timeout=r.duration(m.get("drain_timeout"), join(path, "drain_timeout"), d.drain_timeout)
    )


def _parse_data_dir(r: Reader, node: Node, path: str, ctx: ParseContext) -> Path:
    return _path(r, node, path, ctx) or Config.data_dir


def _parse_sinks(r: Reader, node: Node, path: str, ctx: ParseContext) -> SinksConfig:
    m = r.mapping(node, path, ("queue_size",))
    d = SinksConfig()
    if m is None:
        return d
    return SinksConfig(queue_size=r.integer(m.get("queue_size"), join(path, "queue_size"), d.queue_size))


@dataclass(frozen=True)
class Section:
    """A top-level key: the function mapping its node onto the model, and whether it is required."""

    parse: Callable[[Reader, Node, str, ParseContext], object]
    required: bool = False


def _lazy(module: str, function: str) -> Callable[[Reader, Node, str, ParseContext], object]:
    """A section parser that lives with its adapter, imported only when the section is present
    (so this module needs none of the adapters' libraries)."""

    def parse(r: Reader, node: Node, path: str, ctx: ParseContext) -> object:
        parser: Callable[[Reader, Node, str, ParseContext], object] = getattr(
            importlib.import_module(module), function
        )
        return parser(r, node, path, ctx)

    return parse


#: Top-level sections, in the order they are read; each name is a :class:`Config` field.
SECTIONS: dict[str, Section] = {
    "listen": Section(_parse_listen),
    "admin": Section(_parse_admin),
    "upstreams": Section(_parse_upstreams, required=True),
    "tenants": Section(_parse_tenants),
    "pricing": Section(_parse_pricing),
    "limits": Section(_parse_limits),
    "shutdown": Section(_parse_shutdown),
    "data_dir": Section(_parse_data_dir),
    "sinks": Section(_parse_sinks),
    "tracing": Section(_lazy("sidecar.tracing", "parse_tracing")),
    "logs": Section(_lazy("sidecar.calllog", "parse_logs")),
    "ledger": Section(_lazy("sidecar.ledger", "parse_ledger")),
    "usage_logs": Section(_lazy("sidecar.usagelogs", "parse_usage_logs")),
    "rules": Section(_lazy("sidecar.alerting", "parse_rules_section")),
    "notify": Section(_lazy("sidecar.alerting", "parse_notify_section")),
    "keys": Section(_lazy("sidecar.gateway.keys", "parse_keys_section")),
    "rate_limits": Section(_lazy("sidecar.gateway.ratelimit", "parse_rate_limits")),
    "state": Section(_lazy("sidecar.gateway.sharedstate", "parse_state")),
    "routes": Section(_lazy("sidecar.gateway.routes", "parse_routes")),
    "circuit_breakers": Section(_lazy("sidecar.gateway.routes", "parse_circuit_breakers")),
}


# -- validation on the model -------------------------------------------------------


def _check_upstreams(config: Config) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if not config.upstreams:
        out.append(("upstreams", "at least one upstream is required"))
    names: dict[str, int] = {}
    mounts: dict[str, int] = {}
    for i, up in enumerate(config.upstreams):
        path = index("upstreams", i)
        if up.name and not _NAME.fullmatch(up.name):
            out.append((join(path, "name"), f'invalid name "{up.name}": must match [a-z0-9][a-z0-9_-]*'))
        if up.name in names:
            out.append(
                (
                    join(path, "name"),
                    f'duplicate upstream name "{up.name}" (also upstreams[{names[up.name]}])',
                )
            )
        names.setdefault(up.name, i)
        if up.mount in mounts:
            other = mounts[up.mount]
            out.append((join(path, "mount"), f'duplicate mount "{up.mount}" (also upstreams[{other}])'))
        mounts.setdefault(up.mount, i)
        t = up.timeouts
        for name in ("connect", "first_byte", "total"):
            if getattr(t, name) <= 0:
                out.append((join(path, f"timeouts.{name}"), "must be greater than 0s"))
        for name in ("connect", "first_byte"):
            value = getattr(t, name)
            if 0 < t.total < value:
                out.append(
                    (
                        join(path, f"timeouts.{name}"),
                        f"{format_duration(value)} exceeds timeouts.total ({format_duration(t.total)})",
                    )
                )
        key = up.api_key
        if key is not None and (key.from_env is None) == (key.from_file is None):
            out.append((join(path, "api_key"), "exactly one of from_env or from_file is required"))
    return out


def _check_listeners(config: Config) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if config.admin.listen == config.listen and config.listen.port != 0:
        out.append(("admin.listen", f"same address as listen ({config.listen})"))
    if config.admin.metrics_require_token and config.admin.token_file is None:
        out.append(("admin.metrics_require_token", "needs admin.token_file"))
    return out


def _check_bounds(config: Config) -> list[tuple[str, str]]:
    minimums: list[tuple[str, float, float]] = [
        ("tenants.max_distinct", config.tenants.max_distinct, 1),
        ("tenants.max_length", config.tenants.max_length, 1),
        ("limits.max_body_bytes", config.limits.max_body_bytes, 1),
        ("shutdown.drain_timeout", config.shutdown.drain_timeout, 0),
        ("sinks.queue_size", config.sinks.queue_size, 1),
    ]
    out = [(path, f"must be at least {low:g}, got {value:g}") for path, value, low in minimums if value < low]
    if config.limits.body_read_timeout <= 0:
        out.append(("limits.body_read_timeout", "must be greater than 0s"))
    return out


def _check_routes(config: Config) -> list[tuple[str, str]]:
    if not config.routes:
        return []
    from sidecar.gateway.routes import check_routes

    return check_routes(config.routes, {u.name: u.provider for u in config.upstreams})


#: Model-level checks, each returning ``(field path, message)`` pairs.
CHECKS: list[Callable[[Config], list[tuple[str, str]]]] = [
    _check_upstreams,
    _check_listeners,
    _check_bounds,
    _check_routes,
]


def validate(config: Config) -> list[tuple[str, str]]:
    """Every rule the model breaks, as ``(field path, message)`` pairs (empty when valid)."""
    return [finding for check in CHECKS for finding in check(config)]


# -- entry points -----------------------------------------------------------------


def load(text: str, filename: str, *, env: Mapping[str, str] | None = None) -> Config:
    """Read a config file's text; raises :class:`ConfigError` with every problem found.

    ``filename`` names the file in problems, becomes :attr:`Config.source`, and its
    directory anchors relative paths. ``env`` is used for ``${VAR}`` substitution
    (``os.environ`` when ``None``).
    """
    r = Reader(filename, os.environ if env is None else env)
    r.secret_fields = SECRET_FIELDS
    root = r.compose(text)
    if root is None:
        if not r.problems:
            r.problem(None, "", f"empty file: expected a mapping starting with version: {VERSION}")
        r.raise_for_problems()
        raise AssertionError("unreachable")  # pragma: no cover
    if not isinstance(root, MappingNode):
        r.problem(root, "", f"expected a mapping of config sections, got {describe(root)}")
        r.raise_for_problems()
    version_node = next((v for k, v in root.value if k.value == "version"), None)
    version = r.string(version_node, "version")
    if version_node is None:
        r.problem(root, "version", f'missing required key "version" (expected version: {VERSION})')
    elif version is not None and version != VERSION:
        r.problem(version_node, "version", f'unsupported version "{version}": this sidecar reads {VERSION}')
    r.raise_for_problems()  # nothing else can be read under an unknown version

    required = [name for name, section in SECTIONS.items() if section.required]
    m = r.mapping(root, "", ["version", *SECTIONS], required, "a mapping of config sections")
    parent = PurePath(filename).parent if filename and not filename.startswith("<") else None
    ctx = ParseContext(parent)
    values: dict[str, Any] = {}  # field name → parsed section; the table keeps types per section
    for name, section in SECTIONS.items():
        node = (m or {}).get(name)
        if node is not None:
            values[name] = section.parse(r, node, name, ctx)
    config = dataclasses.replace(Config(source=filename), **values)
    # A value that failed to parse was replaced by its default; a model finding on
    # the same field (or one inside or around it) would only repeat that problem.
    reported = [p.field for p in r.problems]
    for path, message in validate(config):
        if not any(_related(path, other) for other in reported):
            r.problem(locate(root, path), path, message)
    r.raise_for_problems()
    return config


def _related(a: str, b: str) -> bool:
    """Whether one field path is the other or contains it."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def load_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> Config:
    """Read and :func:`load` a config file (the only function here that touches the disk)."""
    name = os.fspath(path)
    with open(name, encoding="utf-8") as f:
        text = f.read()
    return load(text, name, env=env)


def default_config(
    *,
    listen: str | None = None,
    admin_listen: str | None = None,
    upstream_url: str | None = None,
    pricing_file: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> Config:
    """The config of the flag-only mode: every default, then the flags (see :meth:`Config.with_overrides`).

    With no argument it is plain :class:`Config` (no upstream yet), the base the CLI
    applies its flags to; with any, the result is validated, so ``upstream_url``
    is then required (:class:`ConfigError` otherwise).
    """
    if all(v is None for v in (listen, admin_listen, upstream_url, pricing_file, data_dir)):
        return Config()
    return Config().with_overrides(
        listen=listen,
        admin_listen=admin_listen,
        upstream_url=upstream_url,
        pricing_file=pricing_file,
        data_dir=data_dir,
    )
