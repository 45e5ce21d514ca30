"""The sidecar config file: spec → model → validation, every error located, all at once."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from sidecar import config as cfg
from sidecar.config import (
    AdminConfig,
    ApiKeyConfig,
    Config,
    HostPort,
    LimitsConfig,
    PricingConfig,
    ShutdownConfig,
    SinksConfig,
    TenantsConfig,
    Timeouts,
    TlsConfig,
    UpstreamConfig,
)
from sidecar.errors import ConfigError

FULL = """\
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
"""

HELP = "expected <integer><unit> parts such as 30s, 1h30m, 500ms (units y, w, d, h, m, s, ms)"

MINIMAL = """\
version: sidecar/v1
upstreams:
  - {name: openai, url: https://api.openai.com}
"""


def load(text: str, filename: str = "config.yaml", env: dict[str, str] | None = None) -> Config:
    return cfg.load(textwrap.dedent(text), filename, env=env or {})


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env=env)
    return [str(p) for p in info.value.problems]


# -- valid files ------------------------------------------------------------------------


def test_full_example_maps_to_the_expected_dataclasses() -> None:
    got = cfg.load(FULL, "/etc/sidecar/config.yaml", env={})
    assert got == Config(
        version="sidecar/v1",
        listen=HostPort("127.0.0.1", 8080),
        admin=AdminConfig(
            listen=HostPort("127.0.0.1", 9464),
            token_file=Path("/run/secrets/admin-token"),
            metrics_require_token=False,
        ),
        upstreams=(
            UpstreamConfig(
                name="openai",
                url="https://api.openai.com",
                provider="openai",
                mount="/",
                inject_stream_usage=True,
                api_key=ApiKeyConfig(header="authorization", scheme="Bearer", from_env="OPENAI_API_KEY"),
                timeouts=Timeouts(connect=5.0, first_byte=120.0, total=600.0),
                tls=TlsConfig(ca_file=Path("/path/ca.pem"), verify=True),
            ),
            UpstreamConfig(
                name="anthropic", url="https://api.anthropic.com", provider="anthropic", mount="/anthropic"
            ),
        ),
        tenants=TenantsConfig(header="x-tenant-id", required=False, max_distinct=1000, max_length=128),
        pricing=PricingConfig(file=Path("/etc/sidecar/prices.yaml")),  # relative to the config file
        limits=LimitsConfig(max_body_bytes=33554432),
        shutdown=ShutdownConfig(drain_timeout=30.0),
        data_dir=Path("/etc/sidecar/sidecar-data"),
        sinks=SinksConfig(queue_size=10000),
        source="/etc/sidecar/config.yaml",
    )


def test_minimal_file_gets_every_default() -> None:
    got = load(MINIMAL)
    assert got == Config(
        upstreams=(UpstreamConfig(name="openai", url="https://api.openai.com"),), source="config.yaml"
    )
    assert got.listen == HostPort("127.0.0.1", 8080)
    assert got.admin.listen == HostPort("127.0.0.1", 9464)
    assert got.upstreams[0].timeouts == Timeouts(5.0, 120.0, 600.0)
    assert got.upstreams[0].provider is None
    assert got.upstreams[0].api_key is None
    assert got.pricing.file is None
    assert got.data_dir == Path("sidecar-data")
    assert got.limits.max_body_bytes == 32 * 1024 * 1024


def test_values_are_normalised() -> None:
    got = load(
        """\
        version: sidecar/v1
        listen: "[::1]:8081"
        tenants: {header: X-Team}
        upstreams:
          - name: a
            url: "HTTPS://gw.example.com/openai/"
            mount: /openai/
            timeouts: {connect: 1.5, total: 1h}
          - name: b
            url: http://localhost:4000
            provider: anthropic
            mount: /b
            api_key: {from_file: secrets/key}
          - {name: c, url: https://c.example, mount: /c, api_key: {header: X-Key, from_env: C_KEY}}
          - {name: d, url: https://d.example, mount: /d, api_key: {scheme: "", from_env: D_KEY}}
        """,
        filename="conf/sidecar.yaml",
    )
    a, b, c, d = got.upstreams
    assert got.listen == HostPort("::1", 8081)
    assert str(got.listen) == "[::1]:8081"
    assert got.tenants.header == "x-team"
    assert a.url == "https://gw.example.com/openai"
    assert a.mount == "/openai"
    assert a.timeouts == Timeouts(connect=1.5, first_byte=120.0, total=3600.0)
    assert b.api_key == ApiKeyConfig(header="x-api-key", scheme=None, from_file=Path("conf/secrets/key"))
    assert c.api_key == ApiKeyConfig(header="x-key", scheme=None, from_env="C_KEY")
    assert d.api_key == ApiKeyConfig(header="authorization", scheme=None, from_env="D_KEY")


def test_env_substitution_in_the_config() -> None:
    got = load(
        """\
        version: sidecar/v1
        listen: ${LISTEN:-0.0.0.0:8080}
        sinks:
          queue_size: ${QUEUE}  # plain, so typed after substitution (inside {...} it would need quotes)
        upstreams:
          - {name: openai, url: "${UPSTREAM}"}
        """,
        env={"UPSTREAM": "https://proxy.internal/v1", "QUEUE": "50"},
    )
    assert got.listen == HostPort("0.0.0.0", 8080)
    assert got.sinks.queue_size == 50
    assert got.upstreams[0].url == "https://proxy.internal/v1"


def test_load_file_resolves_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        MINIMAL + "pricing: {file: prices.yaml}\nadmin: {token_file: /abs/token}\n", encoding="utf-8"
    )
    got = cfg.load_file(path, env={})
    assert got.source == str(path)
    assert got.pricing.file == tmp_path / "prices.yaml"
    assert got.admin.token_file == Path("/abs/token")


def test_every_section_is_a_config_field() -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(cfg.SECTIONS) == fields - {"version", "source"}


# -- errors: one of each kind, with exact locations ----------------------------------------


def test_problem_format() -> None:
    text = MINIMAL.replace(
        "url: https://api.openai.com}", "url: https://api.openai.com,\n      timeouts: {connect: 5x}}"
    )
    assert problems(text) == [
        f'config.yaml:4:27: upstreams[0].timeouts.connect: invalid duration "5x": {HELP}'
    ]


def test_version_missing() -> None:
    assert problems("listen: 127.0.0.1:1\nupstreams: []\n") == [
        'config.yaml:1:1: version: missing required key "version" (expected version: sidecar/v1)'
    ]


def test_version_wrong_stops_before_the_rest() -> None:
    text = "listen: nonsense\nversion: sidecar/v2\nbogus: 1\n"
    assert problems(text) == [
        'config.yaml:2:10: version: unsupported version "sidecar/v2": this sidecar reads sidecar/v1'
    ]


def test_version_not_a_string() -> None:
    assert problems("version: 1\n") == ["config.yaml:1:10: version: expected a string, got number 1"]


def test_yaml_syntax_error_location() -> None:
    text = "version: sidecar/v1\nupstreams:\n  - name: a\n    url: [https://x\n"
    (message,) = problems(text)
    assert message.startswith("config.yaml:5:1: invalid YAML: ")


def test_empty_file_and_wrong_root() -> None:
    assert problems("") == [
        "config.yaml:1:1: empty file: expected a mapping starting with version: sidecar/v1"
    ]
    assert problems("- a\n- b\n") == ["config.yaml:1:1: expected a mapping of config sections, got a list"]


def test_unknown_keys_with_suggestions() -> None:
    text = MINIMAL + "tenant: {header: x}\nadmin: {listn: 127.0.0.1:1}\n"
    assert problems(text) == [
        'config.yaml:4:1: tenant: unknown key "tenant"; did you mean "tenants"?',
        'config.yaml:5:9: admin.listn: unknown key "listn"; did you mean "listen"?',
    ]


def test_missing_required_keys() -> None:
    assert problems("version: sidecar/v1\n") == [
        'config.yaml:1:1: upstreams: missing required key "upstreams"'
    ]
    assert problems("version: sidecar/v1\nupstreams:\n  - {mount: /x}\n") == [
        'config.yaml:3:5: upstreams[0].name: missing required key "name"',
        'config.yaml:3:5: upstreams[0].url: missing required key "url"',
    ]


def test_no_upstream() -> None:
    assert problems("version: sidecar/v1\nupstreams: []\n") == [
        "config.yaml:2:12: upstreams: at least one upstream is required"
    ]


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("127.0.0.1", "missing port: expected host:port, e.g. 127.0.0.1:8080"),
        ("127.0.0.1:65536", "port 65536 is out of range 0-65535"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        (":8080", "missing host: use 0.0.0.0:PORT to listen on every interface"),
        ("::1:8080", "an IPv6 address goes in brackets, e.g. [::1]:8080"),
        ("[::1:8080", "missing ']' after the IPv6 address"),
        ("[::1]8080", "expected [address]:port, e.g. [::1]:8080"),
        ("[nope]:8080", "'nope' is not an IPv6 address"),
        ("bad host:1", "'bad host' is not a host name or IPv4 address"),
    ],
)
def test_listen_errors(listen: str, message: str) -> None:
    assert problems(MINIMAL + f'listen: "{listen}"\n') == [
        f'config.yaml:4:9: listen: invalid address "{listen}": {message}'
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", HostPort("127.0.0.1", 8080)),
        ("0.0.0.0:1", HostPort("0.0.0.0", 1)),
        ("localhost:65535", HostPort("localhost", 65535)),
        ("[::]:9464", HostPort("::", 9464)),
        ("[fe80::1%eth0]:80", HostPort("fe80::1%eth0", 80)),
        ("127.0.0.1:0", HostPort("127.0.0.1", 0)),  # the system picks a free port
    ],
)
def test_parse_listen(text: str, expected: HostPort) -> None:
    assert cfg.parse_listen(text) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("api.openai.com", "missing scheme: expected http://host or https://host"),
        ("ftp://x.example", "scheme 'ftp' is not supported (http or https only)"),
        ("https://", "missing host"),
        ("https://user:pw@x.example", "credentials in the URL are not allowed (use api_key)"),
        ("https://x.example/v1?a=1", "a query or fragment is not allowed"),
        ("https://x.example/#frag", "a query or fragment is not allowed"),
        ("https://x.example:99999", "invalid port (Port out of range 0-65535)"),
        ("https://x .example", "must not contain spaces"),
    ],
)
def test_upstream_url_errors(url: str, message: str) -> None:
    text = f'version: sidecar/v1\nupstreams:\n  - name: a\n    url: "{url}"\n'
    shown = url.replace("user:pw@", "user:***@")  # credentials are masked in any message
    assert problems(text) == [f'config.yaml:4:10: upstreams[0].url: invalid URL "{shown}": {message}']


def test_type_errors_in_each_section() -> None:
    text = """\
    version: sidecar/v1
    admin: {metrics_require_token: maybe}
    upstreams:
      - name: a
        url: https://a.example
        provider: openia
        inject_stream_usage: 1
        timeouts: {connect: -1, first_byte: soon}
        tls: {verify: "yes"}
        api_key: {header: "bad header", from_env: "1X"}
    tenants: {max_distinct: many}
    limits: {max_body_bytes: 1.5}
    shutdown: {drain_timeout: [1]}
    sinks: []
    data_dir: 5
    """
    assert problems(text) == [
        'config.yaml:2:32: admin.metrics_require_token: expected true or false, got string "maybe"',
        'config.yaml:6:15: upstreams[0].provider: invalid value "openia": expected one of openai, anthropic;'
        ' did you mean "openai"?',
        "config.yaml:7:26: upstreams[0].inject_stream_usage: expected true or false, got number 1",
        "config.yaml:8:25: upstreams[0].timeouts.connect: invalid duration -1: must not be negative",
        f'config.yaml:8:41: upstreams[0].timeouts.first_byte: invalid duration "soon": {HELP}',
        'config.yaml:9:19: upstreams[0].tls.verify: expected true or false, got string "yes"',
        # api_key may hold a secret where a name was expected: its values are never quoted.
        "config.yaml:10:23: upstreams[0].api_key.header: invalid header <10 characters, not shown>:"
        " not a valid header name",
        "config.yaml:10:47: upstreams[0].api_key.from_env: invalid value <2 characters, not shown>:"
        " not an environment variable name",
        'config.yaml:11:25: tenants.max_distinct: expected an integer, got string "many"',
        "config.yaml:12:26: limits.max_body_bytes: expected an integer, got number 1.5",
        "config.yaml:13:27: shutdown.drain_timeout: expected a duration, got a list",
        "config.yaml:14:8: sinks: expected a mapping, got a list",
        "config.yaml:15:11: data_dir: expected a string, got number 5",
    ]


def test_model_validation_errors_are_located() -> None:
    text = """\
    version: sidecar/v1
    listen: 127.0.0.1:9000
    admin: {listen: 127.0.0.1:9000, metrics_require_token: true}
    upstreams:
      - {name: Open_AI, url: https://a.example}
      - name: b
        url: https://b.example
        mount: /
        timeouts: {connect: 0s, first_byte: 10m, total: 5m}
        api_key: {header: x-api-key}
      - {name: b, url: https://c.example, mount: nope}
    tenants: {max_distinct: 0, max_length: 0}
    limits: {max_body_bytes: 0}
    sinks: {queue_size: 0}
    """
    assert problems(text) == [
        "config.yaml:3:17: admin.listen: same address as listen (127.0.0.1:9000)",
        "config.yaml:3:56: admin.metrics_require_token: needs admin.token_file",
        'config.yaml:5:12: upstreams[0].name: invalid name "Open_AI": must match [a-z0-9][a-z0-9_-]*',
        'config.yaml:8:12: upstreams[1].mount: duplicate mount "/" (also upstreams[0])',
        "config.yaml:9:25: upstreams[1].timeouts.connect: must be greater than 0s",
        "config.yaml:9:41: upstreams[1].timeouts.first_byte: 10m exceeds timeouts.total (5m)",
        "config.yaml:10:14: upstreams[1].api_key: exactly one of from_env or from_file is required",
        'config.yaml:11:12: upstreams[2].name: duplicate upstream name "b" (also upstreams[1])',
        'config.yaml:11:46: upstreams[2].mount: invalid mount "nope": must start with "/"',
        "config.yaml:12:25: tenants.max_distinct: must be at least 1, got 0",
        "config.yaml:12:40: tenants.max_length: must be at least 1, got 0",
        "config.yaml:13:26: limits.max_body_bytes: must be at least 1, got 0",
        "config.yaml:14:21: sinks.queue_size: must be at least 1, got 0",
    ]


def test_type_and_model_errors_are_reported_together() -> None:
    text = """\
    version: sidecar/v1
    upstreams:
      - {name: a, url: https://a.example, timeouts: {connect: 5x}}
      - {name: a, url: https://b.example, mount: /b}
    sinks: {queue_size: 0, extra: 1}
    """
    assert problems(text) == [
        f'config.yaml:3:59: upstreams[0].timeouts.connect: invalid duration "5x": {HELP}',
        'config.yaml:4:12: upstreams[1].name: duplicate upstream name "a" (also upstreams[0])',
        "config.yaml:5:21: sinks.queue_size: must be at least 1, got 0",
        'config.yaml:5:24: sinks.extra: unknown key "extra" (known keys: queue_size)',
    ]


def test_a_failed_value_does_not_also_fail_validation() -> None:
    # Two upstreams without a name: both missing, not also "duplicate name".
    text = """\
    version: sidecar/v1
    upstreams:
      - {url: https://a.example}
      - {url: https://b.example, mount: /b}
    """
    assert problems(text) == [
        'config.yaml:3:5: upstreams[0].name: missing required key "name"',
        'config.yaml:4:5: upstreams[1].name: missing required key "name"',
    ]


def test_duplicate_top_level_key() -> None:
    assert problems(MINIMAL + "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n") == [
        'config.yaml:5:1: listen: duplicate key "listen" (first at line 4)'
    ]


def test_unset_environment_variable() -> None:
    assert problems(MINIMAL + "data_dir: ${DATA}\n") == [
        "config.yaml:4:11: data_dir: environment variable DATA is not set"
        " (write ${DATA:-default} for a default)"
    ]


# -- command-line overrides ---------------------------------------------------------------


def test_with_overrides() -> None:
    base = load(FULL)
    got = base.with_overrides(
        listen="0.0.0.0:8000",
        admin_listen="[::1]:9000",
        upstream_url="http://localhost:4000/",
        pricing_file="my-prices.yaml",
    )
    assert got.listen == HostPort("0.0.0.0", 8000)
    assert got.admin == dataclasses.replace(base.admin, listen=HostPort("::1", 9000))
    assert got.upstreams == (
        UpstreamConfig(name="default", url="http://localhost:4000", mount="/", provider=None),
    )
    assert got.pricing.file == Path("my-prices.yaml")
    assert got.tenants == base.tenants
    assert base.with_overrides() == base


def test_with_overrides_errors() -> None:
    base = load(MINIMAL)
    with pytest.raises(ConfigError) as info:
        base.with_overrides(listen="nope", upstream_url="ftp://x")
    assert [str(p) for p in info.value.problems] == [
        '<flags>:0:0: --listen: invalid value "nope": missing port: expected host:port, e.g. 127.0.0.1:8080',
        '<flags>:0:0: --upstream: invalid value "ftp://x":'
        " scheme 'ftp' is not supported (http or https only)",
    ]
    with pytest.raises(ConfigError, match=r"admin.listen: same address as listen"):
        base.with_overrides(listen="127.0.0.1:9464")
    # Port 0 twice is two different free ports, not a clash.
    assert base.with_overrides(listen="127.0.0.1:0", admin_listen="127.0.0.1:0").listen.port == 0


def test_default_config() -> None:
    got = cfg.default_config(upstream_url="https://api.openai.com", listen="127.0.0.1:18080")
    assert got.upstreams == (UpstreamConfig(name="default", url="https://api.openai.com"),)
    assert got.listen == HostPort("127.0.0.1", 18080)
    assert got.source == ""
    assert cfg.default_config() == Config()  # the base the CLI applies its flags to
    with pytest.raises(ConfigError, match="at least one upstream is required"):
        cfg.default_config(listen="127.0.0.1:1")
    with pytest.raises(ConfigError, match="at least one upstream is required"):
        Config().with_overrides()


def test_overrides_used_by_the_cli_and_the_demo() -> None:
    got = cfg.default_config().with_overrides(
        upstream_url="http://127.0.0.1:4000/openai",
        data_dir="/tmp/x",
        extra_upstreams=[("anthropic", "http://127.0.0.1:4000/anthropic", "anthropic", "/anthropic/")],
    )
    assert got.data_dir == Path("/tmp/x")
    assert got.upstreams == (
        UpstreamConfig(name="default", url="http://127.0.0.1:4000/openai"),
        UpstreamConfig(name="anthropic", url="http://127.0.0.1:4000/anthropic", provider="anthropic",
                       mount="/anthropic"),
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        got.with_overrides(extra_upstreams=[("x", "http://h", "azure", "/")])
    assert [str(p) for p in info.value.problems] == ['<flags>:0:0: x: unknown provider "azure"']
    with pytest.raises(ConfigError, match='duplicate upstream name "default"'):
        got.with_overrides(extra_upstreams=[("default", "http://h", None, "/other")])


def test_body_read_timeout_is_a_limit_with_a_located_error() -> None:
    base = "version: sidecar/v1\nupstreams: [{name: a, url: 'http://127.0.0.1:1'}]\n"
    assert cfg.load(base, "c.yaml").limits.body_read_timeout == 60.0
    assert cfg.load(base + "limits: {body_read_timeout: 2500ms}\n", "c.yaml").limits.body_read_timeout == 2.5
    with pytest.raises(ConfigError) as caught:
        cfg.load(base + "limits: {body_read_timeout: 0s}\n", "c.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "c.yaml:3:29: limits.body_read_timeout: must be greater than 0s"
    ]
