"""Provider key files and the keys file, watched off the loop (sidecar.gateway.secrets).

Real files in ``tmp_path``, short poll intervals and bounded waits. Blocking calls made
by sidecar code on the event loop fail the test (blockbuster); the tests' own file
writes are not sidecar code and are allowed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from blockbuster import blockbuster_ctx

from sidecar.errors import ConfigError
from sidecar.gateway.keys import AuthFailure, KeyEntry, KeysConfig, KeyStore, hash_key
from sidecar.gateway.secrets import KeysFileWatcher, SecretFiles, SecretValue, read_keys

FAST = 0.02
WAIT = 3.0
KEY_A = "sk-llmsc-alpha-0123456789abcdefghijklmnopqrstuv"
KEY_B = "sk-llmsc-bravo-0123456789abcdefghijklmnopqrstuv"
KEY_C = "sk-llmsc-charlie-0123456789abcdefghijklmnopqrst"
PROVIDER_1 = "sk-proj-provider-one-AAAAAAAAAAAAAAAA"
PROVIDER_2 = "sk-proj-provider-two-BBBBBBBBBBBBBBBBBBBB"


@pytest.fixture(autouse=True)
def no_blocking_calls() -> Iterator[None]:
    with blockbuster_ctx("sidecar"):
        yield


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def polls(n: int = 5) -> None:
    """Let a FAST watcher poll a few times."""
    await asyncio.sleep(FAST * n)


def replace(path: Path, text: str) -> None:
    """Write ``path`` atomically (a rename), so no poll can see it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def assert_no_secret_logged(caplog: pytest.LogCaptureFixture, *values: str) -> None:
    text = caplog.text
    for value in values:
        assert value not in text
        assert hash_key(value) not in text and hash_key(value)[:8] not in text


# -- provider keys ------------------------------------------------------------------------------


async def test_rewritten_file_is_picked_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "openai"
    path.write_text(PROVIDER_1 + "\n")
    outcomes: list[str] = []
    files = SecretFiles(interval=FAST, on_reload=outcomes.append)
    files.watch([path])
    await files.start()
    try:
        assert files.value(path) == PROVIDER_1  # loaded by start(), before any call
        path.write_text(PROVIDER_2 + "\n")  # in place: a poll may catch it empty, and keeps the old key
        await eventually(lambda: files.value(path) == PROVIDER_2)
        assert outcomes[-1] == "success"
    finally:
        await files.stop()
    assert "changed: the new value is in use" in caplog.text
    assert_no_secret_logged(caplog, PROVIDER_1, PROVIDER_2)


async def test_kubernetes_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    """The kubelet's layout: key -> ..data/key, ..data -> ..<timestamp>; an update swaps ..data."""
    mount = tmp_path / "secret"
    old = mount / "..2025_01_01_00_00_00.000000001"
    old.mkdir(parents=True)
    (old / "key").write_text("sk-one-0000")
    (mount / "..data").symlink_to(old.name)
    (mount / "key").symlink_to("..data/key")
    path = mount / "key"
    files = SecretFiles(interval=FAST)
    files.watch([path])
    await files.start()
    try:
        assert files.value(path) == "sk-one-0000"
        # The new version: same size, same mtime; written while the old one still exists
        # (as the kubelet does), so only the resolved file's identity tells them apart.
        new = mount / "..2025_01_02_00_00_00.000000002"
        new.mkdir()
        (new / "key").write_text("sk-two-0000")
        st = os.stat(old / "key")
        os.utime(new / "key", ns=(st.st_atime_ns, st.st_mtime_ns))
        (mount / "..data_tmp").symlink_to(new.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(old)
        await eventually(lambda: files.value(path) == "sk-two-0000")
    finally:
        await files.stop()


async def test_unreadable_or_empty_file_keeps_last_value_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "anthropic"
    path.write_text(PROVIDER_1)
    outcomes: list[str] = []
    files = SecretFiles(interval=FAST, on_reload=outcomes.append)
    files.watch([path])
    await files.start()
    try:
        path.unlink()
        await eventually(lambda: outcomes == ["failure"])
        await polls()
        assert files.value(path) == PROVIDER_1
        path.mkdir()  # still unreadable, another way: no second warning for the same spell
        await polls()
        path.rmdir()
        replace(path, "  \n")  # empty
        await polls()
        path.unlink()
        replace(path, PROVIDER_1 + "\nsecond line\n")  # two lines would split the header
        await polls()
        assert files.value(path) == PROVIDER_1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "keeping the last good value" in warnings[0].getMessage()
        assert outcomes[0] == "failure" and "success" not in outcomes
        # Fixed: the new value is taken and the warning spell ends.
        path.write_text(PROVIDER_2)
        await eventually(lambda: files.value(path) == PROVIDER_2)
        assert outcomes[-1] == "success"
    finally:
        await files.stop()
    assert_no_secret_logged(caplog, PROVIDER_1, PROVIDER_2)


async def test_missing_at_start_then_appears(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "late"
    outcomes: list[str] = []
    files = SecretFiles(interval=FAST, on_reload=outcomes.append)
    files.watch([path])
    await files.start()
    try:
        assert files.value(path) is None
        assert "go without a provider key" in caplog.text
        path.write_text(PROVIDER_1)
        await eventually(lambda: files.value(path) == PROVIDER_1)
        assert outcomes == ["success"]  # the initial load is not a reload
    finally:
        await files.stop()


async def test_file_added_while_running_is_read_at_once(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("sk-a")
    second.write_text("sk-b")
    files = SecretFiles(interval=3600)  # no poll during the test
    files.watch([first])
    await files.start()
    try:
        files.watch([first, second])
        await eventually(lambda: files.value(second) == "sk-b")
        files.watch([second])
        assert files.value(first) is None and files.value(second) == "sk-b"
    finally:
        await files.stop()


def test_secret_value_from_env_and_repr_hides_value() -> None:
    secret = SecretValue(from_env="OPENAI_API_KEY", environ={"OPENAI_API_KEY": f" {PROVIDER_1}\n"})
    assert secret.value == PROVIDER_1
    assert PROVIDER_1 not in repr(secret) and "OPENAI_API_KEY" in repr(secret)
    assert SecretValue(from_env="X", environ={"X": "a\nb"}).value is None
    assert SecretValue(from_env="X", environ={}).value is None
    with pytest.raises(ValueError):
        SecretValue()


# -- the keys file ------------------------------------------------------------------------------


def keys_yaml(*entries: tuple[str, str, str]) -> str:
    lines = [f"  - {{name: {n}, tenant: {t}, sha256: {hash_key(k)}}}" for n, t, k in entries]
    return "version: sidecar/v1\nkeys:\n" + ("\n".join(lines) if lines else "  []") + "\n"


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def found(store: KeyStore | None, key: str, now: float) -> str | None:
    assert store is not None
    result = store.authenticate(key, now)
    return result.tenant if isinstance(result, KeyEntry) else None


async def test_keys_file_rotation_with_overlap(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(("svc", "acme", KEY_A)))
    clock = Clock()
    outcomes: list[str] = []
    watcher = KeysFileWatcher(
        KeysConfig(file=path, rotation_overlap=60.0, reload_interval=FAST),
        on_reload=outcomes.append,
        clock=clock,
    )
    await watcher.start()
    try:
        t0 = clock.now
        assert found(watcher.store, KEY_A, t0) == "acme"
        held = watcher.store.authenticate(KEY_A, t0) if watcher.store else None  # an in-flight call's entry
        # "svc" gets a new key: picked up by the poll; the old key lives on for the overlap.
        replace(path, keys_yaml(("svc", "acme", KEY_B)))
        await eventually(lambda: outcomes == ["success"])
        assert found(watcher.store, KEY_B, t0) == "acme"
        assert found(watcher.store, KEY_A, t0 + 59.9) == "acme"
        assert found(watcher.store, KEY_A, t0 + 60) is None
        assert isinstance(held, KeyEntry) and held.tenant == "acme"  # unaffected by the swap
        await polls()
        assert outcomes == ["success"]  # unchanged file: no reload
    finally:
        await watcher.stop()
    assert "1 rotated out" in caplog.text
    assert_no_secret_logged(caplog, KEY_A, KEY_B)


async def test_broken_keys_file_keeps_last_good_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(("a", "acme", KEY_A)))
    outcomes: list[str] = []
    watcher = KeysFileWatcher(KeysConfig(file=path, reload_interval=FAST), on_reload=outcomes.append)
    await watcher.start()
    try:
        good = watcher.store
        replace(
            path, f"version: sidecar/v1\nkeys:\n  - {{name: a, tenant: acme, sha256: {KEY_C}}}\n  - {{}}\n"
        )
        await eventually(lambda: outcomes == ["failure"])
        assert watcher.store is good
        assert found(watcher.store, KEY_A, 0) == "acme"
        assert f"{path}:3:37: keys[0].sha256: this is a key, not its hash" in caplog.text
        assert f'{path}:4:5: keys[1].name: missing required key "name"' in caplog.text
        await polls()
        assert outcomes == ["failure"]  # the same broken file is reported once
        # Missing: one more failure, not one per poll.
        path.unlink()
        await eventually(lambda: outcomes == ["failure", "failure"])
        await polls()
        assert outcomes == ["failure", "failure"]
        assert watcher.store is good
        # Fixed: the new keys apply (no overlap configured: the old key is gone at once).
        replace(path, keys_yaml(("b", "globex", KEY_B)))
        await eventually(lambda: outcomes[-1:] == ["success"])
        assert found(watcher.store, KEY_B, 0) == "globex" and found(watcher.store, KEY_A, 0) is None
        # A forced reload (SIGHUP) re-reads an unchanged file.
        assert await watcher.reload() == "success"
    finally:
        await watcher.stop()
    assert_no_secret_logged(caplog, KEY_A, KEY_B, KEY_C)


async def test_start_is_strict_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("version: sidecar/v1\nkeys: [{name: a}]\n")
    with pytest.raises(ConfigError) as info:
        await KeysFileWatcher(KeysConfig(file=path)).start()
    assert [str(p) for p in info.value.problems] == [
        f'{path}:2:8: keys[0].tenant: missing required key "tenant"',
        f'{path}:2:8: keys[0].sha256: missing required key "sha256"',
    ]
    # Not strict (a keys section added by a config reload): every call refused until fixed.
    watcher = KeysFileWatcher(KeysConfig(file=path, reload_interval=FAST))
    await watcher.start(strict=False)
    try:
        assert watcher.store is None
        path.write_text(keys_yaml(("a", "acme", KEY_A)))
        await eventually(lambda: watcher.store is not None)
        assert found(watcher.store, KEY_A, 0) == "acme"
    finally:
        await watcher.stop()


async def test_inline_entries_merge_with_file_and_reconfigure(tmp_path: Path) -> None:
    inline = (KeyEntry("ci", "acme", hash_key(KEY_A)),)
    first, second = tmp_path / "one.yaml", tmp_path / "two.yaml"
    first.write_text(keys_yaml(("b", "globex", KEY_B)))
    second.write_text(keys_yaml(("c", "initech", KEY_C)))
    outcomes: list[str] = []
    config = KeysConfig(file=first, entries=inline, rotation_overlap=3600, reload_interval=3600)
    watcher = KeysFileWatcher(config, on_reload=outcomes.append)
    await watcher.start()
    try:
        assert found(watcher.store, KEY_A, 0) == "acme" and found(watcher.store, KEY_B, 0) == "globex"
        # The file may not reuse an inline name or key.
        first.write_text(keys_yaml(("ci", "globex", KEY_B)))
        assert await watcher.check() == "failure"
        # A reloaded config pointing at another file: loaded at once, old keys overlap.
        watcher.reconfigure(
            KeysConfig(file=second, entries=inline, rotation_overlap=3600, reload_interval=3600)
        )
        await eventually(lambda: outcomes[-1:] == ["success"])
        assert found(watcher.store, KEY_C, 0) == "initech"
        assert found(watcher.store, KEY_B, 0) == "globex"  # rotated out, within its overlap
        assert found(watcher.store, KEY_A, 0) == "acme"
        assert await watcher.check() is None  # unchanged
    finally:
        await watcher.stop()
    # Inline entries alone need no file and no watching.
    only = KeysFileWatcher(KeysConfig(entries=inline))
    await only.start()
    assert found(only.store, KEY_A, 0) == "acme" and await only.check() is None
    await only.stop()


async def test_request_path_reads_are_memory_reads(tmp_path: Path) -> None:
    """``value`` and ``store.authenticate`` on the loop: blockbuster fails the test on any I/O."""
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(("a", "acme", KEY_A)))
    secret = tmp_path / "openai"
    secret.write_text(PROVIDER_1)
    files = SecretFiles()
    files.watch([secret])
    watcher = KeysFileWatcher(KeysConfig(file=path))
    await files.start()
    await watcher.start()
    try:
        for _ in range(100):
            assert files.value(secret) == PROVIDER_1
            assert isinstance(watcher.store.authenticate(KEY_A, 0) if watcher.store else None, KeyEntry)
            assert isinstance(watcher.store.authenticate(KEY_B, 0) if watcher.store else None, AuthFailure)
    finally:
        await watcher.stop()
        await files.stop()


def test_read_keys_for_tools(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml(("a", "acme", KEY_A)))
    store = read_keys(KeysConfig(file=path, entries=(KeyEntry("b", "globex", hash_key(KEY_B)),)))
    assert found(store, KEY_A, 0) == "acme" and found(store, KEY_B, 0) == "globex"
    path.write_bytes(b"version: sidecar/v1\nkeys: [\xff]\n")
    with pytest.raises(ConfigError, match=r"keys.yaml:2:8: not UTF-8 text"):
        read_keys(KeysConfig(file=path))
    with pytest.raises(ConfigError, match="cannot read the keys file"):
        read_keys(KeysConfig(file=tmp_path / "missing.yaml"))
