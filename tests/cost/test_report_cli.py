"""``thrifty report`` as a real process: formats, files, the empty period, and bad input.

Bad input must print exactly one line, ``thrifty: error: ...``, and exit with code 2.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.cost.record import LedgerRecord
from proxy.storage.database import open_database
from tests.cost import insert, record, sample
from tests.services import postgres_server, postgres_url  # noqa: F401

THRIFTY = str(Path(sys.executable).with_name("thrifty"))
DAYS = ["2026-11-02", "2026-11-03", "2026-11-17", "2026-11-30"]

Run = Callable[..., subprocess.CompletedProcess[str]]


def write_ledger(url: str, records: list[LedgerRecord]) -> None:
    async def fill() -> None:
        db = await open_database(url)
        try:
            await insert(db, records)
        finally:
            await db.close()

    asyncio.run(fill())


def config_for(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "thrifty.yaml"
    config.write_text(f"ledger:\n  url: {url}\n", encoding="utf-8")
    return config


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def run(tmp_path: Path, ledger: str) -> Run:
    config = config_for(tmp_path, ledger)

    def run(*args: str, config_file: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [THRIFTY, "report", "--config", str(config_file or config), *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=60,
            cwd=tmp_path,
        )

    return run


@pytest.fixture
def records(ledger: str) -> list[LedgerRecord]:
    made = [*sample(11, 300, DAYS), record("2026-10-31T23:59:59", team="october"), record("2026-12-01T00:00:00", team="dec")]
    write_ledger(ledger, made)
    return made


def test_table_by_team(run: Run, records: list[LedgerRecord]) -> None:
    done = run("--period", "2026-11", "--by", "team")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("thrifty cost report: 2026-11 (UTC, 2026-11-01 00:00 up to 2026-12-01 00:00), by team\n")
    assert "october" not in out and "dec " not in out
    total = next(line for line in out.splitlines() if line.startswith("TOTAL"))
    november = [r for r in records if r.team not in ("october", "dec")]
    assert total.split()[1] == f"{len(november):,}"
    assert "$" in total and "(none)" in out and "Net savings" in out


def test_csv_to_a_file_parses_back(run: Run, records: list[LedgerRecord], tmp_path: Path) -> None:
    done = run("--since", "2026-11-01", "--until", "2026-12-01", "--by", "day,model", "--format", "csv", "--out", "r.csv")
    assert done.returncode == 0 and done.stdout == "wrote r.csv\n" and done.stderr == ""
    raw = (tmp_path / "r.csv").read_bytes()
    assert b"\r\n" in raw and b"$" not in raw
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    total, data = rows[-1], rows[:-1]
    assert total["day"] == "TOTAL" and {r["day"] for r in data} == set(DAYS)
    assert sum(Decimal(r["cost_usd"]) for r in data) == Decimal(total["cost_usd"])
    want = sum(r.cost_nusd for r in records if r.team not in ("october", "dec"))
    assert Decimal(total["cost_usd"]) * 10**9 == want


def test_json_on_stdout(run: Run, records: list[LedgerRecord]) -> None:
    done = run("--period", "2026-11-03", "--by", "cache,provider", "--format", "json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["query"]["by"] == ["cache", "provider"] and doc["query"]["since"] == "2026-11-03T00:00:00Z"
    day = [r for r in records if r.ts >= 1793664000 and r.ts < 1793750400]  # 2026-11-03, UTC
    assert doc["totals"]["requests"] == len(day) and doc["totals"]["cost_nusd"] == sum(r.cost_nusd for r in day)


def test_html_to_a_file(run: Run, records: list[LedgerRecord], tmp_path: Path) -> None:
    done = run("--period", "2026-11", "--format", "html", "--out", str(tmp_path / "r.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("<svg") == 3 and "https://" not in page and "http://" not in page


def test_an_empty_period_says_so_and_succeeds(run: Run, records: list[LedgerRecord]) -> None:
    done = run("--period", "2025-01")
    assert done.returncode == 0 and done.stderr == ""
    assert "No requests in this period." in done.stdout
    empty_csv = run("--period", "2025-01", "--format", "csv")
    assert empty_csv.returncode == 0 and empty_csv.stdout.count("\n") == 2  # the header and a zero TOTAL


def test_a_fresh_ledger_reports_the_current_month_as_empty(run: Run, ledger: str) -> None:
    write_ledger(ledger, [])
    done = run()
    assert done.returncode == 0 and "No requests in this period." in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--by", "team,colour"], "--by: unknown grouping key 'colour'"),
        (["--by", ""], "--by: unknown grouping key an empty name"),
        (["--since", "2026-02-30"], "--since: '2026-02-30' is not a date"),
        (["--since", "last week"], "--since: 'last week' is not a date"),
        (["--since", "2026-11-05", "--until", "2026-11-05"], "must be before --until"),
        (["--since", "2026-11-06T00:00:00Z", "--until", "2026-11-05"], "must be before --until"),
        (["--period", "2026-11", "--since", "2026-11-01"], "--period cannot be combined with --since or --until"),
        (["--period", "2026-11", "--until", "2026-11-20"], "--period cannot be combined"),
        (["--until", "2026-11-20"], "--until needs --since"),
        (["--period", "2026-13"], "--period: '2026-13' is not a period"),
        (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
        (["--colour"], "unrecognized arguments: --colour"),
        (["--out", "no/such/dir/r.csv"], "--out: cannot write 'no/such/dir/r.csv'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run: Run, records: list[LedgerRecord], args: list[str], message: str) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("thrifty: error: ") and message in lines[0]


def test_a_missing_ledger_is_one_line(run: Run, tmp_path: Path) -> None:
    done = run()
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"thrifty: error: ledger.url: no ledger database at '{tmp_path / 'ledger.db'}'"
        " (run the report where the gateway writes its ledger)"
    ]
    assert not (tmp_path / "ledger.db").exists()  # a report never creates an empty ledger


def test_a_bad_config_is_one_line(run: Run, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("ledger:\n  url: mysql://x\n", encoding="utf-8")
    done = run(config_file=config)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "ledger.url" in done.stderr


def test_help_lists_the_options(run: Run) -> None:
    done = subprocess.run([THRIFTY, "report", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--since", "--until", "--period", "--by", "--format", "--out", "team,app,key,model,day,user,provider,cache"):
        assert option in done.stdout


def test_postgresql_ledger(run: Run, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url: str = request.getfixturevalue("postgres_url")
    made = sample(12, 200, DAYS)
    write_ledger(url, made)
    done = run("--period", "2026-11", "--by", "team", "--format", "json", config_file=config_for(tmp_path, url))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["totals"]["requests"] == len(made)
    assert doc["totals"]["net_savings_nusd"] == sum(
        r.savings_cache_nusd + r.savings_routing_nusd + r.savings_pruning_nusd - r.overhead_nusd for r in made
    )
    assert sum(r["cost_nusd"] for r in doc["rows"]) == doc["totals"]["cost_nusd"] == sum(r.cost_nusd for r in made)
