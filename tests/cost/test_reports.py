"""Finance reports: query validation, grouping in the store, totals, period edges, renderings.

The store tests run on a real SQLite file and a real PostgreSQL database; the records go
in through the ledger writer's own INSERT. One test fills SQLite with a million records.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.cost import reports
from proxy.cost.record import COLUMNS, LedgerRecord
from proxy.cost.report_html import money_tick, ticks
from proxy.cost.report_render import cents, produce, to_csv, to_json, to_table
from proxy.cost.reports import Figures, ReportError, make_query
from proxy.storage.database import Database, open_database
from tests.cost import at, insert, record, sample
from tests.services import postgres_server, postgres_url  # noqa: F401

NOW = datetime(2026, 11, 23, 3, 15, tzinfo=UTC)
NOVEMBER = make_query(period="2026-11", by="team")
DAYS = [f"2026-11-{d:02d}" for d in (1, 2, 3, 5, 8, 13, 21, 29, 30)]


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    database = await open_database(url)
    yield database
    await database.close()


def figures_of(records: list[LedgerRecord]) -> Figures:
    total = Figures()
    for r in records:
        total += Figures(
            1,
            r.prompt_tokens,
            r.completion_tokens,
            r.cost_nusd,
            r.baseline_nusd,
            r.savings_cache_nusd,
            r.savings_routing_nusd,
            r.savings_pruning_nusd,
            r.overhead_nusd,
            int(r.status >= 400),
        )
    return total


def expected(records: list[LedgerRecord], key: str) -> dict[str | None, Figures]:
    groups: dict[str | None, list[LedgerRecord]] = defaultdict(list)
    for r in records:
        groups[getattr(r, key)].append(r)
    return {k: figures_of(v) for k, v in groups.items()}


# -- the query ----------------------------------------------------------------------------


def test_the_default_is_the_current_month_by_team() -> None:
    query = make_query(now=NOW)
    assert (query.since, query.until, query.by, query.period) == (
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
        ("team",),
        "2026-11",
    )


@pytest.mark.parametrize(
    ("period", "since", "until"),
    [
        ("2026-12", "2026-12-01", "2027-01-01"),
        ("2028-02", "2028-02-01", "2028-03-01"),
        ("2026-11-23", "2026-11-23", "2026-11-24"),
        ("2026-12-31", "2026-12-31", "2027-01-01"),
        ("2026", "2026-01-01", "2027-01-01"),
    ],
)
def test_periods(period: str, since: str, until: str) -> None:
    query = make_query(period=period)
    assert query.since.timestamp() == at(since) and query.until.timestamp() == at(until)
    assert query.label == period


def test_since_and_until_take_dates_and_iso_datetimes_in_utc() -> None:
    query = make_query(since="2026-11-01T08:00:00+02:00", until="2026-11-03 12:30")
    assert query.since == datetime(2026, 11, 1, 6, tzinfo=UTC)
    assert query.until == datetime(2026, 11, 3, 12, 30, tzinfo=UTC)
    assert query.period is None and "exclusive" in query.label
    assert make_query(since="2026-11-01", until="2026-11-08").label == "2026-11-01 to 2026-11-07"
    alone = make_query(since="2026-11-20", now=NOW)  # up to the end of today
    assert alone.until == datetime(2026, 11, 24, tzinfo=UTC)


def test_grouping_keys_are_checked_and_deduplicated() -> None:
    assert make_query(by="Team, model,team,day").by == ("team", "model", "day")
    assert reports.parse_by("key,user,provider,cache,app") == ("key", "user", "provider", "cache", "app")


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (
            {"by": "team,colour"},
            "--by: unknown grouping key 'colour' (choose from team, app, key, model, day, user, provider, cache, route)",
        ),
        ({"by": ""}, "--by: unknown grouping key an empty name"),
        ({"since": "2026-13-01"}, "--since: '2026-13-01' is not a date"),
        ({"since": "yesterday"}, "--since: 'yesterday' is not a date"),
        ({"since": "2026-11-01", "until": "11/05/2026"}, "--until: '11/05/2026' is not a date"),
        ({"since": "2026-11-05", "until": "2026-11-05"}, "--since (2026-11-05 00:00:00 UTC) must be before --until"),
        ({"since": "2026-11-06", "until": "2026-11-05"}, "must be before --until"),
        ({"period": "2026-11", "since": "2026-11-01"}, "--period cannot be combined with --since or --until"),
        ({"until": "2026-11-05"}, "--until needs --since"),
        ({"period": "2026-13"}, "--period: '2026-13' is not a period"),
        ({"period": "2026-11-31"}, "--period: '2026-11-31' is not a period"),
        ({"period": "november"}, "--period: 'november' is not a period"),
    ],
)
def test_bad_input_is_named(words: dict[str, str], message: str) -> None:
    with pytest.raises(ReportError) as caught:
        make_query(**words)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_url_parameters_are_named_without_dashes() -> None:
    with pytest.raises(ReportError, match=r"^since: 'x' is not a date") as caught:
        make_query(since="x", flag="")
    assert caught.value.param == "since"


# -- the store ----------------------------------------------------------------------------


async def test_by_team_sums_in_the_store_and_totals_are_the_sum_of_rows(db: Database) -> None:
    records = sample(1, 600, DAYS)
    await insert(db, records)
    report = await reports.run(db, NOVEMBER)
    want = expected(records, "team")
    assert {row.key: row.figures for row in report.rows} == {(k,): v for k, v in want.items()}
    assert report.totals == figures_of(records)
    assert sum((r.figures for r in report.rows), Figures()) == report.totals
    assert [r.figures.cost_nusd for r in report.rows] == sorted((r.figures.cost_nusd for r in report.rows), reverse=True)
    assert report.totals.errors == sum(r.status >= 400 for r in records) > 0
    assert report.totals.net_savings_nusd == sum(
        r.savings_cache_nusd + r.savings_routing_nusd + r.savings_pruning_nusd - r.overhead_nusd for r in records
    )


@pytest.mark.parametrize("by", [*reports.GROUP_KEYS, "team,model,day", "day,cache", "user,app,key,provider"])
async def test_every_grouping_adds_up_to_the_same_totals(db: Database, by: str) -> None:
    records = sample(2, 300, DAYS)
    await insert(db, records)
    report = await reports.run(db, make_query(period="2026-11", by=by))
    assert report.totals == figures_of(records)
    assert sum((r.figures for r in report.rows), Figures()) == report.totals
    assert len({r.key for r in report.rows}) == len(report.rows)
    for key, column in (("team", "team"), ("key", "key_id"), ("user", "user_id"), ("cache", "cache")):
        if by == key:
            assert {r.key for r in report.rows} == {(getattr(rec, column),) for rec in records}


async def test_model_is_the_served_model_else_the_requested_one(db: Database) -> None:
    await insert(
        db,
        [
            record("2026-11-02T10:00:00", requested_model="gpt-4o", served_model="gpt-4o-mini", cost_nusd=10),
            record("2026-11-02T10:00:01", requested_model="gpt-4o", served_model=None, status=502, cost_nusd=0),
            record("2026-11-02T10:00:02", requested_model="gpt-4o", served_model="gpt-4o", cost_nusd=30),
        ],
    )
    report = await reports.run(db, make_query(period="2026-11", by="model"))
    assert {r.key[0]: (r.figures.requests, r.figures.cost_nusd, r.figures.errors) for r in report.rows} == {
        "gpt-4o": (2, 30, 1),
        "gpt-4o-mini": (1, 10, 0),
    }


async def test_route_is_the_rule_that_chose_the_model(db: Database) -> None:
    await insert(
        db,
        [
            record("2026-11-02T10:00:00", route="cheap-chat", served_model="gpt-4o-mini", cost_nusd=10),
            record("2026-11-02T10:00:01", route="cheap-chat", served_model="gpt-4o-mini", cost_nusd=15),
            record("2026-11-02T10:00:02", route="hard", served_model="gpt-4o", cost_nusd=300),
            record("2026-11-02T10:00:03", route=None, served_model="gpt-4o", cost_nusd=40),
        ],
    )
    report = await reports.run(db, make_query(period="2026-11", by="route"))
    assert [(r.key[0], r.figures.requests, r.figures.cost_nusd) for r in report.rows] == [
        ("hard", 1, 300),
        (None, 1, 40),
        ("cheap-chat", 2, 25),
    ]


async def test_period_edges_are_inclusive_then_exclusive(db: Database) -> None:
    inside = [
        record("2026-11-01T00:00:00", cost_nusd=1),
        record("2026-11-15T12:00:00", cost_nusd=2),
        record(at("2026-12-01T00:00:00") - 0.001, cost_nusd=4),
    ]
    outside = [record(at("2026-11-01T00:00:00") - 0.001, cost_nusd=100), record("2026-12-01T00:00:00", cost_nusd=200)]
    await insert(db, inside + outside)
    report = await reports.run(db, make_query(period="2026-11", by="day"))
    assert [(r.key[0], r.figures.cost_nusd) for r in report.rows] == [("2026-11-01", 1), ("2026-11-15", 2), ("2026-11-30", 4)]
    december = await reports.run(db, make_query(period="2026-12-01", by="day"))
    assert [(r.key[0], r.figures.cost_nusd) for r in december.rows] == [("2026-12-01", 200)]
    hours = await reports.run(db, make_query(since="2026-11-15T11:00:00Z", until="2026-11-15T12:00:00Z"))
    assert hours.empty  # 12:00:00 itself is the exclusive end
    hours = await reports.run(db, make_query(since="2026-11-15T12:00:00Z", until="2026-11-15T12:00:00.001Z"))
    assert hours.totals.cost_nusd == 2


async def test_days_are_utc_days_in_order(db: Database) -> None:
    records = sample(3, 400, DAYS)
    await insert(db, records)
    report = await reports.run(db, make_query(period="2026-11", by="day,team"))
    days = [r.key[0] for r in report.rows]
    assert days == sorted(days) and set(days) == set(DAYS)
    by_day = defaultdict(int)
    for r in records:
        by_day[datetime.fromtimestamp(r.ts, UTC).date().isoformat()] += r.cost_nusd
    assert {d: f.cost_nusd for (d,), f in ((r.key, r.figures) for r in reports.regroup(report, ("day",)).rows)} == by_day


async def test_regroup_equals_asking_the_store(db: Database) -> None:
    await insert(db, sample(4, 300, DAYS))
    fine = await reports.run(db, make_query(period="2026-11", by="day,team,model"))
    for by in (("team",), ("day",), ("model", "team")):
        direct = await reports.run(db, make_query(period="2026-11", by=",".join(by)))
        assert reports.regroup(fine, by) == direct


async def test_an_empty_period_reports_nothing(db: Database) -> None:
    await insert(db, sample(5, 50, DAYS))
    for by in ("team", "day,model"):
        report = await reports.run(db, make_query(period="2026-10", by=by))
        assert report.empty and report.rows == () and report.totals == Figures()
    assert "No requests in this period." in to_table(report)


async def test_sqlite_bounds_the_scan_with_the_ts_index(tmp_path: Path) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'l.db'}")
    try:
        plan = await db.fetch("EXPLAIN QUERY PLAN " + reports.build_sql("sqlite", ("team", "day")), 0.0, 1.0)
    finally:
        await db.close()
    assert any("USING INDEX ledger_ts" in str(step[-1]) for step in plan), plan


# -- renderings ---------------------------------------------------------------------------


@pytest.fixture
async def november(tmp_path: Path) -> reports.Report:
    db = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await insert(db, sample(6, 500, DAYS))
        return await reports.run(db, make_query(period="2026-11", by="team,model"))
    finally:
        await db.close()


def test_cents_round_half_up_and_show_sub_cent_amounts() -> None:
    assert cents(0) == "$0.00"
    assert cents(1_234_565_000_000) == "$1,234.57"
    assert cents(1_234_564_999_999) == "$1,234.56"
    assert cents(-2_500_000_000) == "-$2.50"
    assert cents(4_000_000) == "<$0.01"
    assert cents(-4_000_000) == ">-$0.01"


def test_table_is_aligned_with_separators_and_totals(november: reports.Report) -> None:
    text = to_table(november)
    lines = text.splitlines()
    assert lines[0].startswith("thrifty cost report: 2026-11 (UTC, 2026-11-01 00:00 up to 2026-12-01 00:00), by team, model")
    header, rule = lines[2], lines[3]
    assert header.split()[:3] == ["team", "model", "Requests"]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert f"{november.totals.requests:,}" in total and cents(november.totals.cost_nusd) in total
    table = [line for line in lines[2:] if line and not line.startswith("Amounts")]
    assert len({len(line) for line in table if line.startswith(("team", "TOTAL", "-"))}) == 1  # aligned
    assert rule.startswith("----") and 'legal, tax & "risk"' in text and "(none)" in text


def test_csv_parses_back_and_adds_up(november: reports.Report) -> None:
    body = to_csv(november)
    assert body.startswith("\ufeffteam,model,requests,prompt_tokens,completion_tokens,cost_usd,baseline_usd,")
    assert "\r\n" in body and "$" not in body
    rows = list(csv.DictReader(io.StringIO(body.removeprefix("\ufeff"), newline="")))
    total, data = rows[-1], rows[:-1]
    assert total["team"] == "TOTAL" and len(data) == len(november.rows)
    assert {r["team"] for r in data} >= {'legal, tax & "risk"', ""}
    for column in ("cost_usd", "baseline_usd", "savings_routing_usd", "overhead_usd", "net_savings_usd"):
        assert sum(Decimal(r[column]) for r in data) == Decimal(total[column])
    assert Decimal(total["cost_usd"]) == Decimal(november.totals.cost_nusd) / 10**9
    assert sum(int(r["requests"]) for r in data) == int(total["requests"]) == november.totals.requests


def test_csv_keeps_names_from_being_read_as_formulas() -> None:
    query = make_query(period="2026-11", by="user")
    report = reports.Report(query, (reports.Row(("=HYPERLINK(1)",), Figures(requests=1)),), Figures(requests=1))
    assert "'=HYPERLINK(1)" in to_csv(report)


def test_json_has_the_query_rows_and_exact_totals(november: reports.Report) -> None:
    doc = json.loads(to_json(november, NOW))
    assert doc["query"] == {
        "period": "2026-11",
        "label": "2026-11",
        "since": "2026-11-01T00:00:00Z",
        "until": "2026-12-01T00:00:00Z",
        "until_exclusive": True,
        "timezone": "UTC",
        "by": ["team", "model"],
    }
    assert doc["generated_at"] == "2026-11-23T03:15:00Z" and doc["currency"] == "USD"
    assert len(doc["rows"]) == len(november.rows)
    for metric in ("requests", "cost_nusd", "baseline_nusd", "savings_cache_nusd", "net_savings_nusd", "errors"):
        assert sum(r[metric] for r in doc["rows"]) == doc["totals"][metric]
    assert Decimal(doc["totals"]["cost_usd"]) * 10**9 == doc["totals"]["cost_nusd"]
    assert any(r["team"] is None for r in doc["rows"])


def total_cells(page: str) -> list[str]:
    row = page.split('<tr class="total">', 1)[1].split("</tr>", 1)[0]
    return re.findall(r'<td class="n">([^<]*)</td>', row)


async def test_html_has_svg_charts_and_nothing_external(tmp_path: Path) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await insert(db, [*sample(7, 800, DAYS), record("2026-11-04T09:00:00", team="<script>alert(1)</script>")])
        page = (await produce(db, make_query(period="2026-11", by="team"), "html", now=NOW)).body
        empty = (await produce(db, make_query(period="2026-10"), "html", now=NOW)).body
        for by in ("user,model", "cache,day"):  # asked twice, or folded from one query
            other = (await produce(db, make_query(period="2026-11", by=by), "html", now=NOW)).body
            assert f"By {by.replace(',', ', ')}" in other and other.count("<svg") == 3
            assert total_cells(other) == total_cells(page) and len(total_cells(page)) == len(reports.METRICS)
    finally:
        await db.close()
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3
    for heading in ("Spend over time, by day", "Spend by team", "Savings by lever", "By team"):
        assert heading in page
    assert page.count("<rect") >= 30 + 5  # one bar per day of November, five levers
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered and "<script" not in lowered and "url(" not in lowered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "No requests in this period." in empty and "<svg" not in empty


def test_axis_ticks_are_round() -> None:
    assert ticks(97.3) == [0, 25, 50, 75, 100]
    assert ticks(0.0042) == pytest.approx([0, 0.002, 0.004, 0.006])
    assert ticks(0) == [0.0, 1.0]
    assert [money_tick(v) for v in (0, 0.005, 2.5, 75, 25_000, 3_000_000)] == ["$0", "$0.005", "$2.5", "$75", "$25k", "$3M"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
async def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    db = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        await insert(db, sample(8, 500, DAYS))
        page = (await produce(db, make_query(period="2026-11", by="team,model"), "html", now=NOW)).body
    finally:
        await db.close()
    html, png = tmp_path / "report.html", tmp_path / "report.png"
    html.write_text(page, encoding="utf-8")
    browser = await asyncio.create_subprocess_exec(
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1200,1800",
        f"--screenshot={png}",
        html.as_uri(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(browser.wait(), 90) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000  # a blank page is a few KB


# -- a million records --------------------------------------------------------------------

MILLION = 1_000_000
# The rows are made by SQLite itself (one INSERT ... SELECT over a counter, in one
# transaction): binding 37 parameters a row through executemany costs about twice as long
# for a million rows, and the point here is the report's query, not the writer's path.
_BASE_COLUMNS = COLUMNS[: COLUMNS.index("error_code") + 1]  # the v2 columns; later ones keep their defaults
_GENERATE = f"""INSERT INTO ledger ({", ".join(_BASE_COLUMNS)})
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1)
SELECT printf('m%012d', i), printf('req_m%012d', i), ? + i * ?, 'chat/completions', 'key_' || (i % 50),
       CASE WHEN i % 21 = 20 THEN NULL ELSE 'team-' || (i % 21) END, 'app', NULL, NULL,
       'gpt-4o', CASE i % 3 WHEN 0 THEN 'gpt-4o' WHEN 1 THEN 'gpt-4o-mini' ELSE 'fast' END, 'openai', NULL, NULL,
       CASE WHEN i % 10 = 0 THEN 'exact' ELSE 'miss' END, 0, 120, 100, i % 700, 0, 0, 'upstream',
       '2.5', '10', '1.25', 'litellm', (i % 9973) * 1000, (i % 9973) * 1000 + (i % 13) * 100,
       0, (i % 13) * 50, (i % 13) * 50, i % 7, 100.0, 90.0, NULL,
       CASE WHEN i % 97 = 0 THEN 502 ELSE 200 END, NULL
FROM n"""


def mod_sum(n: int, m: int) -> int:
    """sum(i % m for i in range(n)), without the loop."""
    whole, rest = divmod(n, m)
    return whole * m * (m - 1) // 2 + rest * (rest - 1) // 2


def test_mod_sum() -> None:
    for n, m in ((0, 7), (10, 7), (1000, 13), (5, 9)):
        assert mod_sum(n, m) == sum(i % m for i in range(n))


async def test_a_million_records_report_quickly_and_exactly(tmp_path: Path) -> None:
    start = at("2026-11-01T00:00:00")
    step = 30 * 86_400 / MILLION  # the whole of November
    db = await open_database(f"sqlite:///{tmp_path / 'million.db'}")
    try:
        began = time.perf_counter()
        await db.execute("BEGIN")  # one statement, one transaction: SQLite generates the rows itself
        await db.execute(_GENERATE, MILLION, start, step)
        await db.execute("COMMIT")
        await insert(db, [record(start - 1, cost_nusd=10**12), record("2026-12-01T00:00:00", cost_nusd=10**12)])
        filled = time.perf_counter() - began
        timings = {}
        for by in ("day,team,model", "key"):
            began = time.perf_counter()
            report = await reports.run(db, make_query(period="2026-11", by=by))
            timings[by] = time.perf_counter() - began
            assert report.totals.requests == MILLION
            assert sum((r.figures for r in report.rows), Figures()) == report.totals
        began = time.perf_counter()
        one_day = await reports.run(db, make_query(period="2026-11-13"))
        timings["one day"] = time.perf_counter() - began
    finally:
        await db.close()
    want_cost = 1000 * mod_sum(MILLION, 9973)
    want = Figures(
        requests=MILLION,
        prompt_tokens=100 * MILLION,
        completion_tokens=mod_sum(MILLION, 700),
        cost_nusd=want_cost,
        baseline_nusd=want_cost + 100 * mod_sum(MILLION, 13),
        savings_routing_nusd=50 * mod_sum(MILLION, 13),
        savings_pruning_nusd=50 * mod_sum(MILLION, 13),
        overhead_nusd=mod_sum(MILLION, 7),
        errors=len(range(0, MILLION, 97)),
    )
    assert report.totals == want
    assert len(report.rows) == 50
    low, high = at("2026-11-13T00:00:00"), at("2026-11-14T00:00:00")
    assert one_day.totals.requests == sum(1 for i in range(MILLION) if low <= start + i * step < high)  # same float maths
    print(f"\n1M records: filled in {filled:.1f} s; report times " + ", ".join(f"{k}: {v:.2f} s" for k, v in timings.items()))
    assert timings["one day"] < 1.0
    assert max(timings.values()) < 15.0
