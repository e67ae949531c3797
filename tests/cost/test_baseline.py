"""Honest baselines: a request for ``auto`` (an alias with no price) is measured against what it
would have cost without thrifty, ``ledger.baseline_model`` or the policy's default cloud target, so
routing savings show up in the ledger and in ``x-thrifty-savings-usd``, including for an answer
served by a local model at no cost; ``baseline - cost = cache + routing + pruning`` still holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.config import load_settings
from proxy.cost.prices import Price, PriceTable, load_litellm_prices
from proxy.cost.pricing import cost_nusd, usd
from proxy.errors import ConfigError
from proxy.pipeline.ledger import default_baseline
from proxy.settings import CacheConfig, LedgerConfig, ModelConfig, Settings, UpstreamConfig
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

POLICY = """\
version: baseline
aliases:
  small: ["@local", gpt-4o-mini]
  large: [gpt-4o, gpt-4o-mini]
rules:
  - name: auto-simple
    match: {model: auto}
    action: {target: [small, large]}
"""
MESSAGES: Any = [{"role": "user", "content": "name a colour of the sky"}]


def price(name: str) -> Price:
    found = PriceTable(load_litellm_prices(), {}).for_name(name)
    assert found is not None
    return found


def gateway(start: Callable[[Settings], ThreadServer], settings: Settings, tmp_path: Path, policy: str = POLICY) -> openai.OpenAI:
    path = tmp_path / "policy.yaml"
    path.write_text(policy, encoding="utf-8")
    routed = replace(
        settings, policies=str(path), upstream=UpstreamConfig(retries=0, probe_interval=0), cache=CacheConfig(enabled=False)
    )
    server = start(routed)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0)


def check_record(rec: dict[str, Any], baseline: Price, served: Price) -> None:
    before, completion = rec["prompt_tokens_before"], rec["completion_tokens"]
    assert rec["baseline_nusd"] == cost_nusd(baseline, before, 0, completion) > 0
    assert rec["cost_nusd"] == cost_nusd(served, rec["prompt_tokens"], 0, completion)
    assert rec["savings_routing_nusd"] == rec["baseline_nusd"] - rec["cost_nusd"] > 0
    levers = rec["savings_cache_nusd"] + rec["savings_routing_nusd"] + rec["savings_pruning_nusd"]
    assert rec["baseline_nusd"] - rec["cost_nusd"] == levers


def test_auto_is_measured_against_the_policys_large_model_by_default(
    start_gateway: Callable[[Settings], ThreadServer], upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path
) -> None:
    client = gateway(start_gateway, settings_for(upstream[1].url, tmp_path), tmp_path)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    rec = record_of(tmp_path / "thrifty.db", raw.headers["x-request-id"])
    assert (rec["requested_model"], rec["served_model"]) == ("auto", "gpt-4o-mini")
    check_record(rec, price("gpt-4o"), price("gpt-4o-mini"))
    assert raw.headers["x-thrifty-savings-usd"] == usd(rec["baseline_nusd"] - rec["cost_nusd"])


def test_auto_served_locally_saves_the_configured_baseline_models_price(
    start_gateway: Callable[[Settings], ThreadServer], upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path
) -> None:
    base = settings_for(upstream[1].url, tmp_path)
    local = ModelConfig("tiny", "llamacpp", f"{upstream[1].url}/v1")
    settings = replace(base, models=(*base.models, local), ledger=replace(base.ledger, baseline_model="gpt-4o-mini"))
    client = gateway(start_gateway, settings, tmp_path)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == "tiny"
    rec = record_of(tmp_path / "thrifty.db", raw.headers["x-request-id"])
    assert rec["served_model"] == "tiny" and rec["cost_nusd"] == 0
    check_record(rec, price("gpt-4o-mini"), Price.free("local"))
    assert raw.headers["x-thrifty-savings-usd"] == usd(rec["baseline_nusd"]) != usd(0)


def test_a_named_model_stays_its_own_baseline(
    start_gateway: Callable[[Settings], ThreadServer], upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path
) -> None:
    client = gateway(start_gateway, settings_for(upstream[1].url, tmp_path), tmp_path)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    rec = record_of(tmp_path / "thrifty.db", raw.headers["x-request-id"])
    assert rec["baseline_nusd"] == rec["cost_nusd"] > 0 and rec["savings_routing_nusd"] == 0
    assert raw.headers["x-thrifty-savings-usd"] == usd(0)


def test_a_baseline_model_without_a_price_stops_the_start(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> None:
    from proxy.app import create_app

    base = settings_for(upstream[1].url, tmp_path)
    settings = replace(
        base, ledger=LedgerConfig(url=base.ledger.url, spill_dir=base.ledger.spill_dir, baseline_model="no-such-model")
    )
    with pytest.raises(ConfigError, match=r"ledger.baseline_model: 'no-such-model' has no price"):
        ThreadServer(lambda: create_app(settings)).start()


def test_default_baseline_rule() -> None:
    cloud = {n: ModelConfig(n, "openai", "http://x/v1") for n in ("gpt-4o", "gpt-4o-mini", "mystery")}
    models = {**cloud, "tiny": ModelConfig("tiny", "ollama", "http://x/v1")}
    table = PriceTable(load_litellm_prices(), {})

    def price_of(name: str) -> Price:
        return table.for_name(name) or Price.free("unknown")

    assert default_baseline({"small": ("tiny", "gpt-4o-mini"), "large": ("mystery", "gpt-4o")}, models, price_of) == "gpt-4o"
    assert default_baseline({"small": ("tiny", "gpt-4o-mini")}, models, price_of) == "gpt-4o-mini"
    assert default_baseline({"small": ("tiny",)}, models, price_of) is None
    assert default_baseline({}, models, price_of) is None


def test_baseline_model_is_read_from_the_ledger_section(tmp_path: Path) -> None:
    path = tmp_path / "thrifty.yaml"
    path.write_text("ledger:\n  baseline_model: gpt-4o\n", encoding="utf-8")
    assert load_settings(str(path), env={}).ledger.baseline_model == "gpt-4o"
    path.write_text("ledger:\n  baseline_model: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"thrifty.yaml:2: .*ledger.baseline_model"):
        load_settings(str(path), env={})
