"""Price tables, lookup rules and the exact cost formula (sidecar.pricing)."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar import pricing
from sidecar.errors import ConfigError
from sidecar.model import Usage
from sidecar.pricing import LongContext, Price, PriceTable, Rates, Tier, cost

D = Decimal

GPT_4O_MINI = Price(input=D("0.15"), cached_input=D("0.075"), output=D("0.60"))
SONNET = Price(
    input=D("3"), cached_input=D("0.30"), cache_write=D("3.75"), cache_write_1h=D("6"), output=D("15")
)


def table(text: str, filename: str = "prices.yaml") -> PriceTable:
    return pricing.load(textwrap.dedent(text), filename)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        table(text)
    return [str(p) for p in info.value.problems]


# -- the cost formula ------------------------------------------------------------------


def test_openai_shaped_usage_with_cached_input() -> None:
    # openai_chat_nonstream_cached_tokens: prompt 1149 (cached 1024), completion 353.
    usage = Usage(input=1149, cached_input=1024, output=353, reasoning=0)
    # (125 * 0.15 + 1024 * 0.075 + 353 * 0.60) / 1e6 = (18.75 + 76.8 + 211.8) / 1e6
    assert cost(usage, GPT_4O_MINI) == D("0.00030735")


def test_anthropic_shaped_usage_with_cache_write() -> None:
    # anthropic_messages_nonstream_cache_creation: input 4 + cache_creation 1163, output 187.
    usage = Usage(input=4 + 1163, cache_write=1163, cache_write_1h=0, output=187)
    # (4 * 3 + 1163 * 3.75 + 187 * 15) / 1e6 = (12 + 4361.25 + 2805) / 1e6
    assert cost(usage, SONNET) == D("0.00717825")


def test_anthropic_shaped_usage_with_reads_and_both_write_ttls() -> None:
    usage = Usage(input=10_000, cached_input=6_000, cache_write=3_000, cache_write_1h=1_000, output=500)
    # uncached 1000 * 3 + read 6000 * 0.30 + 5m 2000 * 3.75 + 1h 1000 * 6 + out 500 * 15
    # = 3000 + 1800 + 7500 + 6000 + 7500 = 25800 → 0.0258
    assert cost(usage, SONNET) == D("0.0258")


def test_reasoning_is_inside_output_and_never_billed_again() -> None:
    assert cost(Usage(input=10, output=100, reasoning=80), GPT_4O_MINI) == cost(
        Usage(input=10, output=100), GPT_4O_MINI
    )


def test_none_counts_are_zero() -> None:
    assert cost(Usage(), SONNET) == 0
    assert cost(Usage(output=1_000_000), SONNET) == D("15")


def test_uncached_part_is_clamped_at_zero() -> None:
    # An upstream reporting more cached tokens than input tokens never yields a negative term.
    assert cost(Usage(input=100, cached_input=150), GPT_4O_MINI) == D("150") * D("0.075") / 1_000_000
    assert cost(Usage(input=10, cache_write=5, cache_write_1h=8), SONNET) == (D(5) * 3 + D(8) * 6) / 1_000_000


def test_exact_arithmetic_no_float() -> None:
    price = table("models: {m: {input: 0.1, output: 0.2}}\n").models["m"]
    assert price.input == D("0.1") and price.output == D("0.2")
    one = cost(Usage(input=1, output=1), price)
    assert isinstance(one, Decimal)
    assert one == D("0.0000003")
    total = sum((cost(Usage(input=1, output=1), price) for _ in range(10_000)), D(0))
    assert total == D("0.003")  # float would drift: 10_000 * (0.1 + 0.2) / 1e6 != 0.003
    assert total == one * 10_000


def test_fallback_prices() -> None:
    flat = Price(input=D("2"), output=D("8"))
    usage = Usage(input=1000, cached_input=100, cache_write=50, cache_write_1h=20, output=10)
    assert cost(usage, flat) == (D(1000) * 2 + D(10) * 8) / 1_000_000  # everything at the input price
    no_1h = Price(input=D("3"), cache_write=D("3.75"), output=D("15"))
    assert no_1h.rates() == Rates(D("3"), D("3"), D("3.75"), D("3.75"), D("15"))
    assert cost(usage, no_1h) == (D(850) * 3 + D(100) * 3 + D(50) * D("3.75") + D(150)) / 1_000_000


# -- tiers and long context -----------------------------------------------------------------

TIERED = """\
models:
  m:
    input: 1.00
    cached_input: 0.10
    output: 4.00
    long_context: {above: 200000, input: 2.00, output: 6.00}
    tiers:
      batch: {input: 0.50, cached_input: 0.05, output: 2.00}
      flex: {input: 0.40, output: 1.60}
      priority:
        input: 2.50
        output: 10.00
        long_context: {above: 100000, input: 5.00}
"""


def test_tier_replaces_base_prices_field_by_field() -> None:
    price = table(TIERED).models["m"]
    usage = Usage(input=1000, cached_input=400, output=100)
    assert cost(usage, price) == (D(600) * 1 + D(400) * D("0.10") + D(100) * 4) / 1_000_000
    assert cost(usage, price, "batch") == (D(600) * D("0.5") + D(400) * D("0.05") + D(100) * 2) / 1_000_000
    # flex sets no cached_input price: the base one stays.
    assert (
        cost(usage, price, "flex") == (D(600) * D("0.4") + D(400) * D("0.10") + D(100) * D("1.6")) / 1_000_000
    )
    # A tier the table does not know (or "default") uses the base prices.
    assert cost(usage, price, "default") == cost(usage, price) == cost(usage, price, None)


def test_long_context_applies_above_the_threshold() -> None:
    price = table(TIERED).models["m"]
    at = Usage(input=200_000, output=1000)
    above = Usage(input=200_001, output=1000)
    assert cost(at, price) == (D(200_000) * 1 + D(1000) * 4) / 1_000_000
    assert cost(above, price) == (D(200_001) * 2 + D(1000) * 6) / 1_000_000
    assert price.rates(200_001).cached_input == D("0.10")  # not given in the block: base stays


def test_tier_with_its_own_long_context() -> None:
    price = table(TIERED).models["m"]
    rates = price.rates(150_000, "priority")
    assert rates == Rates(input=D("5.00"), cached_input=D("0.10"), cache_write=D("5.00"),
                          cache_write_1h=D("5.00"), output=D("10.00"))  # fmt: skip
    # Above both thresholds: base long context first, then the tier, then the tier's long context.
    assert price.rates(250_000, "priority").input == D("5.00")
    assert price.rates(250_000, "priority").output == D("10.00")
    assert price.rates(250_000, "batch").input == D("0.50")


def test_model_dataclasses() -> None:
    price = table(TIERED).models["m"]
    assert price.long_context == LongContext(above=200000, input=D("2.00"), output=D("6.00"))
    assert price.tiers["flex"] == Tier(input=D("0.40"), output=D("1.60"))


# -- lookup --------------------------------------------------------------------------

LOOKUP = """\
models:
  a-model: {input: 1, output: 1}
  a-model-pro: {input: 2, output: 2, aliases: ["a-*"]}
  a-model-special: {input: 3, output: 3, aliases: ["a-model-s*"]}
  first: {input: 4, output: 4, aliases: ["x?"]}
  second: {input: 5, output: 5, aliases: ["?y"]}
  lit: {input: 6, output: 6, aliases: [lit-v2]}
  h: {input: 7, output: 7, aliases: ["h-v?"]}
"""


@pytest.mark.parametrize(
    ("model", "name", "kind"),
    [
        ("a-model", "a-model", "exact"),
        ("a-model-pro", "a-model-pro", "exact"),  # exact beats the "a-*" glob
        ("a-model-sx", "a-model-special", "alias"),  # longest glob wins
        ("a-other", "a-model-pro", "alias"),
        ("xy", "first", "alias"),  # equal lengths: the entry written first
        ("lit-v2", "lit", "alias"),
        ("a-model-2024-08-06", "a-model", "dated"),  # the dated base beats the "a-*" glob
        ("a-model-20240806", "a-model", "dated"),
        ("lit-v2-20250101", "lit", "dated"),
        ("h-v1-2025-01-01", "h", "dated"),  # dated base caught by a glob
        ("a-model-2024-8-6", "a-model-pro", "alias"),  # not a date: only the glob matches
    ],
)
def test_lookup_rules(model: str, name: str, kind: str) -> None:
    match = table(LOOKUP).lookup(model)
    assert match is not None
    assert (match.name, match.kind) == (name, kind)
    assert match.price is table(LOOKUP).models[name] or match.price == table(LOOKUP).models[name]


@pytest.mark.parametrize("model", ["A-model", "zz", "zz-2024-01-01", "", "h-v10"])
def test_unpriced_models(model: str) -> None:
    assert table(LOOKUP).lookup(model) is None


def test_lookups_are_cached_and_bounded() -> None:
    t = table(LOOKUP)
    first = t.lookup("a-model-2024-08-06")
    assert t.lookup("a-model-2024-08-06") is first
    for i in range(5000):
        t.lookup(f"unknown-{i}")
    assert len(t._cache) <= 4096
    assert t.lookup("a-model-sx") is not None


# -- the file format -------------------------------------------------------------------


def test_version_is_a_hash_of_the_bytes(tmp_path: Path) -> None:
    text = "version: sidecar/v1\nmodels: {m: {input: 1, output: 2}}\n"
    path = tmp_path / "prices.yaml"
    path.write_bytes(text.encode())
    loaded = pricing.load_file(path)
    assert loaded.version == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert loaded.version == pricing.load(text, "x").version
    assert loaded.source == str(path)
    assert len(loaded) == 1 and "m" in loaded


def test_version_is_optional_but_checked() -> None:
    assert len(table("models: {m: {input: 1, output: 2}}\n")) == 1
    assert problems("version: v2\nmodels: {m: {input: 1, output: 2}}\n") == [
        'prices.yaml:1:10: version: unsupported version "v2": this sidecar reads sidecar/v1'
    ]


def test_pricing_file_errors_with_line_numbers() -> None:
    text = """\
    models:
      m1: {input: 1, output: "2"}
      m2: {input: -1, output: 2, cahced_input: 1}
      m3: {output: 2}
      m4: {input: .nan, output: true}
      m5:
        input: 1
        output: 2
        long_context: {input: 2}
        tiers: {Batch: {input: 1}, flex: {}, x: 5}
      m1: {input: 1, output: 1}
      m6: {input: 1, output: 1, aliases: ["m1", "shared"]}
      m7: {input: 1, output: 1, aliases: ["shared", 3]}
    """
    assert problems(text) == [
        'prices.yaml:2:26: models.m1.output: expected a decimal number, got string "2"',
        "prices.yaml:3:15: models.m2.input: must be at least 0, got -1",
        'prices.yaml:3:30: models.m2.cahced_input: unknown key "cahced_input"; did you mean "cached_input"?',
        'prices.yaml:4:7: models.m3.input: missing required key "input"',
        "prices.yaml:5:15: models.m4.input: expected a decimal number, got number .nan",
        "prices.yaml:5:29: models.m4.output: expected a decimal number, got boolean true",
        'prices.yaml:9:19: models.m5.long_context.above: missing required key "above"',
        'prices.yaml:10:13: models.m5.tiers.Batch: invalid tier name "Batch": must match [a-z][a-z0-9_-]*',
        "prices.yaml:10:38: models.m5.tiers.flex: gives no price (expected at least one of input,"
        " cached_input, cache_write, cache_write_1h, output)",
        "prices.yaml:10:45: models.m5.tiers.x: expected a mapping, got number 5",
        'prices.yaml:11:3: models.m1: duplicate key "m1" (first at line 2)',
        'prices.yaml:12:39: models.m6.aliases[0]: alias "m1" is also a model name'
        " (the model entry would win)",
        "prices.yaml:13:49: models.m7.aliases[1]: expected a string, got number 3",
    ]


def test_alias_shared_by_two_models() -> None:
    text = (
        'models:\n  a: {input: 1, output: 1, aliases: ["s*"]}\n  b: {input: 1, output: 1, aliases: ["s*"]}\n'
    )
    assert problems(text) == ['prices.yaml:3:38: models.b.aliases[0]: alias "s*" is also an alias of "a"']


def test_structural_errors() -> None:
    assert problems("") == ["prices.yaml:1:1: empty file: expected a mapping with models:"]
    assert problems("version: sidecar/v1\n") == ['prices.yaml:1:1: models: missing required key "models"']
    assert problems("models: [a]\n") == [
        "prices.yaml:1:9: models: expected a mapping of model names to prices, got a list"
    ]
    assert problems("models: {m: 1}\n") == [
        "prices.yaml:1:13: models.m: expected a mapping of prices, got number 1"
    ]
    assert problems("models:\n  m: {input: 1, output: [2\n")[0].startswith("prices.yaml:3:1: invalid YAML:")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"models: {m\xff: {input: 1, output: 1}}\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        pricing.load_file(path)


# -- the packaged catalogue ---------------------------------------------------------------


def test_default_catalogue_loads() -> None:
    t = pricing.default_table()
    assert t is pricing.default_table()  # read once
    assert len(t) >= 30
    assert len(t.version) == 12 and int(t.version, 16) >= 0


@pytest.mark.parametrize(
    ("model", "name", "kind"),
    [
        ("gpt-4o-mini", "gpt-4o-mini", "exact"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", "dated"),
        ("gpt-4o-2024-08-06", "gpt-4o", "dated"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13", "exact"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet", "dated"),
        ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet", "dated"),
        ("text-embedding-ada-002-v2", "text-embedding-ada-002", "alias"),
        ("gpt-5.5-2026-04-23", "gpt-5.5", "dated"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano", "dated"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5", "dated"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5", "dated"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4", "dated"),
        ("claude-sonnet-4-0", "claude-sonnet-4", "alias"),
        ("claude-3-opus-20240229", "claude-3-opus", "dated"),
        ("o1-mini", "o1-mini", "exact"),
    ],
)
def test_default_catalogue_prices_recorded_models(model: str, name: str, kind: str) -> None:
    match = pricing.default_table().lookup(model)
    assert match is not None
    assert (match.name, match.kind) == (name, kind)


def test_default_catalogue_figures() -> None:
    t = pricing.default_table()
    mini = t.lookup("gpt-4o-mini")
    assert mini is not None
    assert cost(Usage(input=1149, cached_input=1024, output=353), mini.price) == D("0.00030735")
    gpt4o, launch = t.models["gpt-4o"], t.models["gpt-4o-2024-05-13"]
    assert (gpt4o.input, gpt4o.output) == (D("2.50"), D("10.00"))
    assert (launch.input, launch.output, launch.cached_input) == (D("5.00"), D("15.00"), None)
    sonnet = t.lookup("claude-3-5-sonnet-20241022")
    assert sonnet is not None
    usage = Usage(input=4 + 1163, cache_write=1163, cache_write_1h=0, output=187)
    assert cost(usage, sonnet.price) == D("0.00717825")
    ada = t.lookup("text-embedding-ada-002-v2")
    assert ada is not None and cost(Usage(input=2), ada.price) == D("0.0000002")


def test_default_catalogue_anthropic_cache_multipliers() -> None:
    # Cache reads 0.1x input, 5-minute writes 1.25x, 1-hour writes 2x (long context included).
    # Claude 3 Haiku is priced off the pattern on Anthropic's page (0.03 / 0.30 / 0.50).
    t = pricing.default_table()
    claude = {name: price for name, price in t.models.items() if name.startswith("claude-")}
    assert len(claude) >= 15
    for name, price in claude.items():
        blocks: list[Price | LongContext] = [price]
        if price.long_context is not None:
            blocks.append(price.long_context)
        for block in blocks:
            assert block.input is not None
            if name == "claude-3-haiku":
                assert (block.cached_input, block.cache_write, block.cache_write_1h) == (
                    D("0.03"),
                    D("0.30"),
                    D("0.50"),
                )
                continue
            assert block.cached_input == block.input * D("0.1"), name
            assert block.cache_write == block.input * D("1.25"), name
            assert block.cache_write_1h == block.input * 2, name


def test_default_catalogue_is_consistent() -> None:
    for name, price in pricing.default_table().models.items():
        for rates in (price.rates(), *(price.rates(0, tier) for tier in price.tiers)):
            assert rates.cached_input <= rates.input, name
            assert min(rates.input, rates.output, rates.cached_input) >= 0, name


def test_prices_are_hashable() -> None:
    price = table(TIERED).models["m"]
    assert hash(price) == hash(dataclasses.replace(price))
    assert {pricing.PriceMatch("m", price, "exact")}


def test_usage_is_empty_only_when_no_field_is_reported() -> None:
    """``is_empty`` names each field (it runs once per call): a field added to ``Usage``
    and not to it would make a call that reports only that field look unreported."""
    assert Usage().is_empty()
    for field in dataclasses.fields(Usage):
        for value in (0, 7):
            assert not Usage(**{field.name: value}).is_empty(), field.name
