"""The ``thrifty bench`` arguments; the benchmark itself (proxy/bench/savings.py) is imported only when it runs."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmarks users run: savings")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    savings = sub.add_parser("savings", help="replay a workload through thrifty and report what it saved and risked")
    savings.add_argument("--workload", required=True, metavar="FILE")
    savings.add_argument(
        "--config", metavar="FILE", help="YAML whose cache / prune sections are used (models and ledger are the bench's)"
    )
    savings.add_argument("--policy", metavar="FILE", default="policies/default.yaml")
    savings.add_argument("--local-url", metavar="URL", help="a real llama.cpp server's /v1 (else a stand-in)")
    savings.add_argument("--out", metavar="DIR", default="bench-savings")
    savings.add_argument("--limit", type=int)
    savings.add_argument("--concurrency", type=int, default=8)
    savings.add_argument("--latency-scale", type=float, default=1.0, help="multiplies the stand-ins' latency (0: none)")
    savings.add_argument("--as-sent-only", action="store_true", help="skip the second pass (the route_as: auto opt-in)")


def run(args: argparse.Namespace) -> int:
    from proxy.bench.savings import run_bench  # the gateway, stand-ins and price table: only for a bench run

    return run_bench(args)
