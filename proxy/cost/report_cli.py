"""``thrifty report``: the finance report of the ledger on the command line.

Wired into ``proxy.cli`` by :func:`add_report_parser` and :func:`run_report`. The period
is ``--period`` (a month ``2026-11``, a day ``2026-11-23`` or a year) or ``--since`` /
``--until`` (UTC; ``--until`` exclusive); without either it is the current month. Bad input
prints one line, ``thrifty: error: ...``, and exits with code 2; a period without
traffic prints "No requests in this period." and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from proxy.cost.report_render import FORMATS, Output, produce
from proxy.cost.reports import GROUP_KEYS, ReportError, make_query
from proxy.settings import Settings
from proxy.storage.database import open_database, sqlite_path

_EPILOG = """examples:
  thrifty report                                   this month, by team
  thrifty report --period 2026-10 --by team,model  October, by team and model
  thrifty report --since 2026-11-01 --until 2026-11-08 --by day --format csv --out week.csv
  thrifty report --by team --format html --out report.html
"""


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to the ``thrifty`` sub-commands (``subparsers`` from add_subparsers)."""
    report: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="spend and savings from the ledger, by team, app, key, model, day, ...",
        description="Spend, baseline and savings by lever from the cost ledger, grouped as asked, with totals.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("--config", metavar="FILE", help="YAML configuration (default: $THRIFTY_CONFIG, else zero-config)")
    report.add_argument("--since", metavar="DATE", help="start, inclusive: YYYY-MM-DD or an ISO datetime (UTC)")
    report.add_argument("--until", metavar="DATE", help="end, exclusive (default: the end of today)")
    report.add_argument("--period", metavar="PERIOD", help="a month (2026-11), a day (2026-11-23) or a year; default this month")
    report.add_argument("--by", metavar="KEYS", help=f"grouping, comma-separated: {','.join(GROUP_KEYS)} (default: team)")
    report.add_argument("--format", choices=FORMATS, default="table", help="default: table")
    report.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    return report


def _fail(message: str) -> int:
    print(f"thrifty: error: {message}", file=sys.stderr)
    return 2


async def run_report(settings: Settings, args: argparse.Namespace) -> int:
    try:
        query = make_query(since=args.since, until=args.until, period=args.period, by=args.by)
    except ReportError as exc:
        return _fail(str(exc))
    url = settings.ledger.url
    missing = _missing_sqlite(url)
    if missing:
        return _fail(f"ledger.url: no ledger database at {missing!r} (run the report where the gateway writes its ledger)")
    db = await open_database(url)
    try:
        output = await produce(db, query, args.format)
    finally:
        await db.close()
    if args.out:
        return _write_file(Path(args.out), output)
    return _write_stdout(output.body)


def _missing_sqlite(url: str) -> str | None:
    """The path of a SQLite ledger that does not exist (opening it would create an empty one)."""
    if not url.startswith("sqlite://"):
        return None
    path = sqlite_path(url)
    return None if path == ":memory:" or Path(path).is_file() else path


def _write_file(path: Path, output: Output) -> int:
    try:
        with path.open("w", encoding="utf-8", newline="") as file:  # newline="": the CSV keeps its CRLFs
            file.write(output.body)
    except OSError as exc:
        return _fail(f"--out: cannot write {str(path)!r}: {exc.strerror}")
    print(f"wrote {path}")
    return 0


def _write_stdout(text: str) -> int:
    try:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
    except BrokenPipeError:  # `thrifty report | head`: the reader left, which is fine
        sys.stdout = open("/dev/null", "w")  # noqa: SIM115 - keeps the interpreter's exit flush quiet
    return 0
