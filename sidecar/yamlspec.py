"""Located YAML: read a file's nodes and collect every problem with its line and column.

Every file format of the sidecar (config, pricing, alert rules) is read the same way:

1. :meth:`Reader.compose` turns text into PyYAML nodes (``yaml.compose`` with the
   safe loader), so each node keeps its ``start_mark``; a syntax error becomes one
   :class:`~sidecar.errors.Problem` at the mark's line and column.
2. A parser walks the nodes with :meth:`Reader.mapping` (unknown keys rejected, each
   at its own location with a "did you mean" suggestion; duplicate keys rejected;
   required keys checked) and the typed getters (:meth:`Reader.string`,
   :meth:`Reader.integer`, :meth:`Reader.decimal`, :meth:`Reader.duration`, ...).
   A getter that meets a wrong value records a problem and returns its ``default``
   (``None`` when none is given), so parsing goes on and every problem is found in
   one pass.
3. Checks that run on the finished model report ``(field path, message)`` pairs;
   :func:`locate` maps such a path back to the node, hence to a line and column.
4. :meth:`Reader.raise_for_problems` raises one :class:`~sidecar.errors.ConfigError`
   carrying all of them, sorted by position.

Field paths name keys with dots and list items with 0-based indexes:
``upstreams[1].timeouts.connect``.

Optional ``${VAR}`` / ``${VAR:-default}`` substitution (OpenTelemetry-config style,
also ``${env:VAR}``; ``$$`` is a literal ``$``) applies to scalar values, never to
keys, when the reader is given an environment. A plain (unquoted) value is typed
after substitution, so ``port: ${PORT}`` reads as an integer; a quoted one stays a
string. Inside a flow mapping (``{a: ...}``) a ``${...}`` value must be quoted,
as ``{`` is YAML syntax there. Unlike the OpenTelemetry spec, a variable that is
not set and has no default is an error rather than an empty string.

Pure module: imports PyYAML and the standard library; no file or network access.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import TypeVar, overload

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError
from yaml.resolver import Resolver

from sidecar.durations import parse_duration
from sidecar.errors import ConfigError, Problem

__all__ = ["Reader", "describe", "index", "join", "locate", "scrub", "suggest"]

T = TypeVar("T")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"

# Stateless for scalars: used to read YAML's int/bool forms (0x1F, 1_000, yes/no).
_CONSTRUCT = SafeConstructor()
_RESOLVER = Resolver()
_SUBST = re.compile(r"\$\$|\$\{([^}]*)\}")
_SUBST_BODY = re.compile(r"(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def join(path: str, key: str) -> str:
    """The field path of ``key`` inside ``path`` (``join("admin", "listen")`` → ``admin.listen``)."""
    return f"{path}.{key}" if path else key


def index(path: str, i: int) -> str:
    """The field path of item ``i`` (0-based) of the list at ``path``: ``upstreams[1]``."""
    return f"{path}[{i}]"


def suggest(word: str, options: Iterable[str]) -> str | None:
    """The option closest to a misspelt ``word``, or ``None`` when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def describe(node: Node) -> str:
    """A short human description of a node for messages: ``a list``, ``number 5``."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    value = str(node.value)
    if node.tag == _NULL:
        return "null"
    if node.tag == _BOOL:
        return f"boolean {value}"
    if node.tag in (_INT, _FLOAT):
        return f"number {value}"
    return f'string "{value}"'


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def locate(root: Node | None, path: str) -> Node | None:
    """The node at a field path (``upstreams[1].timeouts.connect``), or its deepest ancestor present.

    Used to give a location to a problem found on the model after parsing: a value
    taken from a default has no node of its own, so the problem points at the
    enclosing mapping.
    """
    node = root
    for match in _PATH_PART.finditer(path):
        key, item = match.group(1), match.group(2)
        child: Node | None = None
        if key is not None and isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, ScalarNode) and key_node.value == key:
                    child = value_node
                    break
        elif item is not None and isinstance(node, SequenceNode) and int(item) < len(node.value):
            child = node.value[int(item)]
        if child is None:
            return node
        node = child
    return node


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/\s:@\"]*):([^@\s\"/]*)@")
# Messages that quote a key name, not a value: nothing to hide.
_ABOUT_KEYS = ("unknown key ", "missing required key ", "duplicate key ", "keys must be")


def scrub(message: str, secret: bool) -> str:
    """``message`` fit to show: URL credentials masked, and with ``secret`` every quoted
    value replaced by its length."""
    message = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", message)
    if secret and not message.startswith(_ABOUT_KEYS):
        message = _QUOTED.sub(lambda m: f"<{len(m.group(0)) - 2} characters, not shown>", message)
    return message


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Reader:
    """Reads one file's nodes and collects its problems.

    ``filename`` is what problems name; ``env``, when given, turns on ``${VAR}``
    substitution in scalar values (pass ``os.environ`` or a test mapping).
    """

    def __init__(self, filename: str, env: Mapping[str, str] | None = None) -> None:
        self.filename = filename
        self.env = env
        self.problems: list[Problem] = []
        #: Field paths whose values may be secrets (API keys, headers, notification URLs):
        #: a problem there never quotes the value (see :meth:`problem`).
        self.secret_fields: tuple[re.Pattern[str], ...] = ()
        self._substituted: set[int] = set()  # ids of scalars whose text came from ${VAR}

    # -- problems ---------------------------------------------------------------

    def problem(self, where: Node | yaml.Mark | None, field: str, message: str) -> None:
        """Record a problem at a node's (or mark's) start; ``None`` means the top of the file.

        A value quoted in ``message`` is left out when it may be a secret: the field is one
        of :attr:`secret_fields`, or the value came from an environment variable (which is
        where secrets are kept out of the file). Credentials in a quoted URL are always masked.
        """
        mark = where.start_mark if isinstance(where, Node) else where
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        secret = id(where) in self._substituted or any(p.match(field) for p in self.secret_fields)
        self.problems.append(Problem(self.filename, line, column, field, scrub(message, secret)))

    def raise_for_problems(self) -> None:
        """Raise one :class:`ConfigError` with every problem so far, sorted by position."""
        if self.problems:
            raise ConfigError(sorted(self.problems, key=lambda p: (p.line, p.column)))

    # -- documents ----------------------------------------------------------------

    def compose(self, text: str) -> Node | None:
        """Compose ``text`` into nodes; ``None`` for an empty document or a syntax error (recorded)."""
        try:
            node: Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = exc.problem or exc.context or "syntax error"
            if exc.problem and exc.context:
                where = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
                message = f"{exc.problem} ({exc.context}{where})"
            self.problem(mark, "", f"invalid YAML: {message}")
            return None
        except ReaderError as exc:
            before = text[: exc.position]
            line = before.count("\n")
            column = exc.position - (before.rfind("\n") + 1)
            self.problem(
                yaml.Mark(self.filename, exc.position, line, column, None, 0),
                "",
                f"invalid YAML: {exc.reason}",
            )
            return None
        except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error above carries a mark
            self.problem(None, "", f"invalid YAML: {exc}")
            return None
        return node

    # -- containers ---------------------------------------------------------------

    def _key(self, key_node: Node, path: str) -> str | None:
        if isinstance(key_node, ScalarNode) and key_node.tag != _NULL:
            return str(key_node.value)
        self.problem(key_node, path, f"keys must be plain strings, got {describe(key_node)}")
        return None

    def entries(self, node: Node, path: str, what: str = "a mapping") -> list[tuple[str, Node, Node]] | None:
        """The ``(key, key node, value node)`` pairs of a mapping with free-form keys.

        Duplicate keys are problems (the first one wins). A null value counts as an
        empty mapping. ``None`` (recorded) when the node is not a mapping.
        """
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, MappingNode):
            self.problem(node, path, f"expected {what}, got {describe(node)}")
            return None
        seen: dict[str, Node] = {}
        out: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in seen:
                first = seen[key].start_mark.line + 1
                self.problem(
                    key_node, join(path, key), f"duplicate key {_quote(key)} (first at line {first})"
                )
                continue
            seen[key] = key_node
            out.append((key, key_node, value_node))
        return out

    def mapping(
        self,
        node: Node,
        path: str,
        allowed: Iterable[str],
        required: Iterable[str] = (),
        what: str = "a mapping",
    ) -> dict[str, Node] | None:
        """The value nodes of a mapping with a fixed set of keys.

        Each unknown key is a problem at the key's own location, with the closest
        allowed key as a suggestion; each missing required key is a problem at the
        mapping. Returns the known keys' value nodes (``None`` when the node is not
        a mapping; a null value counts as an empty mapping).
        """
        pairs = self.entries(node, path, what)
        if pairs is None:
            return None
        allowed = list(allowed)
        allowed_set = set(allowed)
        out: dict[str, Node] = {}
        for key, key_node, value_node in pairs:
            if key in allowed_set:
                out[key] = value_node
                continue
            close = suggest(key, allowed)
            hint = f'; did you mean "{close}"?' if close else f" (known keys: {', '.join(allowed)})"
            self.problem(key_node, join(path, key), f"unknown key {_quote(key)}{hint}")
        for key in required:
            if key not in out:
                self.problem(node, join(path, key), f"missing required key {_quote(key)}")
        return out

    def sequence(self, node: Node, path: str, what: str = "a list") -> list[Node] | None:
        """The item nodes of a list (a null value counts as empty); ``None`` (recorded) otherwise."""
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return []
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected {what}, got {describe(node)}")
            return None
        return list(node.value)

    # -- scalars ------------------------------------------------------------------

    def _substitute(self, node: ScalarNode, path: str) -> tuple[str, str] | None:
        """The text and tag of a scalar after ``${VAR}`` substitution (``None``: recorded problem)."""
        text = str(node.value)
        if self.env is None or "$" not in text:
            return text, node.tag
        env = self.env
        failed: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            body = _SUBST_BODY.fullmatch(match.group(1))
            if body is None:
                expected = "expected ${NAME} or ${NAME:-default}"
                failed.append(f"invalid substitution {_quote(match.group(0))} ({expected})")
                return ""
            name, default = body.group(1), body.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            failed.append(
                f"environment variable {name} is not set (write ${{{name}:-default}} for a default)"
            )
            return ""

        result = _SUBST.sub(replace, text)
        if failed:
            for message in failed:
                self.problem(node, path, message)
            return None
        if result == text:
            return text, node.tag
        self._substituted.add(id(node))
        if node.style is None:  # plain: type the substituted text as YAML would
            tag: str = _RESOLVER.resolve(ScalarNode, result, (True, False))  # type: ignore[no-untyped-call]
            return result, tag
        return result, _STR

    def _scalar(self, node: Node, path: str, what: str) -> tuple[str, str] | None:
        if not isinstance(node, ScalarNode):
            self.problem(node, path, f"expected {what}, got {describe(node)}")
            return None
        return self._substitute(node, path)

    def _wrong(self, node: Node, path: str, what: str, text: str, tag: str) -> None:
        self.problem(node, path, f"expected {what}, got {describe(ScalarNode(tag, text))}")

    @overload
    def string(
        self,
        node: Node | None,
        path: str,
        *,
        choices: Sequence[str] | None = ...,
        pattern: re.Pattern[str] | None = ...,
        pattern_hint: str = ...,
        allow_empty: bool = ...,
    ) -> str | None: ...
    @overload
    def string(
        self,
        node: Node | None,
        path: str,
        default: T,
        *,
        choices: Sequence[str] | None = ...,
        pattern: re.Pattern[str] | None = ...,
        pattern_hint: str = ...,
        allow_empty: bool = ...,
    ) -> str | T: ...
    def string(
        self,
        node: Node | None,
        path: str,
        default: object = None,
        *,
        choices: Sequence[str] | None = None,
        pattern: re.Pattern[str] | None = None,
        pattern_hint: str = "",
        allow_empty: bool = False,
    ) -> object:
        """A string value: ``default`` when absent (``node`` is ``None``) or wrong (recorded).

        ``choices`` limits it to a closed set; ``pattern`` must match the whole
        value (``pattern_hint`` says what it means in the message).
        """
        if node is None:
            return default
        scalar = self._scalar(node, path, "a string")
        if scalar is None:
            return default
        text, tag = scalar
        if tag != _STR and not (tag in (_INT, _FLOAT) and text != node.value):
            self._wrong(node, path, "a string", text, tag)
            return default
        if not text and not allow_empty:
            self.problem(node, path, "must not be empty")
            return default
        if choices is not None and text not in choices:
            close = suggest(text, choices)
            hint = f'; did you mean "{close}"?' if close else ""
            self.problem(
                node, path, f"invalid value {_quote(text)}: expected one of {', '.join(choices)}{hint}"
            )
            return default
        if pattern is not None and not pattern.fullmatch(text):
            self.problem(
                node, path, f"invalid value {_quote(text)}: {pattern_hint or 'must match ' + pattern.pattern}"
            )
            return default
        return text

    @overload
    def integer(self, node: Node | None, path: str, *, minimum: int | None = ...) -> int | None: ...
    @overload
    def integer(self, node: Node | None, path: str, default: T, *, minimum: int | None = ...) -> int | T: ...
    def integer(
        self, node: Node | None, path: str, default: object = None, *, minimum: int | None = None
    ) -> object:
        """An integer (YAML forms such as ``1_000`` accepted); ``minimum`` is checked here."""
        if node is None:
            return default
        scalar = self._scalar(node, path, "an integer")
        if scalar is None:
            return default
        text, tag = scalar
        if tag != _INT:
            self._wrong(node, path, "an integer", text, tag)
            return default
        value = int(_CONSTRUCT.construct_yaml_int(ScalarNode(tag, text)))
        if minimum is not None and value < minimum:
            self.problem(node, path, f"must be at least {minimum}, got {value}")
            return default
        return value

    @overload
    def number(self, node: Node | None, path: str) -> float | None: ...
    @overload
    def number(self, node: Node | None, path: str, default: T) -> float | T: ...
    def number(self, node: Node | None, path: str, default: object = None) -> object:
        """A finite number (integer or float) as ``float``."""
        if node is None:
            return default
        scalar = self._scalar(node, path, "a number")
        if scalar is None:
            return default
        text, tag = scalar
        if tag == _INT:
            return float(_CONSTRUCT.construct_yaml_int(ScalarNode(tag, text)))
        if tag == _FLOAT:
            value = float(_CONSTRUCT.construct_yaml_float(ScalarNode(tag, text)))
            if math.isfinite(value):
                return value
        self._wrong(node, path, "a finite number", text, tag)
        return default

    @overload
    def decimal(self, node: Node | None, path: str, *, minimum: Decimal | None = ...) -> Decimal | None: ...
    @overload
    def decimal(
        self, node: Node | None, path: str, default: T, *, minimum: Decimal | None = ...
    ) -> Decimal | T: ...
    def decimal(
        self, node: Node | None, path: str, default: object = None, *, minimum: Decimal | None = None
    ) -> object:
        """An exact decimal number, read from the scalar's text (never through ``float``)."""
        if node is None:
            return default
        scalar = self._scalar(node, path, "a number")
        if scalar is None:
            return default
        text, tag = scalar
        value: Decimal | None = None
        if tag == _INT:
            value = Decimal(int(_CONSTRUCT.construct_yaml_int(ScalarNode(tag, text))))
        elif tag == _FLOAT:
            try:
                value = Decimal(text.replace("_", ""))
            except InvalidOperation:
                value = None
            if value is not None and not value.is_finite():
                value = None
        if value is None:
            self._wrong(node, path, "a decimal number", text, tag)
            return default
        if minimum is not None and value < minimum:
            self.problem(node, path, f"must be at least {minimum}, got {text}")
            return default
        return value

    @overload
    def boolean(self, node: Node | None, path: str) -> bool | None: ...
    @overload
    def boolean(self, node: Node | None, path: str, default: T) -> bool | T: ...
    def boolean(self, node: Node | None, path: str, default: object = None) -> object:
        """A boolean (``true``/``false``; YAML 1.1's ``yes``/``no`` too)."""
        if node is None:
            return default
        scalar = self._scalar(node, path, "true or false")
        if scalar is None:
            return default
        text, tag = scalar
        if tag != _BOOL:
            self._wrong(node, path, "true or false", text, tag)
            return default
        return bool(_CONSTRUCT.construct_yaml_bool(ScalarNode(tag, text)))

    @overload
    def duration(
        self, node: Node | None, path: str, *, positive: bool = ..., minimum: float | None = ...
    ) -> float | None: ...
    @overload
    def duration(
        self, node: Node | None, path: str, default: T, *, positive: bool = ..., minimum: float | None = ...
    ) -> float | T: ...
    def duration(
        self,
        node: Node | None,
        path: str,
        default: object = None,
        *,
        positive: bool = False,
        minimum: float | None = None,
    ) -> object:
        """A duration in seconds: a Prometheus string (``1h30m``) or a bare number of seconds.

        ``positive`` requires a value above zero; negative numbers are always refused.
        """
        if node is None:
            return default
        scalar = self._scalar(node, path, "a duration")
        if scalar is None:
            return default
        text, tag = scalar
        seconds: float
        if tag in (_INT, _FLOAT):
            number = self.number(ScalarNode(tag, text, node.start_mark, node.end_mark), path)
            if number is None:
                return default
            if number < 0:
                self.problem(node, path, f"invalid duration {text}: must not be negative")
                return default
            seconds = number
        elif tag == _STR:
            try:
                seconds = parse_duration(text)
            except ValueError as exc:
                self.problem(node, path, str(exc))
                return default
        else:
            self._wrong(node, path, "a duration (e.g. 30s, 1h30m) or a number of seconds", text, tag)
            return default
        if positive and seconds <= 0:
            self.problem(node, path, "must be greater than 0s")
            return default
        if minimum is not None and seconds < minimum:
            self.problem(node, path, f"must be at least {minimum}s")
            return default
        return seconds

    @overload
    def string_list(self, node: Node | None, path: str) -> list[str] | None: ...
    @overload
    def string_list(self, node: Node | None, path: str, default: T) -> list[str] | T: ...
    def string_list(self, node: Node | None, path: str, default: object = None) -> object:
        """A list of strings; each wrong item is its own problem."""
        if node is None:
            return default
        items = self.sequence(node, path, "a list of strings")
        if items is None:
            return default
        out: list[str] = []
        ok = True
        for i, item in enumerate(items):
            value = self.string(item, index(path, i))
            if value is None:
                ok = False
            else:
                out.append(value)
        return out if ok else default

    @overload
    def convert(
        self, node: Node | None, path: str, parse: Callable[[str], T], *, what: str = ...
    ) -> T | None: ...
    @overload
    def convert(
        self, node: Node | None, path: str, parse: Callable[[str], T], default: T, *, what: str = ...
    ) -> T: ...
    def convert(
        self,
        node: Node | None,
        path: str,
        parse: Callable[[str], object],
        default: object = None,
        *,
        what: str = "",
    ) -> object:
        """A string turned into a value by ``parse``; its ``ValueError`` message becomes the problem.

        ``what`` (e.g. ``"address"``) prefixes the message: ``invalid address "x": ...``.
        """
        text = self.string(node, path)
        if text is None or node is None:
            return default
        try:
            return parse(text)
        except ValueError as exc:
            self.problem(node, path, f"invalid {what} {_quote(text)}: {exc}" if what else str(exc))
            return default
