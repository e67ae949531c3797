"""Two replicas' semantic caches on one real Redis: adds and evictions reach the other replica
through the stream, a malformed event does not stop the follower, and the entry format packs
and unpacks the index fields; entries and events of the first format are never read."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

from proxy.cache import entry as entries
from proxy.cache.index import quantize
from proxy.cache.semantic import SemanticCache
from proxy.cache.semantic_key import SemanticKey
from proxy.cache.semantic_sync import STREAM, RedisVectors, entry_key, pack_index, tenant_of, unpack_index
from tests.cache.test_semantic import Failing


def answer(text: str) -> dict[str, object]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice]}


async def until(predicate: Callable[[], object], within: float = 2.0) -> float:
    """Seconds until ``predicate`` holds (fails the test after ``within``)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError("not within the time allowed")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def test_the_packed_index_fields_round_trip() -> None:
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    q8, scale = quantize(vector / np.linalg.norm(vector))
    back, s, expires, partition = unpack_index(pack_index(q8, scale, 1234.5, "team:a/ff"))
    assert np.array_equal(back, q8) and s == pytest.approx(scale) and (expires, partition) == (1234.5, "team:a/ff")
    assert tenant_of(entry_key("team:a%2Fb", "0123")) == "team:a%2Fb"


async def test_replicas_follow_each_others_adds_and_evictions(redis_url: str) -> None:
    tenant = f"team:sync-{uuid.uuid4().hex[:8]}"
    a = SemanticCache(Failing(), RedisVectors(redis_url, 1.0), 4, max_per_tenant=1)
    b = SemanticCache(Failing(), RedisVectors(redis_url, 1.0), 4, max_per_tenant=1)
    await a.start()
    await b.start()
    try:
        key = SemanticKey(tenant, f"{tenant}/p", "first question")
        v1, v2 = np.array([1, 0, 0, 0], dtype=np.float32), np.array([0, 1, 0, 0], dtype=np.float32)
        await a.store_answer(key, v1, entries.encode(tenant, answer("one"), None, time.time()), 60)
        assert await until(lambda: len(list(b.index.entries())) and tenant in {t for t, _ in b.index.entries()}) < 1.0
        first_id = next(k for t, k in a.index.entries() if t == tenant)
        hit = await b.lookup(key, v1, 0.99)
        assert hit is not None and hit.entry.response["choices"][0]["message"]["content"] == "one"

        assert isinstance(b.store, RedisVectors)
        await b.store.client.xadd(STREAM, {"op": "add", "key": "junk", "tenant": tenant, "idx": b"\xff\x00"})
        await b.store.client.xadd(STREAM, {"op": b"\xff\xfe", "key": "junk"})

        second = SemanticKey(tenant, f"{tenant}/p", "second question")
        await a.store_answer(second, v2, entries.encode(tenant, answer("two"), None, time.time()), 60)  # evicts the first

        def only_second() -> bool:
            mine = [k for t, k in b.index.entries() if t == tenant]
            return len(mine) == 1 and b.index.search(f"{tenant}/p", v2, 0.99) is not None

        await until(only_second)
        assert await b.lookup(key, v1, 0.99) is None
        second_id = next(k for t, k in a.index.entries() if t == tenant)
        assert await b.store.client.exists(entry_key(tenant, first_id)) == 0  # the evicted hash is deleted
        assert await b.store.client.exists(entry_key(tenant, second_id)) == 1
    finally:
        await a.close()
        await b.close()


async def test_entries_of_the_first_format_are_never_read(redis_url: str) -> None:
    """Entries stored before the tiers (partitions hashed every earlier message exactly) live under
    ``…:sem:<id>`` and on the first stream: a gateway of this version neither loads nor follows them."""
    tenant = f"team:old-{uuid.uuid4().hex[:8]}"
    writer = RedisVectors(redis_url, 1.0)
    q8, scale = quantize(np.array([1, 0, 0, 0], dtype=np.float32))
    packed = pack_index(q8, scale, time.time() + 60, f"{tenant}/p")
    old = f"thrifty:cache:{{{tenant}}}:sem:0123456789abcdef"
    raw = entries.encode(tenant, answer("old"), None, time.time())
    await writer.client.hset(old, mapping={"idx": packed, "vec": b"\x00" * 16, "text": "first question", "raw": raw})
    await writer.client.expire(old, 60)
    cache = SemanticCache(Failing(), RedisVectors(redis_url, 1.0), 4, max_per_tenant=10)
    await cache.start()
    try:
        old_event = {"op": "add", "key": "fedcba9876543210", "tenant": tenant, "idx": packed}
        await writer.client.xadd("thrifty:cache:semantic:events", old_event)
        await asyncio.sleep(0.3)
        assert tenant not in {t for t, _ in cache.index.entries()}
        assert STREAM != "thrifty:cache:semantic:events" and ":sem2:" in entry_key(tenant, "x")
    finally:
        await cache.close()
        await writer.client.delete(old)
        await writer.close()
