"""Rendering a :class:`~proxy.cost.reports.Report`: terminal table, CSV, JSON (HTML elsewhere).

The last step of ``thrifty report`` and ``GET /v1/thrifty/reports``. The table is for
people: aligned columns, thousands separators, dollars rounded to the cent. CSV and JSON
are for machines and keep full precision: money as plain decimal USD strings with nine
decimals (the stored nano-dollars, exactly), plus the integer nano-dollars in JSON, so a
spreadsheet or a script can reconcile every row against the totals. :func:`produce` runs
the queries a format needs and renders them; it is the one entry point of the CLI and API.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from proxy.cost import reports
from proxy.cost.pricing import usd
from proxy.cost.reports import METRICS, Figures, Report, ReportQuery
from proxy.storage.database import Database

FORMATS = ("table", "csv", "json", "html")
NONE_LABEL = "(none)"
_MANY = frozenset({"user", "key"})  # grouping keys with possibly thousands of values
_BOM = "\ufeff"  # lets Excel read the CSV as UTF-8; csv readers take it with encoding="utf-8-sig"


@dataclass(frozen=True, slots=True)
class Output:
    body: str
    content_type: str
    filename: str


async def produce(db: Database, query: ReportQuery, fmt: str, *, now: datetime | None = None) -> Output:
    """Query the store and render ``fmt`` (the HTML page also needs views by day and by team)."""
    now = now or datetime.now(UTC)
    stem = f"thrifty-report-{_slug(query.label)}"
    if fmt == "html":
        return Output(await _html(db, query, now), "text/html; charset=utf-8", stem + ".html")
    report = await reports.run(db, query)
    if fmt == "csv":
        return Output(to_csv(report), "text/csv; charset=utf-8", stem + ".csv")
    if fmt == "json":
        return Output(to_json(report, now), "application/json", stem + ".json")
    return Output(to_table(report), "text/plain; charset=utf-8", stem + ".txt")


async def _html(db: Database, query: ReportQuery, now: datetime) -> str:
    """The page needs the report and its by-day and by-team views: one scan when the groups stay few."""
    from proxy.cost.report_html import render_html

    charts_by = ("day", "team")
    if _MANY.isdisjoint(query.by):  # one query by (asked + day + team), folded three ways
        fine = await reports.run(db, _with_by(query, tuple(dict.fromkeys((*query.by, *charts_by)))))
        report, charts = reports.regroup(fine, query.by), fine
    else:  # per user or per key: days x users may be many rows, so ask twice instead
        report, charts = await reports.run(db, query), await reports.run(db, _with_by(query, charts_by))
    return render_html(report, reports.regroup(charts, ("day",)), reports.regroup(charts, ("team",)), now)


def _with_by(query: ReportQuery, by: tuple[str, ...]) -> ReportQuery:
    return ReportQuery(query.since, query.until, by, query.period)


def _slug(label: str) -> str:
    kept = "".join(c if c.isalnum() or c == "-" else "_" for c in label)
    return "_".join(part for part in kept.split("_") if part)


# -- table ------------------------------------------------------------------------------


def title(query: ReportQuery) -> str:
    since, until = (m.strftime("%Y-%m-%d %H:%M") for m in (query.since, query.until))
    return f"thrifty cost report: {query.label} (UTC, {since} up to {until}), by {', '.join(query.by)}"


def cents(nano: int) -> str:
    """``$1,234.57``: rounded half up to the cent; a non-zero amount under a cent shows as such."""
    sign = "-" if nano < 0 else ""
    whole_cents = (abs(nano) + 5_000_000) // 10_000_000
    if whole_cents == 0 and nano:
        return ">-$0.01" if nano < 0 else "<$0.01"
    dollars, rest = divmod(whole_cents, 100)
    return f"{sign}${dollars:,}.{rest:02d}"


def cell(figures: Figures, metric: str, kind: str) -> str:
    value = figures.value(metric)
    return cents(value) if kind == "money" else f"{value:,}"


def to_table(report: Report) -> str:
    query = report.query
    lines = [title(query), ""]
    if report.empty:
        lines.append("No requests in this period.")
        return "\n".join(lines) + "\n"
    header = [*query.by, *(label for _, label, _ in METRICS)]
    body = [[_label(v) for v in row.key] + [cell(row.figures, m, k) for m, _, k in METRICS] for row in report.rows]
    total = ["TOTAL", *([""] * (len(query.by) - 1)), *(cell(report.totals, m, k) for m, _, k in METRICS)]
    widths = [max(len(r[i]) for r in (header, *body, total)) for i in range(len(header))]
    keys = len(query.by)

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < keys else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines += [line(header), rule, *(line(r) for r in body), rule, line(total), ""]
    lines.append("Amounts in USD, rounded to the cent; CSV and JSON carry the exact figures.")
    return "\n".join(lines) + "\n"


def _label(value: str | None) -> str:
    return NONE_LABEL if value is None else value


# -- CSV ----------------------------------------------------------------------------------


def csv_header(by: tuple[str, ...]) -> list[str]:
    return [*by, *(_csv_name(m, k) for m, _, k in METRICS)]


def _csv_name(metric: str, kind: str) -> str:
    return metric.removesuffix("_nusd") + "_usd" if kind == "money" else metric


def _csv_figures(figures: Figures) -> list[str]:
    return [usd(figures.value(m)) if k == "money" else str(figures.value(m)) for m, _, k in METRICS]


def to_csv(report: Report) -> str:
    """RFC 4180 (CRLF, quoted where needed), a header row, plain numbers, a TOTAL row last."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(csv_header(report.query.by))
    for row in report.rows:
        writer.writerow([_safe("" if v is None else v) for v in row.key] + _csv_figures(row.figures))
    writer.writerow(["TOTAL", *([""] * (len(report.query.by) - 1)), *_csv_figures(report.totals)])
    return _BOM + out.getvalue()


def _safe(text: str) -> str:
    """Keep a spreadsheet from reading a team or user name as a formula (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# -- JSON ---------------------------------------------------------------------------------


def figures_json(figures: Figures) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for metric, _, kind in METRICS:
        value = figures.value(metric)
        if kind == "money":
            data[metric] = value
            data[_csv_name(metric, kind)] = usd(value)
        else:
            data[metric] = value
    return data


def to_json(report: Report, now: datetime) -> str:
    by = report.query.by
    doc = {
        "object": "thrifty.cost_report",
        "query": report.query.to_json(),
        "generated_at": now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "currency": "USD",
        "money": "*_nusd: integer nano-dollars (1e-9 USD); *_usd: the same amount as an exact decimal string",
        "rows": [{**dict(zip(by, row.key, strict=True)), **figures_json(row.figures)} for row in report.rows],
        "totals": figures_json(report.totals),
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
