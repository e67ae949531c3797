"""The semantic cache end to end: real gateways with the real in-process MiniLM embedder, the
official SDK, the fake upstream, the in-process store and real Redis. A paraphrase is answered
from the cache (``x-thrifty-cache: semantic``, the similarity in the ledger), streamed or not;
"yes" in two conversations never matches; at the shipped defaults a retyped question or
conversation is served (the words tier) and another one is not; two gateways sharing Redis see each other's entries
within a second; a restarted gateway finds its entries again; Redis down fails no request."""

from __future__ import annotations

import time
import uuid
from typing import Any

import openai
import pytest

from proxy.app_state import GATEWAY
from proxy.pipeline.cache import ResponseCache
from tests.api.conftest import closed_port, wait_until
from tests.cache.conftest import Cached, StartCached
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_ledger_e2e import record_of

QUESTION = "How do I reset my password?"
PARAPHRASE = "What is the way to change my password?"  # cosine 0.83 with QUESTION
THRESHOLD = 0.8  # below the pair's similarity, so the test does not depend on the shipped default


def ask(client: openai.OpenAI, *turns: str, **fields: Any) -> Any:
    fields.setdefault("temperature", 0)
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, **fields)  # type: ignore[call-overload]


def cache_of(gateway: Cached) -> ResponseCache:
    cache = gateway.server.app[GATEWAY].cache  # type: ignore[index]
    assert cache is not None and cache.semantic is not None
    return cache


def tenant_client(gateway: Cached) -> openai.OpenAI:
    """A client of a team of its own: shared Redis holds other runs' entries, never this team's."""
    key, _ = gateway.create_key(f"team-{uuid.uuid4().hex[:10]}")
    return gateway.client_for(key)


@pytest.fixture(params=["memory", "redis"])
def semantic(request: pytest.FixtureRequest, start_cached: StartCached) -> Cached:
    extra = {"redis_url": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    return start_cached(mode="semantic", threshold=THRESHOLD, **extra)


def test_a_paraphrase_is_served_from_the_semantic_cache(semantic: Cached, fake: FakeUpstream) -> None:
    client = tenant_client(semantic)
    first = ask(client, QUESTION)
    assert first.headers["x-thrifty-cache"] == "miss"
    semantic.drain()
    second = ask(client, PARAPHRASE)
    assert second.headers["x-thrifty-cache"] == "semantic"
    assert len(fake.requests) == 1
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content == f"echo: {QUESTION}"
    assert ask(client, QUESTION).headers["x-thrifty-cache"] == "exact"  # exact first
    unrelated = ask(client, "What is the boiling point of water at sea level?")
    assert unrelated.headers["x-thrifty-cache"] == "miss"

    record = record_of(semantic.db_path, second.headers["x-request-id"])
    assert record["cache"] == "semantic" and record["cost_nusd"] == 0
    assert THRESHOLD <= record["similarity"] < 1.0
    assert record["savings_cache_nusd"] > 0
    stats = cache_of(semantic).stats()
    assert stats["hits_semantic"] == 1 and stats["hits_exact"] == 1 and stats["semantic"]["entries"] >= 2


def test_a_semantic_hit_is_replayed_as_a_stream(semantic: Cached, fake: FakeUpstream) -> None:
    client = tenant_client(semantic)
    ask(client, QUESTION)
    semantic.drain()
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": PARAPHRASE}], temperature=0, stream=True
    ) as response:
        chunks = list(response.parse())
        assert response.headers["x-thrifty-cache"] == "semantic"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"echo: {QUESTION}"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(fake.requests) == 1


def test_yes_in_two_conversations_does_not_match(semantic: Cached, fake: FakeUpstream) -> None:
    client = tenant_client(semantic)
    one = ask(client, "Shall I delete the production database?", "Are you sure?", "yes")
    semantic.drain()
    two = ask(client, "Do you want the summary in French?", "In French?", "yes")
    assert (one.headers["x-thrifty-cache"], two.headers["x-thrifty-cache"]) == ("miss", "miss")
    assert len(fake.requests) == 2
    semantic.drain()
    again = ask(client, "Shall I delete the production database?", "Are you sure?", "yes.")
    assert again.headers["x-thrifty-cache"] == "semantic"  # within the same conversation it does


def test_the_guard_refuses_another_number(semantic: Cached) -> None:
    client = tenant_client(semantic)
    ask(client, "Is 7 a prime number?")
    semantic.drain()
    assert ask(client, "Is 8 a prime number?").headers["x-thrifty-cache"] == "miss"
    assert cache_of(semantic).semantic.counts["guard_refused"] == 1  # type: ignore[union-attr]


def test_gateways_sharing_redis_see_each_others_entries_within_a_second(
    start_cached: StartCached, redis_url: str, fake: FakeUpstream
) -> None:
    a = start_cached(mode="semantic", threshold=THRESHOLD, redis_url=redis_url)
    b = start_cached(mode="semantic", threshold=THRESHOLD, redis_url=redis_url)
    key, _ = a.create_key(f"team-{uuid.uuid4().hex[:10]}")  # one key store (the ledger file) serves both
    before = len(cache_of(b).semantic.index)  # type: ignore[union-attr]
    ask(a.client_for(key), QUESTION)
    a.drain()
    stored = time.monotonic()
    assert wait_until(lambda: len(cache_of(b).semantic.index) > before, 1.0)  # type: ignore[union-attr]
    seen = time.monotonic() - stored
    assert seen < 1.0
    answer = ask(b.client_for(key), PARAPHRASE)
    assert answer.headers["x-thrifty-cache"] == "semantic"
    assert len(fake.requests) == 1


def test_a_restarted_gateway_warm_starts_from_redis(start_cached: StartCached, redis_url: str, fake: FakeUpstream) -> None:
    first = start_cached(mode="semantic", threshold=THRESHOLD, redis_url=redis_url)
    key, _ = first.create_key(f"team-{uuid.uuid4().hex[:10]}")
    ask(first.client_for(key), QUESTION)
    first.drain()
    first.server.stop()
    again = start_cached(mode="semantic", threshold=THRESHOLD, redis_url=redis_url)
    assert ask(again.client_for(key), PARAPHRASE).headers["x-thrifty-cache"] == "semantic"
    assert len(fake.requests) == 1


def test_requests_succeed_while_redis_is_down(start_cached: StartCached, fake: FakeUpstream) -> None:
    down = start_cached(mode="semantic", threshold=THRESHOLD, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    for text in (QUESTION, PARAPHRASE, QUESTION):
        answer = ask(down.client, text)
        assert answer.headers["x-thrifty-cache"] == "miss"
        assert answer.parse().choices[0].message.content == f"echo: {text}"
        down.drain()
    assert len(fake.requests) == 3
    stats = cache_of(down).stats()
    assert stats["semantic"].get("errors_store", 0) >= 1 and stats["misses"] == 3


def test_at_the_shipped_defaults_a_retyped_question_and_conversation_are_served(
    start_cached: StartCached, fake: FakeUpstream
) -> None:
    """The words tier, far under the cosine threshold: other casing, a greeting, a contraction, a typo;
    in a conversation, earlier turns retyped too. Another question or another history is not served."""
    gateway = start_cached(mode="semantic")  # no threshold: the shipped defaults
    client = tenant_client(gateway)
    ask(client, "What is the minimum order for free delivery?")
    ask(client, "Can I change my flight?", "Yes, up to 24 hours before departure.", "Is there a fee?")
    gateway.drain()
    retyped = ask(client, "hi! whats the minimum order for free delivry")
    assert retyped.headers["x-thrifty-cache"] == "semantic"
    record = record_of(gateway.db_path, retyped.headers["x-request-id"])
    assert record["similarity"] < 0.99  # served by the words tier
    again = ask(client, "can i change my flight", "Yes, up to 24 hours before departure", "is there a fee")
    assert again.headers["x-thrifty-cache"] == "semantic"
    assert ask(client, "What is the maximum order for free delivery?").headers["x-thrifty-cache"] == "miss"
    other = ask(client, "Can I change my hotel?", "Yes, up to 24 hours before departure.", "Is there a fee?")
    assert other.headers["x-thrifty-cache"] == "miss"
    assert len(fake.requests) == 4
