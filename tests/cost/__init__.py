"""Tests of the cost package; the helpers here build ledger records and store them.

Records are written through the real schema (``open_database`` applies the migrations)
with the very statement the ledger writer uses, so the reports read what the gateway writes.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from proxy.cost.record import LedgerRecord
from proxy.cost.writer import _INSERT
from proxy.storage.database import Database

_BASE = LedgerRecord(
    id="",
    request_id="",
    ts=0.0,
    endpoint="chat/completions",
    key_id="key_a",
    team="search",
    app="ranker",
    user_id=None,
    tags=None,
    requested_model="gpt-4o",
    served_model="gpt-4o",
    provider="openai",
    route=None,
    policy_version=None,
    cache="miss",
    stream=False,
    prompt_tokens_before=100,
    prompt_tokens=100,
    completion_tokens=20,
    cached_tokens=0,
    reasoning_tokens=0,
    usage_source="upstream",
    price_input="2.5",
    price_output="10",
    price_cached_input="1.25",
    price_source="litellm",
    cost_nusd=450_000,
    baseline_nusd=450_000,
    savings_cache_nusd=0,
    savings_routing_nusd=0,
    savings_pruning_nusd=0,
    overhead_nusd=0,
    latency_ms=120.0,
    upstream_ms=110.0,
    ttft_ms=None,
    status=200,
    error_code=None,
)
_serial = iter(range(1, 1 << 62))


def at(text: str) -> float:
    """The epoch seconds of an ISO datetime, UTC unless it says otherwise."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def record(when: str | float, **fields: Any) -> LedgerRecord:
    n = next(_serial)
    ts = at(when) if isinstance(when, str) else when
    return replace(_BASE, id=f"rec{n:012d}", request_id=f"req_{n:012d}", ts=ts, **fields)


async def insert(db: Database, records: Iterable[LedgerRecord]) -> None:
    await db.executemany(_INSERT, [r.row() for r in records])


def sample(seed: int, count: int, days: Sequence[str]) -> list[LedgerRecord]:
    """Varied traffic: teams (and none), models, routing, pruning, cache hits, overhead, errors."""
    rnd = random.Random(seed)
    teams = ["search", "support", "growth", 'legal, tax & "risk"', None]
    out = []
    for _ in range(count):
        day = rnd.choice(days)
        when = at(day) + rnd.uniform(0, 86_399.999)
        baseline = rnd.randrange(1_000, 40_000_000)
        cache = rnd.choices(["miss", "exact", "semantic", "bypass"], [70, 15, 10, 5])[0]
        routed = rnd.random() < 0.4 and cache == "miss"
        routing = rnd.randrange(-2_000_000, baseline // 2) if routed else 0
        pruning = rnd.randrange(0, (baseline - routing) // 4 + 1) if cache == "miss" else 0
        savings_cache = baseline if cache in ("exact", "semantic") else 0
        cost = baseline - savings_cache - routing - pruning
        failed = rnd.random() < 0.05
        out.append(
            record(
                when,
                team=rnd.choice(teams),
                app=rnd.choice(["ranker", "bot", None]),
                key_id=rnd.choice(["key_a", "key_b", "key_c"]),
                user_id=rnd.choice([None, "u1", "u2"]),
                requested_model="gpt-4o",
                served_model=None if failed else ("gpt-4o-mini" if routed else "gpt-4o"),
                provider=None if failed else rnd.choice(["openai", "ollama"]),
                cache=cache,
                prompt_tokens=rnd.randrange(0, 5_000),
                completion_tokens=rnd.randrange(0, 2_000),
                cost_nusd=0 if failed else cost,
                baseline_nusd=0 if failed else baseline,
                savings_cache_nusd=0 if failed else savings_cache,
                savings_routing_nusd=0 if failed else routing,
                savings_pruning_nusd=0 if failed else pruning,
                overhead_nusd=rnd.randrange(0, 30_000) if cache == "semantic" else 0,
                status=rnd.choice([500, 502, 429]) if failed else 200,
            )
        )
    return out
