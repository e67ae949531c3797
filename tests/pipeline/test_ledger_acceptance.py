"""Acceptance: 10,000 requests through the proxy on a PostgreSQL ledger, with the ledger
table gone for a third of the run, reconcile exactly: 10,000 records, and the stored cost
sums to the sum of the x-thrifty-cost-usd headers to the nano-dollar."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from proxy.app_state import GATEWAY
from proxy.settings import LedgerConfig, Settings
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import postgres_server, postgres_url  # noqa: F401

TOTAL = 10_000
CONCURRENCY = 50
DOWN_AT, UP_AT = 3_000, 6_000


class Outage:
    """Renames the ledger table away once ``DOWN_AT`` requests are done, and back at ``UP_AT``."""

    def __init__(self, url: str):
        self.url = url
        self.done = 0
        self.changes: list[asyncio.Task[None]] = []

    def completed(self) -> None:
        self.done += 1
        if self.done == DOWN_AT:
            self.changes.append(asyncio.create_task(self._run("ALTER TABLE ledger RENAME TO ledger_offline")))
        elif self.done == UP_AT:
            self.changes.append(asyncio.create_task(self._after(self.changes[-1], "ALTER TABLE ledger_offline RENAME TO ledger")))

    async def _after(self, first: asyncio.Task[None], sql: str) -> None:
        await first
        await self._run(sql)

    async def _run(self, sql: str) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


async def fire(url: str, outage: Outage) -> tuple[Decimal, list[str]]:
    """Every request, ``CONCURRENCY`` at a time; the sum of their cost headers and their ids."""
    indexes = iter(range(TOTAL))
    total = Decimal(0)
    ids: list[str] = []
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        for i in indexes:
            body: dict[str, Any] = {
                "model": "gpt-4o" if i % 3 else "gpt-4o-mini",
                "messages": [{"role": "user", "content": " ".join(itertools.repeat("tok", 1 + i % 97))}],
            }
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                assert response.status == 200, await response.text()
                total += Decimal(response.headers["x-thrifty-cost-usd"])
                ids.append(response.headers["x-request-id"])
            outage.completed()

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    await asyncio.gather(*outage.changes)
    return total, ids


async def test_ten_thousand_requests_with_an_outage_reconcile_exactly(
    upstream: tuple[FakeUpstream, ThreadServer],
    start_gateway: Callable[[Settings], ThreadServer],
    postgres_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    spill = tmp_path / "spill"
    base = settings_for(upstream[1].url, tmp_path)
    settings = replace(base, ledger=LedgerConfig(url=postgres_url, spill_dir=str(spill), buffer_records=1_000))
    gateway = start_gateway(settings)

    started = time.monotonic()
    outage = Outage(postgres_url)
    header_sum, ids = await fire(gateway.url, outage)
    elapsed = time.monotonic() - started
    gateway.stop()  # the writer flushes what it still holds before the database closes
    assert gateway.app is not None
    writer = gateway.app[GATEWAY].ledger.writer
    print(f"\n{TOTAL} requests in {elapsed:.1f} s; {writer.spilled} records spilled during the outage")

    assert len(ids) == len(set(ids)) == TOTAL
    assert writer.spilled > 0, "the outage never reached the spill file"
    conn = await asyncpg.connect(postgres_url)
    try:
        count, distinct, cost = await conn.fetchrow("SELECT COUNT(*), COUNT(DISTINCT request_id), SUM(cost_nusd) FROM ledger")
        stored_ids = {r[0] for r in await conn.fetch("SELECT request_id FROM ledger")}
    finally:
        await conn.close()
    assert (count, distinct) == (TOTAL, TOTAL)
    assert stored_ids == set(ids)
    assert cost > 0 and Decimal(cost) == header_sum * 1_000_000_000
    assert not any(p.is_file() for p in spill.iterdir())
