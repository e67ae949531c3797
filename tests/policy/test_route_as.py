"""``route_as``: an opt-in that routes requests naming a model (``gpt-4o``) as if they asked for
another the policy routes (``auto``), once, keeping the requested model as the baseline. The
loader's checks (file:line), the engine's decision and note, and end to end through the SDK:
the cheaper model answers, the headers say who and by which rules, and the ledger counts the
routing savings against gpt-4o's price."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.cost.prices import PriceTable, load_litellm_prices
from proxy.cost.pricing import cost_nusd, usd
from proxy.errors import ConfigError
from proxy.policy.capabilities import capabilities_for
from proxy.policy.engine import evaluate
from proxy.policy.loader import parse_policy
from proxy.policy.model import Features
from proxy.settings import DEFAULT_BASE_URLS, CacheConfig, ModelConfig, Settings, UpstreamConfig
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

MODELS = (
    ModelConfig("gpt-4o", "openai", DEFAULT_BASE_URLS["openai"]),
    ModelConfig("gpt-4o-mini", "openai", DEFAULT_BASE_URLS["openai"]),
)
POLICY = """\
version: route-as
aliases:
  small: [gpt-4o-mini]
  large: [gpt-4o]
rules:
  - name: gpt-4o-as-auto
    match: {model: gpt-4o}
    action: {route_as: auto}
  - name: auto-hard
    match: {model: auto, task_class: [code, math, reasoning]}
    action: {target: large}
  - name: auto-simple
    match: {model: auto}
    action: {target: [small, large]}
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_policy(textwrap.dedent(text), "p.yaml", MODELS)
    return str(info.value)


def test_route_as_loads_and_the_engine_routes_as_the_named_model_once() -> None:
    policy = parse_policy(POLICY, "p.yaml", MODELS)
    assert policy.rules[0].action.route_as == "auto" and not policy.rules[0].action.arms
    caps = capabilities_for(MODELS)
    simple = evaluate(policy, Features(model="gpt-4o", last_user="hello there"), caps, explain=True)
    assert (simple.rule, simple.model) == ("gpt-4o-as-auto>auto-simple", "gpt-4o-mini")
    assert any("routed as 'auto'" in note for note in simple.notes)
    # the task class is read for the routed-as model even when the request's own model skipped it
    hard = evaluate(policy, Features(model="gpt-4o", last_user="Write a Python function that sorts a list"), caps)
    assert (hard.rule, hard.model) == ("gpt-4o-as-auto>auto-hard", "gpt-4o")
    other = evaluate(policy, Features(model="gpt-4o-mini"), caps)
    assert other.rule is None  # a model no rule names goes where it asked


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """\
            rules:
              - name: loop
                match: {model: [gpt-4o, auto]}
                action: {route_as: auto}
              - name: a
                match: {model: auto}
                action: {target: gpt-4o-mini}
            """,
            "p.yaml:4: rules[0].action.route_as: rule 'loop' could match its own result",
        ),
        (
            """\
            rules:
              - name: everything
                action: {route_as: auto}
              - name: a
                match: {model: auto}
                action: {target: gpt-4o-mini}
            """,
            "rule 'everything' could match its own result",
        ),
        (
            """\
            rules:
              - name: as-nothing
                match: {model: gpt-4o}
                action: {route_as: turbo}
              - name: a
                match: {model: auto}
                action: {target: gpt-4o-mini}
            """,
            "p.yaml:4: rules[0].action.route_as: route_as 'turbo': no rule routes requests for that model",
        ),
        (
            """\
            rules:
              - name: capped
                match: {model: gpt-4o}
                action: {route_as: auto, max_tokens: 10}
            """,
            "route_as goes alone",
        ),
        (
            """\
            rules:
              - name: both
                match: {model: gpt-4o}
                action: {route_as: auto, target: gpt-4o-mini}
            """,
            "needs exactly one of",
        ),
    ],
)
def test_route_as_mistakes_name_file_line_and_key(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_a_gpt_4o_request_with_the_opt_in_is_served_cheaper_and_saves_against_gpt_4o(
    start_gateway: Callable[[Settings], ThreadServer], upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    quick = UpstreamConfig(retries=0, probe_interval=0)
    server = start_gateway(replace(base, policies=str(path), upstream=quick, cache=CacheConfig(enabled=False)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0)

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "say hi"}])
    assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert raw.headers["x-thrifty-route"] == "gpt-4o-as-auto>auto-simple"
    assert upstream[0].requests[-1].payload["model"] == "gpt-4o-mini"
    rec = record_of(tmp_path / "thrifty.db", raw.headers["x-request-id"])
    assert (rec["requested_model"], rec["served_model"], rec["route"]) == ("gpt-4o", "gpt-4o-mini", "gpt-4o-as-auto>auto-simple")
    table = PriceTable(load_litellm_prices(), {})
    gpt_4o, mini = table.for_name("gpt-4o"), table.for_name("gpt-4o-mini")
    assert gpt_4o is not None and mini is not None
    before, completion = rec["prompt_tokens_before"], rec["completion_tokens"]
    assert rec["baseline_nusd"] == cost_nusd(gpt_4o, before, 0, completion)
    assert rec["cost_nusd"] == cost_nusd(mini, rec["prompt_tokens"], 0, completion)
    assert rec["savings_routing_nusd"] == rec["baseline_nusd"] - rec["cost_nusd"] > 0
    assert raw.headers["x-thrifty-savings-usd"] == usd(rec["savings_routing_nusd"])
