"""Stage: rate limits (requests and tokens a minute per key, team or app), shared through Redis.

It sits beside the guard (budgets): after routing, the cache lookup and pruning, just before the
budget hold, so only requests bound for an upstream are counted (a cache hit is free). The
decisions are pure: which limits apply (:func:`applicable`, a named entry winning over ``"*"``),
the sliding-window estimate (:func:`estimate`: the current fixed window's count plus the previous
one's weighted by how much of it still overlaps the last ``window`` seconds), the wait until a
cost fits (:func:`retry_after`) and OpenAI's ``x-ratelimit-*`` headers (:func:`headers`). The I/O
is one Lua script that checks every applicable counter and increments them all or none; a
token count is corrected to the actual usage when the request ends (like a budget settle). Keys
look like ``thrifty:rate:{key:abc}:60:29114520`` (a hash of ``r`` and ``t``; a Cluster hash tag)
and expire after two windows. Redis unreachable: each process keeps its own windows (fail open),
logs once and retries Redis with the budget store's back-off. A caller with no limit costs one
dict lookup and no Redis call.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import redis.asyncio as aioredis

from proxy.cost.budgets import _UNREACHABLE, FailoverBudgetStore, RedisBudgetStore, connect, retry_delay
from proxy.cost.tokens import TokenCounter
from proxy.errors import RateLimited
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.guard import _INLINE_CHARS, Guard, _read_output_caps, _size, output_allowance, prompt_tokens
from proxy.settings import BudgetsConfig, ModelConfig, RateLimit, RateLimitsConfig
from proxy.tasks import TaskSet

log = logging.getLogger("thrifty.ratelimit")

KEY_PREFIX = "thrifty:rate:"


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit as it applies to one principal (a ``"*"`` entry resolved to the name)."""

    scope: str
    name: str
    rpm: int | None
    tpm: int | None

    @property
    def label(self) -> str:
        return f"{self.scope} {self.name}"


class LimitIndex:
    def __init__(self, limits: Iterable[RateLimit]):
        self.named = {(x.scope, x.name): x for x in limits if x.name != "*"}
        self.every = {x.scope: x for x in limits if x.name == "*"}


def applicable(index: LimitIndex, principal: Principal) -> tuple[Limit, ...]:
    out = []
    for scope, name in (("key", principal.key_id), ("team", principal.team), ("app", principal.app)):
        if name:
            rule = index.named.get((scope, name)) or index.every.get(scope)
            if rule is not None:
                out.append(Limit(scope, name, rule.rpm, rule.tpm))
    return tuple(out)


def base_key(limit: Limit, seconds: float) -> str:
    """``thrifty:rate:{scope:name}:window``; the window's number is appended per window."""
    return f"{KEY_PREFIX}{{{limit.scope}:{quote(limit.name, safe='')}}}:{seconds:g}:"


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


def retry_after(current: int, previous: int, cost: int, limit: int, elapsed: float, seconds: float) -> float:
    """Seconds until ``cost`` more fits under ``limit`` (a cost above the limit never fits: one window)."""
    if cost > limit:
        return seconds
    if current + cost <= limit:  # the previous window's weight has to fall
        if previous <= 0:
            return 0.0
        return max(seconds * (1.0 - (limit - current - cost) / previous) - elapsed, 0.0)
    # this window's count becomes the previous one, whose weight falls through the next window
    return seconds - elapsed + seconds * (1.0 - (limit - cost) / current)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def headers(limits: Sequence[Limit], counts: Sequence[Counts], elapsed: float, seconds: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers from the tightest limit of each kind (after this request)."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        best: tuple[float, int, float] | None = None  # remaining, limit, reset
        for limit, c in zip(limits, counts, strict=True):
            cap = limit.rpm if kind == "requests" else limit.tpm
            if cap is None:
                continue
            current, previous = (c.requests, c.prev_requests) if kind == "requests" else (c.tokens, c.prev_tokens)
            remaining = max(cap - estimate(current, previous, elapsed, seconds), 0.0)
            reset = 2 * seconds - elapsed if current > 0 else (seconds - elapsed if previous > 0 else 0.0)
            if best is None or remaining < best[0]:
                best = (remaining, cap, reset)
        if best is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(best[1])
            out[f"x-ratelimit-remaining-{kind}"] = str(int(best[0]))
            out[f"x-ratelimit-reset-{kind}"] = duration(best[2])
    return out


def refusal(limit: Limit, kind: str, wait: float, extra: Mapping[str, str]) -> RateLimited:
    cap = limit.rpm if kind == "requests" else limit.tpm
    unit = "requests" if kind == "requests" else "tokens"
    seconds = max(math.ceil(wait), 1)
    return RateLimited(
        f"Rate limit reached for {limit.label}: {cap} {unit} per window. Please try again in {seconds}s.",
        kind,
        {**extra, "Retry-After": str(seconds)},
    )


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
            except _UNREACHABLE as exc:
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
            except _UNREACHABLE as exc:
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


@dataclass(frozen=True, slots=True)
class Pass:
    """What an admitted request holds: its windows' keys and its token count, corrected once at the end."""

    keys: tuple[str, ...]
    tokens: int
    headers: dict[str, str]


class RateLimiter:
    def __init__(
        self,
        config: RateLimitsConfig,
        store: RateStore,
        counter: TokenCounter,
        output_caps: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.index = LimitIndex(config.limits)
        self.store = store
        self.seconds = config.window_seconds
        self._counter = counter
        self._caps = output_caps or {}
        self.clock = clock  # wall time: windows are aligned on it, the same on every replica
        self._correcting = TaskSet("rate-correct")
        self._bases: dict[Limit, str] = {}

    @property
    def correcting(self) -> int:
        """Token corrections still running in the background."""
        return len(self._correcting)

    def limits_for(self, principal: Principal | None) -> tuple[Limit, ...]:
        return applicable(self.index, principal) if principal is not None else ()

    async def admit(self, exchange: Exchange) -> Pass | None:
        """Count the request on every limit that applies; raise :class:`RateLimited` if one is reached."""
        limits = self.limits_for(exchange.principal)
        if not limits or exchange.target is None:
            return None
        tokens = 0
        if any(limit.tpm is not None for limit in limits):
            target, payload = exchange.target, exchange.payload or {}
            args = (self._counter, exchange.endpoint, payload, target.target_model)
            if _size(payload) > _INLINE_CHARS or not self._counter.ready(target.target_model):
                prompt = await asyncio.to_thread(prompt_tokens, *args)
            else:
                prompt = prompt_tokens(*args)
            tokens = prompt + output_allowance(exchange.endpoint, payload, self._caps.get(target.name))
        now = self.clock()
        number, elapsed = divmod(now, self.seconds)
        keys = []
        for limit in limits:
            base = self._bases.get(limit) or self._bases.setdefault(limit, base_key(limit, self.seconds))
            keys += [f"{base}{int(number)}", f"{base}{int(number) - 1}"]
        caps = [(-1 if x.rpm is None else x.rpm, -1 if x.tpm is None else x.tpm) for x in limits]
        verdict = await self.store.admit(keys, caps, tokens, elapsed)
        if not verdict.granted:
            i = verdict.refused_by
            c = verdict.counts[i]
            current, previous, cost, cap = (
                (c.requests, c.prev_requests, 1, limits[i].rpm)
                if verdict.kind == "requests"
                else (c.tokens, c.prev_tokens, tokens, limits[i].tpm)
            )
            wait = retry_after(current, previous, cost, cap or 0, elapsed, self.seconds)
            raise refusal(limits[i], verdict.kind, wait, headers(limits, verdict.counts, elapsed, self.seconds))
        after = tuple(Counts(c.requests + 1, c.tokens + tokens, c.prev_requests, c.prev_tokens) for c in verdict.counts)
        return Pass(tuple(keys[::2]), tokens, headers(limits, after, elapsed, self.seconds))

    def settle(self, ticket: Pass, exchange: Exchange) -> None:
        """Correct the token count to the actual usage, in the background (never raises)."""
        usage = exchange.usage
        actual = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
        if actual != ticket.tokens and ticket.tokens:
            self._correcting.spawn(self._correct(ticket, actual - ticket.tokens))

    async def _correct(self, ticket: Pass, delta: int) -> None:
        try:
            await self.store.correct(ticket.keys, delta)
        except Exception:  # the store falls back on its own; this is a defect, logged, never raised
            log.exception("could not correct a rate limit token count by %d", delta)

    async def close(self) -> None:
        await self._correcting.drain()
        await self.store.close()


def open_store(config: RateLimitsConfig, budgets: BudgetsConfig, guard: Guard | None) -> RateStore:
    """Shared windows when a Redis URL is configured (the budgets' client when the URL is the same)."""
    local = InProcessRateStore(config.window_seconds)
    if config.redis_url is None:
        return local
    shared = guard.store.shared if guard is not None and isinstance(guard.store, FailoverBudgetStore) else None
    same = (budgets.redis_url, budgets.redis_cluster) == (config.redis_url, config.redis_cluster)
    if isinstance(shared, RedisBudgetStore) and same:
        store = RedisRateStore(shared.client, config.window_seconds, split=config.redis_cluster, owned=False)
    else:
        client = connect(config.redis_url, cluster=config.redis_cluster)
        store = RedisRateStore(client, config.window_seconds, split=config.redis_cluster)
    return FailoverRateStore(store, local)


async def open_limiter(
    config: RateLimitsConfig, budgets: BudgetsConfig, guard: Guard | None, models: Iterable[ModelConfig], counter: TokenCounter
) -> RateLimiter | None:
    """The rate limiter when limits are configured (None otherwise: the hot path stays free)."""
    if not config.limits:
        return None
    caps: Mapping[str, int] = {}
    if any(limit.tpm is not None for limit in config.limits):  # token counts need the encodings and output caps
        models = list(models)
        await asyncio.to_thread(counter.warm, {m.target_model for m in models})
        caps = await asyncio.to_thread(_read_output_caps, models)
    if config.redis_url is None:
        log.info("rate limits are kept per process (no rate_limits.redis_url): each replica enforces them alone")
    return RateLimiter(config, open_store(config, budgets, guard), counter, caps)
