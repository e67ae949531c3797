"""Soak: thrifty's resident memory under mixed traffic with every feature on, for N minutes.

    .venv/bin/python -m tests.benchmarks.soak --minutes 10

Starts ``fixed_upstream.py`` and ``thrifty serve`` (one worker) as processes, with a config
that turns on a routing policy (a fallback list, a cascade), the exact and semantic cache in
Redis (a database index of its own, which must be empty at start and is emptied at the end),
pruning with a budget, budgets in Redis, /metrics, and the SQLite ledger in a temp dir; the
caches get small caps so they fill within the run. This process then drives a mixed load
with aiohttp (plain and streamed chat, repeated and unique prompts, long conversations,
streams cut by the client, embeddings, a model that always answers 500, a slow one, many
keys and teams, /metrics scrapes) and samples thrifty's RSS and open fds every few seconds.
It prints a table per minute and a verdict on the growth over the second half of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.benchmarks.measure import REPO, process_tree, rss_bytes
from tests.benchmarks.processes import StartError, free_port, start, stop, wait_ready

# Growth allowed over the second half of the run, by a least-squares fit of its RSS samples:
# allocator noise (arenas, the ledger writer's batches, aiohttp's buffers) moves RSS by a few
# MB either way once the caps are reached; a leak of even 100 bytes per request would add
# 30 MB over five minutes at ~1,000 req/s and keep going.
THRESHOLD_MB = 8.0
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike"]


@dataclass
class Stats:
    served: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    features: Counter[str] = field(default_factory=Counter)


def policy_yaml() -> str:
    return (
        "version: soak\n"
        "rules:\n"
        "  - name: fallback\n"
        "    match: {model: flaky}\n"
        "    action: {target: [flaky, main]}\n"
        "  - name: cascade\n"
        "    match: {model: main, headers: {x-soak-route: cascade}}\n"
        "    action:\n"
        "      cascade: {try: small, then: main, checks: [empty, short], min_chars: 200}\n"
        "  - name: plain\n"
        "    match: {model: main}\n"
        "    action: {target: main}\n"
    )


OFF = ("semantic", "cache", "prune", "budgets", "policy")  # --off: bisecting a growth by turning features off


def config_yaml(
    port: int, upstream: str, master: str, workdir: Path, redis_url: str, metrics_token: str, off: frozenset[str] = frozenset()
) -> str:
    models = "".join(
        f"  - name: {name}\n    provider: openai-compatible\n    base_url: {upstream}/v1\n"
        f"    api_key: sk-soak-upstream\n    upstream_model: {up}\n"
        for name, up in (
            ("bench-model", "bench-model"),  # what wait_ready asks for
            ("main", "bench-model"),
            ("small", "bench-model"),
            ("flaky", "bench-fail"),
            ("slow", "bench-slow"),
            ("nousage", "bench-nousage"),
            ("embed", "bench-embed"),
        )
    )
    prices = "".join(
        f"  {n}: {{input: 0.15, output: 0.6}}\n" for n in ("bench-model", "main", "small", "flaky", "slow", "nousage", "embed")
    )
    return (
        f"models:\n{models}"
        f"prices:\n{prices}"
        f"auth:\n  master_key: {master}\n  key_cache_seconds: 10\n"
        f"ledger:\n  url: sqlite:///{workdir / 'ledger.db'}\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  workers: 1\n  access_log: false\n"
        + ("policies: false\n" if "policy" in off else f"policies: {workdir / 'policy.yaml'}\n")
        + "upstream:\n  retries: 1\n  breaker_failures: 5\n  breaker_cooldown: 5\n  probe_interval: 0\n"
        + (
            ""
            if "budgets" in off
            else f"budgets:\n  redis_url: {redis_url}\n  limits:\n"
            "    - {team: '*', period: daily, soft_usd: 50, hard_usd: 100}\n"
            "    - {key: '*', period: monthly, hard_usd: 100}\n"
        )
        + f"cache:\n  redis_url: {redis_url}\n  mode: {_cache_mode(off)}\n  ttl_seconds: 600\n  semantic_max_per_tenant: 200\n"
        "  memory_entries: 500\n  memory_bytes: 4194304\n"
        + ("" if "prune" in off else "prune:\n  max_input_tokens: 600\n  keep_last: 4\n  summarize: true\n")
        + f"telemetry:\n  metrics: true\n  metrics_token: {metrics_token}\n"
    )


def _cache_mode(off: frozenset[str]) -> str:
    return "'off'" if "cache" in off else "exact" if "semantic" in off else "semantic"


async def create_keys(ledger: Path, teams: int, per_team: int) -> list[str]:
    from proxy.storage.database import open_database
    from proxy.storage.keys import KeyStore

    db = await open_database(f"sqlite:///{ledger}")
    keys = []
    try:
        store = KeyStore(db)
        for t in range(teams):
            for a in range(per_team):
                key, _ = await store.create(f"soak-team-{t}", f"app-{a}")
                keys.append(key)
    finally:
        await db.close()
    return keys


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat_body(kind: str, rng: random.Random, serial: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(model, payload, extra headers) for one request of a kind."""
    headers: dict[str, str] = {}
    model = "main"
    base: dict[str, Any] = {"temperature": 0, "max_tokens": 32}
    if kind == "repeat":
        text = f"Tell me about topic {rng.randrange(40)}."
    elif kind == "long":
        turns = rng.randrange(20, 40)
        history = []
        for i in range(turns):
            history.append(
                {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i} of {serial}: {sentence(rng, 60)}"}
            )
        history.append({"role": "user", "content": f"Summarize conversation {serial}."})
        return model, {**base, "messages": [{"role": "system", "content": "Be brief."}, *history]}, headers
    else:
        text = f"Question {serial} {secrets.token_hex(6)}: {sentence(rng, 12)}?"
    if kind == "fallback":
        model = "flaky"
    elif kind == "slow":
        model = "slow"
    elif kind == "cascade":
        headers["x-soak-route"] = "cascade"
    elif kind == "stream_nousage":
        model = "nousage"
    return model, {**base, "messages": [{"role": "user", "content": text}]}, headers


KINDS = [
    ("unique", 30),
    ("repeat", 20),
    ("stream", 12),
    ("stream_nousage", 4),
    ("cut", 4),
    ("long", 8),
    ("embeddings", 6),
    ("fallback", 5),
    ("cascade", 6),
    ("slow", 2),
    ("unknown_key", 1),
    ("bad_request", 2),
]


async def one(session: aiohttp.ClientSession, base: str, keys: list[str], rng: random.Random, serial: int, stats: Stats) -> None:
    kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
    key = "sk-not-a-key" if kind == "unknown_key" else rng.choice(keys)
    auth = {"Authorization": f"Bearer {key}"}
    stats.kinds[kind] += 1
    try:
        if kind == "embeddings":
            body = {"model": "embed", "input": [sentence(rng, 8) for _ in range(rng.randrange(1, 4))]}
            async with session.post(f"{base}/v1/embeddings", json=body, headers=auth) as resp:
                await resp.read()
                status = resp.status
        elif kind == "bad_request":
            async with session.post(f"{base}/v1/chat/completions", data=b"{not json", headers=auth) as resp:
                await resp.read()
                status = 200 if resp.status == 400 else resp.status
        else:
            model, payload, extra = chat_body(kind, rng, serial)
            streamed = kind in ("stream", "stream_nousage", "cut") or (kind == "repeat" and rng.random() < 0.3)
            if streamed:
                payload["stream"] = True
                if rng.random() < 0.5:
                    payload["stream_options"] = {"include_usage": True}
            async with session.post(
                f"{base}/v1/chat/completions", json={"model": model, **payload}, headers={**auth, **extra}
            ) as resp:
                if kind == "cut" and resp.status == 200:
                    await resp.content.readany()
                    resp.close()  # drops the connection mid-stream
                    status = 200
                else:
                    await resp.read()
                    status = resp.status
                note_headers(resp.headers, stats)
        if kind == "unknown_key":
            status = 200 if status == 401 else status
        if status == 200:
            stats.served += 1
        else:
            stats.errors[f"{kind}: HTTP {status}"] += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        stats.errors[f"{kind}: {type(exc).__name__}"] += 1


def note_headers(headers: Any, stats: Stats) -> None:
    """Counts what thrifty says it did, so the run shows that every feature was exercised."""
    if cache := headers.get("x-thrifty-cache"):
        stats.features[f"cache {cache}"] += 1
    if headers.get("x-thrifty-prune"):
        stats.features["pruned"] += 1
    if route := headers.get("x-thrifty-route"):
        stats.features[f"route {route}"] += 1
    if headers.get("x-thrifty-budget-warning"):
        stats.features["budget warning"] += 1


async def scrape(session: aiohttp.ClientSession, base: str, token: str, stats: Stats, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        try:
            async with session.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                stats.kinds["metrics"] += 1
                if resp.status != 200:
                    stats.errors[f"metrics: HTTP {resp.status}"] += 1
        except aiohttp.ClientError as exc:
            stats.errors[f"metrics: {type(exc).__name__}"] += 1
        await asyncio.sleep(5)


def open_fds(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        with suppress(OSError):
            total += len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return total


async def drive(
    port: int, keys: list[str], token: str, seconds: float, concurrency: int, pid: int, every: float
) -> tuple[list[tuple[float, int, float, int]], Stats]:
    base = f"http://127.0.0.1:{port}"
    stats = Stats()
    samples: list[tuple[float, int, float, int]] = []
    started = time.monotonic()
    stop_at = started + seconds
    serial = 0
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(seed: int) -> None:
        nonlocal serial
        rng = random.Random(seed)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < stop_at:
                serial += 1
                await one(session, base, keys, rng, serial, stats)

    async def sampler() -> None:
        while time.monotonic() < stop_at + 0.5:
            samples.append((time.monotonic() - started, stats.served, rss_bytes(pid) / 2**20, open_fds(pid)))
            await asyncio.sleep(every)

    async with aiohttp.ClientSession(timeout=timeout) as scraper:
        await asyncio.gather(sampler(), scrape(scraper, base, token, stats, stop_at), *(worker(i) for i in range(concurrency)))
    return samples, stats


def fit_slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def report(samples: list[tuple[float, int, float, int]], stats: Stats, seconds: float) -> bool:
    print("\n| minute | requests served | RSS MB | open fds |")
    print("|-------:|----------------:|-------:|---------:|")
    shown = [samples[0]] + [
        next(s for s in samples if s[0] >= m * 60) for m in range(1, int(seconds // 60)) if samples[-1][0] >= m * 60
    ]
    for t, served, rss, fds in [*shown, samples[-1]]:
        print(f"| {t / 60:6.1f} | {served:15,} | {rss:6.1f} | {fds:8} |")
    half = [s for s in samples if s[0] >= seconds / 2]
    slope = fit_slope([(t, rss) for t, _, rss, _ in half])
    growth = slope * (half[-1][0] - half[0][0]) if half else 0.0
    reqs = half[-1][1] - half[0][1] if half else 0
    per_100k = growth / reqs * 1e5 if reqs else float("nan")
    fds_growth = half[-1][3] - half[0][3] if half else 0
    print(f"\nrequests served: {stats.served:,} in {seconds:.0f} s = {stats.served / seconds:,.0f} req/s")
    print("requests by kind: " + ", ".join(f"{k} {v:,}" for k, v in stats.kinds.most_common()))
    print("thrifty's headers: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.features.items())))
    print("errors: " + (", ".join(f"{k} x{v:,}" for k, v in stats.errors.most_common()) or "none"))
    print(f"RSS: start {samples[0][2]:.1f} MB, peak {max(s[2] for s in samples):.1f} MB, end {samples[-1][2]:.1f} MB")
    print(
        f"second half ({half[0][0] / 60:.1f} to {half[-1][0] / 60:.1f} min, {reqs:,} requests): RSS growth {growth:+.1f} MB "
        f"(least-squares fit), {per_100k:+.2f} MB per 100k requests; open fds {fds_growth:+d}"
    )
    ok = growth <= THRESHOLD_MB
    print(f"verdict: {'PASS' if ok else 'FAIL'} (threshold: at most {THRESHOLD_MB:g} MB over the second half)")
    return ok


def redis_cleanup(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    deleted, batch = 0, []
    for key in client.scan_iter("thrifty:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    client.close()
    return deleted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--redis-db", type=int, default=14, help="a Redis database index used by nothing else (must be empty)")
    parser.add_argument("--off", action="append", default=[], choices=OFF, help="turn a feature off (repeatable)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the upstream's and thrifty's logs here at the end")
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--keys-per-team", type=int, default=3)
    args = parser.parse_args()
    import redis

    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    client = redis.Redis.from_url(redis_url)
    if client.dbsize():
        print(f"Redis database {args.redis_db} is not empty; pick an empty one with --redis-db", file=sys.stderr)
        return 2
    client.close()
    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="thrifty-soak-") as tmp:
        workdir = Path(tmp)
        master = "sk-soak-" + secrets.token_hex(20)
        token = "metrics-" + secrets.token_hex(12)
        up_port, port = free_port(), free_port()
        (workdir / "policy.yaml").write_text(policy_yaml(), encoding="utf-8")
        config = workdir / "thrifty.yaml"
        text = config_yaml(port, f"http://127.0.0.1:{up_port}", master, workdir, redis_url, token, frozenset(args.off))
        config.write_text(text, encoding="utf-8")
        servers = []
        try:
            upstream = start(
                "upstream", [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up_port)], workdir, REPO
            )
            servers.append(upstream)
            keys = asyncio.run(create_keys(workdir / "ledger.db", args.teams, args.keys_per_team))
            thrifty = start("thrifty", [str(REPO / ".venv/bin/thrifty"), "serve", "--config", str(config)], workdir, REPO)
            servers.append(thrifty)
            waited = wait_ready(thrifty, port, {"Authorization": f"Bearer {master}"}, 120.0)
            print(
                f"thrifty ready in {waited:.1f} s, pid {thrifty.pid}, {len(keys)} keys in {args.teams} teams; "
                f"driving {args.concurrency} clients for {args.minutes:g} min",
                flush=True,
            )
            samples, stats = asyncio.run(drive(port, keys, token, seconds, args.concurrency, thrifty.pid, args.sample_every))
            if thrifty.proc.poll() is not None:
                print(f"thrifty exited during the run: {thrifty.log_tail()}")
                return 1
            ok = report(samples, stats, seconds)
            print(f"thrifty log tail: {thrifty.log_tail(3)}")
        except StartError as exc:
            print(f"start failed: {exc}", file=sys.stderr)
            return 1
        finally:
            for server in reversed(servers):
                stop(server)
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(server.log, args.keep_logs / server.log.name)
            print(f"redis db {args.redis_db}: deleted {redis_cleanup(redis_url)} thrifty keys")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
