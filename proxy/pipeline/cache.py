"""Stage: cache (exact, then semantic). Looks a request up before the upstream call; stores the answer after.

It sits after target resolution (and routing), before the budget hold: a hit costs nothing,
so it needs no hold. :meth:`ResponseCache.plan` is pure and cheap: a request that is not
cacheable (see ``proxy.cache.exact``), or whose routing rule turns the cache off, costs one
look at a few fields and is marked ``bypass``; only a cacheable one is hashed. The rule's
``cache`` settings (``exchange.decision.cache``: mode, TTL, threshold, scope) override the
gateway's ``cache:`` config field by field. :meth:`lookup` tries the exact key first (waits at
most the store's timeout, ~100 ms; any failure is a miss), then, when the mode is
``semantic``, the semantic cache (``proxy.cache.semantic``: one embedding, an in-process
index search, a float re-check and a guard). Stores run as tracked background tasks after
the response is on its way, bounded in number, so neither the client nor a Redis outage
waits on them; :meth:`close` awaits those still running. An answer is stored when the
upstream said 200 and every choice finished with ``stop``, ``length`` (the limit is part of
the key), ``tool_calls`` or ``function_call``; never one cut off by a content filter, an
error, or a stream that broke off. Entries over ``max_entry_bytes`` are not stored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from proxy.cache import entry as entries
from proxy.cache import exact
from proxy.cache.entry import Entry
from proxy.cache.semantic_key import DEFAULT_THRESHOLD, SemanticKey, semantic_key
from proxy.cache.store import CacheStore, FailOpenStore, MemoryStore, RedisStore, connect
from proxy.cost.pricing import Usage
from proxy.pipeline.exchange import Exchange
from proxy.settings import CacheConfig, ModelConfig
from proxy.tasks import TaskSet

if TYPE_CHECKING:  # numpy and the embedder load only when a semantic cache is configured
    from proxy.cache.semantic import SemanticCache
    from proxy.cost.prices import Price
    from proxy.policy.model import Policy

log = logging.getLogger("thrifty.cache")

MAX_PENDING_WRITES = 1000
MODES = ("off", "exact", "semantic")


@dataclass(slots=True)
class Plan:
    """What the cache does for one request (the semantic vector is kept from lookup to store)."""

    key: str
    tenant: str
    read: bool
    write: bool
    ttl: float = 3600.0
    semantic: SemanticKey | None = None
    threshold: float = DEFAULT_THRESHOLD
    exchange: Exchange | None = None
    vector: Any = None  # the request's embedding, once computed


class ResponseCache:
    def __init__(
        self,
        store: CacheStore,
        config: CacheConfig,
        clock: Callable[[], float] = time.time,
        semantic: SemanticCache | None = None,
    ):
        self.store = store
        self.config = config
        self.semantic = semantic
        self._clock = clock
        self._writing = TaskSet("cache-store")
        self.counts: Counter[str] = Counter()

    def plan(self, exchange: Exchange, cache_control: str | None) -> Plan | None:
        """None when the request is not cacheable (``exchange.cache`` becomes "bypass")."""
        payload = exchange.payload or {}
        route = exchange.decision.cache if exchange.decision is not None else None
        mode = (route.mode if route is not None else None) or self.config.mode
        verdict = exact.BYPASS
        if mode != "off" and exchange.endpoint == "chat/completions":
            verdict = exact.cacheability(payload, cache_control)
        if verdict.bypass:
            exchange.cache = "bypass"
            self.counts["bypass"] += 1
            return None
        scope = (route.scope if route is not None else None) or self.config.scope
        tenant = exact.tenant(exchange.principal, scope)
        key = exact.cache_key(tenant, exact.request_hash(payload, exchange.route))
        ttl = route.ttl_seconds if route is not None and route.ttl_seconds is not None else self.config.ttl_seconds
        plan = Plan(key, tenant, verdict.read, verdict.write, ttl, exchange=exchange)
        if mode == "semantic" and self.semantic is not None:
            plan.semantic = semantic_key(payload, tenant, exchange.route, self.semantic.embedder.name)
            threshold = route.threshold if route is not None else None
            plan.threshold = threshold if threshold is not None else (self.config.threshold or DEFAULT_THRESHOLD)
        elif mode == "semantic" and not self.counts["semantic_unavailable"]:
            # A policy reloaded with a semantic rule after start-up, or an embedder that failed to start.
            log.warning("a rule asks for the semantic cache, which is not running (restart to load it); exact cache only")
        if mode == "semantic" and self.semantic is None:
            self.counts["semantic_unavailable"] += 1
        return plan

    async def lookup(self, plan: Plan) -> Entry | None:
        """The stored answer, or None (a miss, a failure, or an entry that is not this tenant's).

        Sets ``exchange.cache`` ("exact" or "semantic") and, for a semantic hit, ``exchange.similarity``.
        """
        if not plan.read:
            return None
        try:
            raw = await self.store.get(plan.key)
        except Exception:  # a defect in a store: never a reason to fail the request
            log.exception("cache lookup failed")
            raw = None
        found = entries.decode(raw, plan.tenant) if raw is not None else None
        if found is not None:
            return self._hit(plan, found, "exact")
        if plan.semantic is not None and self.semantic is not None:
            plan.vector, cost = await self.semantic.embed(plan.semantic.text)
            if plan.exchange is not None:
                plan.exchange.overhead_nusd += cost
            if plan.vector is not None:
                hit = await self.semantic.lookup(plan.semantic, plan.vector, plan.threshold)
                if hit is not None:
                    if plan.exchange is not None:
                        plan.exchange.similarity = round(hit.similarity, 4)
                    return self._hit(plan, hit.entry, "semantic")
        self.counts["misses"] += 1
        return None

    def _hit(self, plan: Plan, found: Entry, kind: str) -> Entry:
        self.counts[f"hits_{kind}"] += 1
        if plan.exchange is not None:
            plan.exchange.cache = kind
        return found

    def store_reply(self, plan: Plan, body: bytes, usage: Usage | None) -> None:
        """Store a non-streamed answer (its JSON body), in the background."""
        if plan.write and len(body) <= self.config.max_entry_bytes:
            self._track(self._store(plan, lambda: _loads(body), usage))

    def store_stream(self, plan: Plan, events: Iterable[bytes], usage_object: dict[str, Any] | None, usage: Usage | None) -> None:
        """Store a streamed answer, reassembled from its events, in the background."""
        if plan.write:
            chunks = list(events)
            self._track(self._store(plan, lambda: entries.assemble(chunks, usage_object), usage))

    async def _store(self, plan: Plan, response: Callable[[], Any], usage: Usage | None) -> None:
        answer = response()
        if not entries.storable(answer):
            return
        raw = entries.encode(plan.tenant, answer, usage, self._clock())
        if len(raw) > self.config.max_entry_bytes:
            return
        try:
            await self.store.set(plan.key, raw, plan.ttl)
        except Exception:
            log.exception("cache store failed")
        if plan.semantic is not None and self.semantic is not None:
            if plan.vector is None:  # Cache-Control: no-cache skipped the lookup; the vector is made now
                plan.vector, _ = await self.semantic.embed(plan.semantic.text)
            if plan.vector is not None:
                await self.semantic.store_answer(plan.semantic, plan.vector, raw, plan.ttl)

    def _track(self, storing: Coroutine[Any, Any, None]) -> None:
        if len(self._writing) >= MAX_PENDING_WRITES:  # the store is slower than traffic: skip, never queue
            storing.close()
            self.counts["writes_skipped"] += 1
            return
        self._writing.spawn(storing)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: hits (exact, semantic), misses, bypass, store errors; the semantic cache's own."""
        out: dict[str, Any] = {"hits_exact": 0, "hits_semantic": 0, "misses": 0, "bypass": 0, **self.counts}
        out["store_failures"] = self.store.failures if isinstance(self.store, FailOpenStore) else 0
        if self.semantic is not None:
            out["semantic"] = self.semantic.stats()
        return out

    def errors(self) -> dict[str, int]:
        """Failed calls since start by tier, for the cache error metric (cheap: no walk of the index)."""
        inner = self.store.inner if isinstance(self.store, FailOpenStore) else None
        out = {"exact": inner.errors if isinstance(inner, ErrorCount) else 0}
        if self.semantic is not None:
            out["semantic"] = self.semantic.counts["errors_store"]  # its entries' Redis calls
            out["embedder"] = self.semantic.counts["errors_embedder"]
        return out

    async def drain(self) -> None:
        await self._writing.drain()

    async def close(self) -> None:
        await self.drain()
        await self.store.close()
        if self.semantic is not None:
            await self.semantic.close()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


class ErrorCount:
    """A store that counts its failures since start (``FailOpenStore.failures`` resets once Redis
    answers again), for the cache error metric; the failure itself goes on to ``FailOpenStore``."""

    def __init__(self, inner: CacheStore):
        self.inner = inner
        self.errors = 0

    async def get(self, key: str) -> bytes | None:
        try:
            return await self.inner.get(key)
        except Exception:
            self.errors += 1
            raise

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        try:
            await self.inner.set(key, value, ttl)
        except Exception:
            self.errors += 1
            raise

    async def close(self) -> None:
        await self.inner.close()


def open_cache(config: CacheConfig) -> ResponseCache | None:
    """The cache as configured: Redis (failing open) when a URL is set, else in-process; None when off."""
    if not config.enabled:
        return None
    store: CacheStore
    if config.redis_url:
        client = connect(config.redis_url, config.timeout_seconds, cluster=config.redis_cluster)
        store = FailOpenStore(ErrorCount(RedisStore(client, config.timeout_seconds)))
    else:
        store = MemoryStore(config.memory_entries, config.memory_bytes)
        log.info("response cache kept in this process (no cache.redis_url): replicas do not share it")
    return ResponseCache(store, config)


def semantic_wanted(config: CacheConfig, policy: Policy | None) -> bool:
    """Whether the gateway's mode or any routing rule asks for the semantic cache."""
    if not config.enabled:
        return False
    if config.mode == "semantic":
        return True
    rules = policy.rules if policy is not None else ()
    return any(r.action.cache is not None and r.action.cache.mode == "semantic" for r in rules)


async def open_semantic(
    cache: ResponseCache, models: dict[str, ModelConfig], session: Any, price_of: Callable[[str], Price]
) -> None:
    """Load the embedder (off the loop), warm-start the index, and attach the semantic cache to ``cache``.

    A failure here (a remote embedder down at start-up) leaves the gateway on the exact cache, with a log line.
    """
    from proxy.cache.semantic import build_semantic

    def price_tokens(model: str, tokens: int) -> int:  # USD per 1M tokens -> nano-dollars
        return int(price_of(model).input * tokens * 1000)

    try:
        cache.semantic = await build_semantic(cache.config, models, session, price_tokens)
    except Exception as exc:  # the gateway still starts and serves, exact cache only
        log.error("semantic cache not started (%s: %s); serving with the exact cache only", type(exc).__name__, exc)
