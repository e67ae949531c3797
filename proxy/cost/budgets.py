"""Budget counters: settled spend and live holds per budget window, shared through Redis.

The guard stage (``proxy.pipeline.guard``) decides which counters a request touches and what
it may cost; this module keeps the counts. A request **reserves** its estimate before the
upstream call and **settles** its actual cost after; in Redis each is one Lua script, so the
check and the hold are one atomic step for every replica: refuse if ``spent + reserved +
estimate > hard`` for any of the request's counters, else hold the estimate on all of them.
A counter is a hash (``spent``, ``reserved``, one ``r:<id>`` per hold) and a ZSET of hold ids
scored by deadline (Redis's clock); each script first purges holds past their deadline, so a
crashed replica blocks nothing longer than a request may run. Keys look like
``thrifty:budget:{team:search}:monthly:2025-01`` (a Redis Cluster hash tag) and expire two
days after their window. On a Cluster a request's counters sit in different slots: each gets
its own call, and a refusal releases the holds made before it (never an overspend).

**Overspend bound.** While Redis answers, a window's spend exceeds its hard limit only by
estimation error: at most the sum of (actual - estimate), where positive, over the requests
in flight when the last one was admitted. The estimate is an upper bound when the completion
is capped (``max_tokens``, or the model's known maximum output) and the upstream counts no
more prompt tokens than tiktoken; the bound is then **zero**. If Redis cannot be reached the
store **fails open**: each process enforces the limits alone, from the spend and holds it
last saw in Redis plus its own since, and retries Redis after a back-off of at most 5 s. N
processes can then overspend by at most (N - 1) x the headroom they last saw, (N - 1) x the
hard limit at worst. What was settled meanwhile is replayed into Redis when it answers
(idempotently: a hold made there is settled only while it is still held), so the shared
total is right again. Amounts are integer nano-dollars (exact in Lua below about $9M).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

import redis.asyncio as aioredis

from proxy import redisclient
from proxy.redisclient import UNREACHABLE

log = logging.getLogger("thrifty.budgets")

KEY_PREFIX = "thrifty:budget:"
# How long a counter outlives its window (late settles still land in it).
EXPIRE_GRACE = 2 * 86400
MAX_RETRY_DELAY = 5.0
MAX_UNSYNCED = 100_000


def counter_key(scope: str, name: str, period: str, window: str) -> str:
    """``thrifty:budget:{scope:name}:period:window``; the name is quoted so braces cannot break the tag."""
    return f"{KEY_PREFIX}{{{scope}:{quote(name, safe='')}}}:{period}:{window}"


@dataclass(frozen=True, slots=True)
class Counter:
    """One budget window's counter and the hard limit a reservation is checked against."""

    key: str
    hard: int | None  # nano-USD; None never refuses (a soft-only budget still counts spend)
    expire_at: int  # unix seconds


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    spent: tuple[int, ...]  # settled spend per counter, before this request
    reserved: tuple[int, ...]  # other requests' holds per counter
    refused_by: int | None = None  # index of the counter whose hard limit refused


class BudgetStore(Protocol):
    async def reserve(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation: ...

    async def settle(self, counters: Sequence[Counter], rid: str, amount: int) -> None: ...

    async def close(self) -> None: ...


# KEYS: per counter, its hash then its ZSET. ARGV: id, amount, ttl in ms, then per counter
# its hard limit (-1: none) and its expiry (unix seconds). Returns {granted, refused_by,
# spent_1, reserved_1, spent_2, ...}.
# Numbers reach redis.call only as strings: Redis may print a Lua number as 1e+12.
_PURGE = """
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
-- never sooner than an hour from now: a replica's clock may lag Redis's
local function expire(key, at)
  redis.call('EXPIREAT', key, string.format('%d', math.max(tonumber(at), tonumber(t[1]) + 3600)))
end
local function release(h, id)
  local held = redis.call('HGET', h, 'r:' .. id)
  if held then
    if redis.call('HINCRBY', h, 'reserved', '-' .. held) < 0 then redis.call('HSET', h, 'reserved', '0') end
    redis.call('HDEL', h, 'r:' .. id)
  end
end
local function purge(h, z, now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', '0', '256')) do
    release(h, id)
    redis.call('ZREM', z, id)
  end
end
"""
RESERVE_SCRIPT = (
    _PURGE
    + """
local amount = tonumber(ARGV[2])
local out = {1, 0}
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z, now)
  local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
  out[2 * i + 1], out[2 * i + 2] = spent, reserved
  local hard = tonumber(ARGV[2 + 2 * i])
  if out[1] == 1 and hard >= 0 and spent + reserved + amount > hard then out[1], out[2] = 0, i end
end
if out[1] == 1 then
  for i = 1, #KEYS / 2 do
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    redis.call('HINCRBY', h, 'reserved', ARGV[2])
    redis.call('HSET', h, 'r:' .. ARGV[1], ARGV[2])
    redis.call('ZADD', z, string.format('%d', tonumber(now) + tonumber(ARGV[3])), ARGV[1])
    expire(h, ARGV[3 + 2 * i])
    expire(z, ARGV[3 + 2 * i])
  end
end
return out
"""
)
# KEYS as above. ARGV: id, actual amount, "1" to add it only where the hold is still there
# (a replay of a settle whose reply was lost: it may have run), then per counter its
# expiry. Releases the hold, adds the amount to the settled spend; returns {spent_1,
# reserved_1, ...} afterwards.
SETTLE_SCRIPT = (
    _PURGE
    + """
local out = {}
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  local held = redis.call('HEXISTS', h, 'r:' .. ARGV[1]) == 1
  release(h, ARGV[1])
  redis.call('ZREM', z, ARGV[1])
  purge(h, z, now)
  if held or ARGV[3] ~= '1' then redis.call('HINCRBY', h, 'spent', ARGV[2]) end
  out[2 * i - 1] = tonumber(redis.call('HGET', h, 'spent') or '0')
  out[2 * i] = tonumber(redis.call('HGET', h, 'reserved') or '0')
  expire(h, ARGV[3 + i])
end
return out
"""
)


class RedisBudgetStore:
    """Counters in Redis; ``split`` (Redis Cluster) runs one script per counter."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, *, split: bool = False):
        self.client = client
        self._reserve = client.register_script(RESERVE_SCRIPT)
        self._settle = client.register_script(SETTLE_SCRIPT)
        self._split = split

    async def reserve(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation:
        if not self._split or len(counters) == 1:
            return await self._reserve_together(counters, rid, amount, ttl)
        spent: tuple[int, ...] = ()
        reserved: tuple[int, ...] = ()
        for index, counter in enumerate(counters):
            one = await self._reserve_together([counter], rid, amount, ttl)
            spent, reserved = spent + one.spent, reserved + one.reserved
            if not one.granted:
                if index:
                    await self.settle(counters[:index], rid, 0)
                rest = (0,) * (len(counters) - index - 1)
                return Reservation(False, spent + rest, reserved + rest, index)
        return Reservation(True, spent, reserved)

    async def _reserve_together(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation:
        args: list[str | int] = [rid, amount, max(int(ttl * 1000), 1)]
        for c in counters:
            args += [-1 if c.hard is None else c.hard, c.expire_at]
        out = [int(x) for x in await self._reserve(keys=_keys(counters), args=args)]
        spent, reserved = tuple(out[2::2]), tuple(out[3::2])
        return Reservation(out[0] == 1, spent, reserved, None if out[0] == 1 else out[1] - 1)

    async def settle(self, counters: Sequence[Counter], rid: str, amount: int) -> None:
        await self.settle_seen(counters, rid, amount)

    async def settle_seen(
        self, counters: Sequence[Counter], rid: str, amount: int, *, only_if_held: bool = False
    ) -> tuple[int, ...]:
        """Settle; returns each counter's spend plus holds afterwards."""
        seen: tuple[int, ...] = ()
        for group in [[c] for c in counters] if self._split else [counters]:
            args: list[str | int] = [rid, amount, int(only_if_held), *(c.expire_at for c in group)]
            out = [int(x) for x in await self._settle(keys=_keys(group), args=args)]
            seen += tuple(spent + reserved for spent, reserved in zip(out[::2], out[1::2], strict=True))
        return seen

    async def close(self) -> None:
        await self.client.aclose()


def _keys(counters: Sequence[Counter]) -> list[str]:
    return [k for c in counters for k in (c.key, c.key + ":holds")]


def connect(url: str, *, cluster: bool = False) -> aioredis.Redis | aioredis.RedisCluster:
    """A client that fails fast (the guard fails open); waiting for a pooled connection is
    congestion, not an outage, so it may take longer than a socket timeout."""
    return redisclient.connect(
        url, socket_timeout=1.0, connect_timeout=0.5, pool_timeout=3.0, max_connections=128, cluster=cluster
    )


@dataclass(slots=True)
class _Window:
    expire_at: int
    spent: int = 0
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (amount, deadline)
    deadlines: list[tuple[float, str]] = field(default_factory=list)  # a heap

    def purge(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self.deadlines)
            hold = self.holds.get(rid)
            if hold is not None and hold[1] == deadline:
                self.release(rid)

    def release(self, rid: str) -> None:
        hold = self.holds.pop(rid, None)
        if hold is not None:
            self.reserved = max(self.reserved - hold[0], 0)


class InProcessBudgetStore:
    """The same counters in this process's memory: budgets per process, and the fallback."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def _window(self, counter: Counter, now: float) -> _Window:
        window = self._windows.get(counter.key)
        if window is None:
            for key in [k for k, w in self._windows.items() if w.expire_at < now]:
                del self._windows[key]
            window = self._windows[counter.key] = _Window(counter.expire_at)
        window.purge(now)
        return window

    async def reserve(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation:
        now = self._clock()
        windows = [self._window(c, now) for c in counters]
        spent = tuple(w.spent for w in windows)
        reserved = tuple(w.reserved for w in windows)
        for index, (c, w) in enumerate(zip(counters, windows, strict=True)):
            if c.hard is not None and w.spent + w.reserved + amount > c.hard:
                return Reservation(False, spent, reserved, index)
        for w in windows:
            w.reserved += amount
            w.holds[rid] = (amount, now + ttl)
            heapq.heappush(w.deadlines, (now + ttl, rid))
        return Reservation(True, spent, reserved)

    async def settle(self, counters: Sequence[Counter], rid: str, amount: int) -> None:
        now = self._clock()
        for c in counters:
            window = self._window(c, now)
            window.release(rid)
            window.spent += amount

    def observe(self, counter: Counter, committed: int) -> None:
        """Raise this process's view of a counter to what Redis last reported (for an outage)."""
        window = self._window(counter, self._clock())
        window.spent = max(window.spent, committed)

    async def close(self) -> None:
        self._windows.clear()


def retry_delay(failures: int) -> float:
    """Seconds to leave Redis alone after ``failures`` failed calls in a row."""
    return min(0.25 * 2.0 ** min(failures, 8), MAX_RETRY_DELAY)


class FailoverBudgetStore:
    """Redis first; while it cannot be reached, this process's own counters (fail open)."""

    def __init__(self, shared: RedisBudgetStore, local: InProcessBudgetStore, clock: Callable[[], float] = time.monotonic):
        self.shared = shared
        self.local = local
        self._clock = clock
        self._failures = 0
        self._retry_at = 0.0
        self._local_ids: set[str] = set()
        # Settles Redis has not seen (or may not have: a lost reply), by hold id:
        # (counters, amount, only_if_held). Past MAX_UNSYNCED, sums per counter.
        self._unsynced: dict[str, tuple[tuple[Counter, ...], int, bool]] = {}

    @property
    def degraded(self) -> bool:
        return self._failures > 0

    async def reserve(self, counters: Sequence[Counter], rid: str, amount: int, ttl: float) -> Reservation:
        if self._clock() >= self._retry_at:
            try:
                await self._replay()
                result = await self.shared.reserve(counters, rid, amount, ttl)
            except UNREACHABLE as exc:
                self._down(exc)
            else:
                self._up()
                for counter, spent, reserved in zip(counters, result.spent, result.reserved, strict=True):
                    self.local.observe(counter, spent + reserved)
                return result
        self._local_ids.add(rid)
        return await self.local.reserve(counters, rid, amount, ttl)

    async def settle(self, counters: Sequence[Counter], rid: str, amount: int) -> None:
        held_in_redis = rid not in self._local_ids
        self._local_ids.discard(rid)
        if held_in_redis and self._clock() >= self._retry_at:
            try:
                seen = await self.shared.settle_seen(counters, rid, amount)
            except UNREACHABLE as exc:
                self._down(exc)
            else:
                self._up()
                for counter, committed in zip(counters, seen, strict=True):
                    self.local.observe(counter, committed)
                return
        await self.local.settle(counters, rid, amount)
        if len(self._unsynced) < MAX_UNSYNCED:
            # A hold made in Redis is settled there only if it is still held (the lost reply may
            # have been a settle that ran); a hold made here was never seen there.
            self._unsynced[rid] = (tuple(counters), amount, held_in_redis)
            return
        for counter in counters:  # a long outage under load: keep sums, not ids
            owed = self._unsynced.get("sum:" + counter.key, ((), 0, False))[1]
            self._unsynced["sum:" + counter.key] = ((counter,), owed + amount, False)

    async def _replay(self) -> None:
        """Settle in Redis what was settled here meanwhile (popped first: concurrent calls never repeat one)."""
        while self._unsynced:
            rid = next(iter(self._unsynced))
            counters, amount, only_if_held = entry = self._unsynced.pop(rid)
            try:
                await self.shared.settle_seen(counters, rid, amount, only_if_held=only_if_held)
            except BaseException:
                self._unsynced[rid] = entry
                raise

    def _down(self, exc: Exception) -> None:
        self._failures += 1
        self._retry_at = self._clock() + retry_delay(self._failures)
        if self._failures == 1 or self._failures % 100 == 0:
            log.warning(
                "budget store (Redis) unreachable (%s: %s); enforcing budgets in this process until it answers",
                type(exc).__name__,
                exc,
            )

    def _up(self) -> None:
        if self._failures:
            log.info("budget store (Redis) reachable again after %d failed calls", self._failures)
            self._failures = 0

    async def close(self) -> None:
        if self._unsynced:
            try:
                await self._replay()
            except UNREACHABLE as exc:
                log.warning("budget spend made while Redis was away could not be replayed at shutdown (%s)", exc)
        await self.shared.close()


def open_store(redis_url: str | None, *, cluster: bool = False) -> BudgetStore:
    """Shared counters when a Redis URL is configured, else per-process ones."""
    local = InProcessBudgetStore()
    if redis_url is None:
        return local
    return FailoverBudgetStore(RedisBudgetStore(connect(redis_url, cluster=cluster), split=cluster), local)
