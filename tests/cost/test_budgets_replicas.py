"""Budgets across replicas: Redis down (requests still served), and the acceptance test, three
``thrifty serve`` processes sharing Redis and PostgreSQL under 200 concurrent requests.

The acceptance test checks the bound stated in ``proxy.cost.budgets``: with Redis up and
estimates that are upper bounds (``max_tokens`` set, tiktoken's prompt count at least the
upstream's), the spend recorded in the ledger never exceeds the hard limit, whatever the
interleaving across processes. Per-process accounting would let each of the three spend the
whole budget, which the same assertions would catch.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import redis
from aiohttp import web

from proxy.app_state import GATEWAY
from proxy.cost.budgets import counter_key
from proxy.cost.tokens import TokenCounter
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.api.conftest import closed_port, wait_until
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_guard import HI, budgeted, client_for, limit
from tests.servers import ThreadServer
from tests.services import free_port, postgres_server, postgres_url, redis_url  # noqa: F401

THRIFTY = Path(sys.executable).parent / "thrifty"
COST = 6_000_000  # what the fake upstream reports for HI: 4 prompt + 2 completion tokens at $0.001


def test_redis_down_requests_are_still_served(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    team = "down-" + secrets.token_hex(4)
    nowhere = f"redis://127.0.0.1:{closed_port()}/0"
    gateway = start_gateway(budgeted(settings_for(upstream[1].url, tmp_path), nowhere, limit("team", team, hard=0.030)))
    statuses = []
    with client_for(gateway, team) as client:
        started = time.monotonic()
        for _ in range(8):
            try:
                client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
                statuses.append(200)
            except openai.RateLimitError:
                statuses.append(429)
            assert wait_until(lambda: gateway.app[GATEWAY].guard.settling == 0)
        elapsed = time.monotonic() - started
    # served, never a client error for Redis; the limit still holds in this process:
    # $0.006 a request, $0.013 estimated, $0.030 hard: served while spent + 0.013 <= 0.030
    assert statuses == [200] * 3 + [429] * 5
    assert len(upstream[0].requests) == 3
    assert elapsed < 5
    assert "budget store (Redis) unreachable" in caplog.text


async def _new_key(url: str, team: str) -> str:
    db = await open_database(url)  # applies the schema, as the replicas will
    try:
        key, _ = await KeyStore(db).create(team)
        return key
    finally:
        await db.close()


async def _ledger(url: str) -> dict[int, tuple[int, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, COUNT(*), COALESCE(SUM(cost_nusd), 0) FROM ledger GROUP BY status")
    finally:
        await conn.close()
    return {row[0]: (row[1], int(row[2])) for row in rows}


async def _burst(ports: list[int], key: str, count: int) -> list[int | str]:
    clients = [openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p}/v1", api_key=key, max_retries=0, timeout=60) for p in ports]

    async def one(client: openai.AsyncOpenAI) -> int | str:
        try:
            await client.chat.completions.create(model="budgeted", messages=HI, max_tokens=5)  # type: ignore[arg-type]
            return 200
        except openai.RateLimitError as exc:
            return exc.body["code"] if isinstance(exc.body, dict) else "?"

    try:
        return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(count)))
    finally:
        for c in clients:
            await c.close()


def _wait_healthy(processes: list[subprocess.Popen[bytes]], ports: list[int], logs: list[Path]) -> None:
    deadline = time.monotonic() + 45
    pending = set(range(len(ports)))
    while pending:
        for i in list(pending):
            if processes[i].poll() is not None:
                pytest.fail(f"replica {i} exited with {processes[i].returncode}:\n{logs[i].read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{ports[i]}/health", timeout=1).status_code == 200:
                    pending.discard(i)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            pytest.fail(f"replicas {sorted(pending)} did not start in 45 s")
        time.sleep(0.1)


def test_three_replicas_keep_a_shared_hard_budget(
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    postgres_url: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    fake, server = upstream

    async def slow(payload: dict[str, Any], request: web.Request) -> None:
        await asyncio.sleep(0.05)  # keep many requests in flight at once, on every replica

    fake.handler = slow
    team = "replicas-" + secrets.token_hex(4)
    hard = 300_000_000  # $0.30
    estimate = (TokenCounter().count_messages(HI, "budgeted") + 5) * 1_000_000  # prompt + max_tokens at $0.001
    assert estimate >= COST  # an upper bound: the stated overspend bound is then zero
    key = asyncio.run(_new_key(postgres_url, team))
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        f"""\
models:
  - {{name: budgeted, provider: openai-compatible, base_url: "{server.url}/v1", api_key: {UPSTREAM_KEY}}}
prices:
  budgeted: {{input: 1000, output: 1000}}
auth: {{master_key: {MASTER_KEY}}}
ledger: {{url: "{postgres_url}", spill_dir: "{tmp_path / "spill"}"}}
server: {{access_log: false, drain_timeout: 15}}
budgets:
  redis_url: {redis_url}
  limits:
    - {{team: {team}, period: daily, hard_usd: 0.30}}
""",
        encoding="utf-8",
    )
    ports = [free_port() for _ in range(3)]
    logs = [tmp_path / f"replica-{i}.log" for i in range(3)]
    env = {**os.environ, "THRIFTY_CONFIG": ""}
    processes = []
    for port, log in zip(ports, logs, strict=True):
        with open(log, "wb") as out:
            command = [str(THRIFTY), "serve", "--config", str(config), "--port", str(port)]
            processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    try:
        _wait_healthy(processes, ports, logs)
        results = asyncio.run(_burst(ports, key, 200))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)  # drain: settles finish, the ledger writers flush
        exits = [process.wait(30) for process in processes]
    assert exits == [0, 0, 0], [log.read_text()[-2000:] for log in logs]

    served = results.count(200)
    assert set(results) <= {200, "budget_exceeded"}
    assert len(fake.requests) == served  # refused requests never reached the upstream
    ledger = asyncio.run(_ledger(postgres_url))
    replicas = "\n".join(log.read_text()[-1500:] for log in logs)
    assert ledger == {200: (served, served * COST), 429: (200 - served, 0)}, replicas
    spent = ledger[200][1]
    # the stated bound: spend <= hard + sum of (actual - estimate)+ over requests in flight = hard
    assert spent <= hard
    # and as many served as the budget allows: a refusal means admitted * estimate + estimate > hard
    assert served >= math.ceil(hard / estimate) - 1
    with redis.Redis.from_url(redis_url) as r:
        name = counter_key("team", team, "daily", time.strftime("%Y-%m-%d", time.gmtime()))
        assert r.hmget(name, ["spent", "reserved"]) == [str(spent).encode(), b"0"], replicas
        for k in r.scan_iter(match=f"thrifty:budget:{{team:{team}}}*"):
            r.delete(k)
