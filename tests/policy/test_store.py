"""Policy versions on real databases (an SQLite file and a PostgreSQL server): ids in order,
authors, diffs against the parent, "unless latest" dedupe, lookup by id or label, paging,
and two stores (two processes' worth) appending at once without colliding."""

from __future__ import annotations

import asyncio

from proxy.policy.store import PolicyStore
from proxy.storage.database import Database, open_database

A = "version: a\nrules:\n  - name: all\n    action: {target: gpt-4o}\n"
B = "version: b\nrules:\n  - name: all\n    action: {target: gpt-4o-mini}\n"


async def test_versions_are_numbered_with_author_parent_and_diff(db: Database) -> None:
    store = PolicyStore(db)
    assert await store.latest() is None
    first = await store.add(A, "a-1", "reload-from-file", comment="start-up")
    second = await store.add(B, "b-2", "create", author_key_id="key_1", author_role="admin", comment="cheaper")
    assert first is not None and second is not None
    assert (first.id, first.parent_id, first.diff) == (1, None, "")
    assert (second.id, second.parent_id, second.author_key_id, second.author_role) == (2, 1, "key_1", "admin")
    assert second.diff.splitlines()[:2] == ["--- v1 (a-1)", "+++ v2 (b-2)"]
    assert "-    action: {target: gpt-4o}" in second.diff.splitlines()
    assert "+    action: {target: gpt-4o-mini}" in second.diff.splitlines()
    assert (await store.latest()) == second
    assert await store.latest_id() == (2, "b-2")
    assert (await store.find("1")) == first and (await store.find("a-1")) == first and await store.find("zzz") is None


async def test_unless_latest_adds_nothing_when_the_newest_has_that_version(db: Database) -> None:
    store = PolicyStore(db)
    assert await store.add(A, "a-1", "reload-from-file", unless_latest=True) is not None
    assert await store.add(A, "a-1", "reload-from-file", unless_latest=True) is None
    assert await store.add(B, "b-2", "create") is not None
    again = await store.add(A, "a-1", "reload-from-file", unless_latest=True)  # no longer the newest: recorded
    assert again is not None and again.id == 3


async def test_history_pages_newest_first(db: Database) -> None:
    store = PolicyStore(db)
    for i in range(5):
        await store.add(A if i % 2 else B, f"v{i}", "create")
    page = await store.history(limit=2)
    assert [v.id for v in page] == [5, 4]
    assert [v.id for v in await store.history(limit=10, before=page[-1].id)] == [3, 2, 1]


async def test_two_stores_appending_at_once_get_distinct_ids(db_url: str) -> None:
    first, second = await open_database(db_url), await open_database(db_url)
    try:
        stores = [PolicyStore(first), PolicyStore(second)]
        added = await asyncio.gather(*(stores[i % 2].add(f"{A}# {i}\n", f"v{i}", "create") for i in range(10)))
        ids = sorted(v.id for v in added if v is not None)
        assert ids == list(range(1, 11))
        history = {v.id: v for v in await stores[0].history()}
        for v in history.values():  # each diff is against the parent its row names
            if v.parent_id is not None:
                parent = history[v.parent_id]
                assert v.parent_id == v.id - 1
                assert v.diff.startswith(f"--- v{parent.id} ({parent.version})\n+++ v{v.id} ({v.version})\n"), v.diff
                assert f"-{parent.yaml.splitlines()[-1]}" in v.diff.splitlines()
    finally:
        await first.close()
        await second.close()
