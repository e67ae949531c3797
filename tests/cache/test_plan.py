"""The cache stage's plan: a routing rule's cache settings (mode, TTL, threshold, scope) override
the gateway's ``cache:`` config field by field; the ``cache:`` keys of the semantic cache are
validated with the line of the mistake."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.cache.semantic_key import DEFAULT_THRESHOLD
from proxy.cache.store import MemoryStore
from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.pipeline.auth import Principal
from proxy.pipeline.cache import ResponseCache, semantic_wanted
from proxy.pipeline.exchange import Exchange
from proxy.policy.model import Decision, RouteCache
from proxy.settings import CacheConfig

ALICE = Principal("key-1", "search", None, "user")


def cache_for(**config: Any) -> ResponseCache:
    # plan() reads only the embedder's name
    semantic = SimpleNamespace(embedder=SimpleNamespace(name="minilm"), stats=lambda: {})
    return ResponseCache(MemoryStore(100, 1 << 20), CacheConfig(**config), semantic=semantic)  # type: ignore[arg-type]


def exchange(route: RouteCache | None = None, **payload: Any) -> Exchange:
    out = Exchange("r1", "chat/completions", principal=ALICE)
    out.payload = {"model": "gpt-4o", "temperature": 0, "messages": [{"role": "user", "content": "hello"}], **payload}
    if route is not None:
        out.decision = Decision("rule", "gpt-4o", "v1", cache=route)
    return out


def test_the_gateway_default_is_the_exact_cache_only() -> None:
    plan = cache_for().plan(exchange(), None)
    assert plan is not None and plan.semantic is None and plan.ttl == CacheConfig.ttl_seconds


def test_a_rule_turns_the_semantic_cache_on_with_its_own_threshold_ttl_and_scope() -> None:
    ex = exchange(RouteCache(mode="semantic", ttl_seconds=30, threshold=0.9, scope="key"))
    plan = cache_for().plan(ex, None)
    assert plan is not None and plan.semantic is not None
    assert (plan.threshold, plan.ttl, plan.tenant) == (0.9, 30, "key:key-1")
    assert plan.semantic.partition.startswith("key:key-1/") and plan.semantic.text == "hello"
    assert plan.key.startswith("thrifty:cache:{key:key-1}:exact:")


def test_none_fields_fall_back_to_the_gateway_config() -> None:
    plan = cache_for(mode="semantic", threshold=0.97, ttl_seconds=99).plan(exchange(RouteCache(scope="key")), None)
    assert plan is not None and plan.semantic is not None and (plan.threshold, plan.ttl) == (0.97, 99)
    plan = cache_for(mode="semantic").plan(exchange(), None)
    assert plan is not None and plan.threshold == DEFAULT_THRESHOLD and plan.tenant == "team:search"
    plan = cache_for(mode="semantic").plan(exchange(RouteCache(mode="exact")), None)
    assert plan is not None and plan.semantic is None


def test_a_semantic_rule_without_a_semantic_cache_gets_the_exact_cache(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache(MemoryStore(100, 1 << 20), CacheConfig())
    for _ in range(2):
        plan = cache.plan(exchange(RouteCache(mode="semantic")), None)
        assert plan is not None and plan.semantic is None and plan.read
    assert cache.stats()["semantic_unavailable"] == 2
    assert sum("not running" in r.message for r in caplog.records) == 1  # said once


def test_off_bypasses_and_uncacheable_requests_bypass() -> None:
    cache = cache_for(mode="semantic")
    off = exchange(RouteCache(mode="off"))
    assert cache.plan(off, None) is None and off.cache == "bypass"
    assert cache_for(mode="off").plan(exchange(), None) is None
    assert cache.plan(exchange(RouteCache(mode="semantic"), temperature=0.7), None) is None
    assert cache.stats()["bypass"] == 2


def test_the_semantic_cache_is_loaded_only_when_something_asks_for_it() -> None:
    policy = SimpleNamespace(rules=[SimpleNamespace(action=SimpleNamespace(cache=RouteCache(mode="semantic")))])
    plain = SimpleNamespace(rules=[SimpleNamespace(action=SimpleNamespace(cache=None))])
    assert semantic_wanted(CacheConfig(mode="semantic"), None)
    assert semantic_wanted(CacheConfig(), policy)  # type: ignore[arg-type]
    assert not semantic_wanted(CacheConfig(), plain)  # type: ignore[arg-type]
    assert not semantic_wanted(CacheConfig(enabled=False, mode="semantic"), None)


def config(tmp_path: Path, cache: str) -> Path:
    path = tmp_path / "thrifty.yaml"
    models = "models:\n  - {name: emb, provider: openai, base_url: 'http://127.0.0.1:1/v1'}\n"
    path.write_text(models + "cache:\n" + textwrap.indent(textwrap.dedent(cache), "  "))
    return path


def test_the_semantic_keys_are_read_and_checked(tmp_path: Path) -> None:
    read = load_settings(str(config(tmp_path, "mode: semantic\nthreshold: 0.97\nembedder: emb\nsemantic_max_per_tenant: 10\n")))
    assert (read.cache.mode, read.cache.threshold, read.cache.embedder, read.cache.semantic_max_per_tenant) == (
        "semantic",
        0.97,
        "emb",
        10,
    )
    assert load_settings(str(config(tmp_path, "ttl_seconds: 5\n"))).cache.mode == "exact"
    for bad, says in [
        ("mode: fuzzy\n", "cache.mode"),
        ("threshold: 1.5\n", "cache.threshold"),
        ("threshold: true\n", "cache.threshold"),
        ("embedder: nowhere\n", "cache.embedder"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_settings(str(config(tmp_path, bad)))
        assert says in str(error.value) and ":4" in str(error.value)
