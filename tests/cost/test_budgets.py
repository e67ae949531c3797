"""Budget stores against a real Redis: the Lua reserve/settle under many concurrent callers,
expiry of stale holds, period rollover, and failing open to in-process counters.

The same behaviour tests run against the Redis store (one script for all counters, and
split per counter as on Redis Cluster) and the in-process store, so the fallback keeps
the semantics of the shared store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from proxy.cost.budgets import (
    BudgetStore,
    Counter,
    FailoverBudgetStore,
    InProcessBudgetStore,
    RedisBudgetStore,
    connect,
    counter_key,
    retry_delay,
)
from proxy.cost.prices import Price
from proxy.cost.pricing import Charge
from proxy.cost.tokens import TokenCounter
from proxy.errors import BudgetExceeded
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.guard import Guard
from proxy.settings import BudgetLimit
from tests.api.conftest import closed_port
from tests.services import redis_url  # noqa: F401

MILLI = 1_000_000  # $0.001 in nano-USD


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def make_counter(client: aioredis.Redis) -> AsyncIterator[Callable[..., Counter]]:
    """Counters with names of their own (the Redis server is shared), deleted afterwards."""
    made: list[Counter] = []

    def make(hard: int | None, name: str = "", window: str = "2099-01-01") -> Counter:
        counter = Counter(
            counter_key("team", name or "b-" + secrets.token_hex(4), "daily", window), hard, int(time.time()) + 3600
        )
        made.append(counter)
        return counter

    yield make
    for c in made:
        await client.delete(c.key, c.key + ":holds")


@pytest.fixture(params=["redis", "redis-split", "in-process"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[BudgetStore]:  # noqa: F811
    made: BudgetStore
    if request.param == "in-process":
        made = InProcessBudgetStore()
    else:
        made = RedisBudgetStore(connect(redis_url), split=request.param == "redis-split")
    yield made
    await made.close()


async def test_a_reservation_is_checked_against_spend_and_holds(store: BudgetStore, make_counter: Callable[..., Counter]) -> None:
    team = make_counter(10 * MILLI)
    first = await store.reserve([team], "a", 6 * MILLI, 60)
    assert (first.granted, first.spent, first.reserved) == (True, (0,), (0,))
    refused = await store.reserve([team], "b", 5 * MILLI, 60)  # 0 + 6 held + 5 > 10
    assert (refused.granted, refused.refused_by, refused.reserved) == (False, 0, (6 * MILLI,))
    await store.settle([team], "a", 3 * MILLI)  # the hold goes, the actual cost stays
    second = await store.reserve([team], "b", 5 * MILLI, 60)
    assert (second.granted, second.spent, second.reserved) == (True, (3 * MILLI,), (0,))
    exact = await store.reserve([team], "c", 2 * MILLI, 60)  # 3 + 5 + 2 = 10: allowed (not above)
    assert exact.granted
    assert not (await store.reserve([team], "d", 1, 60)).granted


async def test_all_counters_or_none(store: BudgetStore, make_counter: Callable[..., Counter]) -> None:
    team, key, app = make_counter(100 * MILLI), make_counter(5 * MILLI), make_counter(None)
    refused = await store.reserve([team, key, app], "a", 6 * MILLI, 60)
    assert (refused.granted, refused.refused_by) == (False, 1)
    # nothing was held anywhere: the team budget can still take its whole limit
    assert (await store.reserve([team, app], "b", 100 * MILLI, 60)).granted
    # a soft-only counter never refuses, and still counts
    big = await store.reserve([app], "c", 10**15, 60)
    assert big.granted and big.reserved == (100 * MILLI,)


async def test_stale_holds_expire(store: BudgetStore, make_counter: Callable[..., Counter]) -> None:
    team = make_counter(10 * MILLI)
    assert (await store.reserve([team], "crashed", 9 * MILLI, 0.1)).granted
    assert not (await store.reserve([team], "b", 9 * MILLI, 60)).granted
    await asyncio.sleep(0.2)  # the replica that held it never settles: its hold runs out
    after = await store.reserve([team], "b", 9 * MILLI, 60)
    assert (after.granted, after.reserved) == (True, (0,))
    await store.settle([team], "crashed", 0)  # a settle after expiry releases nothing twice
    assert (await store.reserve([team], "c", 1 * MILLI, 60)).reserved == (9 * MILLI,)


async def test_many_concurrent_reservations_never_overbook(
    redis_url: str,  # noqa: F811
    make_counter: Callable[..., Counter],
    client: aioredis.Redis,
) -> None:
    """300 reservations at once from 6 clients, on two counters: exactly the room there is."""
    team, key = make_counter(200 * MILLI), make_counter(70 * MILLI)
    stores = [RedisBudgetStore(connect(redis_url)) for _ in range(6)]
    try:
        results = await asyncio.gather(
            *(stores[i % 6].reserve([team, key] if i % 2 else [team], f"r{i}", 2 * MILLI, 60) for i in range(300))
        )
        granted = [i for i, r in enumerate(results) if r.granted]
        both = [i for i in granted if i % 2]
        assert len(both) == 35  # the key's 70 / 2
        assert len(granted) == 100  # the team's 200 / 2
        assert int(await client.hget(team.key, "reserved") or 0) == 200 * MILLI
        assert int(await client.hget(key.key, "reserved") or 0) == 70 * MILLI
        assert await client.zcard(team.key + ":holds") == 100
        # settle them all at once too, at half the estimate
        await asyncio.gather(*(stores[i % 6].settle([team, key] if i % 2 else [team], f"r{i}", 1 * MILLI) for i in granted))
        assert await client.hmget(team.key, ["spent", "reserved"]) == [b"100000000", b"0"]
        assert await client.hmget(key.key, ["spent", "reserved"]) == [b"35000000", b"0"]
        assert await client.zcard(team.key + ":holds") == 0
        assert 3600 - 5 < await client.ttl(team.key) <= 3600
    finally:
        for s in stores:
            await s.close()


async def test_the_period_rolls_over_in_utc(redis_url: str, client: aioredis.Redis) -> None:  # noqa: F811
    team = "roll-" + secrets.token_hex(4)
    midnight = (int(time.time()) // 86400 + 2) * 86400  # a UTC midnight to come (Redis keeps future keys)
    now = [midnight - 60.0]
    limits = [BudgetLimit("team", team, "daily", None, 20 * MILLI)]
    guard = Guard(limits, RedisBudgetStore(connect(redis_url)), TokenCounter(), clock=lambda: now[0])
    price = Price(Decimal(1000), Decimal(1000), Decimal(1000), "config")
    caller = Principal("k", team, None, "user")

    def exchange() -> Exchange:
        from proxy.settings import ModelConfig

        payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        return Exchange("r", "chat/completions", principal=caller, target=ModelConfig("m", "openai", "http://x"), payload=payload)

    try:
        done = exchange()
        ticket = await guard.admit(done, price)  # 13 tokens estimated
        assert ticket is not None
        done.charge = Charge(12 * MILLI, 0, 0, 0, 0)
        guard.settle(ticket, done)
        await guard.drain()
        resets = datetime.fromtimestamp(midnight, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with pytest.raises(BudgetExceeded, match=f"resets at {resets}"):
            await guard.admit(exchange(), price)
        now[0] += 120  # one minute past midnight: a new window with nothing spent
        assert await guard.admit(exchange(), price) is not None
        old = counter_key("team", team, "daily", datetime.fromtimestamp(midnight - 60, UTC).strftime("%Y-%m-%d"))
        assert await client.hget(old, "spent") == b"12000000"
        # counters outlive their window by two days, then Redis drops them
        assert abs(await client.expiretime(old) - (midnight + 2 * 86400)) <= 1
    finally:
        await guard.close()
        async for key in client.scan_iter(match=f"thrifty:budget:{{team:{team}}}*"):
            await client.delete(key)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_redis_down_fails_open_and_the_spend_is_replayed(
    redis_url: str,  # noqa: F811
    make_counter: Callable[..., Counter],
    client: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    team = make_counter(10 * MILLI)
    clock = Clock()
    store = FailoverBudgetStore(RedisBudgetStore(connect(redis_url)), InProcessBudgetStore(), clock)
    live = store.shared
    assert (await store.reserve([team], "a", 3 * MILLI, 60)).granted
    await store.settle([team], "a", 2 * MILLI)  # Redis: 2 spent; this process remembers that

    store.shared = RedisBudgetStore(connect(f"redis://127.0.0.1:{closed_port()}/0"))  # Redis goes away
    caplog.set_level(logging.WARNING, "thrifty.budgets")
    started = time.monotonic()
    held = await store.reserve([team], "b", 5 * MILLI, 60)
    assert time.monotonic() - started < 1.0
    assert held.granted and store.degraded
    assert "budget store (Redis) unreachable" in caplog.text
    # enforced in-process, from the spend last seen: 2 + 5 held + 4 > 10
    assert not (await store.reserve([team], "c", 4 * MILLI, 60)).granted
    await store.settle([team], "b", 4 * MILLI)
    assert await client.hget(team.key, "spent") == b"2000000"  # not in Redis yet

    await store.shared.close()
    store.shared = live  # Redis is back; the next call after the back-off retries it
    clock.now += retry_delay(1) + 0.01
    assert (await store.reserve([team], "d", 1 * MILLI, 60)).spent == (6 * MILLI,)
    assert not store.degraded
    assert await client.hget(team.key, "spent") == b"6000000"  # the outage's spend, replayed
    await store.close()


class LostReplies(RedisBudgetStore):
    """Settles whose reply never arrives: after Redis ran them (``ran``), or before."""

    def __init__(self, live: RedisBudgetStore, *, ran: bool) -> None:
        super().__init__(live.client)
        self.ran = ran
        self.lost = 0

    async def settle_seen(self, counters: Any, rid: str, amount: int, *, only_if_held: bool = False) -> tuple[int, ...]:
        if self.lost == 0:
            self.lost += 1
            if self.ran:
                await super().settle_seen(counters, rid, amount, only_if_held=only_if_held)
            raise redis_errors.TimeoutError("Timeout reading from socket")
        return await super().settle_seen(counters, rid, amount, only_if_held=only_if_held)


@pytest.mark.parametrize("ran", [True, False], ids=["ran", "never-ran"])
async def test_a_settle_with_a_lost_reply_counts_once(
    redis_url: str,  # noqa: F811
    make_counter: Callable[..., Counter],
    client: aioredis.Redis,
    ran: bool,
) -> None:
    team = make_counter(100 * MILLI)
    clock = Clock()
    live = RedisBudgetStore(connect(redis_url))
    store = FailoverBudgetStore(LostReplies(live, ran=ran), InProcessBudgetStore(), clock)
    assert (await store.reserve([team], "a", 9 * MILLI, 60)).granted
    await store.settle([team], "a", 4 * MILLI)  # the reply is lost: replayed later, only if still held
    assert store.degraded
    clock.now += retry_delay(1) + 0.01
    assert (await store.reserve([team], "b", 1 * MILLI, 60)).spent == (4 * MILLI,)
    assert await client.hmget(team.key, ["spent", "reserved"]) == [b"4000000", b"1000000"]
    await store.close()


def test_the_retry_delay_backs_off_to_five_seconds() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4, 5, 50)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
