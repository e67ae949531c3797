"""The Redis store across a Redis restart: pooled connections from before the crash are dead,
and none of them may turn into a miss that starts a back-off once Redis is back."""

from __future__ import annotations

import asyncio

from proxy.cache.store import FailOpenStore, RedisStore, connect
from tests.services import RedisProcess


async def test_the_first_calls_after_a_redis_restart_succeed_on_fresh_connections() -> None:
    server = RedisProcess().start()
    store = FailOpenStore(RedisStore(connect(server.url, 0.5), 0.5))
    try:
        await asyncio.gather(*(store.set(f"k{i}", b"v", 60) for i in range(8)))  # eight pooled connections
        assert await store.get("k0") == b"v"
        await asyncio.to_thread(server.kill)
        await asyncio.to_thread(server.start)  # empty: nothing is saved to disk
        await asyncio.gather(*(store.set(f"k{i}", b"again", 60) for i in range(8)))
        assert store.failures == 0
        assert await asyncio.gather(*(store.get(f"k{i}") for i in range(8))) == [b"again"] * 8
    finally:
        await store.close()
        server.stop()


async def test_a_redis_that_is_down_is_a_miss_and_a_back_off() -> None:
    server = RedisProcess().start()
    store = FailOpenStore(RedisStore(connect(server.url, 0.2), 0.2))
    try:
        await store.set("k", b"v", 60)
        await asyncio.to_thread(server.kill)
        assert await store.get("k") is None
        assert store.failures == 1 and store.degraded
        assert await store.get("k") is None  # within the back-off: Redis is not even asked
        assert store.failures == 1
    finally:
        await store.close()
        server.stop()
