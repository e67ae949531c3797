"""The vector index, pure: add, search, replace, remove, expiry, the per-tenant LRU cap, partitions
that never mix, and the large-partition path (Hamming prefilter) finding what an exact scan finds."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from proxy.cache import index as index_module
from proxy.cache.index import VectorIndex, quantize

DIMS = 384


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unit(rng: np.random.Generator, n: int = 1) -> npt.NDArray[np.float32]:
    v = rng.standard_normal((n, DIMS)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(v: npt.NDArray[np.float32], rng: np.random.Generator, noise: float) -> npt.NDArray[np.float32]:
    w = v + noise * unit(rng)[0]
    return (w / np.linalg.norm(w)).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_search_finds_the_closest_entry_over_the_threshold(rng: np.random.Generator) -> None:
    clock = Clock()
    index = VectorIndex(DIMS, 100, clock)
    vectors = unit(rng, 20)
    for i, v in enumerate(vectors):
        index.add("t", "t/p", f"k{i}", v, clock.now + 60)
    query = near(vectors[5], rng, 0.2)
    exact = float(query @ vectors[5])
    match = index.search("t/p", query, 0.9)
    assert match is not None and match.key == "k5"
    assert abs(match.similarity - exact) < 0.01  # int8 is close to the float similarity
    assert index.search("t/p", query, exact + 0.02) is None
    assert index.search("t/other", query, 0.0) is None
    assert len(index) == 20


def test_partitions_and_tenants_never_mix(rng: np.random.Generator) -> None:
    index = VectorIndex(DIMS, 100, Clock())
    v = unit(rng)[0]
    index.add("team:a", "team:a/x", "a1", v, 2000)
    assert index.search("team:b/x", v, 0.0) is None
    assert index.search("team:a/y", v, 0.0) is None
    match = index.search("team:a/x", v, 0.99)
    assert match is not None and match.key == "a1"


def test_replace_remove_and_expire(rng: np.random.Generator) -> None:
    clock = Clock()
    index = VectorIndex(DIMS, 100, clock)
    a, b = unit(rng, 2)
    index.add("t", "t/p", "k", a, clock.now + 10)
    index.add("t", "t/p", "k", b, clock.now + 10)  # the same key again: replaced, not doubled
    assert len(index) == 1
    match = index.search("t/p", b, 0.99)
    assert match is not None and match.key == "k" and index.search("t/p", a, 0.5) is None
    index.add("t", "t/p", "j", a, clock.now + 100)
    clock.now += 11
    assert index.search("t/p", b, 0.5) is None  # expired entries are never found, even before expire()
    assert index.expire() == [("t", "k")]
    assert len(index) == 1 and "k" not in index and "j" in index
    assert index.remove("t", "j") and not index.remove("t", "j")
    assert len(index) == 0 and index.nbytes() == 0


def test_each_tenant_keeps_its_cap_and_loses_its_least_recently_used(rng: np.random.Generator) -> None:
    clock = Clock()
    index = VectorIndex(DIMS, 3, clock)
    vectors = unit(rng, 5)
    for i in range(3):
        assert index.add("t", f"t/p{i % 2}", f"k{i}", vectors[i], 5000) == []
        clock.now += 1
    index.add("other", "other/p", "o", vectors[4], 5000)
    clock.now += 1
    index.touch("t", "k0")  # a hit: k1 is now the least recently used
    clock.now += 1
    assert index.add("t", "t/p0", "k3", vectors[3], 5000) == ["k1"]
    assert sorted(k for _, k in index.entries()) == ["k0", "k2", "k3", "o"]
    assert index.search("t/p1", vectors[1], 0.5) is None
    assert index.search("other/p", vectors[4], 0.99) is not None  # another tenant's cap is its own
    assert not index.remove("other", "k0") and "k0" in index  # a key is removed only by its own tenant


def test_a_full_tenant_loses_a_hundredth_of_its_cap_at_once(rng: np.random.Generator) -> None:
    clock = Clock()
    index = VectorIndex(DIMS, 200, clock)
    vectors = unit(rng, 201)
    for i, v in enumerate(vectors[:200]):
        index.add("t", f"t/p{i % 7}", f"k{i}", v, 5000)
        clock.now += 1
    assert index.add("t", "t/p0", "new", vectors[200], 5000) == ["k0", "k1", "k2"]
    assert len(index) == 198


def test_removing_rows_keeps_the_others_findable(rng: np.random.Generator) -> None:
    index = VectorIndex(DIMS, 1000, Clock())
    vectors = unit(rng, 50)
    for i, v in enumerate(vectors):
        index.add("t", "t/p", f"k{i}", v, 5000)
    for i in range(0, 50, 3):
        index.remove("t", f"k{i}")
    for i, v in enumerate(vectors):
        match = index.search("t/p", v, 0.99)
        assert (match is None) if i % 3 == 0 else (match is not None and match.key == f"k{i}")


def test_a_large_partition_finds_near_duplicates_through_the_hamming_prefilter(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "EXACT_SCAN_ROWS", 100)
    index = VectorIndex(DIMS, 10_000, Clock())
    vectors = unit(rng, 3000)
    for i, v in enumerate(vectors):
        index.add("t", "t/p", f"k{i}", v, 5000)
    for i in rng.choice(3000, 40, replace=False):
        query = near(vectors[i], rng, 0.3)  # cosine about 0.96
        match = index.search("t/p", query, 0.9)
        assert match is not None and match.key == f"k{i}"


def test_quantization_keeps_similarities_within_a_hundredth(rng: np.random.Generator) -> None:
    vectors = unit(rng, 200)
    q, s = zip(*(quantize(v) for v in vectors), strict=True)
    approx = np.stack(q).astype(np.float32) * np.array(s, dtype=np.float32)[:, None]
    assert np.abs(approx @ vectors[0] - vectors @ vectors[0]).max() < 0.01
    with pytest.raises(ValueError):
        VectorIndex(8, 10).add("t", "t/p", "k", vectors[0], 1.0)
