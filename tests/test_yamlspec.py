"""Located YAML reading (sidecar.yamlspec) and Prometheus durations (sidecar.durations)."""

from __future__ import annotations

import re
import textwrap
from decimal import Decimal

import pytest
from yaml.nodes import Node

from sidecar.durations import format_duration, parse_duration
from sidecar.errors import ConfigError
from sidecar.yamlspec import Reader, index, join, locate, suggest

# -- durations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("1w", 604800.0),
        ("1y", 365 * 86400.0),
        ("2y3w", (2 * 365 + 21) * 86400.0),
        ("90m", 5400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5", "5x", "1.5h", "-1s", "+1s", "1m1h", "1s1s", "1h 30m", "s", "1S", "1hm"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.5, "500ms"),
        (1.5, "1s500ms"),
        (5400, "1h30m"),
        (93784.005, "1d2h3m4s5ms"),
        (604800, "1w"),
        (365 * 86400, "1y"),
        (30.0, "30s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan")])
def test_format_duration_rejects(seconds: float) -> None:
    with pytest.raises(ValueError):
        format_duration(seconds)


# -- helpers -----------------------------------------------------------------------


def read(text: str, env: dict[str, str] | None = None) -> tuple[Reader, Node]:
    r = Reader("f.yaml", env)
    node = r.compose(textwrap.dedent(text))
    assert node is not None, r.problems
    return r, node


def messages(r: Reader) -> list[str]:
    return [str(p) for p in r.problems]


def test_paths_and_suggestions() -> None:
    assert join("", "listen") == "listen"
    assert join(index("upstreams", 1), "timeouts") == "upstreams[1].timeouts"
    assert suggest("listn", ["listen", "admin"]) == "listen"
    assert suggest("zzz", ["listen", "admin"]) is None


# -- documents and containers --------------------------------------------------------


def test_syntax_error_has_the_marks_location() -> None:
    r = Reader("f.yaml")
    assert r.compose("a: 1\nb: [1, 2\nc: 3\n") is None
    (problem,) = r.problems
    assert (problem.line, problem.column) == (3, 2)
    assert problem.message.startswith("invalid YAML: expected ',' or ']'")
    assert "started at line 2" in problem.message


def test_tab_indentation_error() -> None:
    r = Reader("f.yaml")
    assert r.compose("a:\n\tb: 1\n") is None
    assert messages(r) == [
        "f.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token"
        " (while scanning for the next token)"
    ]


def test_control_character_is_located() -> None:
    r = Reader("f.yaml")
    assert r.compose("a: 1\nb: x\x07y\n") is None
    (problem,) = r.problems
    assert (problem.line, problem.column) == (2, 5)
    assert "special characters are not allowed" in problem.message


def test_empty_document_is_none_without_problem() -> None:
    r = Reader("f.yaml")
    assert r.compose("# only a comment\n") is None
    assert r.problems == []


def test_mapping_unknown_duplicate_and_missing_keys_all_at_once() -> None:
    r, node = read(
        """\
        name: a
        lisen: 1
        name: b
        zzz: 2
        """
    )
    fields = r.mapping(node, "srv", ["name", "listen", "port"], required=["name", "port"])
    assert fields is not None and set(fields) == {"name"}
    assert r.string(fields["name"], "srv.name") == "a"  # the first of duplicates wins
    assert sorted(messages(r)) == [
        'f.yaml:1:1: srv.port: missing required key "port"',
        'f.yaml:2:1: srv.lisen: unknown key "lisen"; did you mean "listen"?',
        'f.yaml:3:1: srv.name: duplicate key "name" (first at line 1)',
        'f.yaml:4:1: srv.zzz: unknown key "zzz" (known keys: name, listen, port)',
    ]


def test_mapping_of_wrong_kind_and_null() -> None:
    r, node = read("a: [1]\nb:\n")
    top = r.mapping(node, "", ["a", "b"])
    assert top is not None
    assert r.mapping(top["a"], "a", ["x"]) is None
    assert r.mapping(top["b"], "b", ["x"]) == {}  # null reads as an empty mapping
    assert messages(r) == ["f.yaml:1:4: a: expected a mapping, got a list"]


def test_non_string_key() -> None:
    r, node = read("? [1, 2]\n: x\n")
    assert r.entries(node, "") == []
    assert messages(r) == ["f.yaml:1:3: keys must be plain strings, got a list"]


def test_sequence() -> None:
    r, node = read("a: [1, 2]\nb: 3\nc:\n")
    top = r.mapping(node, "", ["a", "b", "c"])
    assert top is not None
    a = r.sequence(top["a"], "a")
    assert a is not None and len(a) == 2
    assert r.sequence(top["c"], "c") == []
    assert r.sequence(top["b"], "b") is None
    assert messages(r) == ["f.yaml:2:4: b: expected a list, got number 3"]


# -- scalars --------------------------------------------------------------------------

SCALARS = """\
s: text
n: 42
u: 1_000
x: 0x1F
f: 0.1
e: 2.5e+3
b: true
y: yes
z: ~
q: "42"
inf: .inf
neg: -3
d1: 1h30m
d2: 90
d3: 1.5
d4: 5x
d5: -2
l: [a, b]
lbad: [a, 1]
"""


@pytest.fixture
def scalars() -> tuple[Reader, dict[str, Node]]:
    r, node = read(SCALARS)
    top = r.entries(node, "")
    assert top is not None
    return r, {key: value for key, _, value in top}


def test_typed_getters_read_values(scalars: tuple[Reader, dict[str, Node]]) -> None:
    r, n = scalars
    get = n.get
    assert r.string(get("s"), "s") == "text"
    assert r.string(get("q"), "q") == "42"
    assert r.integer(get("n"), "n") == 42
    assert r.integer(get("u"), "u") == 1000
    assert r.integer(get("x"), "x") == 31
    assert r.number(get("f"), "f") == 0.1
    assert r.number(get("n"), "n") == 42.0
    assert r.boolean(get("b"), "b") is True
    assert r.boolean(get("y"), "y") is True
    assert r.duration(get("d1"), "d1") == 5400.0
    assert r.duration(get("d2"), "d2") == 90.0
    assert r.duration(get("d3"), "d3") == 1.5
    assert r.string_list(get("l"), "l") == ["a", "b"]
    assert r.problems == []


def test_decimal_comes_from_the_text_not_a_float(scalars: tuple[Reader, dict[str, Node]]) -> None:
    r, n = scalars
    value = r.decimal(n["f"], "f")
    assert value == Decimal("0.1")
    assert value != Decimal(float("0.1"))  # what float parsing would have produced
    assert r.decimal(n["e"], "e") == Decimal("2500")
    assert r.decimal(n["u"], "u") == Decimal(1000)
    assert r.problems == []


def test_absent_values_give_the_default(scalars: tuple[Reader, dict[str, Node]]) -> None:
    r, _ = scalars
    assert r.string(None, "x") is None
    assert r.string(None, "x", "dflt") == "dflt"
    assert r.integer(None, "x", 7) == 7
    assert r.duration(None, "x", 5.0) == 5.0
    assert r.boolean(None, "x", False) is False
    assert r.decimal(None, "x") is None
    assert r.problems == []


def test_type_errors_are_recorded_and_give_the_default(scalars: tuple[Reader, dict[str, Node]]) -> None:
    r, n = scalars
    assert r.string(n["n"], "n", "d") == "d"
    assert r.string(n["z"], "z") is None
    assert r.integer(n["f"], "f", 1) == 1
    assert r.integer(n["b"], "b") is None
    assert r.integer(n["neg"], "neg", 0, minimum=0) == 0
    assert r.number(n["inf"], "inf") is None
    assert r.decimal(n["inf"], "inf") is None
    assert r.decimal(n["q"], "q") is None
    assert r.decimal(n["neg"], "neg", minimum=Decimal(0)) is None
    assert r.boolean(n["s"], "s") is None
    assert r.duration(n["d4"], "d4", 3.0) == 3.0
    assert r.duration(n["d5"], "d5") is None
    assert r.duration(n["b"], "b") is None
    assert r.duration(n["n"], "n", positive=True) == 42.0
    assert r.string_list(n["lbad"], "lbad") is None
    assert r.string(n["l"], "l") is None
    assert messages(r) == [
        "f.yaml:2:4: n: expected a string, got number 42",
        "f.yaml:9:4: z: expected a string, got null",
        "f.yaml:5:4: f: expected an integer, got number 0.1",
        "f.yaml:7:4: b: expected an integer, got boolean true",
        "f.yaml:12:6: neg: must be at least 0, got -3",
        "f.yaml:11:6: inf: expected a finite number, got number .inf",
        "f.yaml:11:6: inf: expected a decimal number, got number .inf",
        'f.yaml:10:4: q: expected a decimal number, got string "42"',
        "f.yaml:12:6: neg: must be at least 0, got -3",
        'f.yaml:1:4: s: expected true or false, got string "text"',
        'f.yaml:16:5: d4: invalid duration "5x": expected <integer><unit> parts such as 30s, 1h30m, 500ms '
        "(units y, w, d, h, m, s, ms)",
        "f.yaml:17:5: d5: invalid duration -2: must not be negative",
        "f.yaml:7:4: b: expected a duration (e.g. 30s, 1h30m) or a number of seconds, got boolean true",
        "f.yaml:19:11: lbad[1]: expected a string, got number 1",
        "f.yaml:18:4: l: expected a string, got a list",
    ]


def test_string_choices_and_pattern() -> None:
    r, node = read("p: opnai\nn: Bad Name\nempty: ''\n")
    top = r.mapping(node, "", ["p", "n", "empty"])
    assert top is not None
    assert r.string(top["p"], "p", choices=["openai", "anthropic"]) is None
    assert (
        r.string(top["n"], "n", pattern=re.compile(r"[a-z]+"), pattern_hint="lower-case letters only") is None
    )
    assert r.string(top["empty"], "empty") is None
    assert r.string(top["empty"], "empty", allow_empty=True) == ""
    assert messages(r) == [
        'f.yaml:1:4: p: invalid value "opnai": expected one of openai, anthropic; did you mean "openai"?',
        'f.yaml:2:4: n: invalid value "Bad Name": lower-case letters only',
        "f.yaml:3:8: empty: must not be empty",
    ]


def test_convert_maps_value_errors() -> None:
    def parse(text: str) -> int:
        if not text.isdigit():
            raise ValueError("digits only")
        return int(text)

    r, node = read("a: '12'\nb: x1\n")
    top = r.mapping(node, "", ["a", "b"])
    assert top is not None
    assert r.convert(top["a"], "a", parse, 0) == 12
    assert r.convert(top["b"], "b", parse, 0, what="count") == 0
    assert messages(r) == ['f.yaml:2:4: b: invalid count "x1": digits only']


# -- environment substitution --------------------------------------------------------------


def test_env_substitution() -> None:
    env = {"PORT": "8080", "HOST": "example.com", "FLAG": "false"}
    r, node = read(
        """\
        port: ${PORT}
        quoted: "${PORT}"
        url: https://${HOST}:${PORT}/v1
        other: ${env:HOST}
        dflt: ${MISSING:-fallback}
        empty: x${MISSING:-}y
        dollar: cost $$5
        flag: ${FLAG}
        """,
        env,
    )
    top = r.mapping(node, "", ["port", "quoted", "url", "other", "dflt", "empty", "dollar", "flag"])
    assert top is not None
    assert r.integer(top["port"], "port") == 8080  # a plain value is typed after substitution
    assert r.string(top["quoted"], "quoted") == "8080"  # a quoted one stays a string
    assert r.string(top["port"], "port") == "8080"  # a substituted number may also be read as text
    assert r.string(top["url"], "url") == "https://example.com:8080/v1"
    assert r.string(top["other"], "other") == "example.com"
    assert r.string(top["dflt"], "dflt") == "fallback"
    assert r.string(top["empty"], "empty") == "xy"
    assert r.string(top["dollar"], "dollar") == "cost $5"
    assert r.boolean(top["flag"], "flag") is False
    assert r.problems == []


def test_env_substitution_errors() -> None:
    r, node = read("a: ${NOPE}\nb: ${1BAD}\n", {})
    top = r.mapping(node, "", ["a", "b"])
    assert top is not None
    assert r.string(top["a"], "a") is None
    assert r.string(top["b"], "b") is None
    assert messages(r) == [
        "f.yaml:1:4: a: environment variable NOPE is not set (write ${NOPE:-default} for a default)",
        'f.yaml:2:4: b: invalid substitution "${1BAD}" (expected ${NAME} or ${NAME:-default})',
    ]


def test_no_substitution_without_env() -> None:
    r, node = read("a: ${HOME}\n")
    top = r.mapping(node, "", ["a"])
    assert top is not None
    assert r.string(top["a"], "a") == "${HOME}"


# -- locating model paths and raising -------------------------------------------------------


def test_locate() -> None:
    _, node = read(
        """\
        upstreams:
          - name: a
          - name: b
            timeouts: {connect: 5s}
        """
    )
    found = locate(node, "upstreams[1].timeouts.connect")
    assert found is not None and (found.start_mark.line, found.start_mark.column) == (3, 24)
    fallback = locate(node, "upstreams[1].timeouts.total")
    assert fallback is not None and fallback.start_mark.line == 3  # the enclosing mapping
    item = locate(node, "upstreams[5].name")
    assert item is not None and item.start_mark.line == 1  # the list itself
    assert locate(None, "a") is None


def test_raise_for_problems_sorts_by_position() -> None:
    r = Reader("f.yaml")
    r.raise_for_problems()  # nothing recorded: no error
    _, node = read("a: 1\nb: 2\n")
    r.problem(None, "z", "late")
    top = r.mapping(node, "", ["a", "b"])
    assert top is not None
    r.problem(top["b"], "b", "second")
    r.problem(top["a"], "a", "first")
    with pytest.raises(ConfigError) as info:
        r.raise_for_problems()
    assert str(info.value) == "f.yaml:1:1: z: late\nf.yaml:1:4: a: first\nf.yaml:2:4: b: second"
    assert len(info.value.problems) == 3
