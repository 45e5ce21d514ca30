"""Provider keys and the keys file, re-read off the event loop (issue 6).

The request path reads keys from memory only: :meth:`SecretFiles.value` and
:attr:`KeysFileWatcher.store` are attribute and dict reads. Files are watched by
polling tasks that ``stat`` and read them in a worker thread (``asyncio.to_thread``)
and swap the in-memory value in one assignment on the loop, so a call sees either
the old value or the new one, never a mix, and a call in flight keeps what it read.

Change detection uses ``os.stat`` of the path, which follows symlinks: Kubernetes
updates a mounted Secret or ConfigMap by pointing the ``..data`` symlink at a new
directory, so the resolved file's inode changes even when its size and mtime do not.
The fingerprint is ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``; ``ctime``
also catches a ``chmod`` that makes the file unreadable.

A file that turns missing, unreadable, empty or malformed keeps the last good value
(or store): one warning per bad spell, and ``on_reload("failure")`` once per bad
version of the file. ``on_reload("success")`` counts each new value or store taken.

Nothing here logs a key, any part or hash of a provider key, or a file's content:
only paths, key names, counts and the problems' locations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError, Problem
from sidecar.gateway.keys import KeysConfig, KeyStore, parse_keys_file

__all__ = ["MAX_SECRET_BYTES", "KeysFileWatcher", "SecretFiles", "SecretValue", "read_keys"]

log = logging.getLogger("sidecar.gateway.secrets")

#: A provider key file larger than this is refused: the path is wrong, not the key long.
MAX_SECRET_BYTES = 64 * 1024

OnReload = Callable[[str], None]
Fingerprint = tuple[int, int, int, int, int]


def _fingerprint(path: Path) -> Fingerprint:
    st = os.stat(path)  # follows symlinks: the file the path resolves to now
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _check_value(text: str) -> tuple[str | None, str | None]:
    """``(value, None)`` for a usable key, ``(None, why)`` otherwise (``why`` never quotes it)."""
    value = text.strip()
    if not value:
        return None, "empty"
    if not (value.isascii() and value.isprintable()):
        # A line break would split the header; anything else would be mangled on the wire.
        return None, "holds a line break, a control or a non-ASCII character (one key, one line)"
    return value, None


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- provider keys ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Read:
    """What one look at a secret file found (built in the worker thread)."""

    fingerprint: Fingerprint | None
    value: str | None
    problem: str | None


def _read_secret(path: Path, known: Fingerprint | None) -> _Read | None:
    """Stat ``path`` and read it when it changed since ``known``; ``None`` when nothing to do.

    Runs in a worker thread. A file that changes while being read is left for the next
    poll (its fingerprint is not recorded), so a half-written key is never taken.
    """
    try:
        before = _fingerprint(path)
    except OSError as exc:
        return _Read(None, None, _os_reason(exc))
    if before == known:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
        if _fingerprint(path) != before:
            return None
    except OSError as exc:
        return _Read(before, None, _os_reason(exc))
    if len(data) > MAX_SECRET_BYTES:
        return _Read(before, None, f"larger than {MAX_SECRET_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _Read(before, None, "not UTF-8 text")
    value, problem = _check_value(text)
    return _Read(before, value, problem)


class SecretValue:
    """One provider key from an environment variable or a file; :attr:`value` is a memory read.

    An environment variable is read once, when the holder is made (a process's
    environment does not change under it). A file's value is set by
    :class:`SecretFiles`, which owns the reading.
    """

    __slots__ = ("_failing", "_fingerprint", "_value", "from_env", "from_file")

    def __init__(
        self,
        *,
        from_env: str | None = None,
        from_file: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if (from_env is None) == (from_file is None):
            raise ValueError("give exactly one of from_env and from_file")
        self.from_env = from_env
        self.from_file = from_file
        self._value: str | None = None
        self._fingerprint: Fingerprint | None = None
        self._failing = False
        if from_env is not None:
            env = os.environ if environ is None else environ
            self._value, _ = _check_value(env.get(from_env, ""))

    @property
    def value(self) -> str | None:
        """The current key, or ``None`` when none was ever read successfully."""
        return self._value

    @property
    def source(self) -> str:
        """Where the key comes from, for log lines (never the key)."""
        return f"environment variable {self.from_env}" if self.from_env else f"file {self.from_file}"

    def __repr__(self) -> str:
        state = "set" if self._value is not None else "unset"
        return f"SecretValue({self.source}, {state})"

    def _apply(self, read: _Read | None, initial: bool) -> str | None:
        """Take what the thread found (on the loop); the outcome to count, if any."""
        if read is None:
            return None
        if read.value is not None:
            changed = self._value is not None and read.value != self._value
            self._value = read.value
            self._fingerprint = read.fingerprint
            if self._failing:
                log.info("provider key from %s is readable again: in use", self.source)
            elif changed:
                log.info("provider key from %s changed: the new value is in use", self.source)
            self._failing = False
            return "success"
        self._fingerprint = read.fingerprint
        if self._failing:
            # Still bad. A new bad version (it has a fingerprint) still counts as a failure.
            return "failure" if read.fingerprint is not None else None
        self._failing = True
        if self._value is not None:
            log.warning("provider key from %s: %s; keeping the last good value", self.source, read.problem)
        else:
            log.warning(
                "provider key from %s: %s; calls to its upstream go without a provider key until it is fixed",
                self.source,
                read.problem,
            )
        return None if initial else "failure"


class SecretFiles:
    """The provider key files in use, polled every ``interval`` seconds off the loop.

    :meth:`watch` sets the files (call it again after a config reload); :meth:`value`
    is what the request path reads. A file added while running is read at once, so a
    new upstream does not wait a poll for its key.
    """

    def __init__(self, *, interval: float = 1.0, on_reload: OnReload | None = None) -> None:
        self.interval = interval
        self.on_reload = on_reload
        self._secrets: dict[Path, SecretValue] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._lock: asyncio.Lock | None = None

    def watch(self, paths: Iterable[Path]) -> None:
        """Watch exactly ``paths`` (values of files no longer listed are forgotten)."""
        wanted = list(dict.fromkeys(paths))
        new = [p for p in wanted if p not in self._secrets]
        self._secrets = {p: self._secrets.get(p) or SecretValue(from_file=p) for p in wanted}
        if new and self._task is not None:
            task = asyncio.get_running_loop().create_task(self.check(), name="secrets:load-new")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def value(self, path: Path) -> str | None:
        """The current key read from ``path`` (``None``: not watched or never read)."""
        secret = self._secrets.get(path)
        return secret.value if secret is not None else None

    def secret(self, path: Path) -> SecretValue | None:
        """The holder for ``path``, for callers that keep it (a memory read each time)."""
        return self._secrets.get(path)

    async def start(self) -> None:
        """Read every file once (in a thread), then poll until :meth:`stop` (``interval <= 0``: never)."""
        await self._check(initial=True)
        if self._task is None and self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="secrets:watch")

    async def stop(self) -> None:
        """Stop polling; the last values stay readable."""
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        self._task = None
        await _cancel(tasks)

    async def check(self) -> None:
        """Look at every file now (what the polling task does each interval)."""
        await self._check(initial=False)

    async def _check(self, initial: bool) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            items = list(self._secrets.items())
            if not items:
                return
            jobs = [(path, secret._fingerprint) for path, secret in items]
            reads = await asyncio.to_thread(lambda: [_read_secret(path, known) for path, known in jobs])
            secrets = [secret for _, secret in items]
            for secret, read in zip(secrets, reads, strict=True):
                outcome = secret._apply(read, initial)
                if outcome is not None and not initial and self.on_reload is not None:
                    self.on_reload(outcome)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # never let one bad poll end the watching
                log.exception("provider key files: check failed")


# -- the keys file ------------------------------------------------------------------------


def read_keys(config: KeysConfig) -> KeyStore:
    """Read and parse the keys file with the config's inline entries (blocking; for the CLI).

    Raises :class:`ConfigError` with every problem, including a file that cannot be read.
    """
    entries = list(config.entries)
    if config.file is not None:
        text = _read_keys_text(config.file)
        entries.extend(parse_keys_file(text, str(config.file), inline=config.entries).entries)
    return KeyStore(entries)


def _read_keys_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), 1, 1, "", f"cannot read the keys file: {_os_reason(exc)}")]
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError([Problem(str(path), line, column, "", "not UTF-8 text")]) from None


@dataclass(frozen=True, slots=True)
class _Loaded:
    fingerprint: Fingerprint | None
    store: KeyStore | None
    error: ConfigError | None


def _load_keys(
    config: KeysConfig, current: KeyStore | None, known: Fingerprint | None, force: bool, now: float
) -> _Loaded | None:
    """Stat, read, parse and rotate in a worker thread; ``None`` when the file is unchanged."""
    fingerprint: Fingerprint | None = None
    entries = list(config.entries)
    if config.file is None and not force:
        return None  # inline entries only change with the config, through reconfigure()
    if config.file is not None:
        try:
            fingerprint = _fingerprint(config.file)
        except OSError as exc:
            problem = Problem(str(config.file), 1, 1, "", f"cannot read the keys file: {_os_reason(exc)}")
            return _Loaded(None, None, ConfigError([problem]))
        if fingerprint == known and not force:
            return None
        try:
            text = _read_keys_text(config.file)
            if _fingerprint(config.file) != fingerprint:
                return None  # written to while read: the next poll takes the finished file
            entries.extend(parse_keys_file(text, str(config.file), inline=config.entries).entries)
        except ConfigError as exc:
            return _Loaded(fingerprint, None, exc)
        except OSError as exc:
            problem = Problem(str(config.file), 1, 1, "", f"cannot read the keys file: {_os_reason(exc)}")
            return _Loaded(fingerprint, None, ConfigError([problem]))
    if current is None:
        return _Loaded(fingerprint, KeyStore(entries), None)
    return _Loaded(fingerprint, current.rotate(entries, now, config.rotation_overlap), None)


class KeysFileWatcher:
    """The keys in force, reloaded from the keys file when it changes.

    :attr:`store` is ``None`` until the first successful load (the proxy then refuses
    every call: never an unauthenticated pass). A broken file keeps the last good store;
    a good one replaces it through :meth:`KeyStore.rotate`, so removed keys live on for
    ``rotation_overlap``. ``clock`` gives wall-clock seconds (expiry is wall-clock).
    """

    def __init__(
        self,
        config: KeysConfig,
        *,
        on_reload: OnReload | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.on_reload = on_reload
        self.clock = clock
        self.store: KeyStore | None = None
        self._fingerprint: Fingerprint | None = None
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[str | None]] = set()
        self._lock: asyncio.Lock | None = None
        self._started = False

    async def start(self, *, strict: bool = True) -> None:
        """Load the keys (in a thread), then check the file every ``reload_interval``.

        ``strict`` (at process start): a file that cannot be loaded raises
        :class:`ConfigError` and nothing is left running. Otherwise (a keys section
        added by a config reload) the problems are logged, :attr:`store` stays as it
        was, and polling starts anyway so the fixed file is picked up.
        """
        outcome, error = await self._load(force=True, initial=True)
        if outcome == "failure" and strict and error is not None:
            raise error
        self._started = True
        if self._task is None and self.config.file is not None and self.config.reload_interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keys:watch")

    async def stop(self) -> None:
        """Stop watching; the last store stays in force."""
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        self._task = None
        await _cancel(tasks)

    def reconfigure(self, config: KeysConfig) -> None:
        """Take a reloaded ``keys`` section (on the loop): reload now if the file or entries changed."""
        old, self.config = self.config, config
        if (old.file, old.entries) == (config.file, config.entries):
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="keys:reconfigure")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if self._started and self._task is None and config.file is not None and config.reload_interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keys:watch")

    async def check(self) -> str | None:
        """Reload if the file changed: ``"success"``, ``"failure"``, or ``None`` (unchanged)."""
        outcome, _ = await self._load(force=False, initial=False)
        return outcome

    async def reload(self) -> str | None:
        """Reload now, changed or not (a SIGHUP or a reconfigured section)."""
        outcome, _ = await self._load(force=True, initial=False)
        return outcome

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await self.check()
            except Exception:  # never let one bad poll end the watching
                log.exception("keys file: check failed")

    async def _load(self, *, force: bool, initial: bool) -> tuple[str | None, ConfigError | None]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            config = self.config
            loaded = await asyncio.to_thread(
                _load_keys, config, self.store, self._fingerprint, force, self.clock()
            )
            if loaded is None:
                return None, None
            outcome = self._take(config, loaded, initial)
        if outcome is not None and not initial and self.on_reload is not None:
            self.on_reload(outcome)
        return outcome, loaded.error

    def _take(self, config: KeysConfig, loaded: _Loaded, initial: bool) -> str | None:
        """Swap in a new store or log why not (on the loop); the outcome to count."""
        where = str(config.file) if config.file is not None else "the config's keys.entries"
        if loaded.store is not None:
            self.store = loaded.store
            self._fingerprint = loaded.fingerprint
            self._failing = False
            retiring = loaded.store.retiring()
            log.info(
                "keys %s from %s: %d keys in force%s",
                "loaded" if initial else "reloaded",
                where,
                len(loaded.store) - len(retiring),
                f", {len(retiring)} rotated out and valid for at most "
                f"{max(u for _, u in retiring) - self.clock():.0f}s more"
                if retiring
                else "",
            )
            return "success"
        error = loaded.error
        repeated = self._failing and loaded.fingerprint is None and self._fingerprint is None
        self._fingerprint = loaded.fingerprint
        self._failing = True
        if repeated:
            return None  # still missing: said once already
        kept = (
            "keeping the last good keys"
            if self.store is not None
            else "every call is refused until it is fixed"
        )
        problems = error.problems if error is not None else []
        log.error(
            "keys file %s rejected (%d problem%s), %s:\n%s",
            where,
            len(problems),
            "" if len(problems) == 1 else "s",
            kept,
            "\n".join(str(p) for p in problems),
        )
        return "failure"
