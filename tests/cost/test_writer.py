"""The ledger writer against real stores (SQLite files, PostgreSQL): batches land, an outage
buffers then spills, and when the store returns every record is written exactly once."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from proxy.cost.record import LedgerRecord
from proxy.cost.writer import LedgerWriter
from proxy.storage.database import Database, open_database
from tests.services import postgres_server, postgres_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def record(i: int = 0, **fields: Any) -> LedgerRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "request_id": f"req-{i}",
        "ts": 1_700_000_000.0 + i,
        "endpoint": "chat/completions",
        "key_id": "master",
        "team": "t",
        "app": None,
        "user_id": None,
        "tags": None,
        "requested_model": "gpt-4o",
        "served_model": "gpt-4o",
        "provider": "openai",
        "route": None,
        "policy_version": None,
        "cache": "miss",
        "stream": i % 2 == 0,
        "prompt_tokens_before": 10,
        "prompt_tokens": 10,
        "completion_tokens": i,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "usage_source": "upstream",
        "price_input": "2.5",
        "price_output": "10",
        "price_cached_input": "1.25",
        "price_source": "litellm",
        "cost_nusd": 25_000 + 10_000 * i,
        "baseline_nusd": 25_000 + 10_000 * i,
        "savings_cache_nusd": 0,
        "savings_routing_nusd": 0,
        "savings_pruning_nusd": 0,
        "overhead_nusd": 0,
        "latency_ms": 1.5,
        "upstream_ms": 1.0,
        "ttft_ms": None,
        "status": 200,
        "error_code": None,
    }
    values.update(fields)
    return LedgerRecord(**values)


@dataclass
class Store:
    """A ledger store the test can take away (rename the table) and give back."""

    url: str
    run: Callable[[str], Any]  # runs one statement on a connection of the test's own

    async def take_down(self) -> None:
        await self.run("ALTER TABLE ledger RENAME TO ledger_down")

    async def bring_back(self) -> None:
        await self.run("ALTER TABLE ledger_down RENAME TO ledger")

    async def ids(self) -> list[str]:
        rows = await self.run("SELECT id FROM ledger")
        return [r[0] for r in rows]


def sqlite_store(path: Path) -> Store:
    def run(sql: str) -> Any:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    async def run_async(sql: str) -> Any:
        return await asyncio.to_thread(run, sql)

    return Store(f"sqlite:///{path}", run_async)


def postgres_store(url: str) -> Store:
    async def run(sql: str) -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    return Store(url, run)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "ledger.db")
    return postgres_store(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def db(store: Store) -> AsyncIterator[Database]:
    database = await open_database(store.url)
    yield database
    await database.close()


async def until(predicate: Callable[[], Any], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within} s: {predicate}")
        await asyncio.sleep(0.05)


def spill_lines(spill_dir: Path) -> list[bytes]:
    return [line for path in spill_dir.glob("*") for line in path.read_bytes().splitlines() if line.strip()]


async def test_batches_land_in_the_store(store: Store, db: Database, tmp_path: Path) -> None:
    writer = LedgerWriter(db, tmp_path / "spill", interval=0.01)
    writer.start()
    records = [record(i) for i in range(2500)]  # more than one batch
    for r in records:
        writer.submit(r)
    writer.submit(records[0])  # the same record twice is written once
    try:
        await until(lambda: _count(store, 2500))
        assert sorted(await store.ids()) == sorted(r.id for r in records)
        stored = await db.fetch("SELECT * FROM ledger WHERE id = ?", records[7].id)
        assert _normal(stored[0]) == _normal(records[7].row())
    finally:
        await writer.close()
    assert sorted(await store.ids()) == sorted(r.id for r in records)
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").iterdir())


async def test_an_outage_buffers_spills_the_overflow_and_loses_nothing(store: Store, db: Database, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    writer = LedgerWriter(db, spill, max_buffer=50, interval=0.01)
    writer.start()
    records = [record(i) for i in range(410)]
    try:
        for r in records[:10]:
            writer.submit(r)
        await until(lambda: _count(store, 10))
        await store.take_down()
        for wave in range(4):  # several failed rounds, each spilling past the buffer
            spilled = writer.spilled
            for r in records[10 + 100 * wave : 110 + 100 * wave]:
                writer.submit(r)
            await until(lambda s=spilled: writer.spilled > s)  # type: ignore[misc]
            assert writer.pending == 50
        assert writer.spilled == 350
        assert not writer.healthy
        await store.bring_back()
        await until(lambda: _count(store, 410), within=60)
        await until(lambda: writer.pending == 0 and not spill_lines(spill))
    finally:
        await writer.close()
    assert sorted(await store.ids()) == sorted(r.id for r in records)
    assert writer.healthy


RESTART = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from proxy.cost.writer import LedgerWriter
    from proxy.storage.database import open_database

    async def main(url: str, spill: Path) -> None:
        db = await open_database(url)
        writer = LedgerWriter(db, spill, interval=0.01)
        writer.start()
        deadline = time.monotonic() + 30
        while any(p.is_file() for p in spill.iterdir()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        print(sum(1 for p in spill.iterdir() if p.is_file()))
        await writer.close()
        await db.close()

    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
    """
)


async def test_close_with_the_store_down_spills_everything_and_a_restart_replays_it(
    store: Store, db: Database, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    writer = LedgerWriter(db, spill, max_buffer=20, interval=0.01)
    writer.start()
    await store.take_down()
    records = [record(i) for i in range(90)]
    for r in records[:50]:
        writer.submit(r)
    await until(lambda: writer.spilled >= 30)  # overflow spilled while running
    for r in records[50:]:
        writer.submit(r)
    await writer.close()  # the store is still down: everything goes to disk

    assert writer.pending == 0
    lines = spill_lines(spill)
    assert sorted(orjson.loads(line)["id"] for line in lines) == sorted(r.id for r in records)

    await store.bring_back()
    assert await store.ids() == []
    restart = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RESTART, store.url, str(spill), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(restart.communicate(), 90)
    assert restart.returncode == 0, err.decode()
    assert out.strip() == b"0", "the restarted writer left spill files behind"
    assert sorted(await store.ids()) == sorted(r.id for r in records)
    assert not any(p.is_file() for p in spill.iterdir())


async def test_a_torn_last_line_is_skipped_and_the_others_are_written(store: Store, db: Database, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    records = [record(i) for i in range(5)]
    torn = orjson.dumps(record(99).to_json())[:57]  # a crash mid-write: no closing brace, no newline
    path = spill / "ledger-4242-1700000000.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r.to_json()) + b"\n" for r in records) + torn)
    os.utime(path, (time.time() - 60, time.time() - 60))  # left by a process that died a minute ago
    writer = LedgerWriter(db, spill, interval=0.01)
    writer.start()
    try:
        await until(lambda: _count(store, 5))
        await until(lambda: not any(spill.iterdir()))
    finally:
        await writer.close()
    assert sorted(await store.ids()) == sorted(r.id for r in records)


async def _count(store: Store, expected: int) -> bool:
    ids = await store.ids()
    assert len(ids) <= expected, f"{len(ids)} rows, more than the {expected} submitted"
    return len(ids) == expected


def _normal(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(int(v) if isinstance(v, bool) else v for v in row)
