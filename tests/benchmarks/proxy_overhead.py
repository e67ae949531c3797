"""Proxy overhead, side by side: a fixed upstream alone, then thrifty, LiteLLM and Portkey before it.

Run on purpose, from the repository root (it is not part of the pytest suite):

    .venv/bin/python -m tests.benchmarks.proxy_overhead [--duration 10] [--skip-peers] [--out results.json]

Each server is one process (one worker) on 127.0.0.1; targets are measured one after the
other so they never compete for the two cores. Per target: a warm-up, requests/s at 32
connections (wrk, one thread) with the server's CPU time read from /proc before and after,
latency at 1 connection (wrk), streamed time to first byte at 1 connection (a raw-socket
client in its own process), and resident memory after the load. See README.md here for
what each figure means and how to read them on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks import peers
from tests.benchmarks.measure import (
    BODY,
    MODEL,
    REPO,
    cpu_seconds,
    machine_busy_seconds,
    rss_bytes,
    run_ttfb,
    run_wrk,
    write_wrk_script,
)
from tests.benchmarks.processes import Server, StartError, free_port, running, start, stop, wait_ready
from tests.benchmarks.report import Result, result_json, table, verdicts


def measure(result: Result, port: int, headers: dict[str, str], server: Server, upstream: Server, args: Any) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    result.load_average_at_start = os.getloadavg()[0]
    script = write_wrk_script(Path(args.workdir) / f"{server.name}.lua", BODY, headers)
    _progress(f"{result.name}: warm-up {args.warmup:g}s at 32 connections")
    run_wrk(url, script, 32, args.warmup)
    _progress(f"{result.name}: {args.duration:g}s at 32 connections")
    machine_before, children_before = machine_busy_seconds(), _children_cpu()
    cpu_before, upstream_before = cpu_seconds(server.pid), cpu_seconds(upstream.pid)
    load = run_wrk(url, script, 32, args.duration)
    cpu_after, upstream_after = cpu_seconds(server.pid), cpu_seconds(upstream.pid)
    machine = machine_busy_seconds() - machine_before
    result.load = load
    server_cpu, upstream_cpu = cpu_after - cpu_before, upstream_after - upstream_before
    if load.requests:
        result.cpu_us_per_request = server_cpu / load.requests * 1e6
        result.upstream_cpu_us_per_request = upstream_cpu / load.requests * 1e6
    # What the rest of the machine (other users) ran meanwhile: busy time less the server,
    # the upstream (when it is a separate process) and wrk (a waited-for child of this one).
    ours = server_cpu + (upstream_cpu if upstream is not server else 0.0) + _children_cpu() - children_before
    result.other_load_cores = max(0.0, machine - ours) / load.seconds if load.seconds else None
    _progress(f"{result.name}: {args.duration:g}s at 1 connection")
    result.latency = run_wrk(url, script, 1, args.duration)
    ttfb_seconds = max(3.0, args.duration / 2)
    _progress(f"{result.name}: streamed TTFB for up to {ttfb_seconds:g}s at 1 connection")
    result.ttfb = run_ttfb(port, headers, ttfb_seconds)
    result.rss_mb = rss_bytes(server.pid) / 2**20
    for what, wrk in (("32 connections", load), ("1 connection", result.latency)):
        if wrk.error_count:
            result.notes.append(f"{what}: errors {wrk.errors}")
    ttfb = result.ttfb
    if ttfb.get("ok") != ttfb.get("requests") or ttfb.get("failure_count"):
        result.notes.append(
            f"stream: {ttfb.get('ok')} of {ttfb.get('requests')} complete, bad status {ttfb.get('bad_status')},"
            f" first bad reply {ttfb.get('first_bad_reply')!r}, connection failures {ttfb.get('failures')}"
        )


def bench_proxy(result: Result, launch: peers.Launch, port: int, upstream: Server, servers: list[Server], args: Any) -> Result:
    """Start one proxy, measure it, stop it; a failure anywhere becomes the row's status."""
    try:
        with running(launch.name, launch.command, args, servers, cwd=launch.cwd or REPO, env=launch.env) as server:
            took = wait_ready(server, port, launch.headers, launch.startup_timeout)
            _progress(f"{result.name}: ready in {took:.1f}s")
            measure(result, port, launch.headers, server, upstream, args)
            if server.proc.poll() is not None:
                result.notes.append(f"exited with code {server.proc.returncode} during the run")
    except StartError as exc:
        result.status = f"failed to start: {exc}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        result.status = f"failed: {type(exc).__name__}: {exc}"
    if not result.ok:
        _progress(f"{result.name}: {result.status}")
    return result


def thrifty_source(ref: str | None, workdir: Path) -> tuple[list[str], Path, str]:
    """Command, working directory and label for thrifty: the work tree, or a snapshot of ``ref``.

    A snapshot (``git archive REF proxy``) lets the benchmark measure a commit while the work
    tree is mid-edit; ``python -m proxy`` run in its folder imports that copy first (the
    editable install's finder comes after ``sys.path``).
    """
    if ref is None:
        exe = Path(sys.executable).with_name("thrifty")
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "proxy"]
        return command, workdir, _git_commit()
    dest = workdir / "thrifty-snapshot"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref, "proxy"], cwd=REPO, capture_output=True, timeout=60)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, timeout=10)
    return [sys.executable, "-m", "proxy"], dest, f"{commit.stdout.strip()} (snapshot of {ref})"


def write_thrifty_config(path: Path, port: int, upstream_url: str, master_key: str, access_log: bool | None) -> Path:
    server = f"server:\n  host: 127.0.0.1\n  port: {port}\n  workers: 1\n"
    if access_log is not None:
        server += f"  access_log: {'true' if access_log else 'false'}\n"
    path.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    provider: openai-compatible\n"
        f"    base_url: {upstream_url}/v1\n"
        "    api_key: sk-bench-upstream\n"
        f"auth:\n  master_key: {master_key}\n"
        f"ledger:\n  url: sqlite:///{path.parent / 'thrifty-ledger.db'}\n" + server,
        encoding="utf-8",
    )
    return path


def effective_access_log(config: Path) -> bool | None:
    try:
        from proxy.config import load_settings

        return load_settings(str(config)).server.access_log
    except Exception:  # only a label for the report; the server itself says the rest
        return None


def run_all(args: Any) -> tuple[list[Result], dict[str, Any]]:
    workdir = Path(args.workdir)
    cache = Path(args.cache).expanduser()
    master_key = "sk-bench-" + secrets.token_hex(20)
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    meta: dict[str, Any] = {"upstream": upstream_url}
    launches: list[tuple[Result, int, peers.Launch]] = []
    variants: list[bool | None] = [None, False] if args.access_log_off else [None]
    thrifty_cmd, thrifty_cwd, thrifty_label = thrifty_source(args.thrifty_ref, workdir)
    meta["thrifty"] = thrifty_label
    for access_log in variants:
        port = free_port()
        config = write_thrifty_config(workdir / f"thrifty-{port}.yaml", port, upstream_url, master_key, access_log)
        effective = effective_access_log(config)
        name = "thrifty" if access_log is None else "thrifty (access_log off)"
        result = Result(name, version=thrifty_label)
        result.notes.append(f"server.access_log = {effective}" + (" (default config)" if access_log is None else ""))
        if access_log is None:
            meta["thrifty_access_log_default"] = effective
        command = [*thrifty_cmd, "serve", "--config", str(config)]
        headers = {"Authorization": f"Bearer {master_key}"}
        launches.append((result, port, peers.Launch("thrifty", "", command, {}, thrifty_cwd, headers, 30.0)))
    if not args.skip_peers:
        for name in ("litellm", "portkey"):
            port = free_port()
            # Installs the peer now if missing, before anything is measured.
            if name == "litellm":
                launch = peers.litellm_launch(cache, workdir, port, upstream_url, MODEL, master_key)
            else:
                launch = peers.portkey_launch(cache, workdir, port, upstream_url)
            result = Result(name, version=launch.version)
            if launch.problem:
                result.status = launch.problem
            launches.append((result, port, launch))

    servers: list[Server] = []
    results: list[Result] = []
    try:
        cmd = [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up_port)]
        upstream = start("upstream", cmd, workdir, cwd=REPO)
        servers.append(upstream)
        base = Result("upstream alone", version="aiohttp+uvloop")
        results.append(base)
        try:
            wait_ready(upstream, up_port, {}, 30.0)
            measure(base, up_port, {"Authorization": "Bearer sk-bench-upstream"}, upstream, upstream, args)
        except (StartError, RuntimeError) as exc:
            base.status = f"failed: {exc}"
            raise SystemExit(f"the fixed upstream did not work, nothing to compare: {exc}") from None
        for result, port, launch in launches:
            results.append(result if not result.ok else bench_proxy(result, launch, port, upstream, servers, args))
    finally:
        for server in servers:
            stop(server)
    return results, meta


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head.stdout.strip() + (" +uncommitted proxy/ changes" if dirty.stdout.strip() else "")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return "?"
        return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr).strip() else "?"

    return {
        "cores": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "wrk": version(["wrk", "--version"]),
        "node": version(["node", "--version"]),
        "kernel": platform.release(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.proxy_overhead", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per target (default 3)")
    parser.add_argument("--skip-peers", action="store_true", help="measure only the upstream alone and thrifty")
    parser.add_argument("--access-log-off", action="store_true", help="also measure thrifty with server.access_log false")
    parser.add_argument(
        "--thrifty-ref", metavar="REF", help="measure thrifty as committed at REF (e.g. HEAD) instead of the work tree"
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--cache", default=str(peers.DEFAULT_CACHE), help="where the peers are installed (default %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 300 or not 0 <= args.warmup <= 60:
        parser.error("--duration must be 1..300 seconds and --warmup 0..60")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    info = machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="thrifty-bench-") as workdir:
        args.workdir = workdir
        results, meta = run_all(args)
    command = "python -m tests.benchmarks.proxy_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    print()
    load = info["loadavg_before"][0]
    print(f"proxy overhead, {time.strftime('%Y-%m-%d %H:%M')}, {info['cores']} cores, load average before {load:.2f}")
    print(f"command: {command.strip()}")
    print(f"thrifty {meta.get('thrifty')}, server.access_log default = {meta.get('thrifty_access_log_default')}")
    runs = f"{args.duration:g}s per run after {args.warmup:g}s warm-up"
    print(f"wrk -t1, POST /v1/chat/completions ({len(BODY)}-byte body), {runs}")
    print(table(results))
    print("CPU/request: the server process tree's utime+stime over the 32-connection run / requests completed.")
    print(f"others' CPU: what other processes on this {info['cores']}-core machine used during that run (noise).")
    print("thrifty targets (one worker):")
    for verdict in verdicts(results):
        print("  " + verdict)
    if args.out:
        data = {
            "command": command.strip(),
            "started": started,
            "seconds": time.time() - started,
            "machine": info,
            "meta": meta,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "workdir"},
            "results": [result_json(r) for r in results],
            "verdicts": verdicts(results),
        }
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
