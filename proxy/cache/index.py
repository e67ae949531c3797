"""The semantic cache's in-process vector index: brute force over quantized vectors, per partition.

Pure data structure, no I/O, no awaits: the semantic cache (``proxy.cache.semantic``) adds
what it stores or what other replicas announce, and searches it with the embedding of a
request. Entries live in partitions (see ``proxy.cache.semantic_key``) and a search only
ever looks inside one, so a tenant or a conversation never sees another's entries. Each
vector is kept as int8 with its scale, expiry and last use (384 + 24 bytes); a partition past
4,096 entries also keeps 384 sign bits per entry, column-wise (48 bytes), and is searched first
by Hamming distance over them (a fraction of a millisecond at 100,000 entries), then the
closest candidates exactly; a smaller one is scanned exactly. The similarity found here is
approximate (int8); the cache re-checks a hit against the stored float32 vector before
serving it, so quantization can cost a hit, never a wrong one. Expiry is by absolute time
(the same on every replica); each tenant holds at most ``max_per_tenant`` entries, the least
recently used evicted first (a hundredth of the cap at a time, so a full tenant does not scan
its entries on every add). Keys are short entry ids.
Memory per entry, keys and maps included: tests/benchmarks/semantic_index.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

EXACT_SCAN_ROWS = 4096  # up to this many entries a partition is scanned exactly
CANDIDATES = 64  # a large partition: how many of the nearest by Hamming distance are checked exactly
HAMMING_SLACK = 32  # bits above the nearest one's distance that still make a candidate
_GROW = 1.25  # a partition's arrays grow by a quarter (none unused for one entry) ...
SMALL_ROWS = 16  # up to this many entries a partition finds a key by a list search (no map)
GROW_ROWS_MAX = 4096  # ... and by at most this many rows (a large one keeps little unused room)
EVICT_SHARE = 100  # a tenant over its cap loses its least recently used 1/100 of the cap at once (at least 1)
_META_BYTES = 24  # scale, expiry, last use: three float64 after each row's vector


def _meta_offset(dims: int) -> int:
    return (dims + 7) // 8 * 8  # float64 aligned


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
    """The entries of one partition: growable arrays, a removed row is filled by the last one.

    Small partitions (one per conversation is common) carry as little as possible: no key map
    below :data:`SMALL_ROWS` entries (a list search), no sign bits until the Hamming prefilter
    is needed, and the vector, scale, expiry and last use of each entry in one row of one array.
    """

    __slots__ = ("bits", "buf", "dims", "keys", "name", "rows", "size", "tenant")

    def __init__(self, name: str, tenant: str, dims: int, capacity: int = 1):
        self.name = name
        self.tenant = tenant
        self.dims = dims
        self.size = 0
        self.keys: list[str] = []
        self.rows: dict[str, int] | None = None  # key -> row, once the partition is not small
        # One array per partition, a row per entry: the int8 vector, then (padded to 8 bytes) scale, expiry and
        # last use as float64 (the LRU order). One array header, not two: most partitions hold one entry.
        self.buf = np.zeros((capacity, _meta_offset(dims) + _META_BYTES), dtype=np.int8)
        self.bits: npt.NDArray[np.uint64] | None = None  # sign bits, column-wise, once the partition is large

    @property
    def q8(self) -> npt.NDArray[np.int8]:
        return self.buf[:, : self.dims]

    @property
    def meta(self) -> npt.NDArray[np.float64]:
        """Scale, expiry, last use: a float64 view of each row's tail."""
        offset = _meta_offset(self.dims)
        return self.buf[:, offset : offset + _META_BYTES].view(np.float64)

    def row(self, key: str) -> int:
        return self.rows[key] if self.rows is not None else self.keys.index(key)

    def _grow(self) -> None:
        held = len(self.buf)
        capacity = held + max(1, min(int(held * (_GROW - 1)), GROW_ROWS_MAX))
        # Copied into an exact-size array: np.resize would keep a view of a larger buffer.
        buf = np.zeros((capacity, self.buf.shape[1]), dtype=np.int8)
        buf[: self.size] = self.buf[: self.size]
        self.buf = buf
        if self.bits is not None:
            bits = np.zeros((self.bits.shape[0], capacity), dtype=np.uint64)
            bits[:, : self.size] = self.bits[:, : self.size]
            self.bits = bits

    def add(self, key: str, q8: npt.NDArray[np.int8], scale: float, expires: float, now: float) -> None:
        if self.size == len(self.buf):
            self._grow()
        row = self.size
        self.q8[row] = q8
        self.meta[row] = (scale, expires, now)
        self.keys.append(key)
        self.size += 1
        if self.rows is not None:
            self.rows[key] = row
        elif self.size > SMALL_ROWS:
            self.rows = {k: i for i, k in enumerate(self.keys)}
        if self.bits is not None:
            self.bits[:, row] = sign_bits(q8[None, :])[:, 0]
        elif self.size > EXACT_SCAN_ROWS:  # from now on searched through the Hamming prefilter
            self.bits = np.zeros(((self.dims + 63) // 64, len(self.buf)), dtype=np.uint64)
            self.bits[:, : self.size] = sign_bits(self.q8[: self.size])

    def remove(self, key: str) -> None:
        row = self.rows.pop(key) if self.rows is not None else self.keys.index(key)
        last = self.size - 1
        if row != last:
            moved = self.keys[last]
            self.buf[row] = self.buf[last]
            if self.bits is not None:
                self.bits[:, row] = self.bits[:, last]
            self.keys[row] = moved
            if self.rows is not None:
                self.rows[moved] = row
        self.keys.pop()
        self.size = last

    def candidates(self, query: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        n = self.size
        if self.bits is None or n <= EXACT_SCAN_ROWS:
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
        meta = self.meta[rows]
        scores = (self.q8[rows].astype(np.float32) @ query) * meta[:, 0]
        scores[meta[:, 1] <= now] = -2.0
        passing = np.flatnonzero(scores >= floor)
        if len(passing) > limit:
            passing = passing[np.argpartition(-scores[passing], limit)[:limit]]
        ranked = passing[np.argsort(-scores[passing])]
        return [(int(rows[i]), float(scores[i])) for i in ranked]

    def nbytes(self) -> int:
        return self.buf.nbytes + (self.bits.nbytes if self.bits is not None else 0)


class VectorIndex:
    """Partitions of quantized vectors with expiry and a per-tenant LRU cap."""

    def __init__(self, dims: int, max_per_tenant: int, clock: Callable[[], float] = time.time):
        self.dims = dims
        self.max_per_tenant = max_per_tenant
        self._clock = clock
        self._partitions: dict[str, Partition] = {}
        self._where: dict[str, Partition] = {}  # entry key -> its partition
        self._counts: dict[str, int] = {}  # entries per tenant
        self._owned: dict[str, set[str]] = {}  # partition names per tenant

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def add(self, tenant: str, partition: str, key: str, vector: npt.NDArray[np.float32], expires: float) -> list[str]:
        """Add (or replace) an entry; returns the keys evicted to keep the tenant under its cap."""
        q8, scale = quantize(vector)
        return self.add_quantized(tenant, partition, key, q8, scale, expires)

    def add_quantized(
        self, tenant: str, partition: str, key: str, q8: npt.NDArray[np.int8], scale: float, expires: float
    ) -> list[str]:
        if len(q8) != self.dims:
            raise ValueError(f"a {len(q8)}-dimensional vector in a {self.dims}-dimensional index")
        if key in self._where:
            self.remove(tenant, key)
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = Partition(partition, tenant, self.dims)
            self._owned.setdefault(tenant, set()).add(partition)
        part.add(key, q8, scale, expires, self._clock())
        self._where[key] = part
        self._counts[tenant] = self._counts.get(tenant, 0) + 1
        if self._counts[tenant] <= self.max_per_tenant:
            return []
        return self._evict(tenant, self._counts[tenant] - self.max_per_tenant + self.max_per_tenant // EVICT_SHARE)

    def _evict(self, tenant: str, count: int) -> list[str]:
        """The tenant's ``count`` least recently used entries, removed."""
        parts = [self._partitions[name] for name in self._owned.get(tenant, ())]
        used = np.concatenate([p.meta[: p.size, 2] for p in parts])
        keys = [key for p in parts for key in p.keys]
        oldest = np.argsort(used, kind="stable")[:count] if count < len(keys) else np.arange(len(keys))
        evicted = [keys[i] for i in oldest]
        for key in evicted:
            self.remove(tenant, key)
        return evicted

    def remove(self, tenant: str, key: str) -> bool:
        part = self._where.get(key)
        if part is None or part.tenant != tenant:
            return False
        del self._where[key]
        part.remove(key)
        self._counts[tenant] -= 1
        if not part.size:
            del self._partitions[part.name]
            self._owned[tenant].discard(part.name)
        if not self._counts[tenant]:
            del self._counts[tenant], self._owned[tenant]
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
        part = self._where.get(key)
        if part is not None and part.tenant == tenant:
            part.meta[part.row(key), 2] = self._clock()

    def expire(self) -> list[tuple[str, str]]:
        """Drop expired entries; returns their (tenant, key)."""
        now = self._clock()
        dead = [
            (part.tenant, part.keys[row])
            for part in self._partitions.values()
            for row in np.flatnonzero(part.meta[: part.size, 1] <= now)
        ]
        for tenant, key in dead:
            self.remove(tenant, key)
        return dead

    def entries(self) -> Iterator[tuple[str, str]]:
        for key, part in self._where.items():
            yield part.tenant, key

    def nbytes(self) -> int:
        """Bytes held by the vector arrays (the keys and maps come on top: see the benchmark)."""
        return sum(p.nbytes() for p in self._partitions.values())
