"""The price table: litellm's bundled price map, read from disk, with admin overrides.

litellm ships ``model_prices_and_context_window_backup.json`` (about 4,200 models); it is
found through the import machinery *without importing litellm* (an import costs seconds
and reaches for the network). Prices are held as :class:`Price` in USD per 1M tokens, as
Decimals, so they print and add exactly. The config's ``prices:`` section overrides or
adds any model; local models (Ollama, llama.cpp, ...) cost what the admin sets there (an
amortized hardware figure), 0 by default. A model with no known price is priced at 0 and
flagged ``price_source = "unknown"`` in its ledger record, with one warning in the log.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from proxy.settings import ModelConfig

log = logging.getLogger("thrifty.cost")

MILLION = Decimal(1_000_000)
ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens; ``source`` says where it came from (config, litellm, local, unknown)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    source: str

    @classmethod
    def free(cls, source: str) -> Price:
        return cls(ZERO, ZERO, ZERO, source)


def litellm_price_file() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    return path if path.is_file() else None


def load_litellm_prices(path: Path | None = None) -> Mapping[str, Price]:
    path = path or litellm_price_file()
    if path is None:
        log.warning("litellm's price map was not found; only prices from the config are known")
        return {}
    return _read_price_file(path)


@functools.cache
def _read_price_file(path: Path) -> Mapping[str, Price]:
    """Parsed once per process (a read-only view): the file changes only with litellm."""
    table = {}
    for name, entry in litellm_models(path).items():
        price = _from_litellm(entry) if "input_cost_per_token" in entry else None
        if price is not None:
            table[name] = price
    return MappingProxyType(table)


# The fields of litellm's map that thrifty reads (prices, output caps, capabilities).
_KEPT = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "max_output_tokens",
    "max_tokens",
    "max_input_tokens",
    "supports_function_calling",
    "supports_vision",
    "supports_response_schema",
)


@functools.cache
def litellm_models(path: Path | None = None) -> Mapping[str, Mapping[str, Any]]:
    """litellm's model map, parsed once per process, each entry cut to the fields thrifty reads
    (the whole map is tens of MB as Python objects; this is a few)."""
    path = path or litellm_price_file()
    if path is None:
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        return {}
    return MappingProxyType(
        {name: {k: entry[k] for k in _KEPT if k in entry} for name, entry in raw.items() if isinstance(entry, dict)}
    )


def model_names(model: ModelConfig) -> tuple[str, ...]:
    """The names a configured model may have in litellm's map, best first."""
    return (model.target_model, model.name, f"{model.provider}/{model.target_model}")


def entry_for(table: Mapping[str, Any], model: ModelConfig) -> Any:
    """The first entry of ``table`` under one of the model's names, or None."""
    for name in model_names(model):
        found = table.get(name)
        if found is not None:
            return found
    return None


def _per_million(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        # normalize() drops trailing zeros; format(..., 'f') keeps it out of exponent form (10, not 1E+1)
        return Decimal(format((Decimal(str(value)) * MILLION).normalize(), "f"))
    except ArithmeticError:
        return None


def _from_litellm(entry: Mapping[str, Any]) -> Price | None:
    inp = _per_million(entry.get("input_cost_per_token"))
    if inp is None:
        return None
    out = _per_million(entry.get("output_cost_per_token")) or ZERO
    cached = _per_million(entry.get("cache_read_input_token_cost"))
    return Price(inp, out, inp if cached is None else cached, "litellm")


class PriceTable:
    """Prices by client-facing model name, resolved once per configured model."""

    def __init__(self, litellm: Mapping[str, Price], overrides: Mapping[str, Price]):
        self._litellm = litellm
        self._overrides = overrides
        self._warned: set[str] = set()

    def for_model(self, model: ModelConfig) -> Price:
        override = self._overrides.get(model.name) or self._overrides.get(model.target_model)
        if override is not None:
            return override
        if model.is_local:
            return Price.free("local")
        found: Price | None = entry_for(self._litellm, model)
        if found is not None:
            return found
        if model.name not in self._warned:
            self._warned.add(model.name)
            log.warning("no price known for model %s; it is recorded at 0 (add it under prices: in the config)", model.name)
        return Price.free("unknown")

    def for_name(self, name: str) -> Price | None:
        """A price by bare model name (for baselines of models not configured here)."""
        return self._overrides.get(name) or self._litellm.get(name)


def overrides_from_config(prices: Mapping[str, Any]) -> dict[str, Price]:
    """``Settings.prices`` (PriceConfig per model) as :class:`Price` entries."""
    return {
        name: Price(p.input, p.output, p.input if p.cached_input is None else p.cached_input, "config")
        for name, p in prices.items()
    }
