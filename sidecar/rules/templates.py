"""Annotation templates: the subset of Prometheus's Go templates both engines render alike.

A template is text with ``{{ ... }}`` actions, each one of::

    {{ $value }}                      the alert's value, printed as Go prints a float64
    {{ $labels.tenant }}              a group label of the alert
    {{ $value | humanize }}           also humanizePercentage, humanizeDuration

The same string goes verbatim into exported Prometheus rules, where Go's
``text/template`` renders it; :func:`render` renders it in-process with the same
number formatting (Prometheus ``template/template.go``), so a notification from the
sidecar and one from Alertmanager read the same. Anything else inside ``{{ }}`` is
refused by :func:`check` rather than silently printed.

Pure module: standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

__all__ = ["check", "go_float", "render"]

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
_EXPR = re.compile(r"\$(value|labels\.([a-zA-Z_][a-zA-Z0-9_]*))(?:\s*\|\s*([a-zA-Z]+))?")


def go_float(value: float) -> str:
    """``value`` as Go's ``fmt`` prints a float64 with ``%v`` (shortest digits, ``1e+06``).

    Go picks the shortest digits that round-trip (as Python's ``repr`` does) and the
    exponent form when the decimal exponent is below -4 or at least 6.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    all_digits = int_part + frac_part
    significant = all_digits.lstrip("0")
    # Where the decimal point sits, counted from the first significant digit.
    point = len(int_part) - (len(all_digits) - len(significant)) + (int(exp_text) if exp_text else 0)
    digits = significant.rstrip("0") or "0"
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        body = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{body}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _g4(value: float) -> str:
    return "%.4g" % value  # noqa: UP031 - the exact C/Go %g semantics are the point


def _humanize(value: float) -> str:
    if value == 0 or math.isnan(value) or math.isinf(value):
        return _g4(value)
    if abs(value) >= 1:
        prefix = ""
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix = p
            value /= 1000
        return _g4(value) + prefix
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = p
        value *= 1000
    return _g4(value) + prefix


def _humanize_percentage(value: float) -> str:
    return _g4(value * 100) + "%"


def _humanize_duration(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return _g4(value)
    if value == 0:
        return _g4(value) + "s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        value = abs(value)
        total = int(value)
        seconds, minutes = total % 60, (total // 60) % 60
        hours, days = (total // 3600) % 24, total // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(value)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = p
        value *= 1000
    return f"{_g4(value)}{prefix}s"


_FUNCS: dict[str, Callable[[float], str]] = {
    "humanize": _humanize,
    "humanizePercentage": _humanize_percentage,
    "humanizeDuration": _humanize_duration,
}


def check(template: str, labels: Sequence[str]) -> list[str]:
    """Problems with ``template`` given the label names an alert of the rule carries."""
    problems: list[str] = []
    for action in _ACTION.finditer(template):
        expr = _EXPR.fullmatch(action.group(1))
        if expr is None:
            problems.append(
                f"unsupported template action {action.group(0)!r} "
                "(use {{ $value }}, {{ $labels.NAME }}, optionally | humanize, humanizePercentage, "
                "humanizeDuration)"
            )
            continue
        label, func = expr.group(2), expr.group(3)
        if label is not None and label not in labels:
            known = ", ".join(labels) or "none"
            problems.append(f"$labels.{label} is not a label of this rule's alerts (labels: {known})")
        if func is not None and func not in _FUNCS:
            problems.append(f"unknown template function {func!r} (known: {', '.join(_FUNCS)})")
    rest = _ACTION.sub("", template)
    if "{{" in rest or "}}" in rest:
        problems.append("unbalanced {{ }} in template")
    return problems


def render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Render a template that passed :func:`check` (unknown actions are left as written)."""

    def one(action: re.Match[str]) -> str:
        expr = _EXPR.fullmatch(action.group(1))
        if expr is None:
            return action.group(0)
        label, func = expr.group(2), expr.group(3)
        if label is not None:
            return labels.get(label, "")
        if func is not None and func in _FUNCS:
            return _FUNCS[func](value)
        return go_float(value)

    return _ACTION.sub(one, template)
