"""Exact cache hits end to end: what thrifty adds over the upstream when it answers from its cache.

Run on purpose, from the repository root (not part of the pytest suite; needs wrk):

    .venv/bin/python -m tests.benchmarks.cache_hit [--duration 10] [--skip-peers] [--out results.json]

One process each on 127.0.0.1, measured one after the other: the fixed upstream alone
(the baseline: every request answered by it), thrifty with its cache off (every request
forwarded: the proxy's own overhead, for context), thrifty answering every request from its
exact cache in this process, and from Redis (a private ``redis-server`` started for the
run, so the shared one is left alone); then LiteLLM's proxy with its response cache
(``cache: true``, local memory and Redis) when its virtualenv exists (``--install-peers``
installs it, see peers.py). The request is one cacheable chat completion (``temperature:
0``), asked again and again, so after the first answer every request is a hit; before and
after each run one request must come back as a hit (thrifty: ``x-thrifty-cache: exact``;
LiteLLM: ``x-litellm-cache-key`` and no upstream CPU), and the upstream's CPU during the
run shows that it was not asked. Figures as in proxy_overhead (README.md here): requests/s
and the server's CPU per request at 32 connections, p50/p99 at 1 connection, added p50/p99
against the upstream alone, resident memory, others' CPU.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.benchmarks import peers
from tests.benchmarks.measure import REPO, WrkResult, cpu_seconds, machine_busy_seconds, rss_bytes, run_wrk, write_wrk_script
from tests.benchmarks.processes import Server, StartError, free_port, running, start, stop, wait_ready

MODEL = "bench-model"
# Cacheable (temperature 0) and otherwise the request proxy_overhead measures.
BODY = '{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16,"temperature":0}'
TARGET_ADDED_P50_MS = 1.0


@dataclass
class Row:
    name: str
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us: float | None = None  # the server's CPU per request at 32 connections
    upstream_cpu_us: float | None = None  # the upstream's, meanwhile: ~0 when every request is a hit
    redis_cpu_us: float | None = None
    rss_mb: float | None = None
    others_cores: float | None = None


@dataclass
class Target:
    name: str
    command: list[str]
    port: int
    headers: dict[str, str]
    hit: str | None  # how a hit shows: a header name, or None (no cache: the baseline and "cache off")
    cwd: Path = REPO
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 30.0
    redis: Server | None = None


def ask(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=BODY, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def is_hit(target: Target, headers: dict[str, str]) -> bool:
    if target.hit == "x-thrifty-cache":
        return headers.get("x-thrifty-cache") == "exact"
    return bool(target.hit and headers.get(target.hit))


def wait_for_hit(target: Target, timeout: float = 10.0) -> None:
    """Ask until the answer comes from the cache (the first answer is stored in the background)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        status, seen = ask(target.port, target.headers)
        if status == 200 and is_hit(target, seen):
            return
        time.sleep(0.1)
    shown = {k: v for k, v in seen.items() if "cache" in k}
    raise StartError(f"no cache hit within {timeout:.0f}s (cache headers: {shown})")


def measure(row: Row, target: Target, server: Server, upstream: Server, args: Any) -> None:
    url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
    script = write_wrk_script(Path(args.workdir) / f"{server.name}.lua", BODY, target.headers)
    if target.hit:
        wait_for_hit(target)
    run_wrk(url, script, 32, args.warmup)
    redis_pid = target.redis.pid if target.redis else None
    machine, children = machine_busy_seconds(), _children_cpu()
    cpu, up = cpu_seconds(server.pid), cpu_seconds(upstream.pid)
    redis = cpu_seconds(redis_pid) if redis_pid else 0.0
    load = run_wrk(url, script, 32, args.duration)
    cpu, up = cpu_seconds(server.pid) - cpu, cpu_seconds(upstream.pid) - up
    redis = (cpu_seconds(redis_pid) - redis) if redis_pid else 0.0
    machine = machine_busy_seconds() - machine
    ours = cpu + (up if upstream is not server else 0.0) + redis + _children_cpu() - children
    row.others_cores = max(0.0, machine - ours) / load.seconds if load.seconds else None
    if load.requests:
        row.rps = load.rps
        row.cpu_us = cpu / load.requests * 1e6
        row.upstream_cpu_us = up / load.requests * 1e6 if upstream is not server else None
        row.redis_cpu_us = redis / load.requests * 1e6 if redis_pid else None
    latency = run_wrk(url, script, 1, args.duration)
    row.p50_ms, row.p99_ms = latency.p50_ms, latency.p99_ms
    row.rss_mb = rss_bytes(server.pid) / 2**20
    for what, wrk in (("32 connections", load), ("1 connection", latency)):
        _note_errors(row, what, wrk)
    if target.hit:
        wait_for_hit(target, 2.0)  # still hits after the load


def _note_errors(row: Row, what: str, wrk: WrkResult) -> None:
    if wrk.error_count:
        row.notes.append(f"{what}: errors {wrk.errors}")


def bench(target: Target, upstream: Server, servers: list[Server], args: Any) -> Row:
    row = Row(target.name)
    _progress(f"{target.name}: starting")
    try:
        slug = "".join(c if c.isalnum() else "-" for c in target.name)
        with running(slug, target.command, args, servers, cwd=target.cwd, env=target.env) as server:
            wait_ready(server, target.port, target.headers, target.startup_timeout)
            measure(row, target, server, upstream, args)
    except (StartError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        row.status = f"failed: {type(exc).__name__}: {exc}"
        _progress(f"{target.name}: {row.status}")
    return row


def thrifty_config(workdir: Path, port: int, upstream: str, master_key: str, cache: str) -> Path:
    """``cache`` is the YAML of the ``cache:`` section's body."""
    path = workdir / f"thrifty-{port}.yaml"
    path.write_text(
        f"models:\n  - name: {MODEL}\n    provider: openai-compatible\n    base_url: {upstream}/v1\n"
        "    api_key: sk-bench-upstream\n"
        f"auth:\n  master_key: {master_key}\n"
        f"ledger:\n  url: sqlite:///{workdir / f'ledger-{port}.db'}\n"
        f"server:\n  host: 127.0.0.1\n  port: {port}\n  workers: 1\n"
        f"cache:\n{cache}",
        encoding="utf-8",
    )
    return path


def litellm_config(workdir: Path, upstream: str, master_key: str, redis_port: int | None) -> Path:
    path = workdir / f"litellm-{'redis' if redis_port else 'local'}.yaml"
    params = f"    type: redis\n    host: 127.0.0.1\n    port: {redis_port}\n" if redis_port else "    type: local\n"
    path.write_text(
        f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n      api_key: sk-bench-upstream\n"
        f"litellm_settings:\n  cache: true\n  cache_params:\n{params}"
        f"general_settings:\n  master_key: {master_key}\n",
        encoding="utf-8",
    )
    return path


def targets(args: Any, upstream: str, redis: Server, redis_port: int) -> list[Target]:
    workdir = Path(args.workdir)
    key = "sk-bench-" + secrets.token_hex(20)
    auth = {"Authorization": f"Bearer {key}"}
    exe = Path(sys.executable).with_name("thrifty")
    thrifty = [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy"]
    found: list[Target] = []
    for name, cache, hit in (
        ("thrifty, cache off (forwarded)", "  enabled: false\n", None),
        ("thrifty, exact hit, in-process", "  enabled: true\n", "x-thrifty-cache"),
        ("thrifty, exact hit, Redis", f"  redis_url: redis://127.0.0.1:{redis_port}/0\n", "x-thrifty-cache"),
    ):
        port = free_port()
        config = thrifty_config(workdir, port, upstream, key, cache)
        found.append(Target(name, [*thrifty, "serve", "--config", str(config)], port, auth, hit, cwd=workdir))
    found[-1].redis = redis
    if args.skip_peers:
        return found
    exe_litellm = Path(args.cache).expanduser() / "litellm-venv" / "bin" / "litellm"
    if not exe_litellm.exists() and args.install_peers:
        installed, _ = peers.ensure_litellm(Path(args.cache).expanduser())
        exe_litellm = installed or exe_litellm
    if not exe_litellm.exists():
        _progress(f"litellm: no virtualenv at {exe_litellm.parents[1]} (--install-peers installs it); skipped")
        return found
    for label, port_of_redis in (("local", None), ("Redis", redis_port)):
        port = free_port()
        config = litellm_config(workdir, upstream, key, port_of_redis)
        command = [str(exe_litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        target = Target(f"litellm, cache hit, {label}", command, port, auth, "x-litellm-cache-key", workdir, env, 240.0)
        target.redis = redis if port_of_redis else None
        found.append(target)
    return found


def run_all(args: Any) -> list[Row]:
    workdir = Path(args.workdir)
    up_port, redis_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    servers: list[Server] = []
    rows: list[Row] = []
    redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    try:
        upstream = start(
            "upstream", [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up_port)], workdir, REPO
        )
        redis = start("redis", redis_cmd, workdir, workdir)
        servers += [upstream, redis]
        wait_ready(upstream, up_port, {}, 30.0)
        base = Row("upstream alone")
        baseline = Target(base.name, [], up_port, {"Authorization": "Bearer sk-bench-upstream"}, None)
        _progress("upstream alone")
        measure(base, baseline, upstream, upstream, args)
        rows.append(base)
        for target in targets(args, upstream_url, redis, redis_port):
            rows.append(bench(target, upstream, servers, args))
    finally:
        for server in servers:
            stop(server)
    return rows


def table(rows: list[Row]) -> str:
    base = rows[0]
    header = ("target", "req/s @32c", "p50 @1c", "p99 @1c", "added p50", "added p99", "CPU/request", "upstream CPU/req")
    header += ("Redis CPU/req", "RSS", "others' CPU")
    lines = [header]
    for r in rows:
        if r.status != "ok" or r.p50_ms is None:
            lines.append((r.name, "FAILED", *(["-"] * (len(header) - 2))))
            continue
        first = r is base
        lines.append(
            (
                r.name,
                f"{r.rps:,.0f}" if r.rps else "-",
                f"{r.p50_ms:.2f} ms",
                f"{r.p99_ms:.2f} ms",
                "" if first else _added(r.p50_ms, base.p50_ms),
                "" if first else _added(r.p99_ms, base.p99_ms),
                _us(r.cpu_us),
                "" if first else _us(r.upstream_cpu_us),
                _us(r.redis_cpu_us),
                f"{r.rss_mb:.0f} MB" if r.rss_mb else "-",
                f"{r.others_cores:.2f} cores" if r.others_cores is not None else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))) + " |"
        for line in lines
    ]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _added(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return f"{value - base:+.2f} ms"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} µs"


def verdicts(rows: list[Row]) -> list[str]:
    base = rows[0].p50_ms
    out = []
    for r in rows[1:]:
        if r.name.startswith("thrifty, exact hit") and r.p50_ms is not None and base is not None:
            added = r.p50_ms - base
            verdict = "pass" if added <= TARGET_ADDED_P50_MS else "miss"
            out.append(f"{r.name}: added p50 {added:+.2f} ms (target <= {TARGET_ADDED_P50_MS:g} ms): {verdict}")
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.cache_hit", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per target (default 3)")
    parser.add_argument("--skip-peers", action="store_true", help="measure only the upstream alone and thrifty")
    parser.add_argument("--install-peers", action="store_true", help="install LiteLLM's proxy first if it is missing")
    parser.add_argument("--cache", default=str(peers.DEFAULT_CACHE), help="where the peers are installed (default %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 300 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be 1..300 seconds and --warmup 0..60")
    for tool in ("wrk", "redis-server"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            print(f"{tool} is not installed (apt-get install {'wrk' if tool == 'wrk' else 'redis-server'})", file=sys.stderr)
            return 2
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="thrifty-cache-bench-") as workdir:
        args.workdir = workdir
        rows = run_all(args)
    command = "python -m tests.benchmarks.cache_hit " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nexact cache hits, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average before {load_before:.2f}")
    print(f"command: {command.strip()}")
    print(f"wrk -t1, POST /v1/chat/completions ({len(BODY)}-byte body, temperature 0), {args.duration:g}s per run")
    print(table(rows))
    for r in rows:
        for note in ([r.status] if r.status != "ok" else []) + r.notes:
            print(f"  {r.name}: {note}")
    for verdict in verdicts(rows):
        print("  " + verdict)
    if args.out:
        data = {"command": command.strip(), "rows": [asdict(r) for r in rows], "verdicts": verdicts(rows)}
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
