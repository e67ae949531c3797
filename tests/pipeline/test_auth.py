"""Authenticator: the master key, cached key lookups, negative caching, TTL and revocation.

The store is a real KeyStore on an in-memory SQLite database; the only thing a test adds
is a counter around its ``find`` (to see when the cache answers) and a clock it moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.pipeline.auth import MASTER, Authenticator, Principal, bearer_token
from proxy.storage.database import Database, open_database
from proxy.storage.keys import KeyRecord, KeyStore

MASTER_KEY = "sk-master-0123456789abcdef"
TTL = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """A real KeyStore; counts how often the authenticator really asks it."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.lookups = 0

    async def find(self, key_hash: str) -> KeyRecord | None:
        self.lookups += 1
        return await self.store.find(key_hash)


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = await open_database("sqlite:///:memory:")
    yield database
    await database.close()


@pytest.fixture
def store(db: Database) -> CountingStore:
    return CountingStore(KeyStore(db))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(store: CountingStore, clock: Clock) -> Authenticator:
    return Authenticator(MASTER_KEY, store.find, TTL, clock=clock)


async def test_master_key_is_the_master_principal_without_a_lookup(auth: Authenticator, store: CountingStore) -> None:
    principal = await auth.authenticate(MASTER_KEY)
    assert principal == MASTER
    assert principal.is_master and principal.role == "admin"
    assert store.lookups == 0


@pytest.mark.parametrize("token", [None, ""])
async def test_a_missing_key_is_refused(auth: Authenticator, token: str | None) -> None:
    with pytest.raises(AuthenticationFailed, match="Missing API key") as caught:
        await auth.authenticate(token)
    assert caught.value.status == 401


async def test_without_a_master_key_the_master_string_is_just_an_unknown_key(store: CountingStore) -> None:
    auth = Authenticator(None, store.find, TTL)
    with pytest.raises(AuthenticationFailed, match="Invalid API key"):
        await auth.authenticate(MASTER_KEY)
    assert store.lookups == 1


async def test_a_virtual_key_becomes_its_principal_and_is_cached(auth: Authenticator, store: CountingStore, clock: Clock) -> None:
    key, record = await store.store.create("research", "notebook", "finance")
    first = await auth.authenticate(key)
    assert first == Principal(record.id, "research", "notebook", "finance")
    assert not first.is_master
    clock.now += TTL - 0.5
    assert await auth.authenticate(key) == first
    assert store.lookups == 1
    clock.now += 1.0  # past the TTL: the store is asked again
    assert await auth.authenticate(key) == first
    assert store.lookups == 2


async def test_unknown_keys_are_cached_too(auth: Authenticator, store: CountingStore, clock: Clock) -> None:
    for _ in range(5):
        with pytest.raises(AuthenticationFailed, match="Invalid API key"):
            await auth.authenticate("sk-thr-no-such-key")
    assert store.lookups == 1  # a flood of bad keys does not reach the store
    clock.now += TTL + 0.1
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate("sk-thr-no-such-key")
    assert store.lookups == 2


async def test_a_cached_miss_hides_no_other_key(auth: Authenticator, store: CountingStore) -> None:
    key, _ = await store.store.create("team")
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key + "x")
    assert (await auth.authenticate(key)).team == "team"
    assert store.lookups == 2


async def test_a_revoked_key_keeps_working_only_until_the_ttl(auth: Authenticator, store: CountingStore, clock: Clock) -> None:
    key, record = await store.store.create("team", "app")
    await auth.authenticate(key)
    assert await store.store.revoke(record.id)
    clock.now += TTL / 2
    assert (await auth.authenticate(key)).key_id == record.id  # cached: the bound the TTL sets
    clock.now += TTL
    with pytest.raises(AuthenticationFailed, match="Invalid API key"):
        await auth.authenticate(key)


async def test_a_revoked_key_is_refused_on_first_sight(auth: Authenticator, store: CountingStore) -> None:
    key, record = await store.store.create("team")
    await store.store.revoke(record.id)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(key)


async def test_each_key_gets_its_own_principal(auth: Authenticator, store: CountingStore) -> None:
    keys = [await store.store.create(f"team-{i}", role=role) for i, role in enumerate(("user", "admin"))]
    principals = [await auth.authenticate(key) for key, _ in keys]
    assert [p.team for p in principals] == ["team-0", "team-1"]
    assert [p.key_id for p in principals] == [record.id for _, record in keys]


def test_require_lets_the_master_and_the_named_roles_through() -> None:
    MASTER.require("finance")
    Principal("key_1", "t", None, "finance").require("finance", "admin")
    with pytest.raises(PermissionDenied, match=r"role \(user\)") as caught:
        Principal("key_2", "t", None, "user").require("finance", "admin")
    assert caught.value.status == 403


@pytest.mark.parametrize(
    ("authorization", "api_key", "expected"),
    [
        ("Bearer sk-abc", None, "sk-abc"),
        ("bearer sk-abc", None, "sk-abc"),
        ("BEARER sk-abc", None, "sk-abc"),
        ("Bearer   sk-abc  ", None, "sk-abc"),
        ("Bearer", None, None),
        ("Bearer    ", None, None),
        ("Basic dXNlcjpwYXNz", None, None),
        ("sk-abc", None, None),
        (None, "sk-header", "sk-header"),
        (None, "  sk-header ", "sk-header"),
        ("", "sk-header", "sk-header"),
        ("Bearer sk-abc", "sk-header", "sk-abc"),
        (None, None, None),
        (None, "", None),
    ],
)
def test_bearer_token(authorization: str | None, api_key: str | None, expected: str | None) -> None:
    assert bearer_token(authorization, api_key) == expected
