"""The finance report as one self-contained HTML page: inline CSS and inline SVG charts.

Rendered by ``thrifty report --format html`` and ``GET /v1/thrifty/reports?format=html``.
The page works offline and can be mailed as an attachment: no script, no font, no image
and no stylesheet is fetched from anywhere; every chart is SVG drawn here (bars with
``<title>`` tooltips). It shows the headline figures, spend over time by day (against the
baseline), spend by team, savings by lever with overhead and the net, and the report's own
table with its totals. Everything user-supplied (team, app, user names) is escaped.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from html import escape

from proxy.cost.report_render import NONE_LABEL, cell, cents, title
from proxy.cost.reports import METRICS, Figures, Report

MAX_TABLE_ROWS = 1000
MAX_BARS = 12
WIDTH = 1000

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;background:#f6f7f9;margin:0}
main{max-width:1060px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0 0 10px}
.sub{color:#6b7280;margin:0 0 20px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin-bottom:16px}
.card,.panel{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:12px 14px}
.card b{display:block;font-size:20px;margin-top:2px}.card span{color:#6b7280;font-size:12px}
.panel{margin-bottom:16px;padding:16px}
.row2{display:grid;grid-template-columns:1fr 1fr;gap:16px}
svg{display:block;width:100%;height:auto}svg text{font-size:11px;fill:#4b5563}
.legend{color:#6b7280;font-size:12px;margin:6px 0 0}.sw{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:5px 7px;border-bottom:1px solid #eef0f3;white-space:nowrap}
th{background:#f9fafb;text-align:left;white-space:normal;vertical-align:bottom}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:600;border-top:2px solid #9ca3af}
.scroll{overflow-x:auto}.note{color:#6b7280;font-size:12px}.empty{padding:30px;text-align:center;color:#6b7280}
@media (max-width:800px){.row2{grid-template-columns:1fr}}
@media print{body{background:#fff}.panel,.card{break-inside:avoid}}
"""
COST, BASELINE, SAVED, OVERHEAD, NET = "#2563eb", "#9ca3af", "#16a34a", "#dc2626", "#0f766e"


def render_html(report: Report, by_day: Report, by_team: Report, now: datetime) -> str:
    query = report.query
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title(query))}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>thrifty cost report: {escape(query.label)}</h1>",
        f'<p class="sub">{escape(_period(report))} · grouped by {escape(", ".join(query.by))} · '
        f"generated {now.astimezone(UTC).strftime('%Y-%m-%d %H:%M')} UTC</p>",
    ]
    if report.empty:
        parts.append('<div class="panel empty">No requests in this period.</div>')
    else:
        parts += [
            _cards(report),
            _panel("Spend over time, by day", day_chart(by_day), _legend((COST, "cost"), (BASELINE, "baseline"))),
            '<div class="row2">',
            _panel("Spend by team", team_chart(by_team)),
            _panel("Savings by lever", lever_chart(report), _legend((SAVED, "saved"), (OVERHEAD, "overhead"), (NET, "net"))),
            "</div>",
            _panel(f"By {', '.join(query.by)}", _table(report)),
        ]
    parts.append(
        '<p class="note">Amounts in USD, rounded to the cent; the CSV and JSON exports carry the exact figures. '
        "Baseline: what the requested model would have cost at the original prompt size.</p>"
    )
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _period(report: Report) -> str:
    q = report.query
    return f"{q.since.strftime('%Y-%m-%d %H:%M')} up to {q.until.strftime('%Y-%m-%d %H:%M')} UTC"


def _panel(heading: str, body: str, footer: str = "") -> str:
    return f'<section class="panel"><h2>{escape(heading)}</h2>{body}{footer}</section>'


def _legend(*items: tuple[str, str]) -> str:
    keys = "".join(f'<i class="sw" style="background:{color}"></i>{escape(name)}' for color, name in items)
    return f'<p class="legend">{keys}</p>'


def _cards(report: Report) -> str:
    t = report.totals
    share = f"{t.net_savings_nusd / t.baseline_nusd:.1%} of baseline" if t.baseline_nusd else "no baseline"
    errors = f"{t.errors / t.requests:.2%} of requests" if t.requests else ""
    cards = [
        ("Spend", cents(t.cost_nusd), f"{t.requests:,} requests"),
        ("Baseline", cents(t.baseline_nusd), "without thrifty"),
        ("Net savings", cents(t.net_savings_nusd), share),
        ("Tokens", f"{t.prompt_tokens + t.completion_tokens:,}", f"{t.prompt_tokens:,} in / {t.completion_tokens:,} out"),
        ("Errors", f"{t.errors:,}", errors),
    ]
    body = "".join(f'<div class="card"><span>{a}</span><b>{escape(b)}</b><span>{escape(c)}</span></div>' for a, b, c in cards)
    return f'<div class="cards">{body}</div>'


def _table(report: Report) -> str:
    by = report.query.by
    head = "".join(f"<th>{escape(k)}</th>" for k in by)
    head += "".join(f'<th class="n">{escape(label)}</th>' for _, label, _ in METRICS)
    rows = []
    for row in report.rows[:MAX_TABLE_ROWS]:
        keys = "".join(f"<td>{escape(NONE_LABEL if v is None else v)}</td>" for v in row.key)
        rows.append(f"<tr>{keys}{_figure_cells(row.figures)}</tr>")
    keys = "<td>TOTAL</td>" + "<td></td>" * (len(by) - 1)
    rows.append(f'<tr class="total">{keys}{_figure_cells(report.totals)}</tr>')
    more = len(report.rows) - MAX_TABLE_ROWS
    note = f'<p class="note">Showing the first {MAX_TABLE_ROWS:,} of {len(report.rows):,} rows; the CSV has them all.</p>'
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>' + (
        note if more > 0 else ""
    )


def _figure_cells(figures: Figures) -> str:
    return "".join(f'<td class="n">{escape(cell(figures, m, k))}</td>' for m, _, k in METRICS)


# -- charts -------------------------------------------------------------------------------


def ticks(top: float, count: int = 4) -> list[float]:
    """Round axis steps (1, 2, 2.5, 5 x 10^n) from 0 to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def money_tick(dollars: float) -> str:
    if abs(dollars) >= 1_000_000:
        return f"${dollars / 1_000_000:,.1f}M".replace(".0M", "M")
    if abs(dollars) >= 10_000:
        return f"${dollars / 1000:,.1f}k".replace(".0k", "k")
    if abs(dollars) >= 10 or dollars == int(dollars):
        return f"${dollars:,.0f}"
    text = f"{dollars:.6f}".rstrip("0")
    return "$" + (text + "0" if text.endswith(".") else text)


def _days(report: Report) -> list[tuple[str, int, int]]:
    """(day, cost, baseline) for every day of the period, zero where nothing ran."""
    seen = {row.key[0]: row.figures for row in report.rows if row.key[0] is not None}
    first = report.query.since.date()
    last = (report.query.until - timedelta(microseconds=1)).date()
    if (last - first).days > 400:  # a long range: only the days with traffic
        return [(d, f.cost_nusd, f.baseline_nusd) for d, f in sorted(seen.items())]
    out = []
    day: date = first
    while day <= last:
        figures = seen.get(day.isoformat())
        out.append((day.isoformat(), figures.cost_nusd if figures else 0, figures.baseline_nusd if figures else 0))
        day += timedelta(days=1)
    return out


def day_chart(by_day: Report) -> str:
    days = _days(by_day)
    height, left, right, top_pad, bottom = 250, 64, 12, 12, 28
    plot_w, plot_h = WIDTH - left - right, height - top_pad - bottom
    top = max([max(c, b) for _, c, b in days] + [0]) / 1e9
    scale = ticks(top)
    y_max = scale[-1]

    def y(dollars: float) -> float:
        return top_pad + plot_h - plot_h * dollars / y_max

    out = [f'<svg viewBox="0 0 {WIDTH} {height}" role="img" aria-label="Spend by day">']
    for value in scale:
        out.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eef0f3"/>')
        out.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{escape(money_tick(value))}</text>')
    slot = plot_w / max(len(days), 1)
    every = max(1, math.ceil(len(days) / 12))
    points = []
    for i, (day, cost, baseline) in enumerate(days):
        x = left + i * slot
        bar_h = plot_h * cost / 1e9 / y_max
        tip = f"{day}: cost {cents(cost)}, baseline {cents(baseline)}"
        out.append(
            f'<rect x="{x + slot * 0.15:.1f}" y="{top_pad + plot_h - bar_h:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{bar_h:.1f}" fill="{COST}"><title>{escape(tip)}</title></rect>'
        )
        points.append(f"{x + slot / 2:.1f},{y(baseline / 1e9):.1f}")
        if i % every == 0:
            out.append(f'<text x="{x + slot / 2:.1f}" y="{height - 8}" text-anchor="middle">{escape(day[5:])}</text>')
    out.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{BASELINE}" stroke-width="2" stroke-dasharray="5 3"/>')
    out.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{top_pad + plot_h}" y2="{top_pad + plot_h}" stroke="#9ca3af"/>')
    out.append("</svg>")
    return "".join(out)


def team_chart(by_team: Report) -> str:
    rows = sorted(by_team.rows, key=lambda r: -r.figures.cost_nusd)
    bars = [(NONE_LABEL if r.key[0] is None else r.key[0], r.figures.cost_nusd, COST) for r in rows[:MAX_BARS]]
    chart = hbar_chart(bars, "Spend by team")
    if len(rows) > MAX_BARS:  # a note, not a bar: the sum of many would dwarf every team shown
        rest = sum(r.figures.cost_nusd for r in rows[MAX_BARS:])
        chart += f'<p class="note">and {len(rows) - MAX_BARS:,} more teams: {escape(cents(rest))} together</p>'
    return chart


def lever_chart(report: Report) -> str:
    t = report.totals
    bars = [
        ("Cache", t.savings_cache_nusd, SAVED),
        ("Routing", t.savings_routing_nusd, SAVED),
        ("Pruning", t.savings_pruning_nusd, SAVED),
        ("Overhead", -t.overhead_nusd, OVERHEAD),
        ("Net savings", t.net_savings_nusd, NET),
    ]
    return hbar_chart([(name, value, OVERHEAD if value < 0 else color) for name, value, color in bars], "Savings by lever")


def hbar_chart(bars: list[tuple[str, int, str]], label: str) -> str:
    """Horizontal bars (label, nano-dollars, colour) around a zero line; negatives go left."""
    row_h, left, right, width = 26, 130, 80, 480
    height = row_h * len(bars) + 10
    low = min([0.0, *(v / 1e9 for _, v, _ in bars)])
    high = max([0.0, *(v / 1e9 for _, v, _ in bars)])
    span = (high - low) or 1.0
    plot_w = width - left - right
    zero = left + plot_w * (-low) / span
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for i, (name, value, color) in enumerate(bars):
        y = 5 + i * row_h
        size = plot_w * abs(value) / 1e9 / span
        x = zero - size if value < 0 else zero
        shown = name if len(name) <= 20 else name[:19] + "…"
        tip = f"{name}: {cents(value)}"
        out.append(f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{escape(shown)}<title>{escape(name)}</title></text>')
        out.append(
            f'<rect x="{x:.1f}" y="{y + 4}" width="{max(size, 0.5):.1f}" height="{row_h - 8}" rx="2" fill="{color}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        value_x = (x + size + 6) if value >= 0 else (zero + 6)
        out.append(f'<text x="{value_x:.1f}" y="{y + 16}">{escape(cents(value))}</text>')
    out.append(f'<line x1="{zero:.1f}" x2="{zero:.1f}" y1="2" y2="{height - 2}" stroke="#6b7280"/>')
    out.append("</svg>")
    return "".join(out)
