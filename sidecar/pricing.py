"""The price table and exact cost arithmetic.

A pricing file gives USD per one million tokens for each model::

    version: sidecar/v1        # optional here; if present it must be sidecar/v1
    models:
      gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}
      claude-sonnet-4:
        input: 3.0
        cached_input: 0.30     # cache reads
        cache_write: 3.75      # 5-minute cache writes
        cache_write_1h: 6.0    # 1-hour cache writes
        output: 15.0
        aliases: ["claude-sonnet-4-*", "claude-sonnet-4-0"]
        long_context: {above: 200000, input: 6.0, output: 22.5}
        tiers:
          batch: {input: 1.5, cached_input: 0.15, cache_write: 1.875, output: 7.5}

``input`` and ``output`` are required; the other prices are optional. Numbers are
read as :class:`~decimal.Decimal` from the YAML text (never through ``float``), so
``0.1 + 0.2`` is exactly ``0.3`` here.

Lookup (:meth:`PriceTable.lookup`), most specific first:

1. ``exact``: the model name is an entry (or a literal alias, without wildcards,
   which then reports kind ``alias``).
2. ``dated``: the name without a trailing ``-YYYY-MM-DD`` or ``-YYYYMMDD`` snapshot
   date is an entry or a literal alias (``gpt-4o-2024-08-06`` → ``gpt-4o``). A
   snapshot whose price differs is listed as an entry of its own and wins by rule 1.
3. ``alias``: the longest matching glob alias (``fnmatch``, case-sensitive; on equal
   lengths the entry written first wins).
4. ``dated``: the name without its snapshot date matches a glob alias.

A name a glob would catch but whose dated base is an entry goes to that entry, so
``claude-sonnet-4-5-20250929`` is priced as ``claude-sonnet-4-5`` even though
``claude-sonnet-4-*`` also matches it.

Cost (:func:`cost`) of one call, with every count ``None`` taken as 0::

    (input - cached_input - cache_write)  * input price
  + cached_input                          * cached_input price   (missing → input price)
  + (cache_write - cache_write_1h)        * cache_write price    (missing → input price)
  + cache_write_1h                        * cache_write_1h price (missing → cache_write price)
  + output                                * output price
  all / 1,000,000

``input`` counts every input token, cached and cache-written ones included, as in
:class:`~sidecar.model.Usage`. Reasoning tokens are inside ``output`` and are never
billed again. Price blocks overlay the base prices field by field: the
``long_context`` block when ``input`` exceeds its ``above``; then the block of the
call's ``service_tier`` (e.g. ``batch``, ``flex``, ``priority``), which may carry a
``long_context`` of its own.

Pure module except :func:`load_file` and :func:`default_table` (which read files).
Imports :mod:`sidecar.yamlspec`, :mod:`sidecar.model`, :mod:`sidecar.errors` and the
standard library.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Context, Decimal, localcontext
from importlib import resources
from typing import Literal

from yaml.nodes import Node

from sidecar.model import Usage
from sidecar.yamlspec import Reader, index, join, locate

__all__ = [
    "VERSION",
    "LongContext",
    "Price",
    "PriceMatch",
    "PriceTable",
    "Rates",
    "Tier",
    "cost",
    "default_table",
    "load",
    "load_file",
]

VERSION = "sidecar/v1"
MatchKind = Literal["exact", "alias", "dated"]

_MILLION = Decimal(1_000_000)
# Wide enough that no realistic count * price is ever rounded.
_EXACT = Context(prec=60)
_DATED = re.compile(r"(.+)-(?:\d{4}-\d{2}-\d{2}|\d{8})")
_TIER_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_RATE_FIELDS = ("input", "cached_input", "cache_write", "cache_write_1h", "output")
_CACHE_LIMIT = 4096  # distinct model names remembered by lookup(); the names come from clients


@dataclass(frozen=True, slots=True)
class Rates:
    """Concrete USD-per-million prices for each token type, after fallbacks."""

    input: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    output: Decimal


@dataclass(frozen=True)
class LongContext:
    """Prices that replace the base ones (field by field) when a call's input exceeds ``above``."""

    above: int
    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    output: Decimal | None = None


@dataclass(frozen=True)
class Tier:
    """Prices of one service tier, replacing the base ones field by field."""

    input: Decimal | None = None
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    output: Decimal | None = None
    long_context: LongContext | None = None


@dataclass(frozen=True)
class Price:
    """One model's prices (USD per one million tokens)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None
    long_context: LongContext | None = None
    tiers: Mapping[str, Tier] = field(default_factory=dict, hash=False)
    aliases: tuple[str, ...] = ()
    # The Rates of each (tier, long context or not, tier's long context or not) seen so
    # far: a few per model, computed once (cost() runs for every priced call).
    _rates: dict[tuple[str | None, bool, bool], Rates] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def rates(self, input_tokens: int = 0, service_tier: str | None = None) -> Rates:
        """The prices that apply to a call with this many input tokens and this service tier."""
        long_context = self.long_context
        tier = self.tiers.get(service_tier) if service_tier is not None else None
        key = (
            service_tier if tier is not None else None,
            long_context is not None and input_tokens > long_context.above,
            tier is not None and tier.long_context is not None and input_tokens > tier.long_context.above,
        )
        rates = self._rates.get(key)
        if rates is None:
            if len(self._rates) >= 64:  # tiers come from responses: keep the memo small
                self._rates.clear()
            rates = self._rates[key] = self._compute_rates(tier, key[1], key[2])
        return rates

    def _compute_rates(self, tier: Tier | None, long_context: bool, tier_long_context: bool) -> Rates:
        values: dict[str, Decimal | None] = {name: getattr(self, name) for name in _RATE_FIELDS}
        blocks: list[LongContext | Tier] = []
        if long_context and self.long_context is not None:
            blocks.append(self.long_context)
        if tier is not None:
            blocks.append(tier)
            if tier_long_context and tier.long_context is not None:
                blocks.append(tier.long_context)
        for block in blocks:
            for name in _RATE_FIELDS:
                value = getattr(block, name)
                if value is not None:
                    values[name] = value
        base = values["input"]
        assert base is not None and values["output"] is not None  # required by construction
        cache_write = values["cache_write"] if values["cache_write"] is not None else base
        return Rates(
            input=base,
            cached_input=values["cached_input"] if values["cached_input"] is not None else base,
            cache_write=cache_write,
            cache_write_1h=values["cache_write_1h"] if values["cache_write_1h"] is not None else cache_write,
            output=values["output"],
        )


@dataclass(frozen=True, slots=True)
class PriceMatch:
    """The entry that prices a model name, and which lookup rule found it."""

    name: str
    price: Price
    kind: MatchKind


def cost(usage: Usage, price: Price, service_tier: str | None = None) -> Decimal:
    """The exact USD cost of one call (see the module docstring for the formula).

    ``None`` counts are taken as 0 here (the caller decides whether a call with no
    usage is priced at all). The uncached input part ``input - cached_input -
    cache_write`` and the five-minute write part ``cache_write - cache_write_1h``
    are clamped at 0, so inconsistent counts from an upstream never give a
    negative term. The result is exact: Decimal arithmetic, no float, no rounding.
    """
    inp = usage.input or 0
    cached = usage.cached_input or 0
    written = usage.cache_write or 0
    written_1h = usage.cache_write_1h or 0
    out = usage.output or 0
    r = price.rates(inp, service_tier)
    uncached = max(inp - cached - written, 0)
    written_5m = max(written - written_1h, 0)
    with localcontext(_EXACT):
        total = (
            uncached * r.input
            + cached * r.cached_input
            + written_5m * r.cache_write
            + written_1h * r.cache_write_1h
            + out * r.output
        )
        return total / _MILLION


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class PriceTable:
    """Prices by model name, with alias and snapshot-date lookup (memoised per name)."""

    def __init__(self, models: Mapping[str, Price], version: str = "", source: str = "") -> None:
        self.models: Mapping[str, Price] = dict(models)
        self.version = version  # first 12 hex digits of the file's SHA-256
        self.source = source
        aliases = [(pattern, name) for name, price in self.models.items() for pattern in price.aliases]
        self._literal = {p: name for p, name in reversed(aliases) if not _is_glob(p)}
        # Longest glob first; sorted() is stable, so file order breaks ties.
        self._globs = sorted(((p, n) for p, n in aliases if _is_glob(p)), key=lambda pair: -len(pair[0]))
        self._cache: dict[str, PriceMatch | None] = {}

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, model: object) -> bool:
        return model in self.models

    def lookup(self, model: str) -> PriceMatch | None:
        """The entry pricing ``model``, or ``None`` (see the module docstring for the rules)."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        dated = _DATED.fullmatch(model)
        base = dated.group(1) if dated is not None else None
        match = self._find(model, "exact", globs=False)
        if match is None and base is not None:
            match = self._find(base, "dated", globs=False)
        if match is None:
            match = self._find(model, "alias", globs=True)
        if match is None and base is not None:
            match = self._find(base, "dated", globs=True)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[model] = match
        return match

    def _find(self, model: str, kind: MatchKind, *, globs: bool) -> PriceMatch | None:
        if not globs:
            price = self.models.get(model)
            if price is not None:
                return PriceMatch(model, price, kind)
            name = self._literal.get(model)
            if name is not None:
                return PriceMatch(name, self.models[name], "alias" if kind == "exact" else kind)
            return None
        for pattern, name in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return PriceMatch(name, self.models[name], kind)
        return None


# -- the file format -------------------------------------------------------------


def _rates(r: Reader, m: dict[str, Node], path: str) -> dict[str, Decimal | None]:
    zero = Decimal(0)
    return {name: r.decimal(m.get(name), join(path, name), minimum=zero) for name in _RATE_FIELDS}


def _long_context(r: Reader, node: Node, path: str) -> LongContext | None:
    m = r.mapping(node, path, ("above", *_RATE_FIELDS), required=("above",))
    if m is None:
        return None
    rates = _rates(r, m, path)
    if all(v is None for v in rates.values()) and not any(k in m for k in _RATE_FIELDS):
        r.problem(node, path, "gives no price (expected at least one of " + ", ".join(_RATE_FIELDS) + ")")
    return LongContext(above=r.integer(m.get("above"), join(path, "above"), 0, minimum=1), **rates)


def _tier(r: Reader, node: Node, path: str) -> Tier | None:
    m = r.mapping(node, path, (*_RATE_FIELDS, "long_context"))
    if m is None:
        return None
    rates = _rates(r, m, path)
    lc = m.get("long_context")
    if not m:
        r.problem(node, path, "gives no price (expected at least one of " + ", ".join(_RATE_FIELDS) + ")")
    return Tier(
        **rates, long_context=None if lc is None else _long_context(r, lc, join(path, "long_context"))
    )


def _model(r: Reader, node: Node, path: str) -> Price | None:
    keys = (*_RATE_FIELDS, "aliases", "long_context", "tiers")
    m = r.mapping(node, path, keys, required=("input", "output"), what="a mapping of prices")
    if m is None:
        return None
    rates = _rates(r, m, path)
    tiers: dict[str, Tier] = {}
    tiers_node = m.get("tiers")
    if tiers_node is not None:
        for name, key_node, value in r.entries(tiers_node, join(path, "tiers")) or []:
            tier_path = join(join(path, "tiers"), name)
            if not _TIER_NAME.fullmatch(name):
                r.problem(key_node, tier_path, f'invalid tier name "{name}": must match [a-z][a-z0-9_-]*')
            tier = _tier(r, value, tier_path)
            if tier is not None:
                tiers[name] = tier
    lc = m.get("long_context")
    return Price(
        input=rates["input"] or Decimal(0),
        output=rates["output"] or Decimal(0),
        cached_input=rates["cached_input"],
        cache_write=rates["cache_write"],
        cache_write_1h=rates["cache_write_1h"],
        long_context=None if lc is None else _long_context(r, lc, join(path, "long_context")),
        tiers=tiers,
        aliases=tuple(r.string_list(m.get("aliases"), join(path, "aliases"), [])),
    )


def load(text: str, filename: str) -> PriceTable:
    """Read a pricing file's text; raises :class:`ConfigError` with every problem found.

    :attr:`PriceTable.version` is computed from the UTF-8 bytes of ``text``.
    """
    return _load(text.encode("utf-8"), filename)


def load_file(path: str | os.PathLike[str]) -> PriceTable:
    """Read and :func:`load` a pricing file (its version hashes the file's exact bytes)."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    return _load(data, name)


@functools.cache
def default_table() -> PriceTable:
    """The catalogue packaged with the sidecar (``sidecar/data/prices.yaml``), read once."""
    data = resources.files("sidecar").joinpath("data/prices.yaml").read_bytes()
    return _load(data, "sidecar/data/prices.yaml")


def _load(data: bytes, filename: str) -> PriceTable:
    r = Reader(filename)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        r.problem(None, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})")
        r.raise_for_problems()
        raise  # pragma: no cover
    root = r.compose(text)
    if root is None and not r.problems:
        r.problem(None, "", "empty file: expected a mapping with models:")
    r.raise_for_problems()
    assert root is not None
    m = r.mapping(root, "", ("version", "models"), required=("models",), what="a mapping with models:")
    r.raise_for_problems()
    assert m is not None
    version = r.string(m.get("version"), "version")
    if version is not None and version != VERSION:
        r.problem(m["version"], "version", f'unsupported version "{version}": this sidecar reads {VERSION}')
        r.raise_for_problems()
    models: dict[str, Price] = {}
    alias_owner: dict[str, str] = {}
    alias_nodes: list[tuple[str, str, Node | None]] = []
    for name, key_node, value in r.entries(m["models"], "models", "a mapping of model names to prices") or []:
        path = join("models", name)
        if not name.strip() or name != name.strip():
            r.problem(key_node, path, f'invalid model name "{name}"')
        price = _model(r, value, path)
        if price is None:
            continue
        models[name] = price
        for i, pattern in enumerate(price.aliases):
            alias_nodes.append((pattern, index(join(path, "aliases"), i), locate(value, index("aliases", i))))
    for pattern, where, node in alias_nodes:
        owner = where.split(".aliases[")[0].removeprefix("models.")
        if pattern in models:
            r.problem(node, where, f'alias "{pattern}" is also a model name (the model entry would win)')
        elif pattern in alias_owner and alias_owner[pattern] != owner:
            r.problem(node, where, f'alias "{pattern}" is also an alias of "{alias_owner[pattern]}"')
        alias_owner.setdefault(pattern, owner)
    r.raise_for_problems()
    version_hash = hashlib.sha256(data).hexdigest()[:12]
    return PriceTable(models, version=version_hash, source=filename)
