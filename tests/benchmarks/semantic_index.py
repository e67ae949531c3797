"""Benchmark: the semantic cache's index at 100,000 entries, against the embedding it follows.

Run on purpose (not by pytest), from the repository root:

    .venv/bin/python -m tests.benchmarks.semantic_index [--entries 100000] [--queries 1000] [--skip-redis]

What it measures, all in this process on the real structures:

- embedding: the in-process MiniLM (int8 ONNX), one short question at a time (``embed_sync``
  and the async ``embed`` through its worker thread), p50/p99;
- lookup: ``VectorIndex.search`` with every entry in ONE partition (the worst case: a tenant's
  single-turn questions under one system prompt) and spread over 1,000 partitions (typical),
  p50/p99; and whether the large-partition path (Hamming prefilter) finds the same entry as
  an exact float32 scan, for near-duplicate queries;
- bytes per entry: tracemalloc's growth while the index is built (arrays, keys, maps), and the
  vector arrays alone;
- warm start: the entries written to a private Redis (RedisProcess from tests.services, never
  the shared server) in thrifty's format, then ``RedisVectors.warm_start`` into a fresh index;
- the whole semantic lookup after the embedding (``SemanticCache.lookup``: index search, the
  candidate fetched from that Redis, float re-check, guard, decode), p50/p99; and a miss that
  fetches every candidate over the words tier's floor (``semantic.CANDIDATES``) and refuses it.

The 100,000 vectors are made from real embeddings of 2,000 generated questions (random
mixtures of two plus noise, normalized), so they keep MiniLM's anisotropy; the queries are
near-duplicates of stored vectors (cosine about 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import tracemalloc
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.cache import entry as entries
from proxy.cache.embedder import LocalEmbedder
from proxy.cache.index import VectorIndex, quantize
from proxy.cache.semantic import SemanticCache
from proxy.cache.semantic_key import DEFAULT_THRESHOLD, SemanticKey
from proxy.cache.semantic_sync import RedisVectors, entry_key, pack_index

SUBJECTS = ["my password", "the invoice", "a refund", "the API key", "my order", "the subscription", "a flight", "the report"]
VERBS = ["reset", "cancel", "change", "download", "track", "renew", "book", "export", "share", "delete"]
FRAMES = ["How do I {v} {s}?", "Can you help me {v} {s}?", "What is the way to {v} {s}", "Is it possible to {v} {s} today?"]


def questions(n: int, rng: random.Random) -> list[str]:
    extra = ["", " on mobile", " for my team", " before Friday", " without logging in", " in Germany", " as an admin"]
    return [rng.choice(FRAMES).format(v=rng.choice(VERBS), s=rng.choice(SUBJECTS)) + rng.choice(extra) for _ in range(n)]


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:.3f} ms, p99 {p99 * 1000:.3f} ms"


def unit(matrix: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.asarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def corpus(base: npt.NDArray[np.float32], n: int, seed: int) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(base), n), rng.integers(0, len(base), n)
    w = rng.uniform(0.2, 0.8, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, base.shape[1])).astype(np.float32) * 0.02
    return unit(w * base[a] + (1 - w) * base[b] + noise)


def bench_embedding(embedder: LocalEmbedder, texts: list[str]) -> None:
    for text in texts[:20]:
        embedder.embed_sync([text])
    sync = []
    for text in texts[:300]:
        started = time.perf_counter()
        embedder.embed_sync([text])
        sync.append(time.perf_counter() - started)

    async def through_worker() -> list[float]:
        out = []
        for text in texts[300:600]:
            started = time.perf_counter()
            await embedder.embed([text])
            out.append(time.perf_counter() - started)
        return out

    print(f"embedding, one question (embed_sync): {ms(sync)}")
    print(f"embedding, one question (async embed, worker thread): {ms(asyncio.run(through_worker()))}")


def build(vectors: npt.NDArray[np.float32], partitions: int) -> tuple[VectorIndex, int]:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = VectorIndex(vectors.shape[1], max_per_tenant=len(vectors) + 1)
    expires = time.time() + 3600
    for i, v in enumerate(vectors):
        index.add("team:bench", f"team:bench/{i % partitions:032x}", f"{i:016x}", v, expires)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return index, grown


def bench_lookup(vectors: npt.NDArray[np.float32], queries: int, seed: int) -> None:
    n = len(vectors)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n, queries)
    probes = unit(vectors[targets] + rng.standard_normal((queries, vectors.shape[1])).astype(np.float32) * 0.017)
    for partitions in (1, 1000, n):
        started = time.perf_counter()
        index, grown = build(vectors, partitions)
        built = time.perf_counter() - started
        times, found, same = [], 0, 0
        for target, probe in zip(targets, probes, strict=True):
            name = f"team:bench/{target % partitions:032x}"
            t0 = time.perf_counter()
            match = index.search(name, probe, 0.9)
            times.append(time.perf_counter() - t0)
            if match is not None:
                found += 1
                same += match.key == f"{target:016x}"
        per = "one partition" if partitions == 1 else f"{partitions:,} partitions of {n // partitions}"
        print(f"lookup, {n:,} entries in {per}: {ms(times)} (built in {built:.1f} s)")
        cos = float(np.median(np.sum(probes * vectors[targets], axis=1)))
        print(f"  near-duplicate queries (median cosine {cos:.3f}): {found}/{queries} found, {same} the stored original")
        if partitions == 1:
            exact = [int(np.argmax(vectors @ p)) for p in probes[:200]]
            agree = sum(e == t for e, t in zip(exact, targets[:200], strict=True))
            print(f"  exact float32 scan finds the original for {agree}/200 of the same queries")
        arrays = index.nbytes() / n
        print(f"  bytes per entry: {grown / n:.0f} (tracemalloc growth: arrays, keys, maps); vector arrays alone {arrays:.0f}")


async def bench_warm_start(vectors: npt.NDArray[np.float32], queries: int) -> None:
    from tests.services import RedisProcess

    server = RedisProcess().start()
    try:
        writer = RedisVectors(server.url, 5.0)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "Open Settings, then Security. " * 8},
            "finish_reason": "stop",
        }
        raw = entries.encode("team:bench", {"object": "chat.completion", "model": "m", "choices": [choice]}, None, time.time())
        started = time.perf_counter()
        for start in range(0, len(vectors), 2000):
            pipe = writer.client.pipeline(transaction=False)
            for i in range(start, min(start + 2000, len(vectors))):
                q8, scale = quantize(vectors[i])
                key = entry_key("team:bench", f"{i:016x}")
                packed = pack_index(q8, scale, time.time() + 3600, f"team:bench/{i % 1000:032x}")
                fields = {"idx": packed, "vec": vectors[i].tobytes(), "raw": raw, "text": "How do I reset my password?"}
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, 3_600_000)
            await pipe.execute()
        print(f"warm start: {len(vectors):,} entries written to a private Redis in {time.perf_counter() - started:.1f} s")
        memory = await writer.client.info("memory")
        print(f"  Redis used_memory: {memory['used_memory'] / len(vectors):.0f} bytes per entry (float32 vector, int8, answer)")
        reader = RedisVectors(server.url, 0.1)
        cache = SemanticCache(Unused(), reader, vectors.shape[1], len(vectors) + 1)
        started = time.perf_counter()
        loaded = await reader.warm_start(cache.index)
        print(f"  warm start (SCAN + HGET, pipelined): {loaded:,} entries in {time.perf_counter() - started:.2f} s")
        await bench_semantic_lookup(cache, vectors, queries)
        await cache.close()
        await writer.close()
    finally:
        server.stop()


class Unused:
    """The lookups below are handed their vectors: no embedder runs."""

    name = "unused"

    async def embed(self, texts: list[str]) -> Any:
        raise NotImplementedError

    async def embed_counted(self, texts: list[str]) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def bench_semantic_lookup(cache: SemanticCache, vectors: npt.NDArray[np.float32], queries: int) -> None:
    """``SemanticCache.lookup`` after the embedding: index search, Redis HMGET, float re-check, guard, decode."""
    rng = np.random.default_rng(17)
    targets = rng.integers(0, len(vectors), queries)
    probes = unit(vectors[targets] + rng.standard_normal((queries, vectors.shape[1])).astype(np.float32) * 0.017)
    times, hits = [], 0
    for target, probe in zip(targets, probes, strict=True):
        key = SemanticKey("team:bench", f"team:bench/{target % 1000:032x}", "How do I reset my password?")
        started = time.perf_counter()
        hit = await cache.lookup(key, probe, 0.9)
        times.append(time.perf_counter() - started)
        hits += hit is not None
    print(f"  semantic lookup after the embedding, partitions of 100 on Redis: {ms(times)}, {hits}/{queries} hits")
    # The worst miss: every candidate over the words tier's floor is fetched, then refused (another number).
    times, refused, fetched = [], cache.counts["guard_refused"], cache.counts
    for target, probe in zip(targets, probes, strict=True):
        key = SemanticKey("team:bench", f"team:bench/{target % 1000:032x}", "How do I reset my password in 2 steps?")
        started = time.perf_counter()
        hit = await cache.lookup(key, probe, DEFAULT_THRESHOLD)
        times.append(time.perf_counter() - started)
        assert hit is None
    per = (fetched["guard_refused"] - refused) / queries
    print(f"  a miss refused by the guard after {per:.1f} candidates fetched from Redis: {ms(times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args()
    rng = random.Random(5)
    texts = questions(2600, rng)
    embedder = LocalEmbedder()
    bench_embedding(embedder, texts)
    started = time.perf_counter()
    base = embedder.embed_sync(texts[600:])
    rate = len(base) / (time.perf_counter() - started)
    print(f"embedded {len(base)} generated questions in batches of 32: {rate:.0f} per second")
    asyncio.run(embedder.close())
    vectors = corpus(base, args.entries, 11)
    bench_lookup(vectors, args.queries, 13)
    if not args.skip_redis:
        asyncio.run(bench_warm_start(vectors, args.queries))


if __name__ == "__main__":
    main()
