"""Redaction: the default rules catch what they must and leave ordinary text alone."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.redact import RedactionSettings, Redactor, luhn_ok, parse_redaction, redact_headers
from sidecar.yamlspec import Reader

R = Redactor()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail alice.smith+llm@example.co.uk now", "mail [REDACTED:email] now"),
        ("card 4111 1111 1111 1111 ok", "card [REDACTED:card] ok"),
        ("card 4111-1111-1111-1111", "card [REDACTED:card]"),
        ("amex 378282246310005.", "amex [REDACTED:card]."),
        ("key sk-proj-AbCdEf0123456789xyzXYZ_-", "key [REDACTED:openai_key]"),
        ("key=sk-ant-api03-AAAAbbbbCCCCdddd", "key=[REDACTED:anthropic_key]"),
        ("Authorization: Bearer abc.def-ghi_jkl123", "Authorization: [REDACTED:bearer]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [REDACTED:aws_access_key]"),
        ("gh ghp_" + "a" * 36, "gh [REDACTED:github_token]"),
        ("jwt eyJhbGciOi.eyJzdWIiOiIx.SflKxwRJSMeKKF2QT4", "jwt [REDACTED:jwt]"),
    ],
)
def test_default_rules_redact(text: str, expected: str) -> None:
    assert R.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112",  # fails the Luhn check
        "timestamp 1735689600",  # too short for a card
        "the task-runner uses sk-short",  # too short for a key
        "an @ sign and a dot. com",
        "plain words, numbers 12 and 3.14",
    ],
)
def test_ordinary_text_survives(text: str) -> None:
    assert R.redact(text) == text


def test_luhn() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert not luhn_ok("1234")


def test_json_values_are_redacted_keys_kept() -> None:
    value = {"messages": [{"role": "user", "content": "I am bob@example.com"}], "n": 1}
    assert R.redact_json(value) == {
        "messages": [{"role": "user", "content": "I am [REDACTED:email]"}],
        "n": 1,
    }


def test_secret_headers_blanked_whatever_the_value() -> None:
    headers = [("Authorization", "Bearer x"), ("X-Api-Key", "k"), ("content-type", "json"), ("X-Mine", "s")]
    assert redact_headers(headers, ["x-mine"]) == [
        ("Authorization", "[REDACTED]"),
        ("X-Api-Key", "[REDACTED]"),
        ("content-type", "json"),
        ("X-Mine", "[REDACTED]"),
    ]
    assert redact_headers({"api-key": "k"}) == [("api-key", "[REDACTED]")]


def _parse(text: str) -> RedactionSettings:
    r = Reader("t.yaml")
    node = r.compose(text)
    assert node is not None
    settings = parse_redaction(r, node, "redaction")
    r.raise_for_problems()
    return settings


def test_config_patterns_and_headers() -> None:
    settings = _parse('{defaults: false, patterns: {employee: "EMP-[0-9]{6}"}, headers: [X-Internal]}')
    assert settings == RedactionSettings(False, (("employee", "EMP-[0-9]{6}"),), ("x-internal",))
    redactor = Redactor.from_settings(settings)
    assert redactor.redact("EMP-123456 bob@example.com") == "[REDACTED:employee] bob@example.com"
    default_plus = Redactor.from_settings(RedactionSettings(patterns=(("employee", "EMP-[0-9]{6}"),)))
    assert default_plus.redact("EMP-123456 bob@example.com") == "[REDACTED:employee] [REDACTED:email]"


def test_config_errors_are_located() -> None:
    with pytest.raises(ConfigError) as info:
        _parse('patterns:\n  bad: "(unclosed"\n  Bad-Name: "x"\n  empty: "a*"\nbogus: 1\n')
    messages = [str(p) for p in info.value.problems]
    assert any(m.startswith("t.yaml:2:8: redaction.patterns.bad: invalid pattern") for m in messages), (
        messages
    )
    assert any("t.yaml:3:3: redaction.patterns.Bad-Name: invalid rule name" in m for m in messages), messages
    assert any("redaction.patterns.empty" in m and "empty string" in m for m in messages), messages
    assert any("t.yaml:5:1: redaction.bogus: unknown key" in m for m in messages), messages
