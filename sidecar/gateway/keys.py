"""Virtual keys: the keys file, hashing, expiry and rotation overlap (issue 6).

Applications get a *virtual* key (``sk-llmsc-...``) that names their tenant; the real
provider keys stay in the sidecar (:mod:`sidecar.gateway.secrets`). The sidecar keeps
only the SHA-256 of each virtual key, so a leaked keys file or config grants nothing.

The keys file (``version: sidecar/v1``; unknown keys are errors, every problem is
reported with its ``file:line:col``)::

    version: sidecar/v1
    keys:
      - name: acme-prod                 # unique; [A-Za-z0-9][A-Za-z0-9._-]*, up to 64 characters
        tenant: acme                    # the tenant every call made with this key is counted under
        sha256: 9f86d081...             # 64 lowercase hex: SHA-256 of the UTF-8 key (never the key)
        models: [gpt-4o*, claude-3-5-*] # optional: allowed models, fnmatch globs (default: every model)
        expires: 2025-12-31T23:59:59Z   # optional: RFC 3339 time, or a date (= 00:00 UTC that day)
        limits: {rpm: 600, tpm: 100000, concurrency: 8}  # optional, see sidecar.gateway.model
        trust_tenant_header: false      # optional: true for a caller (a backend serving many
                                        # customers) whose own tenant header is believed

The same entries may sit inline in the config's ``keys:`` section
(:func:`parse_keys_section`); inline entries and the file's are merged and a name or
hash used twice is an error.

Rotation: :meth:`KeyStore.rotate` builds the store for a reloaded file. A key whose
hash is no longer in the file (removed, or its entry given a new hash) stays valid for
``rotation_overlap`` after the reload, so clients can move to the new key without a
window of 401s. To revoke a key at once, keep its entry with an ``expires`` in the
past (or run with ``rotation_overlap: 0s``).

Pure module: standard library, PyYAML nodes through :mod:`sidecar.yamlspec`,
:mod:`sidecar.tenants` and :mod:`sidecar.gateway.model`. No file access; the current
time (wall-clock seconds, as ``expires`` is a wall-clock time) is always a parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, NoReturn, Protocol

from yaml.nodes import MappingNode, Node, ScalarNode

from sidecar.errors import ConfigError
from sidecar.gateway.model import Limits, parse_limits
from sidecar.tenants import INVALID, OVERFLOW, UNKNOWN, clean_tenant
from sidecar.yamlspec import Reader, describe, index, join

__all__ = [
    "ENTRY_KEYS",
    "KEY_PREFIX",
    "VERSION",
    "AuthFailure",
    "KeyEntry",
    "KeyStore",
    "KeysConfig",
    "KeysFile",
    "allows_model",
    "check_name",
    "check_tenant",
    "format_expires",
    "hash_key",
    "new_key",
    "parse_expires",
    "parse_keys_file",
    "parse_keys_section",
    "presented_key",
    "tenant_for",
]

VERSION = "sidecar/v1"
#: What every key made by :func:`new_key` starts with, so a leaked one is recognisable
#: (secret scanners match on such prefixes) and never mistaken for a provider's key.
KEY_PREFIX = "sk-llmsc-"
#: The keys of one entry, in the order they are documented.
ENTRY_KEYS = ("name", "tenant", "sha256", "models", "expires", "limits", "trust_tenant_header")
_SECTION_KEYS = ("file", "entries", "rotation_overlap", "reload_interval")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))?)?"
)
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_STR_TAG = "tag:yaml.org,2002:str"
_RESERVED_TENANTS = (UNKNOWN, INVALID, OVERFLOW)

Reason = Literal["missing", "unknown", "expired"]

# What the client is told. None of them quotes the presented key, not even a prefix:
# a 401 body ends up in client logs and error trackers.
_MESSAGES: dict[str, str] = {
    "missing": "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
    "unknown": "Invalid API key.",
    "expired": "This API key has expired.",
}


# -- values -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One virtual key as configured: who it belongs to and what it may do.

    ``models`` is ``None`` for "every model"; ``expires`` is wall-clock epoch seconds.
    A request holds the entry it authenticated with until it ends, so a reload that
    removes or changes the entry never affects a call already in flight.
    """

    name: str
    tenant: str
    sha256: str
    models: tuple[str, ...] | None = None
    expires: float | None = None
    limits: Limits = field(default_factory=Limits)
    trust_tenant_header: bool = False


@dataclass(frozen=True, slots=True)
class AuthFailure:
    """Why a call is refused (answered 401 in the provider's error shape).

    ``message`` is safe to send to the client: it never contains the presented key.
    ``name`` is the matching entry's name for an expired key (for the sidecar's own
    log), ``None`` otherwise.
    """

    reason: Reason
    message: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class KeysFile:
    """A parsed keys file."""

    filename: str
    entries: tuple[KeyEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class KeysConfig:
    """The config's ``keys:`` section. Virtual keys are on when the section is present.

    ``rotation_overlap``: how long a key removed from the file (or given a new hash)
    stays valid after the reload that removed it. ``reload_interval``: how often the
    file is checked for changes.
    """

    file: Path | None = None
    entries: tuple[KeyEntry, ...] = ()
    rotation_overlap: float = 0.0
    reload_interval: float = 5.0


# -- hashing and headers ----------------------------------------------------------


def hash_key(key: str) -> str:
    """The SHA-256 of a key's UTF-8 bytes, as 64 lowercase hex characters.

    A plain (unsalted) hash is enough here, unlike for passwords: the keys this
    sidecar issues carry 256 random bits, so there is nothing to guess from the hash.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its hash: ``("sk-llmsc-<43 urlsafe chars>", sha256hex)``."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client presented: ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

    OpenAI SDKs send the former, Anthropic's the latter. A bearer token wins when both
    are set; an ``Authorization`` header with another scheme (``Basic``) is not a key
    of ours and is ignored. Header names are matched case-insensitively whatever the
    mapping type, and so is the ``Bearer`` scheme. The proxy strips both headers
    before forwarding, so a virtual key never reaches the provider.
    """
    bearer: str | None = None
    api_key: str | None = None
    for name, value in headers.items():
        lower = name.lower()
        if lower == "authorization" and bearer is None:
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif lower == "x-api-key" and api_key is None and value.strip():
            api_key = value.strip()
    return bearer if bearer is not None else api_key


def allows_model(entry: KeyEntry, model: str | None) -> bool:
    """Whether ``entry`` may call ``model`` (``None``: the request names no model).

    A key restricted to some models may not make calls that name none (files,
    batches): those could reach any model, so only an unrestricted key may.
    Globs are matched case-sensitively, as providers name models.
    """
    if entry.models is None:
        return True
    if model is None:
        return False
    return any(fnmatchcase(model, pattern) for pattern in entry.models)


def tenant_for(entry: KeyEntry, header_value: str | None, max_length: int = 128) -> str:
    """The tenant of a call made with ``entry``.

    The key's own tenant, unless the entry is marked ``trust_tenant_header`` and the
    client sent a non-empty tenant header: then that header, cleaned as usual.
    """
    if entry.trust_tenant_header and header_value is not None and header_value.strip():
        return clean_tenant(header_value, max_length)
    return entry.tenant


# -- the store ----------------------------------------------------------------------


class KeyStore:
    """The keys in force: entries by hash, plus rotated-out ones until their overlap ends.

    Immutable once built; a reload builds a new store (:meth:`rotate`) and swaps the
    reference, so a lookup never sees a half-updated store.
    """

    __slots__ = ("_by_hash", "_until")

    def __init__(
        self, entries: Iterable[KeyEntry] = (), *, _retiring: Mapping[str, float] | None = None
    ) -> None:
        self._by_hash: dict[str, KeyEntry] = {}
        for entry in entries:
            if entry.sha256 in self._by_hash:
                raise ValueError(
                    f"two keys with the same hash: {self._by_hash[entry.sha256].name!r} and {entry.name!r}"
                )
            self._by_hash[entry.sha256] = entry
        # hash -> wall-clock time the rotated-out entry stops being valid
        self._until: dict[str, float] = dict(_retiring or {})

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        """Every entry held, current and rotated out."""
        return tuple(self._by_hash.values())

    def retiring(self) -> list[tuple[KeyEntry, float]]:
        """Rotated-out entries and the time each stops being valid, soonest first."""
        return sorted(
            ((self._by_hash[h], until) for h, until in self._until.items()), key=lambda item: item[1]
        )

    def authenticate(self, presented: str | None, now: float) -> KeyEntry | AuthFailure:
        """The entry of a presented key, or why it is refused.

        Valid while ``now`` is before ``expires`` and, for a rotated-out key, before
        the end of its overlap; a key past its overlap is ``unknown``, exactly as it
        will be once a later reload drops it.
        """
        if not presented:
            return AuthFailure("missing", _MESSAGES["missing"])
        try:
            digest = hash_key(presented)
        except UnicodeEncodeError:  # a lone surrogate: no key of ours
            return AuthFailure("unknown", _MESSAGES["unknown"])
        entry = self._by_hash.get(digest)
        # The lookup goes by the hash of what was presented, so its timing tells nothing
        # about a stored key; the constant-time compare is belt and braces should the
        # lookup ever change.
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            return AuthFailure("unknown", _MESSAGES["unknown"])
        until = self._until.get(digest)
        if until is not None and now >= until:
            return AuthFailure("unknown", _MESSAGES["unknown"])
        if entry.expires is not None and now >= entry.expires:
            return AuthFailure("expired", _MESSAGES["expired"], entry.name)
        return entry

    def rotate(self, new_entries: Iterable[KeyEntry], now: float, overlap_s: float) -> KeyStore:
        """The store after a reload to ``new_entries`` at ``now``.

        Every new entry is in force at once (a hash present before takes its new
        settings). A current entry whose hash is gone stays valid until
        ``now + overlap_s``; an entry already rotated out keeps its own deadline and is
        dropped once that has passed. ``overlap_s <= 0`` drops gone keys at once.
        """
        fresh = list(new_entries)
        hashes = {e.sha256 for e in fresh}
        kept: list[KeyEntry] = []
        until: dict[str, float] = {}
        for digest, entry in self._by_hash.items():
            if digest in hashes:
                continue
            deadline = self._until.get(digest, now + overlap_s)
            if deadline > now:
                kept.append(entry)
                until[digest] = deadline
        return KeyStore([*fresh, *kept], _retiring=until)


# -- checks shared by the parsers and the CLI -------------------------------------------


def check_name(name: str) -> str | None:
    """Why ``name`` is not a valid key name, or ``None`` when it is."""
    if _NAME.fullmatch(name):
        return None
    return "must be 1 to 64 of A-Z a-z 0-9 . _ - and start with a letter or digit"


def check_tenant(tenant: str, max_length: int = 128) -> str | None:
    """Why ``tenant`` cannot be a key's tenant, or ``None`` when it can.

    A key's tenant must already be what :func:`sidecar.tenants.clean_tenant` would
    record (printable ASCII, no surrounding spaces, not too long) and not one of the
    values the sidecar itself uses for missing, invalid or folded tenants.
    """
    if not tenant.strip():
        return "must not be empty"
    if tenant in _RESERVED_TENANTS:
        return f"{tenant!r} is reserved by the sidecar"
    if clean_tenant(tenant, max_length) != tenant:
        if tenant != tenant.strip():
            return "must not start or end with spaces"
        return f"must be printable ASCII, at most {max_length} characters"
    return None


def parse_expires(value: str | date | datetime) -> float:
    """An expiry as wall-clock epoch seconds.

    Accepts an RFC 3339 time with an offset (``2025-12-31T23:59:59Z``,
    ``...+02:00``) or a date (``2025-12-31``: midnight UTC at the start of that day,
    the earlier reading, so a key never lives longer than its owner may have meant).
    ``datetime``/``date`` objects (what ``yaml.safe_load`` hands out) are taken too.
    A time without an offset is refused: it would mean different instants on
    differently configured hosts. Raises :class:`ValueError`.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a time needs an offset (Z or +HH:MM)")
        return value.timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    m = _RFC3339.fullmatch(value.strip())
    if m is None:
        raise ValueError("expected an RFC 3339 time (2025-12-31T23:59:59Z) or a date (2025-12-31)")
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if m.group(4) is None:
        return datetime(year, month, day, tzinfo=UTC).timestamp()
    if m.group(8) is None and m.group(9) is None:
        raise ValueError("a time needs an offset (Z or +HH:MM)")
    tz = UTC
    if m.group(9) is not None:
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = timezone(-offset if m.group(9) == "-" else offset)
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    moment = datetime(year, month, day, int(m.group(4)), int(m.group(5)), int(m.group(6)), micro, tzinfo=tz)
    return moment.timestamp()


def format_expires(seconds: float) -> str:
    """Epoch seconds as RFC 3339 UTC (``2025-12-31T23:59:59Z``), to the second."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- parsing ------------------------------------------------------------------------


class _PathContext(Protocol):
    def path(self, text: str) -> Path: ...


@dataclass
class _Taken:
    """Names and hashes already used (and where), across the file and the config."""

    names: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def _expires(r: Reader, node: Node | None, path: str) -> float | None:
    if node is None:
        return None
    if isinstance(node, ScalarNode) and node.tag == _TIMESTAMP_TAG:
        # An unquoted date or time: YAML resolves it to a timestamp; read its text.
        node = ScalarNode(_STR_TAG, node.value, node.start_mark, node.end_mark, node.style)
    return r.convert(node, path, parse_expires, what="expires")


def _sha256(r: Reader, node: Node | None, path: str) -> str | None:
    text = r.string(node, path)
    if text is None or node is None:
        return None
    if _SHA256.fullmatch(text):
        return text
    # Never quote the value: a key pasted here by mistake must not reach a log.
    if text.startswith(KEY_PREFIX):
        message = "this is a key, not its hash: store only the SHA-256 (llm-sidecar keys hash prints it)"
    elif re.fullmatch(r"[0-9a-fA-F]{64}", text):
        message = "must be lowercase hex"
    else:
        message = (
            "expected 64 lowercase hex characters: the SHA-256 of the key (llm-sidecar keys hash prints it)"
        )
    r.problem(node, path, message)
    return None


def _models(r: Reader, node: Node | None, path: str) -> tuple[str, ...] | None:
    if node is None:
        return None
    models = r.string_list(node, path)
    if models is None:
        return None
    if not models:
        r.problem(node, path, "must not be empty (leave models out to allow every model)")
        return None
    return tuple(models)


def _parse_entry(r: Reader, node: Node, path: str, taken: _Taken) -> KeyEntry | None:
    """One entry; ``None`` when it has a problem (all recorded)."""
    before = len(r.problems)
    m = r.mapping(node, path, ENTRY_KEYS, required=("name", "tenant", "sha256"), what="a key entry")
    if m is None:
        return None

    def at(key: str) -> tuple[Node | None, str]:
        return m.get(key), join(path, key)

    name = r.string(*at("name"))
    if name is not None and (why := check_name(name)) is not None:
        r.problem(m["name"], join(path, "name"), f"invalid name {name!r}: {why}")
        name = None
    if name is not None:
        if name in taken.names:
            r.problem(
                m["name"], join(path, "name"), f"duplicate key name {name!r} (also {taken.names[name]})"
            )
        else:
            taken.names[name] = path
    tenant = r.string(*at("tenant"))
    if tenant is not None and (why := check_tenant(tenant)) is not None:
        r.problem(m["tenant"], join(path, "tenant"), f"invalid tenant {tenant!r}: {why}")
        tenant = None
    digest = _sha256(r, *at("sha256"))
    if digest is not None:
        if digest in taken.hashes:
            r.problem(m["sha256"], join(path, "sha256"), f"the same key as {taken.hashes[digest]}")
        else:
            taken.hashes[digest] = f"{path} ({name})" if name else path
    models = _models(r, *at("models"))
    expires = _expires(r, *at("expires"))
    limits = parse_limits(r, m["limits"], join(path, "limits")) if "limits" in m else Limits()
    trust = r.boolean(*at("trust_tenant_header"), False)
    if len(r.problems) != before or name is None or tenant is None or digest is None:
        return None
    return KeyEntry(name, tenant, digest, models, expires, limits, trust)


def _parse_entries(r: Reader, items: Sequence[Node], path: str, taken: _Taken) -> list[KeyEntry]:
    out: list[KeyEntry] = []
    for i, item in enumerate(items):
        entry = _parse_entry(r, item, index(path, i), taken)
        if entry is not None:
            out.append(entry)
    return out


def _fail(r: Reader) -> NoReturn:
    raise ConfigError(sorted(r.problems, key=lambda p: (p.line, p.column)))


def parse_keys_file(text: str, filename: str, *, inline: Sequence[KeyEntry] = ()) -> KeysFile:
    """Parse and validate a keys file; raise :class:`ConfigError` with every problem.

    ``version`` is checked first: nothing else is read under a version this sidecar
    does not know. ``inline`` are the config's own entries: a name or hash the file
    uses again is a problem located in the file.
    """
    r = Reader(filename)
    root = r.compose(text)
    if root is None:
        if not r.problems:
            r.problem(None, "", f"empty keys file (expected version: {VERSION} and keys)")
        _fail(r)
    if not isinstance(root, MappingNode):
        r.problem(root, "", f"expected a mapping with version and keys, got {describe(root)}")
        _fail(r)
    version_node = next(
        (v for k, v in root.value if isinstance(k, ScalarNode) and k.value == "version"), None
    )
    if version_node is None:
        r.problem(root, "version", f'missing required key "version" (expected {VERSION})')
        _fail(r)
    version = r.string(version_node, "version")
    if version != VERSION:
        if version is not None:
            r.problem(
                version_node, "version", f"unsupported version {version!r} (this sidecar reads {VERSION})"
            )
        _fail(r)
    fields = r.mapping(root, "", ("version", "keys"), required=("keys",)) or {}
    where = "the config's keys.entries"
    taken = _Taken(
        names={e.name: where for e in inline},
        hashes={e.sha256: f"{where} ({e.name})" for e in inline},
    )
    items = r.sequence(fields["keys"], "keys", "a list of key entries") if "keys" in fields else None
    entries = _parse_entries(r, items or [], "keys", taken)
    if r.problems:
        _fail(r)
    return KeysFile(filename, tuple(entries))


def parse_keys_section(r: Reader, node: Node, path: str, ctx: _PathContext) -> KeysConfig:
    """The config's ``keys:`` section: ``{file, entries, rotation_overlap, reload_interval}``.

    ``file`` is relative to the config file's directory. At least one of ``file`` and
    ``entries`` is required: a ``keys:`` section that names no key would turn
    authentication on and refuse every call, or, read leniently, leave it off while
    the operator believes it on. The file itself is read at start (it may change
    while running); names and hashes are checked against it then.
    """
    m = r.mapping(
        node, path, _SECTION_KEYS, what="a mapping (file, entries, rotation_overlap, reload_interval)"
    )
    d = KeysConfig()
    if m is None:
        return d
    text = r.string(m.get("file"), join(path, "file"))
    epath = join(path, "entries")
    items = r.sequence(m["entries"], epath, "a list of key entries") if "entries" in m else None
    entries = _parse_entries(r, items or [], epath, _Taken())
    if "file" not in m and not items:
        # Entries with problems are reported on their own; this is for a section naming no key.
        r.problem(m.get("entries", node), path, "give file (a keys file) or entries (inline keys), or both")
    return KeysConfig(
        file=ctx.path(text) if text is not None else None,
        entries=tuple(entries),
        rotation_overlap=r.duration(
            m.get("rotation_overlap"), join(path, "rotation_overlap"), d.rotation_overlap
        ),
        reload_interval=r.duration(
            m.get("reload_interval"), join(path, "reload_interval"), d.reload_interval, positive=True
        ),
    )
