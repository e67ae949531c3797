"""The semantic cache's in-process vector index: brute force over quantized vectors, per partition.

Pure data structure, no I/O, no awaits: the semantic cache (``proxy.cache.semantic``) adds
what it stores or what other replicas announce, and searches it with the embedding of a
request. Entries live in partitions (see ``proxy.cache.semantic_key``) and a search only
ever looks inside one, so a tenant or a conversation never sees another's entries. Each
vector is kept as int8 with its scale (384 + 4 bytes), plus 384 sign bits stored column-wise
(48 bytes). A small partition is scanned exactly; a large one first by Hamming distance over
the sign bits (a fraction of a millisecond at 100,000 entries), then the closest candidates
exactly. The similarity found here is approximate (int8); the cache re-checks a hit against
the stored float32 vector before serving it, so quantization can cost a hit, never a wrong
one. Expiry is by absolute time (the same on every replica); each tenant holds at most
``max_per_tenant`` entries, the least recently used evicted first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

EXACT_SCAN_ROWS = 4096  # up to this many entries a partition is scanned exactly
CANDIDATES = 64  # a large partition: how many of the nearest by Hamming distance are checked exactly
HAMMING_SLACK = 32  # bits above the nearest one's distance that still make a candidate
_GROW = 1.5


@dataclass(frozen=True, slots=True)
class Match:
    key: str
    similarity: float  # approximate (int8); the cache re-checks with the stored float vector


def quantize(vector: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], float]:
    """A unit vector as int8 and the scale that maps it back."""
    peak = float(np.abs(vector).max()) or 1.0
    scale = peak / 127.0
    return np.round(vector / scale).astype(np.int8), scale


def sign_bits(vectors: npt.NDArray[Any]) -> npt.NDArray[np.uint64]:
    """n x d vectors as their sign bits, (d/64) x n uint64 (column-wise: a Hamming scan is a few flat passes)."""
    packed = np.packbits(np.asarray(vectors) > 0, axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed.view(np.uint64).T)


class Partition:
    """The entries of one partition: growable arrays, a removed row is filled by the last one."""

    def __init__(self, dims: int, capacity: int = 8):
        self.dims = dims
        self.size = 0
        self.keys: list[str] = []
        self.rows: dict[str, int] = {}
        self.q8 = np.zeros((capacity, dims), dtype=np.int8)
        self.scales = np.zeros(capacity, dtype=np.float32)
        self.bits = np.zeros(((dims + 63) // 64, capacity), dtype=np.uint64)
        self.expires = np.zeros(capacity, dtype=np.float64)

    def _grow(self) -> None:
        capacity = max(8, int(len(self.scales) * _GROW))
        self.q8 = np.resize(self.q8, (capacity, self.dims))
        self.scales = np.resize(self.scales, capacity)
        bits = np.zeros((self.bits.shape[0], capacity), dtype=np.uint64)
        bits[:, : self.size] = self.bits[:, : self.size]
        self.bits = bits
        self.expires = np.resize(self.expires, capacity)

    def add(self, key: str, q8: npt.NDArray[np.int8], scale: float, expires: float) -> None:
        if self.size == len(self.scales):
            self._grow()
        row = self.size
        self.q8[row], self.scales[row], self.expires[row] = q8, scale, expires
        self.bits[:, row] = sign_bits(q8[None, :])[:, 0]
        self.keys.append(key)
        self.rows[key] = row
        self.size += 1

    def remove(self, key: str) -> None:
        row = self.rows.pop(key)
        last = self.size - 1
        if row != last:
            moved = self.keys[last]
            self.q8[row], self.scales[row], self.expires[row] = self.q8[last], self.scales[last], self.expires[last]
            self.bits[:, row] = self.bits[:, last]
            self.keys[row] = moved
            self.rows[moved] = row
        self.keys.pop()
        self.size = last

    def candidates(self, query: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        n = self.size
        if n <= EXACT_SCAN_ROWS:
            return np.arange(n)
        q = sign_bits(query[None, :])[:, 0]
        distance = np.bitwise_count(self.bits[0, :n] ^ q[0]).astype(np.uint16)
        for word in range(1, len(q)):
            distance += np.bitwise_count(self.bits[word, :n] ^ q[word])
        near = np.flatnonzero(distance <= int(distance.min()) + HAMMING_SLACK)
        if len(near) > CANDIDATES:
            near = near[np.argpartition(distance[near], CANDIDATES)[:CANDIDATES]]
        return near

    def best(self, query: npt.NDArray[np.float32], now: float, floor: float, limit: int) -> list[tuple[int, float]]:
        """Up to ``limit`` live rows scoring at least ``floor``, best first."""
        rows = self.candidates(query)
        if not len(rows):
            return []
        scores = (self.q8[rows].astype(np.float32) @ query) * self.scales[rows]
        scores[self.expires[rows] <= now] = -2.0
        passing = np.flatnonzero(scores >= floor)
        if len(passing) > limit:
            passing = passing[np.argpartition(-scores[passing], limit)[:limit]]
        ranked = passing[np.argsort(-scores[passing])]
        return [(int(rows[i]), float(scores[i])) for i in ranked]

    def nbytes(self) -> int:
        return self.q8.nbytes + self.scales.nbytes + self.bits.nbytes + self.expires.nbytes


class VectorIndex:
    """Partitions of quantized vectors with expiry and a per-tenant LRU cap."""

    def __init__(self, dims: int, max_per_tenant: int, clock: Callable[[], float] = time.time):
        self.dims = dims
        self.max_per_tenant = max_per_tenant
        self._clock = clock
        self._partitions: dict[str, Partition] = {}
        # Per tenant, its entries' keys from least to most recently used, with their partition names.
        self._tenants: dict[str, OrderedDict[str, str]] = {}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._tenants.values())

    def __contains__(self, key: object) -> bool:
        return any(key in keys for keys in self._tenants.values())

    def add(self, tenant: str, partition: str, key: str, vector: npt.NDArray[np.float32], expires: float) -> list[str]:
        """Add (or replace) an entry; returns the keys evicted to keep the tenant under its cap."""
        q8, scale = quantize(vector)
        return self.add_quantized(tenant, partition, key, q8, scale, expires)

    def add_quantized(
        self, tenant: str, partition: str, key: str, q8: npt.NDArray[np.int8], scale: float, expires: float
    ) -> list[str]:
        if len(q8) != self.dims:
            raise ValueError(f"a {len(q8)}-dimensional vector in a {self.dims}-dimensional index")
        owned = self._tenants.setdefault(tenant, OrderedDict())
        if key in owned:
            self.remove(tenant, key)
            owned = self._tenants.setdefault(tenant, OrderedDict())
        self._partitions.setdefault(partition, Partition(self.dims)).add(key, q8, scale, expires)
        owned[key] = partition
        evicted = []
        while len(owned) > self.max_per_tenant:
            oldest = next(iter(owned))
            self.remove(tenant, oldest)
            evicted.append(oldest)
        return evicted

    def remove(self, tenant: str, key: str) -> bool:
        owned = self._tenants.get(tenant)
        name = owned.pop(key, None) if owned is not None else None
        if name is None:
            return False
        part = self._partitions[name]
        part.remove(key)
        if not part.size:
            del self._partitions[name]
        if not owned:
            del self._tenants[tenant]
        return True

    def search(self, partition: str, vector: npt.NDArray[np.float32], threshold: float) -> Match | None:
        """The most similar live entry of the partition, if its similarity reaches ``threshold``."""
        found = self.search_all(partition, vector, threshold, 1)
        return found[0] if found else None

    def search_all(self, partition: str, vector: npt.NDArray[np.float32], threshold: float, limit: int) -> list[Match]:
        """Up to ``limit`` live entries of the partition at ``threshold`` or above, most similar first."""
        part = self._partitions.get(partition)
        if part is None:
            return []
        return [Match(part.keys[row], score) for row, score in part.best(vector, self._clock(), threshold, limit)]

    def touch(self, tenant: str, key: str) -> None:
        """Mark an entry used (a hit): it is evicted last."""
        owned = self._tenants.get(tenant)
        if owned is not None and key in owned:
            owned.move_to_end(key)

    def expire(self) -> list[tuple[str, str]]:
        """Drop expired entries; returns their (tenant, key)."""
        now = self._clock()
        dead: list[tuple[str, str]] = []
        for tenant, owned in self._tenants.items():
            for key, name in owned.items():
                part = self._partitions[name]
                if part.expires[part.rows[key]] <= now:
                    dead.append((tenant, key))
        for tenant, key in dead:
            self.remove(tenant, key)
        return dead

    def entries(self) -> Iterator[tuple[str, str]]:
        for tenant, owned in self._tenants.items():
            yield from ((tenant, key) for key in owned)

    def nbytes(self) -> int:
        """Bytes held by the vector arrays (the keys and maps come on top: see the benchmark)."""
        return sum(p.nbytes() for p in self._partitions.values())
