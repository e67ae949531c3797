"""The semantic cache with a remote embedder (the fake upstream's /v1/embeddings, priced as the
request's overhead), and its back-off when the embedder or the store fails."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest

from proxy.cache import entry
from proxy.cache.embedder import Embedded
from proxy.cache.semantic import SemanticCache
from proxy.cache.semantic_key import SemanticKey
from proxy.cache.semantic_sync import MemoryVectors
from tests.cache.conftest import StartCached
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_ledger_e2e import record_of


def test_a_remote_embedder_is_priced_as_overhead_and_serves_hits(start_cached: StartCached, fake: FakeUpstream) -> None:
    gateway = start_cached(mode="semantic", embedder="text-embedding-3-small")
    key, _ = gateway.create_key(f"team-{uuid.uuid4().hex[:8]}")
    client = gateway.client_for(key)
    messages = [{"role": "user", "content": "How do I reset my password?"}]
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, temperature=0, seed=1)
    gateway.drain()
    # Another seed: a miss for the exact cache, the same question for the semantic one.
    second = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, temperature=0, seed=2)
    assert (first.headers["x-thrifty-cache"], second.headers["x-thrifty-cache"]) == ("miss", "semantic")
    embedded = [r for r in fake.requests if r.path == "/v1/embeddings"]
    assert len(embedded) == 3  # the start-up probe, then one per lookup
    assert all(r.payload["model"] == "text-embedding-3-small" for r in embedded)
    paid = record_of(gateway.db_path, first.headers["x-request-id"])
    hit = record_of(gateway.db_path, second.headers["x-request-id"])
    # Six words, one token each at the fake; litellm's price for text-embedding-3-small is $0.02 per 1M tokens.
    assert paid["overhead_nusd"] == hit["overhead_nusd"] == 6 * 20
    assert hit["cache"] == "semantic" and hit["similarity"] == pytest.approx(1.0, abs=1e-3)


ANSWER = {
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "£25"}, "finish_reason": "stop"}],
}


class Failing:
    name = "failing"

    def __init__(self) -> None:
        self.calls = 0

    async def embed(self, texts: list[str]) -> Any:
        raise AssertionError("not used")

    async def embed_counted(self, texts: list[str]) -> Embedded:
        self.calls += 1
        raise ConnectionError("embedding endpoint down")

    async def close(self) -> None:
        return None


class BrokenStore(MemoryVectors):
    async def put(self, *args: Any) -> None:
        raise ConnectionError("Redis down")


async def test_a_failing_embedder_or_store_is_a_miss_and_left_alone_for_a_while() -> None:
    embedder = Failing()
    cache = SemanticCache(embedder, MemoryVectors(), 4, 10)
    assert await cache.embed("hello") == (None, 0)
    assert await cache.embed("hello") == (None, 0)
    assert embedder.calls == 1  # the second call is not made during the back-off
    assert cache.stats()["errors_embedder"] == 1 and cache.stats()["skipped_embedder"] == 1

    broken = SemanticCache(embedder, BrokenStore(), 4, 10)
    key = SemanticKey("team:a", "team:a/p", "hello")
    vector = np.array([1, 0, 0, 0], dtype=np.float32)
    await broken.store_answer(key, vector, b"{}", 60)
    assert len(broken.index) == 0  # not kept locally when the store did not take it
    await broken.store_answer(key, vector, b"{}", 60)
    assert broken.stats()["errors_store"] == 1 and broken.stats()["skipped_store"] == 1


def _vector(cosine: float) -> np.ndarray:
    """A unit vector at ``cosine`` from (1, 0, 0, 0)."""
    return np.array([cosine, (1 - cosine**2) ** 0.5, 0, 0], dtype=np.float32)


async def test_the_words_tier_serves_the_same_words_far_under_the_threshold() -> None:
    cache = SemanticCache(Failing(), MemoryVectors(), 4, 10)
    stored = SemanticKey("team:a", "team:a/p", "What is the minimum order for free delivery?")
    await cache.store_answer(stored, _vector(1.0), entry.encode("team:a", ANSWER, None, 0.0), 60)
    retyped = SemanticKey("team:a", "team:a/p", "whats the minimum order for free delivry")  # a typo, no apostrophe
    hit = await cache.lookup(retyped, _vector(0.7), 0.99)
    assert hit is not None and hit.tier == "words" and hit.similarity == pytest.approx(0.7, abs=1e-6)
    other = SemanticKey("team:a", "team:a/p", "What is the maximum order for free delivery?")
    assert await cache.lookup(other, _vector(0.98), 0.99) is None  # other words: only the cosine tier, under it
    hit = await cache.lookup(other, _vector(0.995), 0.99)
    assert hit is not None and hit.tier == "cosine"
    assert await cache.lookup(retyped, _vector(0.45), 0.99) is None  # under the words tier's floor
    assert await cache.lookup(SemanticKey("team:b", "team:b/p", retyped.text), _vector(1.0), 0.99) is None
    assert cache.stats()["served_words"] == 1 and cache.stats()["served_cosine"] == 1
