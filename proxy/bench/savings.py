"""``thrifty bench savings``: replay a workload, then compare thrifty's ledger to the baseline.

The baseline prices every request on its requested model (as sent: ``gpt-4o``) for its
whole prompt and the large stand-in's answer, with no cache and no pruning; the actual cost
is the ledger's cost plus thrifty's own overhead (summaries, rejected cascade answers). A
false hit is a cache hit whose answer's tag names a question that is not a labelled
duplicate of the request (same ``duplicate_of`` root). Figures go to the terminal and to
``results.json``. Pass "with the opt-in" replays the same requests through the same policy with
one rule put first, ``match: {model: [the workload's models]}, action: {route_as: auto}``: the
opt-in an admin adds so that apps naming their model are routed as if they asked for ``auto``
(their named model stays the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.bench.harness import gateway
from proxy.bench.replay import Outcome, Progress, replay
from proxy.bench.standin import LARGE_SPEED, LOCAL_SPEED, Plan, answer_for, latency_for, read_tag, tag_of
from proxy.bench.workload import Item, last_user_text, read_workload, root_of
from proxy.cost.prices import PriceTable, load_litellm_prices
from proxy.cost.pricing import cost_nusd
from proxy.cost.tokens import TokenCounter
from proxy.storage.database import open_database

LOCAL = "local-small"


def plan_of(item: Item) -> Plan:
    words = 260 if item.difficulty == "hard" else (0 if item.reference is not None else 70)
    return Plan(words, item.reference)


def run_bench(args: argparse.Namespace) -> int:
    items = read_workload(args.workload, args.limit)
    results = asyncio.run(_run(items, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    from proxy.bench.report import render

    (out / "report.html").write_text(render(results, text))
    print(text)
    print(f"report: {out / 'report.html'}")
    print(f"\nresults: {out / 'results.json'}")
    return 0


async def _run(items: list[Item], args: argparse.Namespace) -> dict[str, Any]:
    plans = {tag_of(last_user_text(i.request["messages"])): plan_of(i) for i in items}
    tenants = sorted({i.tenant for i in items})
    passes: dict[str, Any] = {}
    modes = [("as sent", args.policy)]
    if not args.as_sent_only:
        modes.append(("with the opt-in (route_as: auto)", opt_in_policy(args.policy, sorted({i.model for i in items}), args.out)))
    for label, policy in modes:
        async with gateway(tenants, plans, policy, args.config, args.local_url, args.latency_scale) as g:
            bar = Progress(len(items), label)
            outcomes = await replay(g.url, items, g.keys, args.concurrency, None, bar)
            bar.close()
        ledger = await read_ledger(g.ledger)
        passes[label] = figures(items, outcomes, ledger, args.latency_scale, stand_in_local=g.local_stand_in)
    return {"requests": len(items), "tenants": len(tenants), "passes": passes}


def opt_in_policy(policy: str, models: list[str], out: str) -> str:
    """The policy with the route_as opt-in for ``models`` as its first rule, written beside the results."""
    import yaml

    doc = yaml.safe_load(Path(policy).read_text(encoding="utf-8"))
    rule = {"name": "opt-in-as-auto", "match": {"model": models}, "action": {"route_as": "auto"}}
    doc["rules"] = [rule, *doc.get("rules", [])]
    path = Path(out) / "policy-opt-in.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return str(path)


async def read_ledger(path: Path) -> dict[str, tuple[Any, ...]]:
    db = await open_database(f"sqlite:///{path}")
    try:
        rows = await db.fetch(
            "SELECT request_id, cost_nusd, overhead_nusd, savings_cache_nusd, savings_routing_nusd, savings_pruning_nusd,"
            " served_model, cache FROM ledger"
        )
    finally:
        await db.close()
    return {str(r[0]): r for r in rows}


def figures(
    items: list[Item], outcomes: list[Outcome], ledger: dict[str, tuple[Any, ...]], scale: float, stand_in_local: bool
) -> dict[str, Any]:
    counter = TokenCounter()
    prices = PriceTable(load_litellm_prices(), {})
    by_id = {i.id: i for i in items}
    roots_of_tag: dict[str, set[str]] = {}
    for i in items:
        roots_of_tag.setdefault(tag_of(last_user_text(i.request["messages"])), set()).add(root_of(i, by_id))
    baseline = actual = 0
    levers = {"cache": 0, "routing": 0, "pruning": 0, "overhead": 0}
    hits = {"exact": 0, "semantic": 0}
    false_hits, hard_small, simple_large, local, errors = 0, 0, 0, 0, 0
    added: list[float] = []
    for item, outcome in zip(items, outcomes, strict=True):
        text = last_user_text(item.request["messages"])
        price = prices.for_name(item.model)
        completion = counter.count_text(answer_for(text, plan_of(item), True), "gpt-4o")
        if price is not None:
            baseline += cost_nusd(price, counter.count_messages(item.request["messages"], "gpt-4o"), 0, completion)
        row = ledger.get(outcome.request_id or "")
        if outcome.status != 200 or row is None:
            errors += 1
            continue
        actual += int(row[1]) + int(row[2])
        for name, value in zip(("cache", "routing", "pruning", "overhead"), (*row[3:6], row[2]), strict=True):
            levers[name] += int(value)
        served, cache = row[6], row[7]
        if cache in hits:
            hits[cache] += 1
            _, tag = read_tag(outcome.content)
            if tag is None or root_of(item, by_id) not in roots_of_tag.get(tag, set()):
                false_hits += 1
            continue
        small = served != "gpt-4o"
        local += served == LOCAL
        hard_small += item.difficulty == "hard" and small
        simple_large += item.difficulty == "simple" and not small
        speed = LOCAL_SPEED if served == LOCAL else LARGE_SPEED
        added.append(
            outcome.seconds
            - latency_for(counter.count_text(answer_for(text, plan_of(item), served != LOCAL), "gpt-4o"), speed) * scale
        )
    hit_total = hits["exact"] + hits["semantic"]
    return {
        "baseline_usd": baseline / 1e9,
        "actual_usd": actual / 1e9,
        "reduction_pct": 100 * (1 - actual / baseline) if baseline else 0.0,
        "levers_usd": {k: v / 1e9 for k, v in levers.items()},
        "cache_hits": hits,
        "false_hits": false_hits,
        "false_hit_rate_pct": 100 * false_hits / hit_total if hit_total else 0.0,
        "served_locally": local,
        "hard_served_small": hard_small,
        "hard_requests": sum(i.difficulty == "hard" for i in items),
        "simple_sent_large": simple_large,
        "simple_requests": sum(i.difficulty == "simple" for i in items),
        "errors": errors,
        "local_backend": "stand-in (no real model: latency only)" if stand_in_local else "real (--local-url)",
        "added_latency_ms": {"p50": _pct(added, 50), "p95": _pct(added, 95)},
    }


def _pct(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return None
    return round(1000 * statistics.quantiles(values, n=100)[q - 1], 1)


def table(results: dict[str, Any]) -> str:
    labels = list(results["passes"])
    lines = [f"| {results['requests']} requests, {results['tenants']} tenants | " + " | ".join(labels) + " |"]
    lines.append("|---" * (len(labels) + 1) + "|")
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("baseline (all to the requested model)", lambda p: f"${p['baseline_usd']:.4f}"),
        ("actual (ledger cost + overhead)", lambda p: f"${p['actual_usd']:.4f}"),
        ("cost reduction", lambda p: f"{p['reduction_pct']:.1f}%"),
        (
            "saved by cache / routing / pruning",
            lambda p: "${cache:.4f} / ${routing:.4f} / ${pruning:.4f}".format(**p["levers_usd"]),
        ),
        ("cache hits exact / semantic", lambda p: f"{p['cache_hits']['exact']} / {p['cache_hits']['semantic']}"),
        ("false hits", lambda p: f"{p['false_hits']} ({p['false_hit_rate_pct']:.1f}% of hits)"),
        ("served locally", lambda p: f"{p['served_locally']} ({p['local_backend']})"),
        ("hard requests served small", lambda p: f"{p['hard_served_small']} of {p['hard_requests']}"),
        ("simple requests sent large", lambda p: f"{p['simple_sent_large']} of {p['simple_requests']}"),
        ("latency added p50 / p95 (ms)", lambda p: f"{p['added_latency_ms']['p50']} / {p['added_latency_ms']['p95']}"),
        ("errors", lambda p: str(p["errors"])),
    ]
    for name, show in rows:
        lines.append(f"| {name} | " + " | ".join(show(results["passes"][label]) for label in labels) + " |")
    return "\n".join(lines)
