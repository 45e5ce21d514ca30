"""Redaction: secrets and personal data replaced before text leaves the process.

A :class:`Redactor` applies an ordered list of :class:`Rule` objects (a name, a
regular expression and an optional check on each match) to text, replacing every
match with ``[REDACTED:<name>]``. The defaults (:data:`DEFAULT_RULES`) cover
e-mail addresses, payment card numbers (13-19 digits, spaces or dashes allowed,
Luhn-checked so order numbers and timestamps survive), provider API keys
(``sk-...``, ``sk-ant-...``, AWS, Google, GitHub, Slack), bearer tokens and JWTs.
Operators add their own rules in the config (:func:`parse_redaction`).
:meth:`Redactor.redact_prefix` redacts and cuts text to a length at a cost bounded
by that length, however long the text (prompts can be megabytes).

Header values are a separate, simpler matter: :func:`redact_headers` blanks the
value of every header whose *name* is secret (``Authorization``, ``x-api-key``,
``api-key``, cookies, plus configured names), whatever the value looks like.

Where it applies: prompt and completion text recorded on spans when content
capture is opted in, and any upstream text echoed into an error message or a
log line. Call metadata (tenant, model, request id) is not redacted: a tenant
named by an e-mail address must stay recognisable in logs and reports.

Pure module: standard library only (plus :mod:`sidecar.yamlspec` for the
config section); no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from yaml.nodes import Node

from sidecar.yamlspec import Reader, join

__all__ = [
    "DEFAULT_RULES",
    "REDACT_MARGIN",
    "SECRET_HEADERS",
    "RedactionSettings",
    "Redactor",
    "Rule",
    "luhn_ok",
    "parse_redaction",
    "redact_headers",
]

#: Header names whose values are secrets, lower case. Always redacted.
SECRET_HEADERS: frozenset[str] = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)

_HEADER_PLACEHOLDER = "[REDACTED]"
#: How far past a cut :meth:`Redactor.redact_prefix` looks, and how much it keeps clear of
#: the end of what it looked at (characters): longer secrets than this are not expected.
REDACT_MARGIN = 4096


def luhn_ok(text: str) -> bool:
    """Whether the digits in ``text`` pass the Luhn checksum used by payment card numbers."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if len(digits) < 13:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


@dataclass(frozen=True)
class Rule:
    """One kind of sensitive text: ``pattern`` finds candidates, ``check`` (if any) confirms each."""

    name: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None


def _rule(name: str, pattern: str, check: Callable[[str], bool] | None = None) -> Rule:
    return Rule(name, re.compile(pattern), check)


#: The default rules, in the order they are applied (more specific key formats first).
DEFAULT_RULES: tuple[Rule, ...] = (
    # Bearer tokens first: the token may itself look like a key, and the whole
    # "Bearer xyz" is what must go.
    _rule("bearer", r"(?i:\bbearer)\s+[A-Za-z0-9._~+/=-]{8,}"),
    _rule("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"),
    _rule("anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{8,}"),
    _rule("openai_key", r"\bsk-[A-Za-z0-9_-]{16,}"),
    _rule("aws_access_key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    _rule("google_api_key", r"\bAIza[0-9A-Za-z_-]{35}"),
    _rule("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    _rule("slack_token", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    _rule("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    _rule("card", r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])", luhn_ok),
)


class Redactor:
    """Replaces sensitive text found by a list of rules; cheap to share between threads (stateless)."""

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES, replacement: str = "[REDACTED:{name}]") -> None:
        self.rules = tuple(rules)
        self.replacement = replacement

    @classmethod
    def from_settings(cls, settings: RedactionSettings) -> Redactor:
        """The default rules (unless turned off) followed by the configured patterns."""
        rules = list(DEFAULT_RULES) if settings.use_defaults else []
        rules.extend(_rule(name, pattern) for name, pattern in settings.patterns)
        return cls(rules)

    def redact(self, text: str) -> str:
        """``text`` with every match of every rule replaced by ``[REDACTED:<rule name>]``."""
        for rule in self.rules:
            text = rule.pattern.sub(self._replacer(rule), text)
        return text

    def _replacer(self, rule: Rule) -> Callable[[re.Match[str]], str]:
        placeholder = self.replacement.format(name=rule.name)
        check = rule.check

        def replace(match: re.Match[str]) -> str:
            if check is not None and not check(match.group(0)):
                return match.group(0)
            return placeholder

        return replace

    def redact_prefix(self, text: str, limit: int, margin: int = REDACT_MARGIN) -> tuple[str, bool]:
        """``text`` redacted and cut to at most ``limit`` characters; ``True`` when something was cut.

        The cost is bounded whatever the length of ``text``: only its first
        ``limit + 2 * margin`` characters are redacted. A match straddling the end of that
        window may be seen only in part, so when the window cut the text, what is kept
        stops at least ``margin`` characters before the end of the redacted window: a
        secret shorter than ``margin`` is never kept, whole or in part, whichever rule
        would have found it. Redaction runs before the cut, so a secret is never cut
        into a piece that no rule recognises.
        """
        if limit <= 0:
            return "", bool(text)
        window = text[: limit + 2 * margin]
        redacted = self.redact(window)
        keep = limit
        if len(window) < len(text):
            keep = max(0, min(limit, len(redacted) - margin))
        if len(redacted) <= keep:
            return redacted, False
        return redacted[:keep], True

    def redact_json(self, value: object) -> object:
        """A JSON-like value (dicts, lists, strings) with every string redacted; keys are kept."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {key: self.redact_json(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_json(item) for item in value]
        return value


def redact_headers(
    headers: Iterable[tuple[str, str]] | Mapping[str, str], extra_names: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """Header pairs with the values of secret headers (:data:`SECRET_HEADERS` and ``extra_names``) blanked."""
    secret = SECRET_HEADERS | {name.lower() for name in extra_names}
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return [(name, _HEADER_PLACEHOLDER if name.lower() in secret else value) for name, value in pairs]


# -- config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedactionSettings:
    """The ``redaction`` config section.

    ``use_defaults`` keeps :data:`DEFAULT_RULES`; ``patterns`` adds ``(name, regex)``
    rules applied after them; ``headers`` adds header names whose values are secret.
    """

    use_defaults: bool = True
    patterns: tuple[tuple[str, str], ...] = ()
    headers: tuple[str, ...] = ()


_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


def _check_regex(text: str) -> str:
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    if compiled.match(""):
        raise ValueError("the pattern matches the empty string")
    return text


def parse_redaction(
    r: Reader, node: Node, path: str, ctx: object = None, *, headers: bool = True
) -> RedactionSettings:
    """Parse the ``redaction`` section::

        redaction:
          defaults: true                   # keep the built-in rules
          patterns: {employee_id: "EMP-[0-9]{6}"}
          headers: [x-internal-token]      # more header names whose values are secret

    Every problem is recorded on ``r`` with its location; a wrong value falls back to
    its default. ``ctx`` is accepted for the config loader's section signature.
    ``headers=False`` parses a section that redacts text only (``tracing.redaction``):
    a ``headers`` key is then reported as unknown.
    """
    d = RedactionSettings()
    keys = ("defaults", "patterns", "headers") if headers else ("defaults", "patterns")
    m = r.mapping(node, path, keys)
    if m is None:
        return d
    patterns: list[tuple[str, str]] = []
    patterns_node = m.get("patterns")
    if patterns_node is not None:
        for name, key_node, value_node in r.entries(patterns_node, join(path, "patterns")) or []:
            field = join(join(path, "patterns"), name)
            if not _RULE_NAME.fullmatch(name):
                r.problem(key_node, field, f'invalid rule name "{name}": must match [a-z0-9][a-z0-9_]*')
                continue
            pattern = r.convert(value_node, field, _check_regex, what="pattern")
            if pattern is not None:
                patterns.append((name, pattern))
    names = r.string_list(m.get("headers"), join(path, "headers"), [])
    return RedactionSettings(
        use_defaults=r.boolean(m.get("defaults"), join(path, "defaults"), d.use_defaults),
        patterns=tuple(patterns),
        headers=tuple(h.lower() for h in names),
    )
