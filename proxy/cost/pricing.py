"""Pure pricing: usage and unit prices in, a :class:`Charge` out (no I/O, no awaits).

Money is counted in integer nano-dollars (1e-9 USD): every price per 1M tokens with up to
three decimals is exact at that grain, integers add exactly in SQLite and PostgreSQL, and
the per-request figure in the ``x-thrifty-cost-usd`` header is the very integer stored,
so a report's total equals the sum of the headers to the cent and beyond.

Savings are measured against a **baseline**: the requested model at the original prompt
size. They split by lever so that ``baseline - cost = cache + routing + pruning``:

- cache: a hit costs nothing upstream, so the whole baseline is saved by the cache;
- routing: the requested model's price minus the served model's, both at the original
  prompt size (negative if a request was routed to a dearer model);
- pruning: the served model's price for the prompt tokens that pruning removed.

Overhead (embeddings for the semantic cache, summarization calls) is kept apart; net
savings are the levers' sum minus overhead.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from proxy.cost.prices import Price

_NANO_PER_MILLIONTH = Decimal(1000)  # USD per 1M tokens x tokens x 1000 = nano-USD


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: str = "upstream"  # "upstream" when the server reported it, "counted" when thrifty counted


@dataclass(frozen=True, slots=True)
class Charge:
    cost: int
    baseline: int
    savings_cache: int
    savings_routing: int
    savings_pruning: int
    overhead: int = 0

    @property
    def net_savings(self) -> int:
        return self.savings_cache + self.savings_routing + self.savings_pruning - self.overhead


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_openai(data: Any) -> Usage | None:
    """Read OpenAI's ``usage`` object, cached and reasoning tokens included."""
    if not isinstance(data, dict) or ("prompt_tokens" not in data and "completion_tokens" not in data):
        return None
    prompt = _int(data.get("prompt_tokens"))
    details = data.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    completion_details = data.get("completion_tokens_details")
    reasoning = _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
    # reasoning tokens are already inside completion_tokens: they are never added again.
    return Usage(prompt, _int(data.get("completion_tokens")), min(cached, prompt), reasoning)


def cost_nusd(price: Price, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
    uncached = max(prompt_tokens - cached_tokens, 0)
    total = price.input * uncached + price.cached_input * min(cached_tokens, prompt_tokens) + price.output * completion_tokens
    return int((total * _NANO_PER_MILLIONTH).to_integral_value(ROUND_HALF_EVEN))


def charge(
    *,
    requested: Price,
    served: Price,
    usage: Usage,
    prompt_tokens_before: int,
    cache_hit: bool = False,
    overhead: int = 0,
) -> Charge:
    before = max(prompt_tokens_before, usage.prompt_tokens)
    cached = usage.cached_tokens
    baseline = cost_nusd(requested, before, cached, usage.completion_tokens)
    if cache_hit:
        return Charge(0, baseline, baseline, 0, 0, overhead)
    served_unpruned = cost_nusd(served, before, cached, usage.completion_tokens)
    cost = cost_nusd(served, usage.prompt_tokens, cached, usage.completion_tokens)
    return Charge(cost, baseline, 0, baseline - served_unpruned, served_unpruned - cost, overhead)


def usd(nano: int) -> str:
    """Nano-dollars as a plain decimal USD string (``0.000012500``)."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), 1_000_000_000)
    return f"{sign}{whole}.{frac:09d}"
