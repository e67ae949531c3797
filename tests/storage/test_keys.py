"""KeyStore on SQLite and on PostgreSQL: create, find, list, revoke; keys stored only hashed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.storage.database import Database, open_database, sqlite_path
from proxy.storage.keys import KEY_PREFIX, KeyStore, hash_key


@pytest.fixture
def store(db: Database) -> KeyStore:
    return KeyStore(db)


async def test_create_returns_the_key_once_and_find_looks_it_up_by_hash(store: KeyStore) -> None:
    key, record = await store.create("research", "notebook", "finance")
    assert key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) + 40
    assert record.id.startswith("key_")
    assert record.prefix == key[: len(KEY_PREFIX) + 4]
    assert (record.team, record.app, record.role, record.revoked_at) == ("research", "notebook", "finance", None)
    assert record.active
    assert await store.find(hash_key(key)) == record
    assert await store.find(key) is None  # the plain key is not what is stored
    assert await store.find(hash_key(key + "x")) is None


async def test_defaults_are_no_app_and_role_user(store: KeyStore) -> None:
    key, record = await store.create("ops")
    found = await store.find(hash_key(key))
    assert found is not None
    assert (found.app, found.role) == (None, "user")
    assert found.created_at == pytest.approx(record.created_at)


async def test_an_unknown_role_is_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="role must be one of"):
        await store.create("ops", role="root")
    assert await store.list(include_revoked=True) == []


async def test_keys_are_distinct(store: KeyStore) -> None:
    created = [await store.create("team") for _ in range(20)]
    assert len({key for key, _ in created}) == 20
    assert len({record.id for _, record in created}) == 20


async def test_list_in_creation_order_and_revoke(store: KeyStore) -> None:
    records = [(await store.create(team, app))[1] for team, app in (("a", "x"), ("b", None), ("c", "z"))]
    assert [r.id for r in await store.list()] == [r.id for r in records]
    assert await store.revoke(records[1].id) is True
    assert await store.revoke(records[1].id) is False  # revocation is not repeated or undone
    assert await store.revoke("key_nosuchkey") is False
    assert [r.team for r in await store.list()] == ["a", "c"]
    every = await store.list(include_revoked=True)
    assert [r.team for r in every] == ["a", "b", "c"]
    revoked = every[1]
    assert not revoked.active
    assert revoked.revoked_at is not None and revoked.revoked_at >= revoked.created_at


async def test_find_returns_a_revoked_key_marked_inactive(store: KeyStore) -> None:
    key, record = await store.create("team")
    await store.revoke(record.id)
    found = await store.find(hash_key(key))
    assert found is not None and found.id == record.id and not found.active


async def test_keys_outlive_the_connection(db_url: str) -> None:
    first = await open_database(db_url)
    try:
        key, record = await KeyStore(first).create("team", "app")
    finally:
        await first.close()
    second = await open_database(db_url)
    try:
        assert await KeyStore(second).find(hash_key(key)) == record
    finally:
        await second.close()


async def _every_cell(db: Database) -> list[str]:
    if db.dialect == "sqlite":
        tables = [r[0] for r in await db.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")]
    else:
        tables = [r[0] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    cells: list[str] = []
    for table in tables:
        for row in await db.fetch(f'SELECT * FROM "{table}"'):
            cells.extend(str(cell) for cell in row)
    return cells


async def test_the_plain_key_is_stored_nowhere(db: Database, db_url: str, store: KeyStore) -> None:
    keys = [(await store.create("team", "app"))[0] for _ in range(3)]
    cells = await _every_cell(db)
    for key in keys:
        assert hash_key(key) in cells
        assert not any(key in cell or key[len(KEY_PREFIX) :] in cell for cell in cells)
    if db.dialect == "sqlite":
        await db.close()  # the file, its WAL and its shared memory, as they lie on disk
        path = Path(sqlite_path(db_url))
        raw = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))
        for key in keys:
            assert key[len(KEY_PREFIX) :].encode() not in raw
            assert hash_key(key).encode() in raw


async def test_the_key_hash_is_unique_in_the_schema(db: Database, db_url: str) -> None:
    await KeyStore(db).create("team")
    rows = await db.fetch("SELECT key_hash FROM api_keys")
    duplicate = ("key_dup", rows[0][0], "sk-thr-dup", "team", None, "user", 0.0)
    insert = "INSERT INTO api_keys (id, key_hash, prefix, team, app, role, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    if db.dialect == "postgresql":
        import asyncpg

        errors = (asyncpg.UniqueViolationError,)
    with pytest.raises(errors):
        await db.execute(insert, *duplicate)
