"""Pure pricing: usage shapes priced in integer nano-dollars, savings split by lever, usd()."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.cost.prices import Price
from proxy.cost.pricing import Charge, Usage, charge, cost_nusd, usage_from_openai, usd

GPT_4O = Price(Decimal("2.5"), Decimal("10"), Decimal("1.25"), "test")
MINI = Price(Decimal("0.15"), Decimal("0.6"), Decimal("0.075"), "test")


def test_plain_usage_is_priced_per_token_in_nano_dollars() -> None:
    usage = usage_from_openai({"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500})
    assert usage == Usage(1000, 500, 0, 0)
    # 1000 x $2.50/1M = $0.0025 ; 500 x $10/1M = $0.005
    assert cost_nusd(GPT_4O, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == 7_500_000


def test_cached_prompt_tokens_are_priced_at_the_cache_read_rate() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 2000,
            "completion_tokens": 100,
            "total_tokens": 2100,
            "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0},
        }
    )
    assert usage is not None and usage.cached_tokens == 1536
    cost = cost_nusd(GPT_4O, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
    # 464 uncached x 2.5 + 1536 cached x 1.25 + 100 x 10, per 1M tokens, x 1e9 nano
    assert cost == 464 * 2500 + 1536 * 1250 + 100 * 10_000 == 4_080_000
    assert cost < cost_nusd(GPT_4O, 2000, 0, 100)


def test_cached_tokens_never_exceed_the_prompt() -> None:
    usage = usage_from_openai({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50}})
    assert usage is not None and usage.cached_tokens == 10
    assert cost_nusd(GPT_4O, 10, 50, 0) == 10 * 1250


def test_reasoning_tokens_are_inside_completion_tokens_and_not_added_again() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 100,
            "completion_tokens": 1000,
            "total_tokens": 1100,
            "completion_tokens_details": {"reasoning_tokens": 900, "accepted_prediction_tokens": 0},
        }
    )
    assert usage == Usage(100, 1000, 0, 900)
    priced = charge(requested=GPT_4O, served=GPT_4O, usage=usage, prompt_tokens_before=100)
    assert priced.cost == 100 * 2500 + 1000 * 10_000  # not 1900 output tokens


@pytest.mark.parametrize(
    "data",
    [None, "usage", [], {}, {"total_tokens": 5}, {"input_tokens": 3, "output_tokens": 4}],
)
def test_missing_or_foreign_usage_is_not_read_as_openai_usage(data: object) -> None:
    assert usage_from_openai(data) is None


def test_garbage_token_fields_count_as_zero() -> None:
    usage = usage_from_openai(
        {"prompt_tokens": -5, "completion_tokens": True, "prompt_tokens_details": None, "completion_tokens_details": "x"}
    )
    assert usage == Usage(0, 0, 0, 0)


def test_cache_hit_costs_nothing_and_saves_the_whole_baseline() -> None:
    usage = Usage(1000, 200)
    priced = charge(requested=GPT_4O, served=GPT_4O, usage=usage, prompt_tokens_before=1000, cache_hit=True, overhead=7)
    assert priced.cost == 0
    assert priced.baseline == priced.savings_cache == 1000 * 2500 + 200 * 10_000
    assert priced.savings_routing == priced.savings_pruning == 0
    assert priced.net_savings == priced.baseline - 7


def test_routing_and_pruning_savings_are_attributed_to_their_levers() -> None:
    # Asked for gpt-4o with a 3000-token prompt; routed to mini and pruned to 1000 tokens.
    priced = charge(requested=GPT_4O, served=MINI, usage=Usage(1000, 100), prompt_tokens_before=3000)
    assert priced.baseline == 3000 * 2500 + 100 * 10_000
    assert priced.cost == 1000 * 150 + 100 * 600
    assert priced.savings_routing == priced.baseline - (3000 * 150 + 100 * 600)
    assert priced.savings_pruning == 2000 * 150
    assert priced.savings_cache == 0


def test_routing_to_a_dearer_model_is_a_negative_saving() -> None:
    priced = charge(requested=MINI, served=GPT_4O, usage=Usage(100, 10), prompt_tokens_before=100)
    assert priced.savings_routing < 0
    assert priced.net_savings == priced.baseline - priced.cost


prices = st.builds(
    lambda i, o, c: Price(Decimal(i) / 1000, Decimal(o) / 1000, Decimal(c) / 1000, "h"),
    st.integers(0, 200_000),
    st.integers(0, 800_000),
    st.integers(0, 200_000),
)


@given(
    requested=prices,
    served=prices,
    prompt=st.integers(0, 2_000_000),
    removed=st.integers(0, 2_000_000),
    cached=st.integers(0, 2_000_000),
    completion=st.integers(0, 500_000),
    cache_hit=st.booleans(),
    overhead=st.integers(0, 10**9),
)
def test_savings_split_so_that_baseline_minus_cost_is_the_sum_of_levers(
    requested: Price,
    served: Price,
    prompt: int,
    removed: int,
    cached: int,
    completion: int,
    cache_hit: bool,
    overhead: int,
) -> None:
    usage = Usage(prompt, completion, min(cached, prompt))
    priced = charge(
        requested=requested,
        served=served,
        usage=usage,
        prompt_tokens_before=prompt + removed,
        cache_hit=cache_hit,
        overhead=overhead,
    )
    assert priced.baseline - priced.cost == priced.savings_cache + priced.savings_routing + priced.savings_pruning
    assert priced.net_savings == priced.baseline - priced.cost - overhead
    assert priced.cost >= 0 and priced.savings_pruning >= 0
    if cache_hit:
        assert priced.cost == 0 and priced.savings_cache == priced.baseline
    else:
        assert priced.savings_cache == 0
    if requested == served and removed == 0:
        assert priced.savings_routing == priced.savings_pruning == 0


@given(
    price=prices,
    prompt=st.integers(0, 10_000_000),
    cached=st.integers(0, 10_000_000),
    completion=st.integers(0, 10_000_000),
)
def test_prices_with_three_decimals_are_exact_in_nano_dollars(price: Price, prompt: int, cached: int, completion: int) -> None:
    cached = min(cached, prompt)
    exact = (price.input * (prompt - cached) + price.cached_input * cached + price.output * completion) * 1000
    assert exact == exact.to_integral_value()
    assert cost_nusd(price, prompt, cached, completion) == int(exact)


def test_sub_nano_costs_round_half_to_even() -> None:
    tiny = Price(Decimal("0.0005"), Decimal("0.0015"), Decimal("0"), "t")  # 0.5 and 1.5 nano-dollars a token
    assert cost_nusd(tiny, 1, 0, 0) == 0
    assert cost_nusd(tiny, 0, 0, 1) == 2
    assert cost_nusd(tiny, 3, 0, 0) == 2  # 1.5 -> 2


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0.000000000"),
        (1, "0.000000001"),
        (12_500, "0.000012500"),
        (7_500_000, "0.007500000"),
        (1_000_000_000, "1.000000000"),
        (1_234_567_890_123, "1234.567890123"),
        (-1, "-0.000000001"),
        (-1_500_000_000, "-1.500000000"),
    ],
)
def test_usd_formats_nano_dollars_as_plain_decimals(nano: int, text: str) -> None:
    assert usd(nano) == text


@given(st.integers(-(10**18), 10**18))
def test_usd_round_trips_through_decimal(nano: int) -> None:
    text = usd(nano)
    assert "e" not in text.lower()
    assert Decimal(text) * 1_000_000_000 == nano


def test_charge_defaults_have_no_overhead() -> None:
    assert Charge(5, 9, 0, 4, 0).net_savings == 4
