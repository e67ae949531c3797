"""The savings benchmark's HTML report: one offline page (inline CSS and SVG, nothing fetched).

Written beside ``results.json`` by ``thrifty bench savings``: per pass, cost against the
baseline and savings by lever (the finance report's bar chart, ``proxy/cost/report_html``),
then the benchmark's table. Cache, routing and latency charts are not drawn yet.
"""

from __future__ import annotations

from html import escape
from typing import Any

from proxy.cost.report_html import _CSS, BASELINE, COST, NET, OVERHEAD, SAVED, hbar_chart


def render(results: dict[str, Any], table: str) -> str:
    panels = []
    for label, p in results["passes"].items():
        levers = p["levers_usd"]
        bars = [
            ("Baseline", int(p["baseline_usd"] * 1e9), BASELINE),
            ("Actual", int(p["actual_usd"] * 1e9), COST),
            ("Cache", int(levers["cache"] * 1e9), SAVED),
            ("Routing", int(levers["routing"] * 1e9), SAVED),
            ("Pruning", int(levers["pruning"] * 1e9), SAVED),
            ("Overhead", -int(levers["overhead"] * 1e9), OVERHEAD),
            ("Reduction", int((p["baseline_usd"] - p["actual_usd"]) * 1e9), NET),
        ]
        chart = hbar_chart(bars, f"Cost by lever: {label}")
        panels.append(f'<div class="panel"><h2>{escape(label)}: {p["reduction_pct"]:.1f}% less</h2>{chart}</div>')
    rows = [line.strip("|").split("|") for line in table.splitlines() if not line.startswith("|---")]
    head = "".join(f"<th>{escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>thrifty savings</title><style>{_CSS}</style></head>'
        f'<body><main><h1>thrifty bench savings</h1><p class="sub">{results["requests"]} requests, '
        f"{results['tenants']} tenants</p>{''.join(panels)}"
        f'<div class="panel scroll"><table><tr>{head}</tr>{body}</table></div></main></body></html>'
    )
