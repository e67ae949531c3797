"""Where thrifty's CPU goes under load: py-spy on one worker while wrk drives it.

Starts the fixed upstream and ``thrifty serve`` (the work tree, default config plus
``--config-extra`` lines), warms it up, then samples it with ``py-spy record`` while wrk
sends the benchmark's chat completion at 32 connections, and prints the hottest frames
(self and inclusive, in percent of samples; the SQLite writer thread is included). py-spy
is not a dependency of thrifty: install it anywhere (``pip install py-spy``) and pass
``--py-spy PATH`` if it is not on ``PATH``. Run as root or with ptrace allowed:

    .venv/bin/python -m tests.benchmarks.profile_thrifty [--duration 20] [--out profile.txt]
"""

from __future__ import annotations

import argparse
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.benchmarks.measure import BODY, REPO, run_wrk, write_wrk_script
from tests.benchmarks.processes import free_port, start, stop, wait_ready
from tests.benchmarks.proxy_overhead import thrifty_source


def summarize(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per frame from py-spy's collapsed-stack output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self (the frame itself was running):"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    out += ["", "inclusive (the frame was on the stack):"]
    out += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top * 2)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.profile_thrifty", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds sampled under load (default 20)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    parser.add_argument("--top", type=int, default=30, help="frames listed (default 30)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="the py-spy executable")
    parser.add_argument("--config-extra", action="append", default=[], help="YAML lines added under server:")
    parser.add_argument("--thrifty-ref", metavar="REF", help="profile thrifty as committed at REF")
    parser.add_argument("--out", type=Path, help="also write the summary to this file")
    args = parser.parse_args()
    if not args.py_spy or not Path(args.py_spy).exists():
        print("py-spy not found: pip install py-spy (anywhere) and pass --py-spy PATH", file=sys.stderr)
        return 2
    if not 1 <= args.duration <= 300:
        parser.error("--duration must be 1..300 seconds")
    key = "sk-bench-" + secrets.token_hex(20)
    with tempfile.TemporaryDirectory(prefix="thrifty-profile-") as tmp:
        workdir = Path(tmp)
        up_port, port = free_port(), free_port()
        upstream = start(
            "upstream", [sys.executable, "-m", "tests.benchmarks.fixed_upstream", "--port", str(up_port)], workdir, REPO
        )
        servers = [upstream]
        try:
            wait_ready(upstream, up_port, {}, 30.0)
            command, cwd, label = thrifty_source(args.thrifty_ref, workdir)
            config = workdir / "thrifty.yaml"
            config.write_text(
                f"models:\n  - name: bench-model\n    provider: openai-compatible\n"
                f"    base_url: http://127.0.0.1:{up_port}/v1\n    api_key: sk-bench-upstream\n"
                f"auth:\n  master_key: {key}\nledger:\n  url: sqlite:///{workdir / 'ledger.db'}\n"
                f"server:\n  host: 127.0.0.1\n  port: {port}\n" + "".join(f"  {x}\n" for x in args.config_extra),
                encoding="utf-8",
            )
            thrifty = start("thrifty", [*command, "serve", "--config", str(config)], workdir, cwd)
            servers.append(thrifty)
            headers = {"Authorization": f"Bearer {key}"}
            wait_ready(thrifty, port, headers, 30.0)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            script = write_wrk_script(workdir / "load.lua", BODY, headers)
            run_wrk(url, script, 32, 3)
            raw = workdir / "profile.raw"
            spy = [args.py_spy, "record", "-p", str(thrifty.pid), "-d", f"{args.duration:g}", "-r", str(args.rate)]
            spy += ["-f", "raw", "-o", str(raw), "--nonblocking"]
            sampler = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                load = run_wrk(url, script, 32, args.duration + 2)
                _, err = sampler.communicate(timeout=args.duration + 60)
            finally:
                if sampler.poll() is None:
                    sampler.kill()
                    sampler.wait()
            if sampler.returncode != 0 or not raw.exists():
                print(f"py-spy failed: {err.decode(errors='replace').strip()[-400:]}", file=sys.stderr)
                return 1
            summary = f"thrifty {label}; {load.rps:,.0f} req/s at 32 connections while sampled\n" + summarize(raw, args.top)
        finally:
            for server in servers:
                stop(server)
    print(summary)
    if args.out:
        args.out.write_text(summary + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
