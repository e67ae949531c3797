"""Rate-limit windows: the counts of the rate-limit stage (``proxy.pipeline.ratelimit``), kept in
Redis or, while Redis cannot be reached, in this process.

A limit's window is a hash (``r`` requests, ``t`` tokens) per fixed window; the sliding count
is the current window plus the previous one weighted by its overlap with the last ``window``
seconds (:func:`estimate`). In Redis one Lua script reads every applicable limit's two windows,
decides and increments them all or none, so replicas share each limit exactly; a token count is
corrected after the request by the difference between the actual usage and its allowance. The
failover store copies the budget store's pattern: on a connection error it counts in this
process (each replica then enforces each limit alone), logs once, and retries Redis after the
same back-off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from proxy.cost.budgets import retry_delay
from proxy.redisclient import UNREACHABLE

log = logging.getLogger("thrifty.ratelimit")


@dataclass(frozen=True, slots=True)
class Counts:
    """One limit's window counts: requests and tokens in the current and the previous window."""

    requests: int = 0
    tokens: int = 0
    prev_requests: int = 0
    prev_tokens: int = 0


def estimate(current: int, previous: int, elapsed: float, seconds: float) -> float:
    """The sliding-window count: all of this window plus the part of the previous one still in the last ``seconds``."""
    return current + previous * max(1.0 - elapsed / seconds, 0.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    granted: bool
    counts: tuple[Counts, ...]  # before this request
    refused_by: int = 0
    kind: str = ""  # requests | tokens, when refused


class RateStore(Protocol):
    async def admit(self, keys: Sequence[str], caps: Sequence[tuple[int, int]], tokens: int, elapsed: float) -> Verdict: ...

    async def correct(self, keys: Sequence[str], delta: int) -> None: ...

    async def close(self) -> None: ...


# KEYS: per limit, its current window's hash then the previous one's. ARGV: tokens, the weight of
# the previous window (0..1), TTL in ms, then per limit its rpm and tpm (-1: none). Returns
# {granted, refused_by, kind (1 requests, 2 tokens), r, t, pr, pt per limit}.
ADMIT_SCRIPT = """
local tokens, weight = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {1, 0, 0}
for i = 1, #KEYS / 2 do
  local c = redis.call('HMGET', KEYS[2 * i - 1], 'r', 't')
  local p = redis.call('HMGET', KEYS[2 * i], 'r', 't')
  local r, t, pr, pt = tonumber(c[1] or '0'), tonumber(c[2] or '0'), tonumber(p[1] or '0'), tonumber(p[2] or '0')
  out[4 * i], out[4 * i + 1], out[4 * i + 2], out[4 * i + 3] = r, t, pr, pt
  local rpm, tpm = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  if out[1] == 1 and rpm >= 0 and r + pr * weight + 1 > rpm then out[1], out[2], out[3] = 0, i, 1 end
  if out[1] == 1 and tpm >= 0 and t + pt * weight + tokens > tpm then out[1], out[2], out[3] = 0, i, 2 end
end
if out[1] == 1 then
  for i = 1, #KEYS / 2 do
    redis.call('HINCRBY', KEYS[2 * i - 1], 'r', '1')
    redis.call('HINCRBY', KEYS[2 * i - 1], 't', ARGV[1])
    redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[3])
  end
end
return out
"""
# KEYS: the windows a request was counted in. ARGV: the token correction (actual - admitted).
CORRECT_SCRIPT = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('HINCRBY', KEYS[i], 't', ARGV[1]) end
end
return 0
"""


def _verdict(out: Sequence[int]) -> Verdict:
    counts = tuple(Counts(*out[i : i + 4]) for i in range(3, len(out), 4))
    granted = out[0] == 1
    return Verdict(granted, counts, 0 if granted else out[1] - 1, "" if granted else ("requests" if out[2] == 1 else "tokens"))


class RedisRateStore:
    """Windows in Redis; ``split`` (Redis Cluster) runs one script per limit (a refusal by a later
    limit then leaves the earlier ones counted once: a small over-count, never an overrun)."""

    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, seconds: float, *, split: bool = False, owned: bool = True
    ):
        self.client = client
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._correct = client.register_script(CORRECT_SCRIPT)
        self._seconds = seconds
        self._split = split
        self._owned = owned

    async def admit(self, keys: Sequence[str], caps: Sequence[tuple[int, int]], tokens: int, elapsed: float) -> Verdict:
        weight = max(1.0 - elapsed / self._seconds, 0.0)
        groups = [[i] for i in range(len(caps))] if self._split else [list(range(len(caps)))]
        counts: tuple[Counts, ...] = ()
        for group in groups:
            args: list[str | int | float] = [tokens, f"{weight:.6f}", max(int(self._seconds * 2000), 1)]
            for i in group:
                args += list(caps[i])
            out = [int(x) for x in await self._admit(keys=[k for i in group for k in keys[2 * i : 2 * i + 2]], args=args)]
            one = _verdict(out)
            if not one.granted:
                rest = (Counts(),) * (len(caps) - len(counts) - len(one.counts))
                return Verdict(False, counts + one.counts + rest, group[one.refused_by], one.kind)
            counts += one.counts
        return Verdict(True, counts)

    async def correct(self, keys: Sequence[str], delta: int) -> None:
        for group in [[k] for k in keys] if self._split else [list(keys)]:
            await self._correct(keys=group, args=[delta])

    async def close(self) -> None:
        if self._owned:
            await self.client.aclose()


class InProcessRateStore:
    """The same windows in this process's memory: the fallback while Redis is away."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._seconds = seconds
        self._clock = clock
        self._windows: dict[str, tuple[float, list[int]]] = {}  # key -> (expires, [requests, tokens])
        self._swept = 0.0

    def _get(self, key: str, now: float) -> list[int]:
        entry = self._windows.get(key)
        return entry[1] if entry is not None and entry[0] > now else [0, 0]

    async def admit(self, keys: Sequence[str], caps: Sequence[tuple[int, int]], tokens: int, elapsed: float) -> Verdict:
        now = self._clock()
        if now - self._swept > 60:
            self._windows = {k: v for k, v in self._windows.items() if v[0] > now}
            self._swept = now
        counts = tuple(Counts(*self._get(keys[2 * i], now), *self._get(keys[2 * i + 1], now)) for i in range(len(caps)))
        verdict = _decide(counts, caps, tokens, elapsed, self._seconds)
        if verdict.granted:
            for i in range(len(caps)):
                current = self._get(keys[2 * i], now)
                self._windows[keys[2 * i]] = (now + 2 * self._seconds, [current[0] + 1, current[1] + tokens])
        return verdict

    async def correct(self, keys: Sequence[str], delta: int) -> None:
        for key in keys:
            entry = self._windows.get(key)
            if entry is not None:
                entry[1][1] += delta

    async def close(self) -> None:
        self._windows.clear()


def _decide(counts: Sequence[Counts], caps: Sequence[tuple[int, int]], tokens: int, elapsed: float, seconds: float) -> Verdict:
    for i, (c, (rpm, tpm)) in enumerate(zip(counts, caps, strict=True)):
        if rpm >= 0 and estimate(c.requests, c.prev_requests, elapsed, seconds) + 1 > rpm:
            return Verdict(False, tuple(counts), i, "requests")
        if tpm >= 0 and estimate(c.tokens, c.prev_tokens, elapsed, seconds) + tokens > tpm:
            return Verdict(False, tuple(counts), i, "tokens")
    return Verdict(True, tuple(counts))


class FailoverRateStore:
    """Redis first; while it cannot be reached, this process's own windows (fail open)."""

    def __init__(self, shared: RedisRateStore, local: InProcessRateStore, clock: Callable[[], float] = time.monotonic):
        self.shared, self.local, self._clock = shared, local, clock
        self._failures = 0
        self._retry_at = 0.0

    async def admit(self, keys: Sequence[str], caps: Sequence[tuple[int, int]], tokens: int, elapsed: float) -> Verdict:
        if self._clock() >= self._retry_at:
            try:
                verdict = await self.shared.admit(keys, caps, tokens, elapsed)
            except UNREACHABLE as exc:
                self._down(exc)
            else:
                self._up()
                return verdict
        return await self.local.admit(keys, caps, tokens, elapsed)

    async def correct(self, keys: Sequence[str], delta: int) -> None:
        if self._clock() >= self._retry_at:
            try:
                await self.shared.correct(keys, delta)
                return
            except UNREACHABLE as exc:
                self._down(exc)
        await self.local.correct(keys, delta)

    def _down(self, exc: Exception) -> None:
        self._failures += 1
        self._retry_at = self._clock() + retry_delay(self._failures)
        if self._failures == 1 or self._failures % 100 == 0:
            log.warning(
                "rate limit store (Redis) unreachable (%s: %s); counting in this process until it answers",
                type(exc).__name__,
                exc,
            )

    def _up(self) -> None:
        if self._failures:
            log.info("rate limit store (Redis) reachable again after %d failed calls", self._failures)
            self._failures = 0

    async def close(self) -> None:
        await self.shared.close()
