"""Semantic keys: what is embedded, and which entries a request may ever be compared with."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.cache.semantic_key import (
    CONTEXT_WORDS_CHARS,
    DEFAULT_THRESHOLD,
    WORDS_FLOOR,
    compatible,
    decide,
    embedded_text,
    partition,
    same_words,
    semantic_key,
)


def chat(*turns: tuple[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "temperature": 0, "messages": [{"role": r, "content": c} for r, c in turns], **fields}


def key_of(payload: dict[str, Any], tenant: str = "team:a", route: str | None = "r") -> str:
    return partition(payload, tenant, route, "minilm")


def test_the_last_user_message_is_embedded_and_only_text_is() -> None:
    assert embedded_text(chat(("system", "be brief"), ("user", "  What is 2+2? "))) == "What is 2+2?"
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    assert embedded_text(chat(("user", parts))) == "hello\nthere"
    image = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    assert embedded_text(chat(("user", image))) is None
    assert embedded_text(chat(("user", "hi"), ("assistant", "hello"))) is None  # the last turn is not the user's
    assert embedded_text(chat(("user", "x" * 5000))) is None
    assert embedded_text({"messages": []}) is None


def test_yes_in_two_conversations_lives_in_two_partitions() -> None:
    one = chat(("user", "Shall I delete the database?"), ("assistant", "Are you sure?"), ("user", "yes"))
    two = chat(("user", "Do you want the summary in French?"), ("assistant", "French?"), ("user", "yes"))
    assert key_of(one) != key_of(two)
    again = chat(("user", "Shall I delete the database?"), ("assistant", "Are you sure?"), ("user", "yes please"))
    assert key_of(one) == key_of(again)  # the same conversation: only the last message is compared
    # GPTCache#8: "how old is he?" about two different people.
    obama = chat(("user", "Who was the 44th US president?"), ("assistant", "Barack Obama."), ("user", "how old is he?"))
    biden = chat(("user", "Who was the 46th US president?"), ("assistant", "Joe Biden."), ("user", "how old is he?"))
    assert key_of(obama) != key_of(biden)


def test_earlier_turns_count_by_their_content_words() -> None:
    """A conversation retyped (case, punctuation, greetings, contractions) shares a partition; any other word,
    number, negation or order of words in an earlier turn splits it."""
    one = chat(("user", "Shall I delete the database?"), ("assistant", "Are you sure? It can't be undone."), ("user", "yes"))
    retyped = chat(
        ("user", "hi, shall i delete the database"), ("assistant", "Are you sure?  It cannot be undone"), ("user", "yes")
    )
    assert key_of(one) == key_of(retyped)
    for other in (
        chat(("user", "Shall I delete the test database?"), ("assistant", "Are you sure? It can't be undone."), ("user", "yes")),
        chat(("user", "Shall I delete the database?"), ("assistant", "Are you sure? It can be undone."), ("user", "yes")),
        chat(("user", "Shall I delete the database?"), ("user", "Are you sure? It can't be undone."), ("user", "yes")),
        chat(("user", "Shall I delete database 2?"), ("assistant", "Are you sure? It can't be undone."), ("user", "yes")),
    ):
        assert key_of(other) != key_of(one)
    # Turns that are not plain text (tool calls, named turns) are kept exactly: a casing change splits them.
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}
    with_tool = {
        **chat(("user", "Run f")),
        "messages": [{"role": "user", "content": "Run f"}, call, {"role": "user", "content": "ok?"}],
    }
    named = {**with_tool, "messages": [{"role": "user", "content": "run f"}, call, {"role": "user", "content": "ok?"}]}
    assert key_of(with_tool) == key_of(dict(with_tool)) and key_of(with_tool) != key_of(named)
    # So is a history too long to read word by word on every request.
    long = "Tell me about the history of Rome. " * (CONTEXT_WORDS_CHARS // 30)
    assert key_of(chat(("user", long), ("user", "more"))) != key_of(chat(("user", long.lower()), ("user", "more")))


def test_everything_that_changes_the_answer_splits_partitions() -> None:
    base = chat(("system", "You are terse."), ("user", "Capital of France?"))
    assert key_of(base) == key_of(chat(("system", "You are terse."), ("user", "France's capital city?")))
    assert key_of(base) == key_of({**base, "stream": True, "user": "u1", "seed": 3, "n": 1})
    assert key_of(base) == key_of({**base, "temperature": 0.04})  # the same bucket
    different = [
        chat(("system", "You are verbose."), ("user", "Capital of France?")),
        {**base, "tools": [{"type": "function", "function": {"name": "f"}}]},
        {**base, "response_format": {"type": "json_object"}},
        {**base, "max_tokens": 5},
        {**base, "temperature": 0.7},
        {**base, "model": "gpt-4o-mini"},
    ]
    keys = {key_of(p) for p in different}
    assert key_of(base) not in keys and len(keys) == len(different)
    assert key_of(base, route="other") != key_of(base)
    assert partition(base, "team:a", "r", "other-embedder") != key_of(base)


def test_tenants_never_share_a_partition() -> None:
    payload = chat(("user", "hello"))
    a, b = semantic_key(payload, "team:a", None, "m"), semantic_key(payload, "team:b", None, "m")
    assert a is not None and b is not None
    assert a.partition.startswith("team:a/") and b.partition.startswith("team:b/")
    assert a.partition.split("/")[1] == b.partition.split("/")[1]  # only the tenant differs, and it is part of the key
    assert semantic_key(chat(("user", "hi"), ("assistant", "x")), "team:a", None, "m") is None


def test_the_guard_refuses_other_numbers_and_negations() -> None:
    assert compatible("How do I reset my password?", "What are the steps to reset a password")
    assert not compatible("Is 7 a prime number?", "Is 8 a prime number?")
    assert not compatible("Flights to Paris for 2 people", "Flights to Paris for 3 people")
    assert compatible("What is 1,000 plus 5?", "what's 1000 + 5")
    assert not compatible("Can I use Python 3.11?", "Can't I use Python 3.11?")
    assert not compatible("Should I take the job?", "Should I not take the job?")
    assert compatible("I can't log in", "I cannot log in")
    swapped = "Transfer £50 from my current account to my savings"
    assert not compatible("Transfer £50 from my savings to my current account", swapped)
    assert not compatible("Does the dog bite the man?", "Does the man bite the dog?")
    polite = "Hi, please transfer £50 from my savings to my current account"
    assert compatible(polite, "transfer £50 from savings to current account")


def test_the_same_content_words_are_the_same_question() -> None:
    assert same_words("What's the minimum order for free delivery?", "what is the minimum order for free delivery")
    assert same_words("Hi! What is the notice period to end my tenancy? Cheers", "What is the notice period to end my tenancy?")
    assert same_words("At the college, when is the next open day?", "When is the next open day at the college?")
    assert same_words("Where can I find my invioce history?", "Where can I find my invoice history?")
    assert same_words(
        "What is the bagage allowence for economy passengers?", "What is the baggage allowance for economy passengers?"
    )
    assert not same_words("How do I switch energy supplier?", "How do I change energy supplier?")  # a synonym: the cosine tier's
    assert not same_words("Is the trial free?", "Is the trail free?")  # two dictionary words: not a typo
    assert not same_words("What's Mary's phone number?", "What's Mark's phone number?")  # too short to be taken for a typo
    assert not same_words("Transfer from savings to current", "Transfer from current to savings")


@pytest.mark.parametrize(
    ("asked", "stored", "similarity", "tier"),
    [
        ("what's the minimum order for free delivery", "What is the minimum order for free delivery?", 0.93, "words"),
        ("How do I cancle an order?", "How do I cancel an order?", 0.7, "words"),
        ("How do I cancle an order?", "How do I cancel an order?", WORDS_FLOOR - 0.01, None),  # under the floor
        ("How do I switch energy supplier?", "How do I change energy supplier?", 0.95, None),  # other words, low cosine
        ("How do I switch energy supplier?", "How do I change energy supplier?", DEFAULT_THRESHOLD, "cosine"),
        ("Is 7 a prime number?", "Is 8 a prime number?", 0.999, None),  # the guard holds in both tiers
        ("Transfer £50 from my savings to my current account", "Transfer £50 from my current account to my savings", 0.998, None),
        ("Can I cancel within the cooling-off period?", "Can I cancel after the cooling-off period?", 0.985, None),
    ],
)
def test_decide_serves_in_two_tiers(asked: str, stored: str, similarity: float, tier: str | None) -> None:
    assert decide(asked, stored, similarity) == tier
