"""The guard stage: which budgets apply, estimates, verdicts, the ``budgets:`` config section,
and the stage itself over real HTTP (official SDK, fake upstream, budgets in real Redis).

The pure decisions are tested as functions; the stage is driven through the gateway, so a
refusal is seen as the client sees it (429 ``budget_exceeded``) and the fake upstream's
recorded requests show that no upstream call was made.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from proxy.app_state import GATEWAY
from proxy.config import load_settings
from proxy.cost.budgets import Counter, InProcessBudgetStore, Reservation
from proxy.cost.prices import Price
from proxy.cost.pricing import Charge
from proxy.cost.tokens import TokenCounter
from proxy.errors import BudgetExceeded, ConfigError
from proxy.pipeline.auth import MASTER, Principal
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.guard import (
    DEFAULT_OUTPUT_CAP,
    Budget,
    BudgetIndex,
    Guard,
    Window,
    applicable,
    estimate,
    output_allowance,
    output_caps,
    prompt_tokens,
    refusal,
    warning,
    window,
)
from proxy.settings import BudgetLimit, BudgetsConfig, ModelConfig, PriceConfig, Settings
from tests.api.conftest import wait_until
from tests.conftest import settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import redis_url  # noqa: F401

USD = 1_000_000_000
PER_TOKEN = Price(Decimal(1000), Decimal(1000), Decimal(1000), "config")  # $0.001 a token: 1e6 nano-USD
HI = [{"role": "user", "content": "hi"}]


def limit(scope: str, name: str, period: str = "daily", soft: float | None = None, hard: float | None = None) -> BudgetLimit:
    return BudgetLimit(scope, name, period, nano(soft), nano(hard))


def nano(usd: float | None) -> int | None:
    return None if usd is None else int(Decimal(str(usd)) * USD)


# --- which budgets apply -------------------------------------------------------------------


def test_named_and_every_budgets_apply_to_a_principal() -> None:
    index = BudgetIndex(
        [
            limit("team", "search", "monthly", soft=800, hard=1000),
            limit("key", "key_1", hard=5),
            limit("app", "*", soft=10),
            limit("team", "other", hard=1),
        ]
    )
    got = applicable(index, Principal("key_1", "search", "ranker", "user"))
    assert got == (
        Budget("key", "key_1", "daily", None, 5 * USD),
        Budget("team", "search", "monthly", 800 * USD, 1000 * USD),
        Budget("app", "ranker", "daily", 10 * USD, None),
    )
    # "*" is per app, resolved to the caller's own; no app, no app budget.
    assert applicable(index, Principal("key_2", "search", None, "user")) == (
        Budget("team", "search", "monthly", 800 * USD, 1000 * USD),
    )
    assert applicable(index, Principal("key_3", "nobody", "x", "user")) == (Budget("app", "x", "daily", 10 * USD, None),)
    assert applicable(index, MASTER) == ()


def test_a_named_budget_wins_over_every_for_the_same_period() -> None:
    index = BudgetIndex([limit("app", "*", hard=10), limit("app", "big", hard=100), limit("app", "*", "monthly", hard=50)])
    got = applicable(index, Principal("k", "t", "big", "user"))
    assert got == (Budget("app", "big", "daily", None, 100 * USD), Budget("app", "big", "monthly", None, 50 * USD))


# --- windows and estimates -----------------------------------------------------------------


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "now", "ident", "end"),
    [
        ("daily", "2025-01-15T23:59:59", "2025-01-15", "2025-01-16T00:00:00"),
        ("daily", "2025-01-16T00:00:00", "2025-01-16", "2025-01-17T00:00:00"),
        ("daily", "2024-02-28T12:00:00", "2024-02-28", "2024-02-29T00:00:00"),
        ("monthly", "2025-01-31T23:59:59", "2025-01", "2025-02-01T00:00:00"),
        ("monthly", "2025-12-31T23:00:00", "2025-12", "2026-01-01T00:00:00"),
    ],
)
def test_windows_are_utc_days_and_months(period: str, now: str, ident: str, end: str) -> None:
    assert window(period, at(now)) == Window(ident, datetime.fromisoformat(end).replace(tzinfo=UTC))


@pytest.mark.parametrize(
    ("payload", "cap", "expected"),
    [
        ({"max_tokens": 50}, 16384, 50),
        ({"max_completion_tokens": 30, "max_tokens": 50}, None, 30),
        ({"max_tokens": 50, "n": 3}, None, 150),
        ({}, 16384, 16384),
        ({}, None, DEFAULT_OUTPUT_CAP),
        ({"max_tokens": 0, "n": True}, None, DEFAULT_OUTPUT_CAP),
    ],
)
def test_the_output_allowance(payload: dict[str, Any], cap: int | None, expected: int) -> None:
    assert output_allowance("chat/completions", payload, cap) == expected


def test_embeddings_have_no_output_and_count_their_input() -> None:
    counter = TokenCounter()
    assert output_allowance("embeddings", {"max_tokens": 9}, None) == 0
    assert prompt_tokens(counter, "embeddings", {"input": ["hello world", [1, 2, 3]]}, "text-embedding-3-small") == 2 + 3


def test_the_estimate_is_prompt_plus_allowance_at_the_served_price() -> None:
    counter = TokenCounter()
    payload = {"messages": HI, "max_tokens": 5}
    prompt = prompt_tokens(counter, "chat/completions", payload, "gpt-4o")
    assert prompt == counter.count_messages(HI, "gpt-4o") == 8
    assert estimate(PER_TOKEN, prompt, output_allowance("chat/completions", payload, None)) == 13 * 1_000_000
    # tool definitions are billed as prompt tokens: they count
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert prompt_tokens(counter, "chat/completions", {**payload, "tools": tools}, "gpt-4o") > prompt


def test_output_caps_come_from_litellms_map() -> None:
    models = [ModelConfig("big", "openai", "http://x", upstream_model="gpt-4o"), ModelConfig("odd", "openai", "http://x")]
    assert output_caps(models, {"gpt-4o": {"max_output_tokens": 16384}, "odd": {"mode": "chat"}}) == {"big": 16384}


# --- verdicts ------------------------------------------------------------------------------


def test_a_refusal_names_the_scope_the_period_and_the_reset() -> None:
    budget = Budget("team", "search", "monthly", None, 1000 * USD)
    error = refusal(budget, window("monthly", at("2025-01-20T10:00:00")), 998 * USD, 1 * USD, 2 * USD)
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "budget_exceeded")
    assert error.message == (
        "Budget exceeded: the monthly budget of team search is $1,000.00; $998.00 is spent and $1.00 is held by "
        "requests in flight, and this request could cost up to $2.00. The budget resets at 2025-02-01T00:00:00Z."
    )


def test_warnings_appear_once_the_soft_limit_is_crossed() -> None:
    both = Budget("team", "search", "monthly", 800 * USD, 1000 * USD)
    assert warning(both, 799 * USD) is None
    assert warning(both, 830 * USD) == "team search: 83% of monthly budget"
    assert warning(Budget("app", "ränker", "daily", 10 * USD, None), 12 * USD) == "app r?nker: 120% of daily soft limit"
    assert warning(Budget("key", "k", "daily", None, 5 * USD), 6 * USD) is None


# --- the stage, with an in-process store and a moving clock ----------------------------------


class Clock:
    def __init__(self, now: str) -> None:
        self.now = at(now)

    def __call__(self) -> float:
        return self.now


class NoCounting(TokenCounter):
    def count_messages(self, messages: Any, model: str) -> int:
        raise AssertionError("tokens were counted for a principal without budgets")


def exchange_for(principal: Principal, payload: dict[str, Any] | None = None) -> Exchange:
    target = ModelConfig("gpt-4o", "openai", "http://upstream")
    return Exchange("req", "chat/completions", principal=principal, target=target, payload=payload or {"messages": HI})


class Gated(InProcessBudgetStore):
    """Reservations wait for ``gate``; settles are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.settled: list[tuple[str, int]] = []

    async def reserve(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation:
        await self.gate.wait()
        return await super().reserve(counters, rid, amount, ttl)

    async def settle(self, counters: Sequence[Counter], rid: str, amount: int) -> None:
        self.settled.append((rid, amount))
        await super().settle(counters, rid, amount)


async def test_a_client_that_leaves_mid_reserve_leaves_no_hold() -> None:
    store = Gated()
    guard = Guard([limit("team", "search", hard=10)], store, TokenCounter())
    admitting = asyncio.create_task(guard.admit(exchange_for(Principal("k", "search", None, "user")), PER_TOKEN))
    await asyncio.sleep(0.01)
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    store.gate.set()  # the reservation lands after the request is gone: it is released at once
    for _ in range(500):
        await asyncio.sleep(0.01)
        if store.settled:
            break
    await guard.drain()
    assert [amount for _, amount in store.settled] == [0]


async def test_a_long_prompt_is_counted_off_the_loop_to_the_same_estimate() -> None:
    counter = TokenCounter()
    guard = Guard([limit("team", "search", hard=1000)], InProcessBudgetStore(), counter)
    messages = [{"role": "user", "content": "word " * 20_000}]
    ticket = await guard.admit(exchange_for(Principal("k", "search", None, "user"), {"messages": messages}), PER_TOKEN)
    assert ticket is not None
    assert ticket.amount == estimate(PER_TOKEN, counter.count_messages(messages, "gpt-4o"), DEFAULT_OUTPUT_CAP)


async def test_no_budget_means_no_counting_and_no_ticket() -> None:
    guard = Guard([limit("team", "search", hard=1)], InProcessBudgetStore(), NoCounting())
    assert await guard.admit(exchange_for(Principal("k", "other", None, "user")), PER_TOKEN) is None


async def test_holds_settle_and_the_period_rolls_over(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock("2025-01-15T23:59:00")
    store = InProcessBudgetStore(clock)
    guard = Guard([limit("team", "search", soft=0.010, hard=0.030)], store, TokenCounter(), clock=clock)
    caller = Principal("k", "search", None, "user")
    request = {"messages": HI, "max_tokens": 5}  # estimate: 13 tokens, $0.013

    caplog.set_level(logging.WARNING, "thrifty.budgets")
    for expected_warning in (None, None, "team search: 36% of daily budget", "team search: 55% of daily budget"):
        exchange = exchange_for(caller, request)
        ticket = await guard.admit(exchange, PER_TOKEN)
        assert ticket is not None and ticket.amount == 13_000_000
        assert ticket.warning == expected_warning
        exchange.charge = Charge(5_000_000, 0, 0, 0, 0, overhead=500_000)  # cost + overhead is settled
        guard.settle(ticket, exchange)
        await guard.drain()
    # one log line per budget and window, however many requests cross the soft limit
    assert [r.getMessage() for r in caplog.records] == [
        "budget {team:search}:daily:2025-01-15: soft limit crossed (team search: 36% of daily budget)"
    ]
    # $0.022 spent + $0.013 > $0.030: refused, naming the budget
    with pytest.raises(BudgetExceeded, match="the daily budget of team search is"):
        await guard.admit(exchange_for(caller, request), PER_TOKEN)
    clock.now = at("2025-01-16T00:00:01")  # a new UTC day: a new window, nothing spent
    ticket = await guard.admit(exchange_for(caller, request), PER_TOKEN)
    assert ticket is not None and ticket.warning is None


# --- the budgets: config section -----------------------------------------------------------

BUDGETS = """\
budgets:
  redis_url: redis://127.0.0.1:6379/0
  limits:
    - {team: search, period: monthly, soft_usd: 800, hard_usd: 1000}
    - {key: key_1a2b3c4d5e6f, period: daily, hard_usd: 5}
    - {app: "*", period: daily, soft_usd: 0.000001}
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "thrifty.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_settings(str(path), env={})


def test_the_budgets_section_is_read(tmp_path: Path) -> None:
    budgets = load(tmp_path, BUDGETS).budgets
    assert budgets.redis_url == "redis://127.0.0.1:6379/0"
    assert budgets.limits == (
        BudgetLimit("team", "search", "monthly", 800 * USD, 1000 * USD),
        BudgetLimit("key", "key_1a2b3c4d5e6f", "daily", None, 5 * USD),
        BudgetLimit("app", "*", "daily", 1000, None),
    )
    assert load(tmp_path, "models: []\n").budgets == BudgetsConfig()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("budgets:\n  limits:\n    - {period: daily, hard_usd: 1}\n", 3, "budgets.limits[0]: needs exactly one of key, team"),
        ("budgets:\n  limits:\n    - {team: a, app: b, period: daily, hard_usd: 1}\n", 3, "needs exactly one"),
        ("budgets:\n  limits:\n    - team: a\n      period: weekly\n      hard_usd: 1\n", 4, "period: must be one of daily"),
        ("budgets:\n  limits:\n    - {team: a, period: daily}\n", 3, "needs soft_usd, hard_usd or both"),
        ("budgets:\n  limits:\n    - team: a\n      period: daily\n      hard_usd: -1\n", 5, "hard_usd: must be a non-neg"),
        (
            "budgets:\n  limits:\n    - team: a\n      period: daily\n      soft_usd: 2\n      hard_usd: 1\n",
            5,
            "soft_usd: must not",
        ),
        (
            "budgets:\n  limits:\n    - {team: a, period: daily, hard_usd: 1}\n    - {team: a, period: daily, soft_usd: 1}\n",
            4,
            "set twice",
        ),
        ("budgets:\n  redis_url: http://x\n", 2, "budgets.redis_url: must start with redis://"),
        ("budgets:\n  limit: []\n", 2, "budgets.limit: unknown key"),
    ],
)
def test_a_budget_mistake_names_the_key_and_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'thrifty.yaml'}:{line}: "), str(caught.value)
    assert message in str(caught.value)


# --- the stage over HTTP: 429 with no upstream call, the warning header, every path settles ---


@pytest.fixture
def team(redis_url: str) -> Iterator[str]:  # noqa: F811
    """A team name of its own (the Redis server is shared); its counters are deleted afterwards."""
    name = "guard-" + secrets.token_hex(4)
    yield name
    with redis.Redis.from_url(redis_url) as r:
        for key in r.scan_iter(match=f"thrifty:budget:{{team:{name}}}*"):
            r.delete(key)


def budgeted(settings: Settings, url: str | None, *limits: BudgetLimit) -> Settings:
    prices = {"gpt-4o": PriceConfig(Decimal(1000), Decimal(1000))}
    return replace(settings, prices=prices, budgets=BudgetsConfig(redis_url=url, limits=limits))


def client_for(gateway: ThreadServer, team: str) -> openai.OpenAI:
    async def create() -> tuple[str, Any]:
        return await gateway.app[GATEWAY].keys.create(team)  # type: ignore[index]

    key, _ = gateway.call(create)
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30)


def counters(redis_url: str, team: str) -> dict[str, int]:  # noqa: F811
    with redis.Redis.from_url(redis_url) as r:
        [key] = [k for k in r.scan_iter(match=f"thrifty:budget:{{team:{team}}}:daily:*") if not k.endswith(b":holds")]
        return {k.decode(): int(v) for k, v in r.hgetall(key).items() if k in (b"spent", b"reserved")}


def ledger_rows(gateway: ThreadServer, count: int) -> list[tuple[Any, ...]]:
    async def fetch() -> list[tuple[Any, ...]]:
        db = gateway.app[GATEWAY].db  # type: ignore[index]
        return await db.fetch("SELECT status, error_code, cost_nusd FROM ledger ORDER BY ts")

    assert wait_until(lambda: len(gateway.call(fetch)) >= count)
    rows: list[tuple[Any, ...]] = gateway.call(fetch)
    return rows


def test_a_hard_limit_refuses_before_any_upstream_call(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    team: str,
) -> None:
    fake, server = upstream
    gateway = start_gateway(budgeted(settings_for(server.url, tmp_path), redis_url, limit("team", team, hard=0.015)))
    with client_for(gateway, team) as client:
        first = client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert first.choices[0].message.content == "echo: hi"
        # $0.006 spent (or $0.013 still held) + $0.013 > $0.015, whatever the settle's timing
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
    assert caught.value.response.headers["x-should-retry"] == "false"  # the SDK does not retry it
    assert f"the daily budget of team {team} is $0.015; $0.006 is spent" in error["message"]
    assert len(fake.requests) == 1  # the refused request never reached the upstream
    assert ledger_rows(gateway, 2) == [(200, None, 6_000_000), (429, "budget_exceeded", 0)]
    assert wait_until(lambda: counters(redis_url, team) == {"spent": 6_000_000, "reserved": 0})


def test_the_soft_limit_adds_a_warning_header(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    team: str,
) -> None:
    settings = budgeted(settings_for(upstream[1].url, tmp_path), redis_url, limit("team", team, soft=0.005, hard=0.05))
    gateway = start_gateway(settings)
    guard = gateway.app[GATEWAY].guard
    with client_for(gateway, team) as client:
        quiet = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert "x-thrifty-budget-warning" not in quiet.headers
        assert wait_until(lambda: guard.settling == 0)
        warned = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert warned.headers["x-thrifty-budget-warning"] == f"team {team}: 12% of daily budget"
        stream = client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=HI,  # type: ignore[arg-type]
            max_tokens=5,
            stream=True,
        )
        assert stream.headers["x-thrifty-budget-warning"] == f"team {team}: 24% of daily budget"
        chunks: list[Any] = list(stream.parse())
        assert [c.choices[0].delta.content for c in chunks if c.choices][1:3] == ["echo:", " hi"]
    # the stream settled at its actual cost too: three requests at $0.006
    assert wait_until(lambda: counters(redis_url, team) == {"spent": 18_000_000, "reserved": 0})


def test_failed_and_cut_off_requests_release_their_holds(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    team: str,
) -> None:
    fake, server = upstream

    async def broken(payload: dict[str, Any], request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=503)

    gateway = start_gateway(budgeted(settings_for(server.url, tmp_path), redis_url, limit("team", team, hard=1)))
    fake.handler = broken
    with client_for(gateway, team) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
    failed = ledger_rows(gateway, 1)[0]
    assert failed[0] == 503
    assert wait_until(lambda: counters(redis_url, team) == {"spent": failed[2], "reserved": 0})  # as the ledger has it
    # a client that goes away mid-stream: its hold is released, the relayed part is charged
    fake.handler, fake.chunk_delay = None, 0.2
    with client_for(gateway, team) as client:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three four five six seven eight"}],
            max_tokens=50,
            stream=True,
        )
        next(iter(stream))
        stream.close()
    assert wait_until(lambda: counters(redis_url, team)["reserved"] == 0)
    rows = ledger_rows(gateway, 2)
    assert rows[-1][0] == 499 and rows[-1][2] > 0
    assert counters(redis_url, team)["spent"] == sum(row[2] for row in rows)


def test_a_key_without_budgets_is_not_held(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    team: str,
) -> None:
    settings = budgeted(settings_for(upstream[1].url, tmp_path), None, limit("team", team, hard=0.001))
    gateway = start_gateway(settings)
    with client_for(gateway, "someone-else") as client:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
    with client_for(gateway, team) as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
    assert gateway.app[GATEWAY].guard.settling == 0


def test_a_hold_covers_the_dearest_model_a_fallback_could_end_on(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    team: str,
) -> None:
    fake, server = upstream
    policy = tmp_path / "fallback.yaml"
    policy.write_text(
        "rules:\n"
        "  - {name: mini-only, match: {model: cheap}, action: {target: gpt-4o-mini}}\n"
        "  - {name: mini-then-4o, match: {model: auto}, action: {target: [gpt-4o-mini, gpt-4o]}}\n",
        encoding="utf-8",
    )
    settings = budgeted(settings_for(server.url, tmp_path), redis_url, limit("team", team, hard=0.010))
    prices = {**settings.prices, "gpt-4o-mini": PriceConfig(Decimal(1), Decimal(1))}
    gateway = start_gateway(replace(settings, prices=prices, policies=str(policy)))
    with client_for(gateway, team) as client:
        # At gpt-4o-mini's price the hold is a few micro-dollars: served.
        served = client.chat.completions.with_raw_response.create(model="cheap", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert served.headers["x-thrifty-model"] == "gpt-4o-mini"
        # The same request may fall back to gpt-4o ($1,000 per 1M): ~$0.013 could be spent, over $0.010.
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="auto", messages=HI, max_tokens=5)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "budget_exceeded"
    assert len(fake.requests) == 1  # the refused request never reached an upstream
