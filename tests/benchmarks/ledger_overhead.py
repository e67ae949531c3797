"""Ledger overhead: what pricing and recording cost a request, and how fast the writer stores records.

Run on purpose, from the repository root (it is not part of the pytest suite):

    .venv/bin/python -m tests.benchmarks.ledger_overhead [--records 50000] [--skip-postgres] [--out FILE]

Three parts, one after the other, on the SQLite ledger and then on PostgreSQL:

1. request path: ``ledger.price(exchange)`` + ``ledger.record(exchange)`` timed per request
   (``perf_counter_ns``) on realistic exchanges, paced like a request stream, the writer's
   background task running against the real store as in ``thrifty serve``; meanwhile a probe
   process sends an event down a pipe every 0.5 ms and the loop notes how late each one was
   handled (what the writer's turns on the loop cost other requests); a control row runs
   the same with a writer that drops the records;
2. writer: N priced records submitted in bursts, timed until ``COUNT(*)`` (over a connection
   of its own) shows all of them; the batch sizes, and the CPU the writer costs per record
   in this process and, for PostgreSQL, in the database server;
3. end to end (needs wrk; ``--skip-e2e``): ``thrifty serve`` with each ledger before the fixed
   upstream: latency at 1 connection, req/s and CPU/request at 32.

PostgreSQL is the server at ``--postgres``; a scratch database is created and dropped. See
README.md here for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from proxy.cost.prices import PriceTable, load_litellm_prices
from proxy.cost.pricing import usage_from_openai
from proxy.cost.record import LedgerRecord
from proxy.cost.tokens import TokenCounter
from proxy.cost.writer import LedgerWriter
from proxy.errors import ConfigError
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.ledger import Ledger
from proxy.settings import ModelConfig
from proxy.storage.database import Database, open_database
from tests.benchmarks.measure import BODY, CLOCK_TICKS, REPO, cpu_seconds, machine_busy_seconds, run_wrk, write_wrk_script
from tests.benchmarks.processes import Server, StartError, free_port, running, start, stop, wait_ready
from tests.benchmarks.proxy_overhead import _children_cpu, _git_commit, _progress, thrifty_source

TARGET_P50_US = 200.0
TARGET_RECORDS_PER_S = 5_000.0
SERVED = ModelConfig("gpt-4o-mini", "openai", "https://api.openai.com/v1", "sk-bench")
OTHER = ModelConfig("gpt-4o", "openai", "https://api.openai.com/v1", "sk-bench")
PRINCIPAL = Principal("key_7f3a9c2e", "search-team", "ranker", "member")
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Summarize the attached incident report in three bullet points."},
]
# A reply's ``usage`` as OpenAI sends it (the same object ends a stream, in its usage chunk).
USAGE = {
    "prompt_tokens": 412,
    "completion_tokens": 96,
    "total_tokens": 508,
    "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
USAGE_CHUNK = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "choices": [], "usage": dict(USAGE)}
KINDS = (("chat, usage object", False), ("chat stream, usage chunk", True))


def exchange(i: int, streamed: bool) -> Exchange:
    """A finished chat completion as routes.py leaves it for the ledger: usage from the reply."""
    ex = Exchange(f"req-{i:08d}-{secrets.token_hex(4)}", "chat/completions", principal=PRINCIPAL)
    ex.requested_model, ex.target, ex.stream = SERVED.name, SERVED, streamed
    ex.payload = {"model": SERVED.name, "messages": MESSAGES, "user": "u-1234", "stream": streamed}
    ex.upstream_started = ex.started + 0.0004
    ex.first_byte = ex.upstream_started + 0.18
    ex.upstream_done = ex.first_byte + (0.9 if streamed else 0.0)
    ex.usage = usage_from_openai(USAGE_CHUNK["usage"] if streamed else USAGE)
    return ex


def make_ledger(db: Database, spill: Path, writer: type[LedgerWriter] = LedgerWriter) -> Ledger:
    """As proxy.app builds it: litellm's price map, a lazy token counter, the writer."""
    models = {m.name: m for m in (SERVED, OTHER)}
    return Ledger(PriceTable(load_litellm_prices(), {}), TokenCounter(), writer(db, spill), models)


class CountingDatabase:
    """The store, noting each batch's size and time (the writer sees the same interface)."""

    def __init__(self, db: Database):
        self.db, self.dialect = db, db.dialect
        self.batches: list[int] = []
        self.batch_seconds: list[float] = []

    async def execute(self, sql: str, *args: Any) -> None:
        await self.db.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        started = time.perf_counter()
        await self.db.executemany(sql, rows)
        self.batch_seconds.append(time.perf_counter() - started)
        self.batches.append(len(rows))

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await self.db.fetch(sql, *args)

    async def close(self) -> None:
        await self.db.close()


# -- stores -------------------------------------------------------------------------------


@dataclass
class Store:
    name: str
    url: str
    count: Callable[[], Awaitable[int]]  # rows in the ledger, read over a connection of the benchmark's own
    counter_cpu: Callable[[], float]  # this process's CPU spent counting (left out of the writer's)
    server_cpu: Callable[[], Awaitable[float]] | None = None  # the database server's CPU seconds so far


@asynccontextmanager
async def sqlite_store(workdir: Path) -> AsyncIterator[Store]:
    path = workdir / "ledger.db"
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-count")
    local = threading.local()
    tid = pool.submit(threading.get_native_id).result()

    def count() -> int:
        if not hasattr(local, "conn"):
            local.conn = sqlite3.connect(path)
        return int(local.conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])

    async def counted() -> int:
        return await asyncio.get_running_loop().run_in_executor(pool, count)

    try:
        yield Store("SQLite", f"sqlite:///{path}", counted, lambda: thread_cpu(tid))
    finally:
        pool.shutdown(wait=True)


@asynccontextmanager
async def postgres_store(server_url: str) -> AsyncIterator[Store]:
    name = f"thrifty_bench_{secrets.token_hex(4)}"
    url = server_url.rsplit("/", 1)[0] + "/" + name
    admin = await asyncpg.connect(server_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"', timeout=60)
        conn = await asyncpg.connect(url, timeout=10)
        try:

            async def count() -> int:
                return int(await conn.fetchval("SELECT COUNT(*) FROM ledger"))

            async def server_cpu() -> float:
                return await postgres_cpu(url, exclude=conn.get_server_pid())

            yield Store("PostgreSQL", url, count, lambda: 0.0, server_cpu)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', timeout=60)
        await admin.close()


async def postgres_cpu(url: str, exclude: int = 0) -> float:
    """CPU seconds of the backends serving ``url``'s database (but ``exclude`` and the one asking),
    plus the server's WAL writer, checkpointer and background writer; read from /proc."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND pid NOT IN (pg_backend_pid(), $1))"
            " OR backend_type IN ('walwriter', 'checkpointer', 'background writer')",
            exclude,
        )
    finally:
        await conn.close()
    return sum(cpu_seconds(r["pid"]) for r in rows)


def thread_cpu(tid: int) -> float:
    try:
        text = Path(f"/proc/self/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- 1. request path -----------------------------------------------------------------------


@dataclass
class PathResult:
    kind: str
    store: str
    total_us: list[float] = field(repr=False)  # price + record
    price_us: list[float] = field(repr=False)  # price alone; record is the rest
    delays_us: list[float] = field(repr=False)  # how long the probe's events waited for the loop

    def summary(self) -> dict[str, float | None]:
        record = [t - p for t, p in zip(self.total_us, self.price_us, strict=True)]
        return {
            "p50_us": pct(self.total_us, 0.5),
            "p90_us": pct(self.total_us, 0.9),
            "p99_us": pct(self.total_us, 0.99),
            "max_us": max(self.total_us),
            "price_p50_us": pct(self.price_us, 0.5),
            "record_p50_us": pct(record, 0.5),
            "event_delay_p99_us": pct(self.delays_us, 0.99) if self.delays_us else None,
            "event_delay_max_us": max(self.delays_us, default=None),
        }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class IdleWriter(LedgerWriter):
    """The control: records are built and priced, and dropped instead of written."""

    def submit(self, record: LedgerRecord) -> None:
        pass


_PINGER = """import os, struct, sys, time
fd, period = int(sys.argv[1]), float(sys.argv[2])
while True:
    os.write(fd, struct.pack("d", time.perf_counter()))
    time.sleep(period)
"""


@asynccontextmanager
async def event_probe(period: float = 0.0005) -> AsyncIterator[list[float]]:
    """Events from another process (a pipe, as requests come on sockets) every ``period`` seconds:
    how long each waited for the event loop, in µs (perf_counter is CLOCK_MONOTONIC in both)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    pinger = await asyncio.create_subprocess_exec(sys.executable, "-c", _PINGER, str(write_fd), str(period), pass_fds=(write_fd,))
    os.close(write_fd)
    delays: list[float] = []
    pending = bytearray()

    def readable() -> None:
        now = time.perf_counter()
        try:
            pending.extend(os.read(read_fd, 65536))
        except BlockingIOError:
            return
        whole = len(pending) // 8 * 8
        delays.extend((now - sent) * 1e6 for (sent,) in struct.iter_unpack("d", pending[:whole]))
        del pending[:whole]

    loop = asyncio.get_running_loop()
    loop.add_reader(read_fd, readable)
    try:
        for _ in range(1000):  # the pinger's interpreter takes a moment to start: not timed
            if delays:
                break
            await asyncio.sleep(0.005)
        yield delays
    finally:
        loop.remove_reader(read_fd)
        pinger.kill()
        await pinger.wait()
        os.close(read_fd)


async def request_path(ledger: Ledger, streamed: bool, count: int, warmup: int, rate: float) -> PathResult:
    """Per request, price + record, timed; between requests the loop turns (and the writer runs)."""
    total: list[float] = []
    price: list[float] = []
    period = 1.0 / rate if rate > 0 else 0.0
    async with event_probe() as delays:
        started = time.perf_counter()
        for i in range(warmup + count):
            if i == warmup:
                delays.clear()
            ex = exchange(i, streamed)
            t0 = time.perf_counter_ns()
            ledger.price(ex)
            t1 = time.perf_counter_ns()
            ledger.record(ex)
            t2 = time.perf_counter_ns()
            if i >= warmup:
                total.append((t2 - t0) / 1000)
                price.append((t1 - t0) / 1000)
            delay = started + (i + 1) * period - time.perf_counter()
            await asyncio.sleep(delay if delay > 0.001 else 0)  # the loop's timers have 1 ms resolution
    return PathResult("", "", total, price, delays)


async def run_request_path(store: Store, workdir: Path, args: Any, control: bool = False) -> list[PathResult]:
    """Both kinds of exchange with the writer on ``store``; or, as the control, one kind, writer idle."""
    db = await open_store(store.url)
    ledger = make_ledger(db, workdir / "spill", IdleWriter if control else LedgerWriter)
    ledger.writer.start()
    results = []
    try:
        for kind, streamed in KINDS[:1] if control else KINDS:
            where = "writer idle (control)" if control else store.name
            _progress(f"request path, {kind}, {where}: {args.requests:,} requests")
            result = await request_path(ledger, streamed, args.requests, args.requests // 10, args.rate)
            result.kind, result.store = kind, "idle (control)" if control else store.name
            results.append(result)
    finally:
        await ledger.close()
        await db.close()
    expected = 0 if control else len(KINDS) * (args.requests + args.requests // 10)
    if (stored := await store.count()) != expected:
        raise SystemExit(f"request path, {store.name}: {stored} records stored, {expected} expected")
    return results


# -- 2. writer -----------------------------------------------------------------------------


@dataclass
class WriterResult:
    store: str
    records: int
    submit_s: float
    stored_s: float
    batches: list[int]
    batch_ms_p50: float
    cpu_us_per_record: float  # this process, all threads
    loop_cpu_us_per_record: float  # of which the event loop's thread (what requests wait behind)
    server_cpu_us_per_record: float | None

    @property
    def records_per_s(self) -> float:
        return self.records / self.stored_s


async def run_writer(store: Store, workdir: Path, records: int, burst: int) -> WriterResult:
    db = CountingDatabase(await open_store(store.url))
    await db.execute("DELETE FROM ledger")
    ledger = make_ledger(db, workdir / "spill")
    built = [record_of(ledger, i) for i in range(records)]
    writer = ledger.writer
    writer.start()
    await asyncio.sleep(0.3)  # its start (spill replay, a first empty drain) is not timed
    db.batches.clear()
    db.batch_seconds.clear()
    _progress(f"writer, {store.name}: {records:,} records in bursts of {burst}")
    server_before = await store.server_cpu() if store.server_cpu else 0.0
    counter_before, loop_before = store.counter_cpu(), thread_cpu(threading.get_native_id())
    cpu_before, started = time.process_time(), time.perf_counter()
    for first in range(0, records, burst):
        for rec in built[first : first + burst]:
            writer.submit(rec)
        await asyncio.sleep(0)  # the next burst of finished requests comes on the loop's next turn
    submitted = time.perf_counter() - started
    while await store.count() < records:
        if time.perf_counter() - started > 300:
            raise SystemExit(f"writer, {store.name}: not all records stored after 300 s")
        await asyncio.sleep(0.01)
    stored = time.perf_counter() - started
    cpu = time.process_time() - cpu_before - (store.counter_cpu() - counter_before)
    loop_cpu = thread_cpu(threading.get_native_id()) - loop_before
    server = await store.server_cpu() - server_before if store.server_cpu else None
    await ledger.close()
    await db.close()
    ms = sorted(s * 1000 for s in db.batch_seconds)
    return WriterResult(
        store=store.name,
        records=records,
        submit_s=submitted,
        stored_s=stored,
        batches=db.batches,
        batch_ms_p50=ms[len(ms) // 2] if ms else 0.0,
        cpu_us_per_record=cpu / records * 1e6,
        loop_cpu_us_per_record=loop_cpu / records * 1e6,
        server_cpu_us_per_record=None if server is None else server / records * 1e6,
    )


def record_of(ledger: Ledger, i: int) -> LedgerRecord:
    """What ``record`` hands the writer, built ahead of the timed run (a third of them streamed)."""
    ex = exchange(i, i % 3 == 0)
    ledger.price(ex)
    ex.finished = ex.upstream_done
    return ledger._record(ex)


# -- 3. end to end -------------------------------------------------------------------------


@dataclass
class EndToEnd:
    name: str
    status: str = "ok"
    p50_ms: float | None = None
    p99_ms: float | None = None
    other_cores: float | None = None  # what other processes ran during the 1-connection run
    rps: float | None = None
    cpu_us_per_request: float | None = None
    db_cpu_us_per_request: float | None = None


def thrifty_config(path: Path, port: int, upstream: str, key: str, ledger_url: str) -> Path:
    path.write_text(
        "models:\n"
        "  - name: bench-model\n"
        "    provider: openai-compatible\n"
        f"    base_url: {upstream}/v1\n"
        "    api_key: sk-bench-upstream\n"
        "    upstream_model: gpt-4o-mini\n"  # priced from litellm's map; the fixed upstream ignores it
        f"auth:\n  master_key: {key}\n"
        f"ledger:\n  url: {json.dumps(ledger_url)}\n  spill_dir: {json.dumps(str(path.parent / 'spill'))}\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  workers: 1\n",
        encoding="utf-8",
    )
    return path


async def run_end_to_end(ledgers: Sequence[tuple[str, str]], args: Any) -> list[EndToEnd]:
    """The upstream alone, then thrifty with each ``(name, ledger url)`` before it, one at a time."""
    workdir = Path(args.workdir)
    key = "sk-bench-" + secrets.token_hex(20)
    up_port = free_port()
    command, cwd, _ = thrifty_source(None, workdir)
    servers: list[Server] = []
    results = [EndToEnd("upstream alone")] + [EndToEnd(name) for name, _ in ledgers]
    try:
        cmd = [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up_port)]
        upstream = start("upstream", cmd, workdir, REPO)
        servers.append(upstream)
        wait_ready(upstream, up_port, {}, 30.0)
        headers = {"Authorization": "Bearer sk-bench-upstream"}
        await asyncio.to_thread(e2e_measure, results[0], up_port, headers, [upstream.pid], None, args)
        headers = {"Authorization": f"Bearer {key}"}
        for result, (_, url) in zip(results[1:], ledgers, strict=True):
            port = free_port()
            config = thrifty_config(workdir / f"thrifty-{port}.yaml", port, f"http://127.0.0.1:{up_port}", key, url)
            db_url = url if url.startswith("postgres") else None
            try:
                with running(f"thrifty-{port}", [*command, "serve", "--config", str(config)], args, servers, cwd=cwd) as server:
                    wait_ready(server, port, headers, 30.0)
                    await asyncio.to_thread(e2e_measure, result, port, headers, [server.pid, upstream.pid], db_url, args)
            except (StartError, RuntimeError, OSError) as exc:
                result.status = f"failed: {exc}"
                _progress(f"end to end, {result.name}: {result.status}")
    finally:
        for server in servers:
            stop(server)
    return results


def e2e_measure(result: EndToEnd, port: int, headers: dict[str, str], pids: list[int], db_url: str | None, args: Any) -> None:
    """wrk at 32 connections (req/s, the server's CPU), then at 1 (latency, and the machine's other load)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    script = write_wrk_script(Path(args.workdir) / f"e2e-{port}.lua", BODY, headers)

    def db_cpu() -> float:
        return asyncio.run(postgres_cpu(db_url)) if db_url else 0.0

    _progress(f"end to end, {result.name}: warm-up, then {args.e2e_duration:g}s at 32 and at 1 connection")
    run_wrk(url, script, 32, 2)
    db_before, cpu_before = db_cpu(), cpu_seconds(pids[0])
    load = run_wrk(url, script, 32, args.e2e_duration)
    cpu, db = cpu_seconds(pids[0]) - cpu_before, db_cpu() - db_before
    ours_before, machine_before = sum(map(cpu_seconds, pids)) + _children_cpu() + db_cpu(), machine_busy_seconds()
    latency = run_wrk(url, script, 1, args.e2e_duration)
    machine, ours = machine_busy_seconds() - machine_before, sum(map(cpu_seconds, pids)) + _children_cpu() + db_cpu()
    result.other_cores = max(0.0, machine - (ours - ours_before)) / latency.seconds if latency.seconds else None
    result.rps, result.p50_ms, result.p99_ms = load.rps, latency.p50_ms, latency.p99_ms
    if load.requests:
        result.cpu_us_per_request = cpu / load.requests * 1e6
        result.db_cpu_us_per_request = db / load.requests * 1e6 if db_url else None
    if load.error_count or latency.error_count:
        result.status = f"errors: {load.errors} at 32 connections, {latency.errors} at 1"


# -- the report ----------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} µs"


def report(paths: list[PathResult], writers: list[WriterResult], e2e: list[EndToEnd], args: Any) -> list[str]:
    pace = f"at {args.rate:,.0f} req/s" if args.rate > 0 else "unpaced"
    out = [f"1. request path: ledger.price + ledger.record, {args.requests:,} requests per row {pace}"]
    rows: list[tuple[str, ...]] = [(p.kind, p.store, *(_us(v) for v in p.summary().values())) for p in paths]
    path_columns = ("exchange", "writer on", "p50", "p90", "p99", "max", "p50 price", "p50 record", "event delay p99", "max")
    out += [table(path_columns, rows), ""]
    out.append(f"2. writer: {args.records:,} records submitted in bursts of {args.burst}, until COUNT(*) shows them all")
    rows = []
    for w in writers:
        sizes = sorted(w.batches)
        batches = f"{len(sizes)}: {sizes[0]}/{sizes[len(sizes) // 2]}/{sizes[-1]}" if sizes else "-"
        timing = (f"{w.submit_s:.2f} s", f"{w.stored_s:.2f} s", f"{w.records_per_s:,.0f}", batches, f"{w.batch_ms_p50:.1f} ms")
        cpu = (_us(w.cpu_us_per_record), _us(w.loop_cpu_us_per_record), _us(w.server_cpu_us_per_record))
        rows.append((w.store, *timing, *cpu))
    heads = ("store", "submitted in", "all stored in", "records/s", "batches: n: min/p50/max", "batch p50")
    out += [table((*heads, "CPU/record here", "of which loop", "CPU/record db server"), rows)]
    if e2e:
        out += ["", f"3. end to end: thrifty serve, 1 worker, before the fixed upstream; {args.e2e_duration:g}s per wrk run"]
        rows = []
        for r in e2e:
            if r.p50_ms is None or r.p99_ms is None or r.rps is None:
                rows.append((r.name, "FAILED", *(["-"] * 6)))
                continue
            added = "" if r is e2e[0] or e2e[0].p50_ms is None else f"{r.p50_ms - e2e[0].p50_ms:+.2f} ms"
            others = "-" if r.other_cores is None else f"{r.other_cores:.2f} cores"
            cells = (f"{r.p50_ms:.2f} ms", f"{r.p99_ms:.2f} ms", added, others, f"{r.rps:,.0f}")
            rows.append((r.name, *cells, _us(r.cpu_us_per_request), _us(r.db_cpu_us_per_request)))
        columns = ("target", "p50 @1c", "p99 @1c", "added p50", "others' CPU @1c", "req/s @32c", "CPU/request")
        out += [table((*columns, "db CPU/request"), rows)]
        out += [f"  {r.name}: {r.status}" for r in e2e if r.status != "ok"]
    out += ["", "targets:"]
    for p in paths[1:]:  # not the control
        p50 = pct(p.total_us, 0.5)
        out.append(f"  request path p50 <= 200 µs ({p.kind}, {p.store}): {_us(p50)}  {_pf(p50 <= TARGET_P50_US)}")
    for w in writers:
        rate = w.records_per_s
        out.append(f"  writer >= 5,000 records/s ({w.store}): {rate:,.0f}  {_pf(rate >= TARGET_RECORDS_PER_S)}")
    return out


def _pf(passed: bool) -> str:
    return "PASS" if passed else "MISS"


# -- main ----------------------------------------------------------------------------------


async def run(args: Any) -> tuple[list[PathResult], list[WriterResult], list[EndToEnd], list[str]]:
    """SQLite, then PostgreSQL (a failure there is reported, not fatal), then end to end."""
    workdir = Path(args.workdir)
    paths: list[PathResult] = []
    writers: list[WriterResult] = []
    problems: list[str] = []
    ledgers = [("thrifty, SQLite ledger", f"sqlite:///{workdir / 'e2e.db'}")]
    async with sqlite_store(workdir) as lite:
        paths += await run_request_path(lite, workdir, args, control=True)
        paths += await run_request_path(lite, workdir, args)
        writers.append(await run_writer(lite, workdir, args.records, args.burst))
    async with AsyncExitStack() as stack:
        if not args.skip_postgres:
            try:
                pg = await stack.enter_async_context(postgres_store(args.postgres))
                paths += await run_request_path(pg, workdir, args)
                writers.append(await run_writer(pg, workdir, args.records, args.burst))
                db = await open_store(pg.url)
                await db.execute("DELETE FROM ledger")
                await db.close()
                ledgers.append(("thrifty, PostgreSQL ledger", pg.url))
            except (OSError, TimeoutError, ConfigError, asyncpg.PostgresError) as exc:
                problems.append(f"PostgreSQL FAILED: {type(exc).__name__}: {exc}")
                _progress(problems[-1])
        e2e = [] if args.skip_e2e else await run_end_to_end(ledgers, args)
    return paths, writers, e2e, problems


async def open_store(url: str) -> Database:
    """open_database, bounded: a PostgreSQL migration waits on a cluster-wide advisory lock."""
    try:
        async with asyncio.timeout(60):
            return await open_database(url)
    except TimeoutError:
        raise TimeoutError("opening the store took over 60 s (another process holding the migration lock?)") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.ledger_overhead", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--records", type=int, default=50_000, help="records for the writer run (default 50,000)")
    parser.add_argument("--burst", type=int, default=32, help="records submitted per turn of the loop (default 32)")
    parser.add_argument("--requests", type=int, default=10_000, help="timed requests per request-path row (default 10,000)")
    parser.add_argument("--rate", type=float, default=2_000.0, help="request-path pace in req/s, 0 unpaced (default 2,000)")
    parser.add_argument("--skip-postgres", action="store_true", help="the SQLite ledger only")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres", help="server (%(default)s)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end part (it needs wrk)")
    parser.add_argument("--e2e-duration", type=float, default=5.0, help="seconds per end-to-end wrk run (default 5)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.records < 1_000 or args.requests < 100 or args.burst < 1 or not 1 <= args.e2e_duration <= 120:
        parser.error("--records >= 1000, --requests >= 100, --burst >= 1, --e2e-duration 1..120")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.skip_e2e and subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        print("wrk is not installed (apt-get install wrk); or pass --skip-e2e", file=sys.stderr)
        return 2
    load, started = os.getloadavg()[0], time.time()
    try:
        import uvloop  # as thrifty serve runs

        loop = "uvloop"
        uvloop.install()
    except ImportError:
        loop = "asyncio"
    with tempfile.TemporaryDirectory(prefix="thrifty-ledger-bench-") as workdir:
        args.workdir = workdir
        paths, writers, e2e, problems = asyncio.run(run(args))
    command = ("python -m tests.benchmarks.ledger_overhead " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    lines = [
        f"ledger overhead, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average before {load:.2f}",
        f"command: {command}",
        f"thrifty {_git_commit()}, event loop {loop}",
        *report(paths, writers, e2e, args),
        *problems,
    ]
    print("\n" + "\n".join(lines))
    if args.out:
        data = {
            "command": command,
            "started": started,
            "seconds": time.time() - started,
            "request_path": [{"kind": p.kind, "store": p.store, **p.summary()} for p in paths],
            "writer": [{**asdict(w), "records_per_s": w.records_per_s} for w in writers],
            "end_to_end": [asdict(r) for r in e2e],
            "problems": problems,
            "report": lines,
        }
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
