"""The database layer on SQLite and PostgreSQL: migrations, batches, locks, bad URLs.

Also checks the shared test services themselves (``tests.services``): whichever PostgreSQL
and Redis the session got, local or embedded, answer.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path
from subprocess import PIPE

import pytest
import redis.asyncio as aioredis

from proxy.errors import ConfigError
from proxy.storage import migrations
from proxy.storage.database import Database, PostgresDatabase, open_database, sqlite_path, to_postgres
from tests.services import free_port

LATEST = migrations.MIGRATIONS[-1][0]


async def versions(db: Database) -> list[int]:
    return [r[0] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY version")]


async def test_migrations_run_twice_change_nothing(db_url: str) -> None:
    for _ in range(2):
        db = await open_database(db_url)
        try:
            await migrations.apply(db)  # and once more on the same connection
            assert await versions(db) == [v for v, _ in migrations.MIGRATIONS]
            assert await db.fetch("SELECT COUNT(*) FROM api_keys") == [(0,)]
        finally:
            await db.close()


async def test_a_newer_schema_is_refused_by_name(db_url: str) -> None:
    db = await open_database(db_url)
    await db.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)", LATEST + 1, 0.0)
    await db.close()
    with pytest.raises(ConfigError, match=rf"schema version {LATEST + 1}, newer than this thrifty \({LATEST}\)"):
        await open_database(db_url)


async def test_execute_fetch_and_executemany(db: Database) -> None:
    await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    await db.executemany("INSERT INTO t (id, name) VALUES (?, ?)", [(1, "a"), (2, "b"), (3, None)])
    assert await db.fetch("SELECT id, name FROM t WHERE id >= ? ORDER BY id", 2) == [(2, "b"), (3, None)]
    await db.execute("UPDATE t SET name = ? WHERE id = ?", "z", 3)
    assert await db.fetch("SELECT name FROM t WHERE id = ?", 3) == [("z",)]


async def test_a_failing_batch_writes_nothing(db: Database) -> None:
    await db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await db.executemany("INSERT INTO t (id) VALUES (?)", [(1,), (2,), (2,)])
    assert await db.fetch("SELECT COUNT(*) FROM t") == [(0,)]
    await db.executemany("INSERT INTO t (id) VALUES (?)", [(1,), (2,)])  # the connection is still usable
    assert await db.fetch("SELECT COUNT(*) FROM t") == [(2,)]


async def test_close_twice_is_harmless(db_url: str) -> None:
    db = await open_database(db_url)
    await db.close()
    await db.close()


async def test_sqlite_is_in_wal_mode_and_makes_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    db = await open_database("sqlite:///nested/dir/ledger.db")  # relative to the working directory
    try:
        assert await db.fetch("PRAGMA journal_mode") == [("wal",)]
    finally:
        await db.close()
    assert (tmp_path / "nested" / "dir" / "ledger.db").is_file()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///thrifty.db", "thrifty.db"),
        ("sqlite:///data/thrifty.db", "data/thrifty.db"),
        ("sqlite:////var/lib/thrifty.db", "/var/lib/thrifty.db"),
        ("sqlite://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_path(url: str, path: str) -> None:
    assert sqlite_path(url) == path


def test_placeholders_become_numbered_for_postgres() -> None:
    sql = "UPDATE t SET a = ?, b = ? WHERE id = ?"
    assert to_postgres(sql) == "UPDATE t SET a = $1, b = $2 WHERE id = $3"


async def test_an_unusable_sqlite_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open SQLite database"):
        await open_database(f"sqlite:///{tmp_path}")  # a directory


async def test_an_unreachable_postgres_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot connect to PostgreSQL"):
        await open_database(f"postgresql://postgres@127.0.0.1:{free_port()}/thrifty")


async def test_an_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unsupported database URL scheme in 'mysql'"):
        await open_database("mysql://localhost/thrifty")


async def test_the_postgres_migration_lock_excludes(postgres_url: str) -> None:
    first, second = await PostgresDatabase.open(postgres_url), await PostgresDatabase.open(postgres_url)
    entered = asyncio.Event()

    async def take_second() -> None:
        async with second.exclusive():
            entered.set()

    try:
        async with first.exclusive():
            waiter = asyncio.create_task(take_second())
            waiting = "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            for _ in range(300):  # until the second connection is seen queued on the lock
                if (await first.fetch(waiting))[0][0] >= 1:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the second holder never queued on the advisory lock")
            assert not entered.is_set()
        await asyncio.wait_for(waiter, 30)
        assert entered.is_set()
    finally:
        await first.close()
        await second.close()


_MIGRATE = textwrap.dedent(
    """
    import asyncio, pathlib, sys, time
    from proxy.storage.database import open_database

    url, go = sys.argv[1], pathlib.Path(sys.argv[2])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)

    async def main():
        db = await open_database(url)
        await db.close()

    asyncio.run(main())
    """
)


async def test_concurrent_migrations_from_several_processes(postgres_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    processes = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", _MIGRATE, postgres_url, str(go), stdout=PIPE, stderr=PIPE)
        for _ in range(6)
    ]
    try:
        for process in processes:  # every process has imported and waits at the start line
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
        go.touch()
        results = [await asyncio.wait_for(p.communicate(), 60) for p in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert [p.returncode for p in processes] == [0] * len(processes), [err.decode() for _, err in results]
    db = await open_database(postgres_url)
    try:
        assert await versions(db) == [v for v, _ in migrations.MIGRATIONS]
    finally:
        await db.close()


async def test_the_redis_service_answers(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        info = await client.info("server")
        assert info.get("redis_version")
    finally:
        await client.aclose()


async def test_sqlite_reads_do_not_wait_behind_a_write(tmp_path: Path) -> None:
    """Reads (key lookups, reports) have their own connection: an open write transaction,
    as a ledger batch holds, neither blocks them nor shows them uncommitted rows."""
    db = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await db.execute("BEGIN IMMEDIATE")
        await db.execute(
            "INSERT INTO api_keys (id, key_hash, prefix, team, role, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            "key_1",
            "h",
            "sk-thr-x",
            "t",
            "user",
            0.0,
        )
        assert await asyncio.wait_for(db.fetch("SELECT COUNT(*) FROM api_keys"), 5) == [(0,)]
        await db.execute("COMMIT")
        assert await db.fetch("SELECT COUNT(*) FROM api_keys") == [(1,)]
    finally:
        await db.close()


async def test_an_in_memory_sqlite_database_is_one_database(tmp_path: Path) -> None:
    db = await open_database("sqlite:///:memory:")
    try:
        await db.execute("CREATE TABLE t (x INTEGER)")
        await db.executemany("INSERT INTO t VALUES (?)", [(1,), (2,)])
        assert await db.fetch("SELECT SUM(x) FROM t") == [(3,)]
    finally:
        await db.close()
