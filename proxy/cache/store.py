"""Where cache entries live: Redis (shared by every replica) or this process's memory.

:class:`CacheStore` is the whole protocol: ``get``, ``set`` with a TTL, ``close``. The
Redis store is a thin client with short timeouts (the lookup sits on the hot path);
:class:`FailOpenStore` wraps it so that Redis down or slow never fails a request: an error
or a timeout counts as a miss (or a skipped write), is logged once and then every 100th
time, and Redis is left alone for a growing back-off (at most 5 s) before it is tried again;
the client reconnects on its own. :class:`MemoryStore` is a bounded LRU (entries and bytes)
with per-entry expiry: the store when no ``cache.redis_url`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis

from proxy import redisclient
from proxy.redisclient import UNREACHABLE

log = logging.getLogger("thrifty.cache")

MAX_RETRY_DELAY = 5.0


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """A bounded LRU in this process: at most ``max_entries`` entries and ``max_bytes`` of values."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return found[1]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if len(value) > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl, value)
        self._bytes += len(value)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self._bytes -= len(value)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisStore:
    """Entries as plain Redis strings with an expiry (``SET … PX``); works on Redis >= 6.2, Valkey, Cluster."""

    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster, timeout: float):
        self.client = client
        self._timeout = timeout

    async def get(self, key: str) -> bytes | None:
        async with asyncio.timeout(self._timeout):
            value = await self.client.get(key)
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        async with asyncio.timeout(self._timeout):
            await self.client.set(key, value, px=max(int(ttl * 1000), 1))

    async def close(self) -> None:
        await self.client.aclose()


def connect(url: str, timeout: float, *, cluster: bool = False) -> aioredis.Redis | aioredis.RedisCluster:
    """A client that gives up within ``timeout`` (the lookup sits on the hot path; the caller fails open)."""
    return redisclient.connect(
        url, socket_timeout=timeout, connect_timeout=timeout, pool_timeout=timeout, max_connections=64, cluster=cluster
    )


def retry_delay(failures: int) -> float:
    """Seconds to leave Redis alone after ``failures`` failed calls in a row."""
    return min(0.05 * 2.0 ** min(failures, 8), MAX_RETRY_DELAY)


class FailOpenStore:
    """A store whose failures are misses: never raises for an unreachable or slow backend."""

    def __init__(self, inner: CacheStore, clock: Callable[[], float] = time.monotonic):
        self.inner = inner
        self._clock = clock
        self.failures = 0
        self._retry_at = 0.0

    @property
    def degraded(self) -> bool:
        return self.failures > 0

    async def get(self, key: str) -> bytes | None:
        if self._clock() < self._retry_at:
            return None
        try:
            value = await self.inner.get(key)
        except UNREACHABLE as exc:
            self._down(exc)
            return None
        self._up()
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if self._clock() < self._retry_at:
            return
        try:
            await self.inner.set(key, value, ttl)
        except UNREACHABLE as exc:
            self._down(exc)
            return
        self._up()

    def _down(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at = self._clock() + retry_delay(self.failures)
        if self.failures == 1 or self.failures % 100 == 0:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("cache store (Redis) unreachable or slow (%s); serving uncached until it answers", reason)

    def _up(self) -> None:
        if self.failures:
            log.info("cache store (Redis) reachable again after %d failed calls", self.failures)
            self.failures = 0

    async def close(self) -> None:
        try:
            await self.inner.close()
        except UNREACHABLE as exc:
            log.debug("cache store close: %s", exc)
