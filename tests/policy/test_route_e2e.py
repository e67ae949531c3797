"""Routing end to end: a real gateway with a policy, the official OpenAI SDK, a fake upstream
that records which model it was asked for, and the SQLite ledger; budget-state routing with
the real guard on a real Redis; the router handing health, prices and the task class to the
engine."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest
import redis

from proxy.app_state import GATEWAY
from proxy.cost.prices import Price
from proxy.errors import ConfigError
from proxy.pipeline.auth import Principal
from proxy.pipeline.route import blended_prices, load_router
from proxy.policy.loader import load_policy
from proxy.settings import BudgetLimit, ModelConfig, Settings
from tests.api.conftest import wait_until
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_guard import HI, budgeted, client_for
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer
from tests.services import redis_url  # noqa: F401

PRICES = {
    "tiny": Price(Decimal("0.2"), Decimal("1.4"), Decimal("0.2"), "config"),
    "big": Price(Decimal(2), Decimal(14), Decimal(2), "litellm"),
}

POLICY = """\
version: e2e
aliases:
  cheap: [tiny, gpt-4o-mini]
rules:
  - name: vip
    match: {headers: {x-customer-tier: gold}}
    action: {target: gpt-4o}
  - name: simple
    match: {model: auto}
    action: {target: cheap, max_tokens: 64}
"""
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
def routed(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    tiny = ModelConfig("tiny", "openai-compatible", f"{upstream[1].url}/v1", UPSTREAM_KEY, timeouts=base.models[0].timeouts)
    return replace(base, models=(*base.models, tiny), policies=str(policy))


@pytest.fixture
def sdk(start_gateway: Callable[[Settings], ThreadServer], routed: Settings) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(routed)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        yield client


def ledger_of(settings: Settings) -> Path:
    return Path(settings.ledger.url.removeprefix("sqlite:///"))


def test_an_auto_request_goes_to_the_cheap_model_named_by_the_rule(
    sdk: openai.OpenAI, fake: FakeUpstream, routed: Settings
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "hello"}])
    reply = raw.parse()
    assert reply.choices[0].message.content == "echo: hello"
    assert raw.headers["x-thrifty-route"] == "simple" and raw.headers["x-thrifty-model"] == "tiny"
    sent = fake.requests[-1].payload
    assert sent["model"] == "tiny" and sent["max_tokens"] == 64
    record = record_of(ledger_of(routed), raw.headers["x-request-id"])
    version = load_policy(routed.policies or "", routed.models).version
    assert version.startswith("e2e-")
    assert (record["route"], record["policy_version"]) == ("simple", version)
    assert (record["requested_model"], record["served_model"]) == ("auto", "tiny")
    # "auto" names no priced model: the baseline is the policy's default cloud target, the first
    # priced cloud model of its aliases (gpt-4o-mini; tiny has no price), and routing saved the rest
    assert record["baseline_nusd"] > record["cost_nusd"]
    assert record["savings_routing_nusd"] == record["baseline_nusd"] - record["cost_nusd"]


def test_a_tools_request_is_routed_away_from_a_model_without_tools(
    sdk: openai.OpenAI, fake: FakeUpstream, routed: Settings
) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, max_tokens=10
    )
    reply = raw.parse()
    assert reply.choices[0].message.tool_calls and reply.choices[0].message.tool_calls[0].function.name == "weather"
    assert raw.headers["x-thrifty-route"] == "simple" and raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    sent = fake.requests[-1].payload
    assert sent["model"] == "gpt-4o-mini" and sent["max_tokens"] == 10  # below the cap: the client's own
    record = record_of(ledger_of(routed), raw.headers["x-request-id"])
    assert (record["route"], record["served_model"]) == ("simple", "gpt-4o-mini")


def test_a_streamed_request_is_routed_and_a_header_rule_applies(sdk: openai.OpenAI, fake: FakeUpstream) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "one two"}], stream=True, extra_headers={"x-customer-tier": "gold"}
    ) as response:
        assert response.headers["x-thrifty-route"] == "vip"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == "echo: one two"
    assert fake.requests[-1].payload["model"] == "gpt-4o"


def test_a_request_naming_a_model_is_left_alone(sdk: openai.OpenAI, fake: FakeUpstream, routed: Settings) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "x-thrifty-route" not in raw.headers and raw.headers["x-thrifty-model"] == "gpt-4o"
    assert fake.requests[-1].payload == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    record = record_of(ledger_of(routed), raw.headers["x-request-id"])
    assert record["route"] is None and record["policy_version"].startswith("e2e-")
    embedding = sdk.embeddings.create(model="text-embedding-3-small", input="not routed")
    assert embedding.data and fake.requests[-1].payload["model"] == "text-embedding-3-small"


async def test_an_invalid_policy_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: a\n    action: {target: gpt-9}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: rules\[0\].action.target: unknown model 'gpt-9'"):
        await load_router(str(bad), ())
    assert await load_router(None, ()) is None


async def test_a_request_no_target_can_serve_is_refused_with_the_reasons(tmp_path: Path) -> None:
    from proxy.api.wire import parse_chat
    from proxy.errors import UnsupportedRequest
    from proxy.pipeline.exchange import Exchange

    policy = tmp_path / "p.yaml"
    policy.write_text("rules:\n  - {name: local, match: {model: auto}, action: {target: tiny}}\n", encoding="utf-8")
    router = await load_router(str(policy), (ModelConfig("tiny", "openai-compatible", "http://127.0.0.1:9/v1"),))
    assert router is not None
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}'
    exchange = Exchange("req-1", "chat/completions")
    with pytest.raises(UnsupportedRequest, match=r"rule 'local' \(line 2\): skipped tiny: no tool calling"):
        await router.route(exchange, parse_chat(body), {})
    assert exchange.route is None and exchange.policy_version == router.policy.version
    plain = parse_chat(b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}')
    routed = await router.route(exchange, plain, {})
    assert (routed.model, exchange.route) == ("tiny", "local")


# --- the state of the world: budget spend (real guard, real Redis), backend health, prices ---

BUDGET_POLICY = """\
rules:
  - name: over-budget
    match: {model: auto, budget: {above: 0.5, scope: team}}
    action: {target: gpt-4o-mini}
  - name: normal
    match: {model: auto}
    action: {target: gpt-4o}
"""


@pytest.fixture
def team(redis_url: str) -> Iterator[str]:  # noqa: F811
    name = "route-" + secrets.token_hex(4)
    yield name
    with redis.Redis.from_url(redis_url) as r:
        for key in r.scan_iter(match=f"thrifty:budget:{{team:{name}}}*"):
            r.delete(key)


def test_a_team_over_half_its_budget_is_routed_to_the_cheap_model_counting_other_replicas_spend(
    start_gateway: Callable[[Settings], ThreadServer],
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    team: str,
) -> None:
    policy = tmp_path / "budget.yaml"
    policy.write_text(BUDGET_POLICY, encoding="utf-8")
    limits = (BudgetLimit("team", team, "daily", None, 100_000_000),)  # $0.10 a day
    settings = replace(budgeted(settings_for(upstream[1].url, tmp_path), redis_url), policies=str(policy))
    settings = replace(settings, budgets=replace(settings.budgets, limits=limits))
    gateway = start_gateway(settings)
    guard = gateway.app[GATEWAY].guard  # type: ignore[index]
    principal = Principal("k", team, None, "user")
    with client_for(gateway, team) as client:

        def route_of() -> str:
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=HI, max_tokens=5)  # type: ignore[arg-type]
            return str(raw.headers["x-thrifty-route"])

        def share_is(expected: float) -> bool:  # the settle runs after the response
            return wait_until(lambda: abs((guard.spend_share(principal, "team") or 0) - expected) < 1e-9)

        assert guard.spend_share(principal, "team") is None  # nothing seen yet: a budget rule does not match
        assert route_of() == "normal"  # $0.006 at gpt-4o's configured price
        assert share_is(0.06)
        with redis.Redis.from_url(redis_url) as r:  # another replica spends $0.05 meanwhile
            [key] = [k for k in r.scan_iter(match=f"thrifty:budget:{{team:{team}}}:daily:*") if not k.endswith(b":holds")]
            r.hincrby(key, "spent", 50_000_000)
        assert route_of() == "normal"  # this process has not read the counter since: still 6%
        assert share_is(0.62)  # the reservation read 56% from Redis, plus its own 6% when it settled
        assert route_of() == "over-budget"
    assert [r.payload["model"] for r in upstream[0].requests] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]


async def test_the_router_hands_health_prices_and_the_task_class_to_the_engine(tmp_path: Path) -> None:
    from proxy.api.wire import parse_chat
    from proxy.pipeline.exchange import Exchange
    from tests.policy.test_engine import FakeBackends

    policy = tmp_path / "p.yaml"
    policy.write_text(
        "rules:\n"
        "  - {name: code, match: {task_class: code}, action: {cheapest: [big, tiny], cache: {mode: exact, ttl: 1h}}}\n"
        "  - {name: rest, action: {target: [tiny, big]}}\n",
        encoding="utf-8",
    )
    models = [ModelConfig(n, "openai-compatible", "http://127.0.0.1:9/v1") for n in ("tiny", "big")]
    backends = FakeBackends(down={"tiny"})
    router = await load_router(str(policy), models, backends=backends)
    assert router is not None
    router.attach(prices=blended_prices(["tiny", "big"], lambda m: PRICES[m]))
    assert router.prices == {"tiny": 0.5, "big": 5.0}

    async def route(text: str) -> Exchange:
        exchange = Exchange("req-1", "chat/completions")
        body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]})
        await router.route(exchange, parse_chat(body), {})
        return exchange

    coded = await route("Fix this Python function: def f(x): return x +")
    assert coded.features is not None and coded.features.task_class == "code"
    assert coded.decision is not None and (coded.decision.model, coded.decision.fallbacks) == ("big", ("tiny",))  # tiny is down
    assert coded.decision.cache is not None and coded.decision.cache.ttl_seconds == 3600
    backends.down.clear()
    coded = await route("Fix this Python function: def f(x): return x +")
    assert coded.decision is not None and coded.decision.model == "tiny"  # up again, and the cheaper
    plain = await route("hello!")
    assert plain.route == "rest" and plain.features is not None and plain.features.task_class == "chat"
