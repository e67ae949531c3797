"""The exact cache's pure parts: what is cacheable, the key, the tenant, entries (stored,
reassembled from a stream, replayed), the in-process LRU, the fail-open wrapper and the
``cache:`` config section."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cache import entry, exact
from proxy.cache.store import FailOpenStore, MemoryStore
from proxy.config import load_settings
from proxy.cost.pricing import Usage
from proxy.errors import ConfigError
from proxy.pipeline.auth import MASTER, Principal
from proxy.settings import CacheConfig
from tests.fake_upstream import completion, stream_chunks

HI: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


# --- what may be cached ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "header", "verdict"),
    [
        ({}, None, exact.CACHEABLE),
        ({"temperature": 0.0}, None, exact.CACHEABLE),
        ({"temperature": 0.7, "seed": 3}, None, exact.CACHEABLE),
        ({"temperature": None, "seed": 3}, None, exact.CACHEABLE),
        ({"temperature": 0.7}, None, exact.BYPASS),
        ({"temperature": None}, None, exact.BYPASS),  # absent means 1
        ({"temperature": False}, None, exact.BYPASS),
        ({"seed": True, "temperature": 1}, None, exact.BYPASS),
        ({"n": 1}, None, exact.CACHEABLE),
        ({"n": 2}, None, exact.BYPASS),
        ({"n": 2, "seed": 1}, None, exact.BYPASS),
        ({}, "no-cache", exact.REFRESH),
        ({}, "No-Cache, max-age=0", exact.REFRESH),
        ({}, "no-store", exact.BYPASS),
        ({}, "max-age=0, no-store", exact.BYPASS),
        ({}, "max-age=60", exact.CACHEABLE),
        ({"temperature": 1}, "no-cache", exact.BYPASS),
    ],
)
def test_cacheability(fields: dict[str, Any], header: str | None, verdict: exact.Cacheability) -> None:
    payload = {k: v for k, v in {**HI, **fields}.items() if v is not None}
    assert exact.cacheability(payload, header) == verdict


# --- the key --------------------------------------------------------------------------------


def test_the_hash_ignores_delivery_fields_and_key_order() -> None:
    base = exact.request_hash(HI)
    delivery = {**HI, "stream": True, "stream_options": {"include_usage": True}, "user": "u1", "metadata": {"a": "b"}}
    assert exact.request_hash(delivery) == base
    assert exact.request_hash(dict(reversed(list(HI.items())))) == base
    assert exact.request_hash({**HI, "temperature": 0.0, "n": 1}) == base
    assert len(base) == 64 and int(base, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o-mini"},
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"seed": 1},
        {"top_p": 0.5},
        {"max_tokens": 5},
        {"max_completion_tokens": 5},
        {"stop": ["\n"]},
        {"logprobs": True},
        {"presence_penalty": 0.1},
        {"a_field_added_later": 1},
    ],
)
def test_every_answer_changing_field_changes_the_hash(change: dict[str, Any]) -> None:
    assert exact.request_hash({**HI, **change}) != exact.request_hash(HI)


def test_the_route_is_in_the_hash() -> None:
    assert exact.request_hash(HI, "cheap") != exact.request_hash(HI) != exact.request_hash(HI, "strong")


def test_tenants_and_keys() -> None:
    member = Principal("key_1", "search", None, "user")
    loner = Principal("key_2", None, None, "user")
    assert exact.tenant(member, "team") == "team:search"
    assert exact.tenant(member, "key") == "key:key_1"
    assert exact.tenant(loner, "team") == "key:key_2"
    assert exact.tenant(MASTER, "team") == "key:master"
    # braces and colons in a team name cannot break the hash tag nor pass for another tenant
    odd = exact.tenant(Principal("k", "a}:key:b{", None, "user"), "team")
    assert "{" not in odd and "}" not in odd and odd.count(":") == 1
    assert exact.cache_key("team:search", "ab" * 32) == "thrifty:cache:{team:search}:exact:" + "ab" * 32


# --- entries ---------------------------------------------------------------------------------


def test_an_entry_round_trips_for_its_tenant_only() -> None:
    response = completion(HI)
    raw = entry.encode("team:a", response, Usage(9, 2), 1700000000.0)
    found = entry.decode(raw, "team:a")
    assert found is not None and found.response == response and found.usage == Usage(9, 2) and found.stored_at == 1700000000.0
    assert entry.decode(raw, "team:b") is None
    assert entry.decode(b"not json", "team:a") is None


def test_a_hit_body_has_a_fresh_id() -> None:
    found = entry.decode(entry.encode("t", completion(HI), None, 0.0), "t")
    assert found is not None
    body = orjson.loads(entry.response_body(found))
    assert body["id"] != "chatcmpl-fake" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == completion(HI)["choices"] and body["usage"] == completion(HI)["usage"]


@pytest.mark.parametrize("finish", ["content_filter", None])
def test_unfinished_answers_are_not_storable(finish: str | None) -> None:
    response = completion(HI)
    response["choices"][0]["finish_reason"] = finish
    assert not entry.storable(response)
    assert entry.storable(completion(HI))


def events_of(chunks: list[dict[str, Any]]) -> list[bytes]:
    return [b"data: " + orjson.dumps(c) for c in chunks]


def test_a_stream_reassembles_into_the_completion_it_streamed() -> None:
    payload = {**HI, "stream_options": {"include_usage": True}}
    chunks = stream_chunks(payload, ["echo:", "hi", "there"])
    usage = chunks[-1]["usage"]
    assembled = entry.assemble(events_of(chunks[:-1]), usage)
    assert assembled is not None and entry.storable(assembled)
    assert assembled["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi there"}
    assert assembled["choices"][0]["finish_reason"] == "stop" and assembled["usage"] == usage


def test_tool_calls_reassemble_and_replay() -> None:
    base = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
    chunks = [
        chunk({"role": "assistant", "content": None}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    assembled = entry.assemble(events_of(chunks), None)
    assert assembled is not None
    message = assembled["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ]
    replayed = entry.replay(entry.Entry("t", assembled, Usage(3, 4), 0.0), include_usage=True)
    events = [e for e in replayed.split(b"\n\n") if e]
    again = entry.assemble(events[:-1], None)
    assert again is not None and again["choices"] == assembled["choices"]
    assert orjson.loads(events[-1][6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_a_replay_is_shaped_like_a_live_stream() -> None:
    long = {**HI, "messages": [{"role": "user", "content": "word " * 100}]}
    found = entry.Entry("t", completion(long), None, 0.0)
    events = [orjson.loads(e[6:]) for e in entry.replay(found, include_usage=False).split(b"\n\n") if e]
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(events) > 4  # the text comes in several pieces
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        == completion(long)["choices"][0]["message"]["content"]
    )
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]


# --- stores ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_memory_store_is_a_bounded_lru_with_expiry() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, max_bytes=10, clock=clock)
    await store.set("a", b"1111", 60)
    await store.set("b", b"2222", 60)
    assert await store.get("a") == b"1111"  # a is now the most recent
    await store.set("c", b"3333", 60)  # over 2 entries (and 10 bytes): b goes
    assert await store.get("b") is None and await store.get("a") == b"1111" and len(store) == 2
    await store.set("big", b"x" * 11, 60)  # larger than the whole store: not kept
    assert await store.get("big") is None and store.size_bytes == 8
    clock.now += 61
    assert await store.get("a") is None and await store.get("c") is None and store.size_bytes == 0


class Broken:
    def __init__(self) -> None:
        self.calls = 0
        self.up = False

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError("refused")
        return b"v"

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.get(key)

    async def close(self) -> None:
        pass


async def test_the_fail_open_store_backs_off_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    clock, inner = Clock(), Broken()
    store = FailOpenStore(inner, clock=clock)
    assert await store.get("k") is None and store.degraded
    for _ in range(50):  # within the back-off nothing reaches the backend, and nothing is logged again
        assert await store.get("k") is None
        await store.set("k", b"v", 60)
    assert inner.calls == 1
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    inner.up = True
    clock.now += 10
    assert await store.get("k") == b"v" and not store.degraded


# --- config ----------------------------------------------------------------------------------


def load(tmp_path: Path, text: str) -> CacheConfig:
    path = tmp_path / "thrifty.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_settings(str(path), env={}).cache


def test_the_cache_section_is_read(tmp_path: Path) -> None:
    text = "cache:\n  redis_url: redis://127.0.0.1:6379/2\n  ttl_seconds: 60\n  scope: key\n  max_entry_bytes: 4096\n"
    cache = load(tmp_path, text)
    assert (cache.redis_url, cache.ttl_seconds, cache.scope, cache.max_entry_bytes) == (
        "redis://127.0.0.1:6379/2",
        60.0,
        "key",
        4096,
    )
    assert load(tmp_path, "models: []\n") == CacheConfig()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("cache:\n  redis_url: http://x\n", 2, "cache.redis_url: must start with redis://"),
        ("cache:\n  scope: app\n", 2, "cache.scope: must be one of team, key"),
        ("cache:\n  ttl_seconds: 0\n", 2, "cache.ttl_seconds: must be a positive number"),
        ("cache:\n  enabled: maybe\n", 2, "cache.enabled: must be true or false"),
        ("cache:\n  colour: red\n", 2, "cache.colour: unknown key"),
    ],
)
def test_a_bad_cache_section_names_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'thrifty.yaml'}:{line}: "), str(caught.value)
    assert message in str(caught.value)
