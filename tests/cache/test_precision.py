"""The semantic cache's safety claim at its shipped defaults (``DEFAULT_THRESHOLD`` for the cosine tier,
``WORDS_FLOOR`` for the words tier): on labelled near-miss pairs (tests/data/cache_pairs/, fow-cache
0.1.0, CC BY 4.0) at most 1% of non-duplicates would be served a duplicate's answer, measured the
way thrifty decides a hit (embedded text and partition from ``proxy.cache.semantic_key``, the real
in-process embedder, ``semantic_key.decide``), questions and conversations alike; and what it
serves. It runs on every pair (5 to 15 s on two shared cores): with 300 non-duplicate questions one false hit
is 0.33 points, and a 300-question subset (145 of them) was too coarse to hold the claim
(its first two false hits already make 1.4%). The sweep over thresholds is
``python -m tests.benchmarks.cache_precision`` (tests/data/cache_pairs/RESULTS.md)."""

from __future__ import annotations

import pytest

from proxy.cache.embedder import LocalEmbedder
from proxy.cache.semantic_key import DEFAULT_THRESHOLD, WORDS_FLOOR
from tests.benchmarks.cache_precision import MAX_FALSE_HITS, Scored, load_pairs, rates, score


@pytest.fixture(scope="module")
def scores() -> list[Scored]:
    return score(load_pairs(), LocalEmbedder())


@pytest.mark.parametrize("kind", ["question", "conversation"])
def test_the_default_threshold_serves_at_most_one_near_miss_in_a_hundred(scores: list[Scored], kind: str) -> None:
    mine = [s for s in scores if s.kind == kind]
    at_default = rates(mine, DEFAULT_THRESHOLD)
    assert at_default.negatives >= 100
    wrong = [f"{s.id} ({s.similarity:.3f})" for s in mine if not s.duplicate and s.served(DEFAULT_THRESHOLD)]
    assert at_default.false_hit_rate <= MAX_FALSE_HITS, f"false hits at {DEFAULT_THRESHOLD} / {WORDS_FLOOR}: {wrong}"


def test_the_measurement_can_tell_duplicates_apart(scores: list[Scored]) -> None:
    """The numbers above mean something: duplicates are served, and a plain cosine cache would fail."""
    questions = [s for s in scores if s.kind == "question"]
    at_default = rates(questions, DEFAULT_THRESHOLD)
    # The words tier serves most near repeats (case, punctuation, greetings, typos): 32.7% of duplicates measured.
    assert at_default.hit_rate >= 0.30
    assert at_default.hit_rate > rates(questions, DEFAULT_THRESHOLD, words=False).hit_rate + 0.15
    assert rates(questions, 0.80, plain=True).false_hit_rate > 0.3  # the near-misses are hard ones
    conversations = [s for s in scores if s.kind == "conversation"]
    # Identical last messages after different turns: the last message alone would be served.
    assert rates(conversations, DEFAULT_THRESHOLD, plain=True).false_hit_rate > 0.5
