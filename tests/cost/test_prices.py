"""The price table: litellm's map read from disk (litellm never imported), config overrides,
local models at 0, unknown models flagged."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.cost.prices import Price, PriceTable, litellm_price_file, load_litellm_prices, overrides_from_config
from proxy.settings import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://127.0.0.1:9/v1"


@pytest.fixture(scope="module")
def litellm_prices() -> Mapping[str, Price]:
    return load_litellm_prices()


def test_the_price_map_loads_from_disk_without_importing_litellm() -> None:
    script = textwrap.dedent(
        """
        import sys
        from proxy.cost.prices import litellm_price_file, load_litellm_prices
        table = load_litellm_prices()
        print(len(table), litellm_price_file(), "litellm" in sys.modules, any(m.startswith("litellm") for m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    count, path, imported, any_submodule = done.stdout.split()
    assert int(count) > 1000
    assert path.endswith("litellm/model_prices_and_context_window_backup.json")
    assert imported == "False" and any_submodule == "False"


def test_litellm_prices_are_converted_to_usd_per_million_exactly(litellm_prices: Mapping[str, Price]) -> None:
    path = litellm_price_file()
    assert path is not None
    raw = json.loads(path.read_text())
    checked = 0
    for name in ("gpt-4o", "gpt-4o-mini", "o1", "claude-sonnet-4-5", "text-embedding-3-small"):
        entry = raw.get(name)
        if entry is None:
            continue
        price = litellm_prices[name]
        assert price.source == "litellm"
        assert price.input == Decimal(str(entry["input_cost_per_token"])) * 1_000_000
        assert price.output == Decimal(str(entry.get("output_cost_per_token", 0))) * 1_000_000
        cached = entry.get("cache_read_input_token_cost")
        assert price.cached_input == (price.input if cached is None else Decimal(str(cached)) * 1_000_000)
        checked += 1
    assert checked >= 3
    assert litellm_prices["gpt-4o"].cached_input < litellm_prices["gpt-4o"].input


def test_entries_without_an_input_price_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "sample_spec": "documentation, not a model",
                "image-model": {"output_cost_per_image": 0.04},
                "m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06},
                "no-output": {"input_cost_per_token": 3e-07},
            }
        )
    )
    table = load_litellm_prices(path)
    assert set(table) == {"m", "no-output"}
    assert table["m"] == Price(Decimal(1), Decimal(2), Decimal(1), "litellm")
    assert table["no-output"].output == 0 and table["no-output"].input == Decimal("0.3")


def test_a_configured_price_overrides_litellm(litellm_prices: Mapping[str, Price], tmp_path: Path) -> None:
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            models:
              - {{name: gpt-4o, provider: openai, base_url: {BASE}}}
              - {{name: fast, provider: openai, base_url: {BASE}, upstream_model: gpt-4o-mini}}
            prices:
              gpt-4o: {{input: 2.0, output: 8, cached_input: 0.5}}
              gpt-4o-mini: {{input: 0.1, output: 0.4}}
            """
        )
    )
    settings = load_settings(str(config), env={})
    table = PriceTable(litellm_prices, overrides_from_config(settings.prices))
    by_name = {m.name: m for m in settings.models}
    assert table.for_model(by_name["gpt-4o"]) == Price(Decimal("2.0"), Decimal(8), Decimal("0.5"), "config")
    # matched by the upstream model name; cached input defaults to the input price
    assert table.for_model(by_name["fast"]) == Price(Decimal("0.1"), Decimal("0.4"), Decimal("0.1"), "config")
    assert table.for_name("gpt-4o") is not None and table.for_name("gpt-4o").source == "config"  # type: ignore[union-attr]
    assert table.for_name("o1") == litellm_prices["o1"]
    assert table.for_name("no-such-model-at-all") is None


def test_a_model_without_override_gets_the_litellm_price(litellm_prices: Mapping[str, Price]) -> None:
    table = PriceTable(litellm_prices, {})
    aliased = ModelConfig("cheap", "openai", BASE, upstream_model="gpt-4o-mini")
    assert table.for_model(aliased) == litellm_prices["gpt-4o-mini"]
    assert table.for_model(ModelConfig("gpt-4o", "openai", BASE)) == litellm_prices["gpt-4o"]


@pytest.mark.parametrize("provider", ["ollama", "llamacpp", "lmstudio", "vllm"])
def test_local_providers_price_zero_unless_configured(litellm_prices: Mapping[str, Price], provider: str) -> None:
    # even a name that litellm prices is free when it runs on local hardware
    local = ModelConfig("gpt-4o-mini", provider, "http://127.0.0.1:11434/v1")
    assert PriceTable(litellm_prices, {}).for_model(local) == Price.free("local")
    amortized = Price(Decimal("0.05"), Decimal("0.05"), Decimal("0.05"), "config")
    assert PriceTable(litellm_prices, {"gpt-4o-mini": amortized}).for_model(local) == amortized


def test_an_unknown_model_is_flagged_and_warned_about_once(
    litellm_prices: Mapping[str, Price], caplog: pytest.LogCaptureFixture
) -> None:
    table = PriceTable(litellm_prices, {})
    unknown = ModelConfig("house-model-7", "openai", BASE, upstream_model="house-model-7-2025")
    with caplog.at_level(logging.WARNING, logger="thrifty.cost"):
        first = table.for_model(unknown)
        second = table.for_model(unknown)
    assert first == second == Price(Decimal(0), Decimal(0), Decimal(0), "unknown")
    warnings = [r for r in caplog.records if "house-model-7" in r.getMessage()]
    assert len(warnings) == 1


def test_without_a_price_map_only_config_prices_are_known() -> None:
    table = PriceTable({}, {"m": Price(Decimal(1), Decimal(1), Decimal(1), "config")})
    assert table.for_model(ModelConfig("m", "openai", BASE)).source == "config"
    assert table.for_model(ModelConfig("gpt-4o", "openai", BASE)).source == "unknown"
