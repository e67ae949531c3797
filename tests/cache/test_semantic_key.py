"""Semantic keys: what is embedded, and which entries a request may ever be compared with."""

from __future__ import annotations

from typing import Any

from proxy.cache.semantic_key import compatible, embedded_text, partition, semantic_key


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
