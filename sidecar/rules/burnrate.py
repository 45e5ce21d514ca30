"""The multiwindow burn-rate table (``sidecar/data/burn_rate_windows.yaml``) and its arithmetic.

Alerts are stored as budget fractions so one table serves any SLO period; the
factor an alert compares against is ``budget_fraction x period / long``. The table
is package data, read once (its source is cited in the file itself).

Imports the standard library and :mod:`sidecar.yamlspec`; reads only package data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources

from yaml.nodes import Node, ScalarNode

from sidecar import yamlspec
from sidecar.errors import ConfigError

__all__ = ["BurnSpec", "default_alerts", "factor", "parse_fraction", "parse_spec_list"]

TABLE_VERSION = "sidecar/burn-rate-windows/v1"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


@dataclass(frozen=True, slots=True)
class BurnSpec:
    """One alert of a burn-rate table before a period is known: a fraction or a fixed factor."""

    severity: str
    long: float
    short: float
    budget_fraction: float | None = None
    factor: float | None = None


def factor(spec: BurnSpec, period: float) -> float:
    """The burn-rate factor of ``spec`` for an SLO ``period`` (seconds)."""
    if spec.factor is not None:
        return spec.factor
    assert spec.budget_fraction is not None
    return spec.budget_fraction * period / spec.long


def parse_fraction(
    r: yamlspec.Reader, node: Node | None, path: str, *, numbers_are_percent: bool = False
) -> float | None:
    """A ratio written ``5%`` or as a number: a fraction (``0.05``), or a percent when asked.

    Returns the fraction, or ``None`` (problem recorded) when the value is not a
    number or percentage; range checks are the caller's.
    """
    if node is None:
        return None
    if isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT):
        number = r.decimal(node, path)
        if number is None:
            return None
        # Decimal keeps 99.9 / 100 == 0.999 exactly before the one rounding to float.
        return float(number / 100) if numbers_are_percent else float(number)
    text = r.string(node, path)
    if text is None:
        return None
    if text.endswith("%"):
        try:
            value = Decimal(text[:-1].strip())
        except InvalidOperation:
            value = None
        if value is not None and value.is_finite():
            return float(value / 100)
    form = "a percentage such as 99.9 or 99.9%" if numbers_are_percent else "a fraction such as 0.05 or 5%"
    r.problem(node, path, f"expected {form}, got string {text!r}")
    return None


def parse_spec_list(
    r: yamlspec.Reader, node: Node, path: str, severities: tuple[str, ...]
) -> list[tuple[BurnSpec, Node, str]]:
    """Parse a list of ``{severity, long, short, budget_fraction | factor}`` (problems recorded)."""
    out: list[tuple[BurnSpec, Node, str]] = []
    items = r.sequence(node, path, "a list of burn-rate alerts")
    if items is None:
        return out
    if not items:
        r.problem(node, path, "must list at least one alert")
    for i, item in enumerate(items):
        ipath = yamlspec.index(path, i)
        fields = r.mapping(
            item,
            ipath,
            ("severity", "long", "short", "budget_fraction", "factor"),
            required=("severity", "long", "short"),
        )
        if fields is None:
            continue
        severity = r.string(fields.get("severity"), yamlspec.join(ipath, "severity"), choices=severities)
        long = r.duration(fields.get("long"), yamlspec.join(ipath, "long"), positive=True)
        short = r.duration(fields.get("short"), yamlspec.join(ipath, "short"), positive=True)
        fraction = parse_fraction(r, fields.get("budget_fraction"), yamlspec.join(ipath, "budget_fraction"))
        fixed = r.number(fields.get("factor"), yamlspec.join(ipath, "factor"))
        ok = severity is not None and long is not None and short is not None
        if ("budget_fraction" in fields) == ("factor" in fields):
            r.problem(item, ipath, "give exactly one of budget_fraction or factor")
            ok = False
        if fraction is not None and not 0 < fraction <= 1:
            r.problem(
                fields["budget_fraction"], yamlspec.join(ipath, "budget_fraction"), "must be in (0, 100%]"
            )
            ok = False
        if fixed is not None and fixed <= 0:
            r.problem(fields["factor"], yamlspec.join(ipath, "factor"), "must be greater than 0")
            ok = False
        if long is not None and short is not None and short >= long:
            r.problem(fields["short"], yamlspec.join(ipath, "short"), "must be shorter than long")
            ok = False
        if ok and (fraction is not None or fixed is not None):
            assert severity is not None and long is not None and short is not None
            out.append((BurnSpec(severity, long, short, fraction, fixed), item, ipath))
    return out


@functools.cache
def default_alerts() -> tuple[BurnSpec, ...]:
    """The package's multiwindow table; raises :class:`ConfigError` if the shipped file is broken."""
    text = resources.files("sidecar").joinpath("data/burn_rate_windows.yaml").read_text(encoding="utf-8")
    r = yamlspec.Reader("burn_rate_windows.yaml")
    root = r.compose(text)
    specs: list[BurnSpec] = []
    if root is not None:
        fields = r.mapping(root, "", ("version", "alerts"), required=("version", "alerts"))
        if fields is not None:
            r.string(fields.get("version"), "version", choices=(TABLE_VERSION,))
            if "alerts" in fields:
                specs = [s for s, _, _ in parse_spec_list(r, fields["alerts"], "alerts", ("page", "ticket"))]
    r.raise_for_problems()
    if not specs:
        raise ConfigError([])
    return tuple(specs)
