"""Virtual keys (sidecar.gateway.keys) and the ``keys`` subcommands, pure and in-process."""

from __future__ import annotations

import argparse
import hashlib
import io
import re
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar.errors import ConfigError
from sidecar.gateway import commands
from sidecar.gateway.keys import (
    AuthFailure,
    KeyEntry,
    KeysConfig,
    KeyStore,
    allows_model,
    hash_key,
    new_key,
    parse_expires,
    parse_keys_file,
    parse_keys_section,
    presented_key,
    tenant_for,
)
from sidecar.gateway.model import Limits
from sidecar.yamlspec import Reader

KEY_A = "sk-llmsc-alpha-0123456789abcdefghijklmnopqrstuv"
KEY_B = "sk-llmsc-bravo-0123456789abcdefghijklmnopqrstuv"
KEY_C = "sk-llmsc-charlie-0123456789abcdefghijklmnopqrst"
HA, HB, HC = hash_key(KEY_A), hash_key(KEY_B), hash_key(KEY_C)
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z


def entry(name: str, key: str, tenant: str = "acme", **kw: object) -> KeyEntry:
    return KeyEntry(name=name, tenant=tenant, sha256=hash_key(key), **kw)  # type: ignore[arg-type]


def problems(text: str, filename: str = "keys.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_keys_file(text, filename)
    return [str(p) for p in info.value.problems]


# -- hashing and key format ---------------------------------------------------------------


def test_hash_is_sha256_of_utf8_and_new_keys_are_prefixed_random() -> None:
    assert hash_key("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    key, digest = new_key()
    assert re.fullmatch(r"sk-llmsc-[A-Za-z0-9_-]{43}", key)
    assert digest == hash_key(key) and re.fullmatch(r"[0-9a-f]{64}", digest)
    assert new_key()[0] != key


# -- the keys file --------------------------------------------------------------------------


def test_parse_full_file() -> None:
    text = f"""\
version: sidecar/v1
keys:
  - name: acme-prod
    tenant: acme
    sha256: {HA}
    models: [gpt-4o*, claude-3-5-sonnet-latest]
    expires: 2030-01-01
    limits: {{rpm: 600, tpm: 100000, concurrency: 8}}
  - name: backend
    tenant: platform
    sha256: {HB}
    expires: 2030-01-01T12:00:00+02:00
    trust_tenant_header: true
  - {{name: quoted, tenant: "acme corp", sha256: "{HC}", expires: "2030-01-01T10:00:00.5Z"}}
"""
    parsed = parse_keys_file(text, "keys.yaml")
    a, b, c = parsed.entries
    assert a == KeyEntry(
        "acme-prod",
        "acme",
        HA,
        ("gpt-4o*", "claude-3-5-sonnet-latest"),
        datetime(2030, 1, 1, tzinfo=UTC).timestamp(),
        Limits(600, 100000, 8),
    )
    assert b.trust_tenant_header and b.models is None and b.limits.empty
    assert b.expires == datetime(2030, 1, 1, 10, tzinfo=UTC).timestamp()
    assert c.tenant == "acme corp" and c.expires == datetime(2030, 1, 1, 10, tzinfo=UTC).timestamp() + 0.5


def test_every_problem_located_at_once_and_no_key_echoed() -> None:
    text = f"""\
version: sidecar/v1
keys:
  - {{name: a, tenant: acme, sha256: {HA}}}
  - {{name: a, tenant: acme, sha256: {HB}}}
  - {{name: c, tenant: acme, sha256: {HA}}}
  - {{name: d, tenant: "", sha256: {KEY_C}}}
  - {{name: e, tenant: unknown, sha256: {HC.upper()}, model: [x]}}
  - {{name: "bad name", tenant: acme, sha256: abc, expires: 2030-01-01T10:00:00, models: []}}
  - {{tenant: acme, limits: {{rpm: 0}}, trust_tenant_header: maybe}}
"""
    got = problems(text)
    assert got == [
        "keys.yaml:4:12: keys[1].name: duplicate key name 'a' (also keys[0])",
        "keys.yaml:5:37: keys[2].sha256: the same key as keys[0] (a)",
        "keys.yaml:6:23: keys[3].tenant: must not be empty",
        "keys.yaml:6:35: keys[3].sha256: this is a key, not its hash: store only the SHA-256 "
        "(llm-sidecar keys hash prints it)",
        "keys.yaml:7:23: keys[4].tenant: invalid tenant 'unknown': 'unknown' is reserved by the sidecar",
        "keys.yaml:7:40: keys[4].sha256: must be lowercase hex",
        'keys.yaml:7:106: keys[4].model: unknown key "model"; did you mean "models"?',
        "keys.yaml:8:12: keys[5].name: invalid name 'bad name': must be 1 to 64 of A-Z a-z 0-9 . _ - "
        "and start with a letter or digit",
        "keys.yaml:8:46: keys[5].sha256: expected 64 lowercase hex characters: the SHA-256 of the key "
        "(llm-sidecar keys hash prints it)",
        'keys.yaml:8:60: keys[5].expires: invalid expires "2030-01-01T10:00:00": a time needs an offset '
        "(Z or +HH:MM)",
        "keys.yaml:8:89: keys[5].models: must not be empty (leave models out to allow every model)",
        'keys.yaml:9:5: keys[6].name: missing required key "name"',
        'keys.yaml:9:5: keys[6].sha256: missing required key "sha256"',
        "keys.yaml:9:34: keys[6].limits.rpm: must be at least 1, got 0",
        'keys.yaml:9:59: keys[6].trust_tenant_header: expected true or false, got string "maybe"',
    ]
    assert not any(KEY_C in p for p in got)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["f.yaml:1:1: empty keys file (expected version: sidecar/v1 and keys)"]),
        ("- a\n", ["f.yaml:1:1: expected a mapping with version and keys, got a list"]),
        ("keys: []\n", ['f.yaml:1:1: version: missing required key "version" (expected sidecar/v1)']),
        # Nothing else is read under an unknown version (the bad key below is not reported).
        (
            "version: v2\nkeys: [{nope: 1}]\n",
            ["f.yaml:1:10: version: unsupported version 'v2' (this sidecar reads sidecar/v1)"],
        ),
        ("version: sidecar/v1\n", ['f.yaml:1:1: keys: missing required key "keys"']),
        (
            "version: sidecar/v1\nkeys: {}\nextra: 1\n",
            [
                "f.yaml:2:7: keys: expected a list of key entries, got a mapping",
                'f.yaml:3:1: extra: unknown key "extra" (known keys: version, keys)',
            ],
        ),
        (
            "version: sidecar/v1\nkeys: [\n",
            [
                "f.yaml:3:1: invalid YAML: expected the node content, but found '<stream end>' "
                "(while parsing a flow node started at line 3)"
            ],
        ),
    ],
)
def test_file_shape_problems(text: str, expected: list[str]) -> None:
    assert problems(text, "f.yaml") == expected


def test_empty_key_list_is_valid() -> None:
    assert parse_keys_file("version: sidecar/v1\nkeys: []\n", "k.yaml").entries == ()


def test_file_names_and_hashes_checked_against_inline_entries() -> None:
    inline = [entry("ci", KEY_A)]
    text = (
        "version: sidecar/v1\nkeys:\n"
        f"  - {{name: ci, tenant: acme, sha256: {HB}}}\n"
        f"  - {{name: x, tenant: acme, sha256: {HA}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_keys_file(text, "k.yaml", inline=inline)
    assert [str(p) for p in info.value.problems] == [
        "k.yaml:3:12: keys[0].name: duplicate key name 'ci' (also the config's keys.entries)",
        "k.yaml:4:37: keys[1].sha256: the same key as the config's keys.entries (ci)",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2030-01-01", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T00:00:00Z", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01t00:00:00z", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01 05:30:00+05:30", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2029-12-31T19:00:00-05:00", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T00:00:00.123456789Z", datetime(2030, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        (date(2030, 1, 1), datetime(2030, 1, 1, tzinfo=UTC)),
        (datetime(2030, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))), datetime(2030, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_expires(value: str | date, expected: datetime) -> None:
    assert parse_expires(value) == expected.timestamp()


@pytest.mark.parametrize(
    "value", ["2030-01-01T00:00:00", "2030-13-01", "2030-1-1", "tomorrow", datetime(2030, 1, 1)]
)
def test_parse_expires_refuses(value: str | datetime) -> None:
    with pytest.raises(ValueError):
        parse_expires(value)


# -- the config section ------------------------------------------------------------------------


class Ctx:
    def path(self, text: str) -> Path:
        return Path("/etc/sidecar") / text


def section(text: str) -> tuple[KeysConfig, list[str]]:
    r = Reader("sidecar.yaml", env={"KEYS_FILE": "k.yaml"})
    root = r.compose(text)
    assert root is not None
    node = next(v for k, v in root.value if k.value == "keys")
    cfg = parse_keys_section(r, node, "keys", Ctx())
    return cfg, [str(p) for p in sorted(r.problems, key=lambda p: (p.line, p.column))]


def test_section_defaults_relative_file_and_inline_entries() -> None:
    cfg, errs = section("keys: {file: '${KEYS_FILE}'}\n")
    assert errs == []
    assert cfg == KeysConfig(
        file=Path("/etc/sidecar/k.yaml"), entries=(), rotation_overlap=0.0, reload_interval=5.0
    )
    cfg, errs = section(
        f"keys:\n  rotation_overlap: 1h\n  reload_interval: 30s\n  entries:\n"
        f"    - {{name: a, tenant: acme, sha256: {HA}}}\n"
    )
    assert errs == []
    assert cfg == KeysConfig(None, (KeyEntry("a", "acme", HA),), 3600.0, 30.0)


def test_section_problems() -> None:
    _, errs = section(
        f"keys:\n  entries:\n    - {{name: a, tenant: acme, sha256: {HA}}}\n"
        f"    - {{name: a, tenant: acme, sha256: {HA}}}\n  reload_interval: 0s\n  overlap: 1h\n"
    )
    assert errs == [
        "sidecar.yaml:4:14: keys.entries[1].name: duplicate key name 'a' (also keys.entries[0])",
        "sidecar.yaml:4:39: keys.entries[1].sha256: the same key as keys.entries[0] (a)",
        "sidecar.yaml:5:20: keys.reload_interval: must be greater than 0s",
        'sidecar.yaml:6:3: keys.overlap: unknown key "overlap"; did you mean "rotation_overlap"?',
    ]
    # A keys section naming no key would refuse every call (or, read leniently, check none).
    assert section("keys: {rotation_overlap: 1h}\n")[1] == [
        "sidecar.yaml:1:7: keys: give file (a keys file) or entries (inline keys), or both"
    ]
    assert section("keys:\n  entries: []\n")[1] == [
        "sidecar.yaml:2:12: keys: give file (a keys file) or entries (inline keys), or both"
    ]


# -- authentication -----------------------------------------------------------------------------


def test_authenticate_every_reason_and_messages_never_hold_the_key() -> None:
    store = KeyStore([entry("a", KEY_A), entry("old", KEY_B, expires=T0)])
    ok = store.authenticate(KEY_A, T0)
    assert isinstance(ok, KeyEntry) and ok.name == "a"
    results = {
        "none": store.authenticate(None, T0),
        "empty": store.authenticate("", T0),
        "unknown": store.authenticate(KEY_C, T0),
        "surrogate": store.authenticate("sk-\ud800", T0),
        "expired": store.authenticate(KEY_B, T0),
    }
    assert {k: (r.reason if isinstance(r, AuthFailure) else r) for k, r in results.items()} == {
        "none": "missing",
        "empty": "missing",
        "unknown": "unknown",
        "surrogate": "unknown",
        "expired": "expired",
    }
    expired = results["expired"]
    assert isinstance(expired, AuthFailure) and expired.name == "old"
    for result in results.values():
        assert isinstance(result, AuthFailure)
        assert "sk-llmsc" not in result.message and result.message


def test_expiry_is_exact() -> None:
    store = KeyStore([entry("a", KEY_A, expires=T0)])
    assert isinstance(store.authenticate(KEY_A, T0 - 0.001), KeyEntry)
    assert store.authenticate(KEY_A, T0) == AuthFailure("expired", "This API key has expired.", "a")


def test_rotation_overlap_at_exact_times() -> None:
    a, b = entry("svc", KEY_A), entry("gone", KEY_B)
    store = KeyStore([a, b])
    # The file now gives "svc" a new key and drops "gone".
    rotated = store.rotate([entry("svc", KEY_C)], T0, 60.0)
    assert isinstance(rotated.authenticate(KEY_C, T0), KeyEntry)
    for key in (KEY_A, KEY_B):
        assert rotated.authenticate(key, T0) in (a, b)
        assert isinstance(rotated.authenticate(key, T0 + 59.999), KeyEntry)
        failure = rotated.authenticate(key, T0 + 60.0)
        assert isinstance(failure, AuthFailure) and failure.reason == "unknown"
    assert [(e.name, until) for e, until in rotated.retiring()] == [("svc", T0 + 60), ("gone", T0 + 60)]
    # A later reload keeps the original deadline (the overlap does not restart)...
    again = rotated.rotate([entry("svc", KEY_C)], T0 + 30, 60.0)
    assert [until for _, until in again.retiring()] == [T0 + 60, T0 + 60]
    assert isinstance(again.authenticate(KEY_A, T0 + 59), KeyEntry)
    assert isinstance(again.authenticate(KEY_A, T0 + 60), AuthFailure)
    # ...and drops what has run out.
    later = again.rotate([entry("svc", KEY_C)], T0 + 60, 60.0)
    assert later.retiring() == [] and len(later) == 1
    # A key put back is current again, with no deadline.
    back = rotated.rotate([entry("svc", KEY_C), entry("gone", KEY_B)], T0 + 10, 60.0)
    assert isinstance(back.authenticate(KEY_B, T0 + 10_000), KeyEntry)
    # No overlap: gone at once.
    assert isinstance(store.rotate([], T0, 0.0).authenticate(KEY_A, T0), AuthFailure)


def test_rotation_keeps_expiry_and_new_settings_win() -> None:
    store = KeyStore([entry("a", KEY_A, expires=T0 + 10)])
    rotated = store.rotate([], T0, 60.0)
    assert isinstance(rotated.authenticate(KEY_A, T0 + 9), KeyEntry)
    failure = rotated.authenticate(KEY_A, T0 + 10)
    assert isinstance(failure, AuthFailure) and failure.reason == "expired"
    # The same hash with new settings (a tenant moved): the new entry applies at once.
    moved = store.rotate([entry("a", KEY_A, tenant="globex")], T0, 60.0)
    found = moved.authenticate(KEY_A, T0)
    assert isinstance(found, KeyEntry) and found.tenant == "globex" and moved.retiring() == []


def test_store_refuses_duplicate_hashes() -> None:
    with pytest.raises(ValueError, match="same hash"):
        KeyStore([entry("a", KEY_A), entry("b", KEY_A)])


# -- models, headers, tenants --------------------------------------------------------------------


def test_allows_model() -> None:
    anything = entry("a", KEY_A)
    some = entry("b", KEY_B, models=("gpt-4o*", "claude-3-5-sonnet-latest"))
    assert allows_model(anything, "o1") and allows_model(anything, None)
    assert allows_model(some, "gpt-4o") and allows_model(some, "gpt-4o-mini-2024-07-18")
    assert allows_model(some, "claude-3-5-sonnet-latest")
    assert not allows_model(some, "gpt-4") and not allows_model(some, "GPT-4o")
    assert not allows_model(some, "claude-3-5-sonnet-latest-x")
    # A restricted key may not make calls that name no model (files, batches).
    assert not allows_model(some, None)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"authorization": "bearer   sk-1  "}, "sk-1"),
        ({"AUTHORIZATION": "BEARER sk-1"}, "sk-1"),
        ({"x-api-key": "sk-2"}, "sk-2"),
        ({"X-Api-Key": " sk-2 "}, "sk-2"),
        ({"x-api-key": "sk-2", "Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": "sk-2"}, "sk-2"),
        ({"Authorization": "Bearer ", "x-api-key": "sk-2"}, "sk-2"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"x-api-key": ""}, None),
        ({"content-type": "application/json"}, None),
        (CIMultiDict([("Authorization", "Bearer sk-1"), ("Authorization", "Bearer sk-3")]), "sk-1"),
    ],
)
def test_presented_key(headers: dict[str, str], expected: str | None) -> None:
    assert presented_key(headers) == expected


def test_tenant_for() -> None:
    plain = entry("a", KEY_A, tenant="acme")
    trusted = entry("b", KEY_B, tenant="platform", trust_tenant_header=True)
    assert tenant_for(plain, "globex") == "acme"
    assert tenant_for(trusted, "globex") == "globex"
    assert tenant_for(trusted, None) == "platform" and tenant_for(trusted, "  ") == "platform"
    assert tenant_for(trusted, "x" * 200) == "__invalid__"


# -- the CLI, through argparse as cli.py wires it ------------------------------------------------------


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llm-sidecar")
    commands.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    status: int = args.func(args)
    return status


def test_keys_new_prints_a_key_once_that_authenticates_from_the_printed_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli("keys", "new", "--tenant", "acme corp: #1", "--models", "gpt-4o*, o1", "--expires", "30d") == 0
    out = capsys.readouterr().out
    keys = re.findall(r"sk-llmsc-[A-Za-z0-9_-]+", out)
    assert len(keys) == 1, "the key is printed exactly once"
    assert "only this once" in out
    lines = [line for line in out.splitlines() if line.startswith("  - {")]
    assert len(lines) == 1 and keys[0] not in lines[0]
    parsed = parse_keys_file(f"version: sidecar/v1\nkeys:\n{lines[0]}\n", "keys.yaml")
    found = KeyStore(parsed.entries).authenticate(keys[0], datetime.now(UTC).timestamp())
    assert isinstance(found, KeyEntry)
    assert found.tenant == "acme corp: #1" and found.models == ("gpt-4o*", "o1")
    assert found.name.startswith("acme-corp-1-")
    assert found.expires is not None
    assert 29 * 86400 < found.expires - datetime.now(UTC).timestamp() <= 30 * 86400


def test_keys_new_names_and_validation(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("keys", "new", "--tenant", "acme", "--name", "ci", "--trust-tenant-header") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  - {"))
    (parsed,) = parse_keys_file(f"version: sidecar/v1\nkeys:\n{line}\n", "k").entries
    assert parsed.name == "ci" and parsed.trust_tenant_header
    for argv, message in [
        (("--tenant", "unknown"), "--tenant: 'unknown' is reserved by the sidecar"),
        (("--tenant", "tab\there"), "--tenant: must be printable ASCII, at most 128 characters"),
        (("--tenant", "a", "--name=-x"), "--name: must be 1 to 64"),
        (("--tenant", "a", "--expires", "2020-01-01"), "--expires: 2020-01-01T00:00:00Z is already past"),
        (("--tenant", "a", "--expires", "soon"), "--expires: expected an RFC 3339 time"),
        (("--tenant", "a", "--models", " , "), "--models: name at least one model"),
    ]:
        assert cli("keys", "new", *argv) == 2
        out = capsys.readouterr()
        assert out.out == "" and message in out.err


def test_keys_hash_reads_stdin_and_prints_only_the_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY_A + "\n"))
    assert cli("keys", "hash", "--tenant", "acme", "--name", "legacy") == 0
    out = capsys.readouterr()
    assert out.out == f"  - {{name: legacy, tenant: acme, sha256: {HA}}}\n"
    assert KEY_A not in out.out + out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli("keys", "hash", "--tenant", "acme") == 0
    assert "may be guessed" in capsys.readouterr().err
    for stdin in ("", "a\nb\n"):
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert cli("keys", "hash", "--tenant", "acme") == 2


def test_keys_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "keys.yaml"
    good.write_text(
        f"version: sidecar/v1\nkeys:\n  - {{name: a, tenant: acme, sha256: {HA}}}\n"
        f"  - {{name: b, tenant: acme, sha256: {HB}, expires: 2020-01-01}}\n"
    )
    assert cli("keys", "check", str(good)) == 0
    assert capsys.readouterr().out == f"{good}: ok (2 keys, 1 expired)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: sidecar/v1\nkeys:\n  - {name: a, tenant: acme}\n")
    assert cli("keys", "check", str(bad)) == 1
    assert capsys.readouterr().err == f'{bad}:3:5: keys[0].sha256: missing required key "sha256"\n'
    assert cli("keys", "check", str(tmp_path / "missing.yaml")) == 1
    assert "cannot read the keys file: No such file or directory" in capsys.readouterr().err
