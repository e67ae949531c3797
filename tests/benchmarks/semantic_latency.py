"""Semantic cache latency under load: what ``cache: {mode: semantic}`` adds over exact mode on misses.

Run on purpose, from the repository root (not part of the pytest suite; needs wrk):

    .venv/bin/python -m tests.benchmarks.semantic_latency [--duration 5]

A fixed upstream (``fixed_upstream.py``) and one ``thrifty serve`` process at a time (in-process
caches, no Redis), exact mode then semantic mode, each driven by wrk (one thread) at 1, 4 and
16 connections with a distinct question per request (a generated Lua ``request`` hook), so
every request is a miss that the semantic mode embeds: the realistic case. Printed per mode and
concurrency: p50/p95, what semantic adds over exact at the same concurrency, req/s, thrifty's
CPU time per request (``/proc``), and how many answers were cache hits (should be ~0).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.cache_hit import thrifty_config
from tests.benchmarks.measure import REPO, cpu_seconds
from tests.benchmarks.processes import free_port, running, start, stop, wait_ready

CONCURRENCY = (1, 4, 16)
_LUA = r"""
local topics = {"password", "invoice", "refund", "shipping address", "two-factor login", "API key", "team plan",
  "export to CSV", "dark mode", "email alerts", "billing portal", "data retention", "usage report", "webhook"}
local asks = {"How do I change the %s for account %d?", "Why does my %s fail on order %d?",
  "Can I get help with the %s, ticket %d?", "What is the limit on %s for plan %d?"}
local n = OFFSET
local hits = 0
request = function()
  n = n + 1
  local q = string.format(asks[n %% #asks + 1], topics[math.floor(n / #asks) %% #topics + 1], n)
  local body = '{"model":"bench-model","temperature":0,"max_tokens":16,"messages":[{"role":"user","content":"' .. q .. '"}]}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer KEY"}, body)
end
response = function(status, headers, body)
  local c = headers["x-thrifty-cache"] or headers["X-Thrifty-Cache"]
  if c == "exact" or c == "semantic" then hits = hits + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"errors":%%d,"p50_us":%%d,"p95_us":%%d,"hits":%%d}\n',
    summary.requests, summary.duration, summary.errors.status + summary.errors.timeout + summary.errors.read,
    latency:percentile(50), latency:percentile(95), hits))
end
"""


def run(port: int, key: str, connections: int, seconds: float, offset: int, workdir: Path) -> dict[str, float]:
    script = workdir / f"q-{port}-{offset}.lua"
    script.write_text(_LUA.replace("OFFSET", str(offset)).replace("KEY", key).replace("%%", "%"), encoding="utf-8")
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout=10s", "-s", str(script)]
    proc = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, timeout=seconds + 40
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {(proc.stderr or proc.stdout)[-300:]}")
    data: dict[str, float] = json.loads(line.removeprefix("WRKJSON "))
    return data


def bench_mode(mode: str, upstream: str, workdir: Path, args: argparse.Namespace, servers: list) -> dict[int, dict[str, float]]:  # type: ignore[type-arg]
    key = "sk-bench-" + secrets.token_hex(20)
    port = free_port()
    config = thrifty_config(workdir, port, upstream, key, f"  mode: {mode}\n")
    exe = Path(sys.executable).with_name("thrifty")
    out: dict[int, dict[str, float]] = {}
    with running(f"thrifty-{mode}", [str(exe), "serve", "--config", str(config)], args, servers, cwd=workdir) as server:
        wait_ready(server, port, {"Authorization": f"Bearer {key}"}, 60.0)
        run(port, key, 4, 2, 10_000_000, workdir)  # warm-up
        for i, c in enumerate(CONCURRENCY):
            before = cpu_seconds(server.pid)
            data = run(port, key, c, args.duration, (i + 1) * 1_000_000, workdir)
            data["cpu_us"] = (cpu_seconds(server.pid) - before) / max(data["requests"], 1) * 1e6
            data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
            out[c] = data
            print(f"[{time.strftime('%H:%M:%S')}] {mode} c{c}: {data}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.semantic_latency")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency (default 5)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="thrifty-semlat-") as workdir:
        args.workdir = workdir
        up = free_port()
        servers: list = []  # type: ignore[type-arg]
        upstream = start(
            "upstream", [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up)], Path(workdir), REPO
        )
        try:
            wait_ready(upstream, up, {}, 30.0)
            results = {m: bench_mode(m, f"http://127.0.0.1:{up}", Path(workdir), args, servers) for m in ("exact", "semantic")}
        finally:
            stop(upstream)
    print(f"\nsemantic latency, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average before {load:.2f}")
    print("| conc | mode | p50 | p95 | added p50 | added p95 | req/s | CPU/request | hits | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in CONCURRENCY:
        e = results["exact"][c]
        for mode in ("exact", "semantic"):
            r = results[mode][c]
            added = "" if mode == "exact" else f"+{(r['p50_us'] - e['p50_us']) / 1000:.1f} ms"
            added95 = "" if mode == "exact" else f"+{(r['p95_us'] - e['p95_us']) / 1000:.1f} ms"
            print(
                f"| {c} | {mode} | {r['p50_us'] / 1000:.1f} ms | {r['p95_us'] / 1000:.1f} ms | {added} | {added95} |"
                f" {r['rps']:,.0f} | {r['cpu_us']:,.0f} µs | {r['hits']:.0f} | {r['errors']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
