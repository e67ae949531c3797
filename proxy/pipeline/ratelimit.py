"""Stage: rate limits (requests and tokens a minute per key, team or app), shared through Redis.

It sits beside the guard (budgets): after routing, the cache lookup and pruning, just before the
budget hold, so only requests bound for an upstream are counted (a cache hit is free). The
decisions are pure: which limits apply (:func:`applicable`, a named entry winning over ``"*"``),
the sliding-window estimate (:func:`estimate`: the current fixed window's count plus the previous
one's weighted by how much of it still overlaps the last ``window`` seconds), the wait until a
cost fits (:func:`retry_after`) and OpenAI's ``x-ratelimit-*`` headers (:func:`headers`). The I/O
(``proxy.pipeline.ratelimit_store``) is one Lua script that checks every applicable counter and
increments them all or none; a token count is corrected to the actual usage when the request
ends (like a budget settle). Keys
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
from urllib.parse import quote

from proxy.cost.budgets import FailoverBudgetStore, RedisBudgetStore, connect
from proxy.cost.tokens import TokenCounter
from proxy.errors import RateLimited
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.guard import INLINE_CHARS, Guard, output_allowance, payload_size, prompt_tokens, read_output_caps
from proxy.pipeline.ratelimit_store import (
    Counts,
    FailoverRateStore,
    InProcessRateStore,
    RateStore,
    RedisRateStore,
    estimate,
)
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


def refusal(limit: Limit, kind: str, wait: float, cost: int, extra: Mapping[str, str]) -> RateLimited:
    """The 429. The official SDKs wait Retry-After (``retry-after-ms`` first) before their retries,
    so a retry lands when the window has room; a request larger than the limit itself never fits,
    and ``x-should-retry: false`` keeps them from trying."""
    cap = (limit.rpm if kind == "requests" else limit.tpm) or 0
    seconds = max(math.ceil(wait), 1)
    out = {**extra, "Retry-After": str(seconds), "retry-after-ms": str(max(math.ceil(wait * 1000), 1))}
    if cost > cap:
        out["x-should-retry"] = "false"
        message = f"Request too large for {limit.label}: it may use {cost} tokens and the limit is {cap} tokens per window."
    else:
        message = f"Rate limit reached for {limit.label}: {cap} {kind} per window. Please try again in {seconds}s."
    return RateLimited(message, kind, out)


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
            if payload_size(payload) > INLINE_CHARS or not self._counter.ready(target.target_model):
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
            raise refusal(limits[i], verdict.kind, wait, cost, headers(limits, verdict.counts, elapsed, self.seconds))
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
        caps = await asyncio.to_thread(read_output_caps, models)
    if config.redis_url is None:
        log.info("rate limits are kept per process (no rate_limits.redis_url): each replica enforces them alone")
    return RateLimiter(config, open_store(config, budgets, guard), counter, caps)
