"""The semantic cache: embed the question, search the partition, re-check, serve or store.

Used by the cache stage (``proxy.pipeline.cache``) after an exact miss, for requests whose
route's cache mode is ``semantic``, and built at start-up only when some route or the
gateway's ``cache.mode`` asks for it (this module imports numpy). A lookup embeds the
request's text (``proxy.cache.semantic_key``) once, searches the in-process index
(``proxy.cache.index``) within the request's partition, fetches the best few candidates from
the store (``proxy.cache.semantic_sync``) and serves one only if ``semantic_key.decide`` lets
it through with the float32 similarity (the same content words from a low floor, or the
threshold; the guard on numbers, negations and word order either way) and the entry names
the same tenant. A failure of the embedder or of Redis is a miss (counted in :meth:`stats`,
logged at most once per 100): never a client error. A remote embedder's tokens are priced
and charged to the request as overhead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.cache import entry as entries
from proxy.cache.embedder import DIMENSIONS, Embedded, Embedder, LocalEmbedder, Overloaded, RemoteEmbedder, Vectors
from proxy.cache.entry import Entry
from proxy.cache.index import VectorIndex, quantize
from proxy.cache.semantic_key import WORDS_FLOOR, SemanticKey, decide, known_words
from proxy.cache.semantic_sync import MemoryVectors, RedisVectors, Stored, new_id, pack_index
from proxy.cache.store import retry_delay
from proxy.settings import CacheConfig, ModelConfig

log = logging.getLogger("thrifty.cache")

INDEX_MARGIN = 0.02  # int8 similarities this far under the least served one are still re-checked in float
EXPIRE_EVERY = 60.0  # seconds between sweeps of expired entries
CANDIDATES = 3  # entries fetched and checked at most per lookup, best first (the guard may refuse the closest)


@dataclass(frozen=True, slots=True)
class SemanticHit:
    entry: Entry
    similarity: float
    tier: str  # "cosine" or "words" (semantic_key.decide)


class SemanticCache:
    def __init__(
        self,
        embedder: Embedder,
        store: MemoryVectors | RedisVectors,
        dims: int,
        max_per_tenant: int,
        price_tokens: Callable[[int], int] = lambda tokens: 0,
        clock: Callable[[], float] = time.time,
    ):
        self.embedder = embedder
        self.store = store
        self.index = VectorIndex(dims, max_per_tenant, clock)
        self._price_tokens = price_tokens
        self._clock = clock
        self._swept = clock()
        self.counts: Counter[str] = Counter()
        self.embed_seconds = 0.0
        known_words()  # the typo check's dictionary, read once at start-up rather than on a first lookup
        # After a failure the embedder or the store is left alone for a growing back-off (at most 5 s).
        self._down: dict[str, tuple[int, float]] = {}  # what -> (failures in a row, retry at, monotonic)

    async def start(self) -> None:
        await self.store.start(self.index)

    async def embed(self, text: str) -> tuple[Vectors | None, int]:
        """The text's vector (None when the embedder failed) and its cost in nano-dollars."""
        if self._resting("embedder"):
            return None, 0
        try:
            done: Embedded = await self.embedder.embed_counted([text])
        except Overloaded:  # a burst beyond what the embedder works off soon: this request goes uncached
            self.counts["skipped_busy"] += 1
            return None, 0
        except Exception as exc:  # an embedder down or broken is a miss, never a failed request
            self._failed("embedder", exc)
            return None, 0
        self._recovered("embedder")
        self.counts["embeddings"] += 1
        self.embed_seconds += done.seconds
        return done.vectors[0], self._price_tokens(done.tokens) if done.tokens else 0

    async def lookup(self, key: SemanticKey, vector: Vectors, threshold: float) -> SemanticHit | None:
        """The closest stored answer that passes the float re-check and the guard, among a few candidates."""
        self._sweep()
        floor = min(threshold, WORDS_FLOOR) - INDEX_MARGIN
        for match in self.index.search_all(key.partition, vector, floor, CANDIDATES):
            if self._resting("store"):
                return None
            try:
                stored = await self.store.get(key.tenant, match.key)
            except Exception as exc:
                self._failed("store", exc)
                return None
            self._recovered("store")
            if stored is None:  # gone from Redis (expired early, evicted, or Redis restarted empty)
                self.index.remove(key.tenant, match.key)
                continue
            if len(stored.vector) != len(vector):
                continue
            similarity = float(stored.vector @ vector)
            tier = decide(key.text, stored.text, similarity, threshold)
            if tier is None:
                self.counts["guard_refused"] += 1
                continue
            hit = entries.decode(stored.raw, key.tenant)
            if hit is not None:
                self.index.touch(key.tenant, match.key)
                self.counts[f"served_{tier}"] += 1
                return SemanticHit(hit, similarity, tier)
        return None

    async def store_answer(self, key: SemanticKey, vector: Vectors, raw: bytes, ttl: float) -> None:
        """Add an answer to the index and the store (``raw``: the entry as encoded for the exact cache)."""
        if self._resting("store"):
            return
        expires = self._clock() + ttl
        name = new_id()
        q8, scale = quantize(vector)
        packed = pack_index(q8, scale, expires, key.partition)
        evicted = self.index.add_quantized(key.tenant, key.partition, name, q8, scale, expires)
        try:
            await self.store.put(key.tenant, name, packed, Stored(vector, key.text, raw), ttl, evicted)
        except Exception as exc:
            self.index.remove(key.tenant, name)  # not in Redis: other replicas would never see it
            self._failed("store", exc)
            return
        self._recovered("store")
        self.counts["stored"] += 1

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._swept >= EXPIRE_EVERY:
            self._swept = now
            self.store.forget([key for _, key in self.index.expire()])

    def _failed(self, what: str, exc: BaseException) -> None:
        self.counts[f"errors_{what}"] += 1
        failures = self._down.get(what, (0, 0.0))[0] + 1
        self._down[what] = (failures, time.monotonic() + retry_delay(failures))
        total = self.counts[f"errors_{what}"]
        if total == 1 or total % 100 == 0:
            log.warning("semantic cache %s failed (%s: %s); serving uncached (%d so far)", what, type(exc).__name__, exc, total)

    def _resting(self, what: str) -> bool:
        """Whether ``what`` failed lately and is left alone for now (counted as skipped)."""
        down = self._down.get(what)
        if down is None or time.monotonic() >= down[1]:
            return False
        self.counts[f"skipped_{what}"] += 1
        return True

    def _recovered(self, what: str) -> None:
        if what in self._down:
            failures, _ = self._down.pop(what)
            log.info("semantic cache %s answers again after %d failures", what, failures)

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            "entries": len(self.index),
            "index_bytes": self.index.nbytes(),
            "embed_ms_mean": round(self.embed_seconds / max(self.counts["embeddings"], 1) * 1000, 3),
        }

    async def close(self) -> None:
        await self.store.close()
        await self.embedder.close()


async def build_semantic(
    config: CacheConfig, models: Mapping[str, ModelConfig], session: Any, price_tokens: Callable[[str, int], int]
) -> SemanticCache:
    """The semantic cache as configured: the embedder loaded (off the loop), the index warm-started."""
    started = time.perf_counter()
    embedder: Embedder
    if config.embedder == "local":
        embedder = await asyncio.to_thread(LocalEmbedder)
        dims = DIMENSIONS
        price: Callable[[int], int] = lambda tokens: 0  # noqa: E731 (in-process: time, no money)
    else:
        model = models[config.embedder]
        embedder = RemoteEmbedder(session, model.base_url, model.target_model, model.api_key)
        dims = int((await embedder.embed(["dimensions"])).shape[1])  # the endpoint's vector size
        price = functools.partial(price_tokens, model.name)
    store: MemoryVectors | RedisVectors = MemoryVectors()
    if config.redis_url:
        store = RedisVectors(config.redis_url, config.timeout_seconds, cluster=config.redis_cluster)
    cache = SemanticCache(embedder, store, dims, config.semantic_max_per_tenant, price)
    await cache.start()
    where = "shared through Redis" if config.redis_url else "in this process only (no cache.redis_url)"
    seconds = time.perf_counter() - started
    log.info("semantic cache ready in %.2f s: embedder %s, %d entries, %s", seconds, embedder.name, len(cache.index), where)
    return cache
