"""Stage: cache (exact). Looks a request up before the upstream call; stores the answer after.

It sits after target resolution (and routing), before the budget hold: a hit costs nothing,
so it needs no hold. :meth:`ResponseCache.plan` is pure and cheap: a request that is not
cacheable (see ``proxy.cache.exact``) costs one look at a few fields and is marked
``bypass``; only a cacheable one is hashed. :meth:`lookup` waits at most the store's timeout
(~100 ms) and treats any failure as a miss. Stores run as tracked background tasks after the
response is on its way, bounded in number, so neither the client nor a Redis outage waits on
them; :meth:`close` awaits those still running. An answer is stored when the upstream said
200 and every choice finished with ``stop``, ``length`` (the limit is part of the key, so
the same request is cut at the same place), ``tool_calls`` or ``function_call``; never one
cut off by a content filter, an error, or a stream that broke off. Entries over
``max_entry_bytes`` are not stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.cache import entry as entries
from proxy.cache import exact
from proxy.cache.entry import Entry
from proxy.cache.store import CacheStore, FailOpenStore, MemoryStore, RedisStore, connect
from proxy.config import CacheConfig
from proxy.cost.pricing import Usage
from proxy.pipeline.exchange import Exchange
from proxy.tasks import TaskSet

log = logging.getLogger("thrifty.cache")

MAX_PENDING_WRITES = 1000


@dataclass(frozen=True, slots=True)
class Plan:
    """What the cache does for one request."""

    key: str
    tenant: str
    read: bool
    write: bool


class ResponseCache:
    def __init__(self, store: CacheStore, config: CacheConfig, clock: Callable[[], float] = time.time):
        self.store = store
        self.config = config
        self._clock = clock
        self._writing = TaskSet("cache-store")

    def plan(self, exchange: Exchange, cache_control: str | None) -> Plan | None:
        """None when the request is not cacheable (``exchange.cache`` becomes "bypass")."""
        payload = exchange.payload or {}
        verdict = exact.cacheability(payload, cache_control) if exchange.endpoint == "chat/completions" else exact.BYPASS
        if verdict.bypass:
            exchange.cache = "bypass"
            return None
        tenant = exact.tenant(exchange.principal, self.config.scope)
        key = exact.cache_key(tenant, exact.request_hash(payload, exchange.route))
        return Plan(key, tenant, verdict.read, verdict.write)

    async def lookup(self, plan: Plan) -> Entry | None:
        """The stored answer, or None (a miss, a failure, or an entry that is not this tenant's)."""
        if not plan.read:
            return None
        try:
            raw = await self.store.get(plan.key)
        except Exception:  # a defect in a store: never a reason to fail the request
            log.exception("cache lookup failed")
            return None
        return entries.decode(raw, plan.tenant) if raw is not None else None

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
            await self.store.set(plan.key, raw, self.config.ttl_seconds)
        except Exception:
            log.exception("cache store failed")

    def _track(self, storing: Coroutine[Any, Any, None]) -> None:
        if len(self._writing) >= MAX_PENDING_WRITES:  # the store is slower than traffic: skip, never queue
            storing.close()
            return
        self._writing.spawn(storing)

    async def drain(self) -> None:
        await self._writing.drain()

    async def close(self) -> None:
        await self.drain()
        await self.store.close()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def open_cache(config: CacheConfig) -> ResponseCache | None:
    """The cache as configured: Redis (failing open) when a URL is set, else in-process; None when off."""
    if not config.enabled:
        return None
    store: CacheStore
    if config.redis_url:
        store = FailOpenStore(
            RedisStore(connect(config.redis_url, config.timeout_seconds, cluster=config.redis_cluster), config.timeout_seconds)
        )
    else:
        store = MemoryStore(config.memory_entries, config.memory_bytes)
        log.info("response cache kept in this process (no cache.redis_url): replicas do not share it")
    return ResponseCache(store, config)
