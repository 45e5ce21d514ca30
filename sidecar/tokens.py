"""Local token estimates with tiktoken, working offline; always labelled *estimated*.

This module owns counting tokens for calls whose usage the upstream did not report
(streams without usage, cut streams, client aborts). Its results go into
``CallRecord.estimated`` and never overwrite a reported count.

tiktoken downloads its BPE files on first use; the sidecar must not depend on that.
The ``bpe_openai`` package ships ``cl100k_base`` and ``o200k_base`` byte-identical (gzip),
so :func:`prepare_offline_cache` decompresses them into a tiktoken cache directory
under the names tiktoken looks for (the SHA-1 of the download URL), checked against
tiktoken's pinned SHA-256, and points ``TIKTOKEN_CACHE_DIR`` at it. tiktoken checks the
hash again when it loads a file; a wrong file makes it try to download, which fails
loudly when offline rather than giving wrong counts.

Model → encoding uses tiktoken's own table (:func:`tiktoken.model.encoding_name_for_model`).
Models it does not know fall back to ``o200k_base``. That includes every Claude
model: Anthropic publishes no tokenizer, so Claude estimates are approximate (and,
like all estimates, labelled estimated). Encodings not shipped offline (``p50k_base``,
``r50k_base``, ``gpt2``: retired models only) are approximated by ``cl100k_base``.
Chat framing tokens (a few per message) are not counted.

The only I/O here is preparing the cache and loading encodings; both block, so the
caller runs them in a thread (or once at startup). No asyncio, no clock.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tiktoken.model

from sidecar.model import Usage
from sidecar.providers import PromptText

__all__ = [
    "DEFAULT_ENCODING",
    "OFFLINE_ENCODINGS",
    "Estimator",
    "default_cache_dir",
    "prepare_offline_cache",
]

_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


@dataclass(frozen=True, slots=True)
class _BundledEncoding:
    name: str
    sha256: str  # tiktoken's pinned hash (tiktoken_ext/openai_public.py)

    @property
    def cache_name(self) -> str:
        """The file name tiktoken looks for in its cache: SHA-1 of the download URL."""
        return hashlib.sha1(_URL.format(name=self.name).encode()).hexdigest()


#: The encodings available offline, with tiktoken's pinned SHA-256 of each file.
_BUNDLED: dict[str, _BundledEncoding] = {
    e.name: e
    for e in (
        _BundledEncoding("cl100k_base", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
        _BundledEncoding("o200k_base", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    )
}
#: Names of the encodings that work without network access.
OFFLINE_ENCODINGS: tuple[str, ...] = tuple(_BUNDLED)
#: The encoding for models tiktoken does not know (Claude among them).
DEFAULT_ENCODING = "o200k_base"
#: Stand-in for known encodings that are not shipped offline.
_LEGACY_FALLBACK = "cl100k_base"


def default_cache_dir() -> Path:
    """``$TIKTOKEN_CACHE_DIR`` when set (and not empty), else ``~/.cache/llm-sidecar/tiktoken``."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path("~/.cache/llm-sidecar/tiktoken").expanduser()


def _fallback_cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"llm-sidecar-tiktoken-{uid}"


def _valid(file: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _has_files(directory: Path) -> bool:
    return all(_valid(directory / e.cache_name, e.sha256) for e in _BUNDLED.values())


def _bundled_file(name: str) -> Path:
    """Where ``bpe_openai`` keeps ``NAME.tiktoken.gz``, found without importing it.

    Importing ``bpe_openai`` would build its own tokenizer tables at import time (and
    warn about a deprecated ``importlib.resources`` call); the sidecar needs the files only.
    """
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bpe_openai package (tiktoken's encodings, offline) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"


def _bundled_bytes(encoding: _BundledEncoding) -> bytes:
    data = gzip.decompress(_bundled_file(encoding.name).read_bytes())
    if hashlib.sha256(data).hexdigest() != encoding.sha256:
        raise ValueError(f"bpe_openai's {encoding.name} does not match tiktoken's pinned SHA-256")
    return data


def _fill(directory: Path) -> None:
    """Write every bundled encoding that is missing or wrong in ``directory`` (atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    for encoding in _BUNDLED.values():
        target = directory / encoding.cache_name
        if _valid(target, encoding.sha256):
            continue
        data = _bundled_bytes(encoding)
        fd, tmp = tempfile.mkstemp(prefix=f".{encoding.cache_name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def prepare_offline_cache(cache_dir: Path | None = None) -> Path:
    """Make tiktoken's offline cache hold the bundled encodings; return the directory in use.

    When ``TIKTOKEN_CACHE_DIR`` already names a directory holding valid copies, nothing
    is written and that directory is returned. Otherwise the files are written into
    ``cache_dir`` (default: :func:`default_cache_dir`; a per-user temp directory when
    that is not writable), missing or wrong files replaced, and ``TIKTOKEN_CACHE_DIR``
    is set to it. Blocking (hashes and writes a few megabytes): call it at startup or
    from a thread.
    """
    configured = os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured and _has_files(Path(configured)):
        return Path(configured)
    candidates = [cache_dir or default_cache_dir(), _fallback_cache_dir()]
    error: OSError | None = None
    for directory in candidates:
        try:
            _fill(directory)
        except OSError as exc:
            error = error or exc
            continue
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        return directory
    assert error is not None
    raise error


class Estimator:
    """Counts tokens locally; encodings load once, lazily, under a lock.

    Loading an encoding reads and parses a few megabytes and blocks; counting a long
    text blocks too. Call from a worker thread. With ``prepare`` True the offline
    cache is prepared (see :func:`prepare_offline_cache`) before the first load.
    """

    def __init__(self, cache_dir: Path | None = None, prepare: bool = True) -> None:
        self._cache_dir = cache_dir
        self._prepare = prepare
        self._prepared = False
        self._lock = threading.Lock()
        self._encodings: dict[str, tiktoken.Encoding] = {}

    def encoding_for(self, model: str | None) -> str:
        """The encoding name used for ``model`` (see the module docstring for fallbacks)."""
        if not model:
            return DEFAULT_ENCODING
        try:
            name = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            return DEFAULT_ENCODING
        return name if name in _BUNDLED else _LEGACY_FALLBACK

    def encoding(self, name: str) -> tiktoken.Encoding:
        """The loaded encoding ``name`` (loading it on first use)."""
        loaded = self._encodings.get(name)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._encodings.get(name)
            if loaded is None:
                if self._prepare and not self._prepared:
                    prepare_offline_cache(self._cache_dir)
                    self._prepared = True
                loaded = tiktoken.get_encoding(name)
                self._encodings[name] = loaded
        return loaded

    def count(self, text: str, model: str | None) -> int:
        """Tokens in ``text`` for ``model``; special-token text counts as plain text."""
        if not text:
            return 0
        return len(self.encoding(self.encoding_for(model)).encode(text, disallowed_special=()))

    def estimate(self, model: str | None, prompt: PromptText | None, output_text: str | None) -> Usage:
        """Estimated ``input`` (from ``prompt``) and ``output`` (from ``output_text``).

        A part that is not given (None) stays None; every other field is None.
        """
        return Usage(
            input=None if prompt is None else self.count(prompt.text, model) + prompt.token_ids,
            output=None if output_text is None else self.count(output_text, model),
        )
