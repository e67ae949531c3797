"""One small async interface over the two stores thrifty writes to: SQLite and PostgreSQL.

SQLite (the embedded default) runs on one dedicated thread, so the event loop never
blocks on disk and every statement sees the one connection in order; the file is opened
in WAL mode so readers (``thrifty report``, another process) never wait on the writer.
PostgreSQL goes through an asyncpg pool. SQL is written once with ``?`` placeholders and
rewritten to ``$1, $2, ...`` for PostgreSQL. Schema migrations live in ``migrations``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from proxy.errors import ConfigError

Row = tuple[Any, ...]


class Database(Protocol):
    dialect: str

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def close(self) -> None: ...


async def open_database(url: str) -> Database:
    """Connect to ``sqlite:///path`` or ``postgresql://...`` and bring the schema up to date."""
    from proxy.storage import migrations

    db: Database
    if url.startswith("sqlite://"):
        db = await SQLiteDatabase.open(sqlite_path(url))
    elif url.startswith(("postgresql://", "postgres://")):
        db = await PostgresDatabase.open(url)
    else:
        raise ConfigError(f"ledger.url: unsupported database URL scheme in {url.split(':', 1)[0]!r}")
    try:
        if isinstance(db, PostgresDatabase):
            async with db.exclusive():  # several replicas may start at once
                await migrations.apply(db)
        else:
            await migrations.apply(db)
    except BaseException:
        await db.close()
        raise
    return db


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` absolute."""
    path = url.removeprefix("sqlite://")
    if path.startswith("/"):
        path = path[1:]
    if path in ("", ":memory:"):
        return ":memory:"
    return path


class _Lane:
    """One SQLite connection on its own thread: statements on it run one at a time, in order."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor):
        self.conn = conn
        self.executor = executor

    @classmethod
    async def open(cls, path: str, name: str) -> _Lane:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"thrifty-sqlite-{name}")

        def connect() -> sqlite3.Connection:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise ConfigError(f"ledger.url: cannot open SQLite database {path!r}: {exc}") from None
        return cls(conn, executor)

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def close(self) -> None:
        await self.run(self.conn.close)
        self.executor.shutdown(wait=True)


class SQLiteDatabase:
    """Writes on one connection and thread, reads on another (WAL lets them overlap), so a
    key lookup or a large report never waits behind a ledger batch, nor a batch behind them.
    An in-memory database has one connection for both (two would be two databases)."""

    dialect = "sqlite"

    def __init__(self, writer: _Lane, reader: _Lane):
        self._writer = writer
        self._reader = reader
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> SQLiteDatabase:
        writer = await _Lane.open(path, "write")
        if path == ":memory:":
            return cls(writer, writer)
        try:
            reader = await _Lane.open(path, "read")
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._writer.run(self._writer.conn.execute, sql, args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._writer.run(self._executemany, sql, list(rows))

    def _executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        # One transaction for the batch. The connection is in autocommit mode
        # (isolation_level=None), where ``with conn:`` begins nothing: BEGIN it here.
        conn = self._writer.conn
        conn.execute("BEGIN")
        try:
            conn.executemany(sql, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        conn = self._reader.conn
        result: list[Row] = await self._reader.run(lambda: conn.execute(sql, args).fetchall())
        return result

    async def close(self) -> None:
        if self._closed:  # idempotent, as asyncpg's pool is
            return
        self._closed = True
        if self._reader is not self._writer:
            await self._reader.close()
        await self._writer.close()


_PLACEHOLDER = re.compile(r"\?")


def to_postgres(sql: str) -> str:
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, pool: Any):
        self._pool = pool

    @classmethod
    async def open(cls, url: str) -> PostgresDatabase:
        import asyncpg  # imported only when PostgreSQL is configured

        try:
            pool = await asyncpg.create_pool(url, min_size=2, max_size=8, command_timeout=30)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(f"ledger.url: cannot connect to PostgreSQL: {exc}") from None
        return cls(pool)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold a cluster-wide advisory lock (schema changes by one replica at a time)."""
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock(74837201)")
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock(74837201)")

    async def execute(self, sql: str, *args: Any) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(to_postgres(sql), *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(to_postgres(sql), list(rows))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._pool.acquire() as conn:
            records = await conn.fetch(to_postgres(sql), *args)
        return [tuple(r) for r in records]

    async def close(self) -> None:
        await self._pool.close()
