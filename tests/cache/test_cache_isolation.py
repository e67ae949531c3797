"""Tenant isolation, as a property: over random tenants (teams and keys made in the key
store, keys without a team, the master key), prompts and orders of requests, an answer
stored by one tenant is never served to another, and every repeat within a tenant is a hit.

The upstream numbers its answers, so each answer has exactly one owner: the tenant whose
request made the upstream produce it. A model of the cache (a dict keyed by tenant and
prompt) says which requests must be hits and what they must receive.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.cache.exact import tenant
from proxy.pipeline.auth import MASTER
from proxy.settings import CACHE_SCOPES
from tests.cache.conftest import Cached, StartCached
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream, completion

TEAMS = ["alpha", "beta", "gamma"]
# A caller: a new key of a team, or the master key (a tenant of its own).
callers = st.lists(st.sampled_from([*TEAMS, "master"]), min_size=2, max_size=5)


def numbered(fake: FakeUpstream) -> dict[str, str]:
    """Make the upstream answer "answer-<n>"; returns the map of answers to their prompts."""
    produced: dict[str, str] = {}

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        body = completion(payload)
        answer = f"answer-{len(produced)}"
        produced[answer] = payload["messages"][-1]["content"]
        body["choices"][0]["message"]["content"] = answer
        return web.json_response(body)

    fake.handler = handler
    return produced


@pytest.fixture(params=[("memory", "team"), ("memory", "key"), ("redis", "team")], ids=lambda p: "-".join(p))
def isolated(request: pytest.FixtureRequest, start_cached: StartCached) -> tuple[Cached, str]:
    store, scope = request.param
    assert scope in CACHE_SCOPES
    extra = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    return start_cached(scope=scope, **extra), scope


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    who=callers,
    order=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=14),
)
def test_no_answer_crosses_a_tenant(
    isolated: tuple[Cached, str], fake: FakeUpstream, who: list[str], order: list[tuple[int, int]]
) -> None:
    gateway, scope = isolated
    produced = numbered(fake)
    run = uuid.uuid4().hex  # examples share the gateway (and Redis): each asks its own questions
    prompts = [f"{run} question {i}" for i in range(3)]
    keys, tenants = [], []
    for team in who:
        if team == "master":
            keys.append(MASTER_KEY)
            tenants.append(tenant(MASTER, scope))
            continue
        key, principal = gateway.create_key(team)
        keys.append(key)
        tenants.append(tenant(principal, scope))
    clients = [gateway.client_for(k) for k in keys]
    owner: dict[str, str] = {}  # answer -> the tenant it was produced for
    model: dict[tuple[str, str], str] = {}  # (tenant, prompt) -> the answer the cache holds
    try:
        for caller, p in order:
            caller %= len(clients)
            raw = clients[caller].chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": prompts[p]}], temperature=0
            )
            answer = raw.parse().choices[0].message.content
            assert answer is not None
            me = tenants[caller]
            if raw.headers["x-thrifty-cache"] == "exact":
                assert owner[answer] == me, f"{me} was served {answer}, stored by {owner[answer]}"
                assert model[me, prompts[p]] == answer
            else:
                assert raw.headers["x-thrifty-cache"] == "miss"
                assert (me, prompts[p]) not in model, "a repeat within a tenant must be a hit"
                assert answer not in owner and produced[answer] == prompts[p]
                owner[answer] = me
                model[me, prompts[p]] = answer
                gateway.drain()
    finally:
        for client in clients:
            client.close()


# Three wordings of one question: at a low threshold every one is a semantic match of the others,
# so an answer that could cross a tenant (or a scope) through the vector index would be served.
WORDINGS = ["what is the capital of France", "what's the capital city of France", "tell me France's capital"]


@pytest.fixture(params=[("memory", "team"), ("redis", "key")], ids=lambda p: "semantic-" + "-".join(p))
def isolated_semantic(request: pytest.FixtureRequest, start_cached: StartCached) -> tuple[Cached, str]:
    store, scope = request.param
    extra = {"redis_url": request.getfixturevalue("redis_url")} if store == "redis" else {}
    return start_cached(scope=scope, mode="semantic", threshold=0.5, **extra), scope


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    who=callers,
    order=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=12),
)
def test_no_semantic_answer_crosses_a_tenant(
    isolated_semantic: tuple[Cached, str], fake: FakeUpstream, who: list[str], order: list[tuple[int, int]]
) -> None:
    gateway, scope = isolated_semantic
    produced = numbered(fake)
    run = uuid.uuid4().hex  # in the system prompt: each example's entries live in partitions of their own
    system = {"role": "system", "content": f"Conversation {run}."}
    keys, tenants = [], []
    for team in who:
        if team == "master":
            keys.append(MASTER_KEY)
            tenants.append(tenant(MASTER, scope))
            continue
        key, principal = gateway.create_key(team)
        keys.append(key)
        tenants.append(tenant(principal, scope))
    clients = [gateway.client_for(k) for k in keys]
    owner: dict[str, str] = {}
    stored: set[str] = set()  # tenants that have stored an answer in this example
    try:
        for caller, p in order:
            caller %= len(clients)
            raw = clients[caller].chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[system, {"role": "user", "content": WORDINGS[p]}], temperature=0
            )
            answer = raw.parse().choices[0].message.content
            assert answer is not None
            me, status = tenants[caller], raw.headers["x-thrifty-cache"]
            if status in ("exact", "semantic"):
                assert owner[answer] == me, f"{me} was served {answer} ({status}), stored by {owner[answer]}"
            else:
                assert status == "miss" and me not in stored, "a tenant with an entry must hit one of its wordings"
                assert answer not in owner and produced[answer] == WORDINGS[p]
                owner[answer] = me
                stored.add(me)
                gateway.drain()
    finally:
        for client in clients:
            client.close()
