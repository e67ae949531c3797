"""Finance reports over the ledger: a query (period and grouping) in, aggregated rows out.

This is the read side of the ``cost`` package, behind ``thrifty report`` and
``GET /v1/thrifty/reports``. :func:`make_query` turns the user's words (``--period
2026-11``, ``--since``/``--until``, ``--by team,model``) into a :class:`ReportQuery` or a
:class:`ReportError` naming what is wrong; :func:`run` sends one ``GROUP BY`` to the store,
so the database does the summing and only one row per group comes back, whatever the
number of records. Money stays in integer nano-dollars end to end: the totals are the
exact sum of the rows, and :func:`regroup` folds a fine grouping into a coarser one (the
HTML page derives its by-day and by-team charts from a single query that way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

from proxy.storage.database import Database

# --by name -> SQL expression per dialect ("day" is a whole-day bucket, rendered as a date).
_DAY = {"sqlite": "CAST(ts / 86400 AS INTEGER)", "postgresql": "CAST(FLOOR(ts / 86400) AS BIGINT)"}
_KEYS: dict[str, str] = {
    "team": "team",
    "app": "app",
    "key": "key_id",
    # the model that was paid for; a request that failed before routing keeps the one asked for
    "model": "COALESCE(served_model, requested_model)",
    "day": "",
    "user": "user_id",
    "provider": "provider",
    "cache": "cache",
    # the policy rule that chose the model (NULL where no policy ran or no rule applied)
    "route": "route",
}
GROUP_KEYS: tuple[str, ...] = tuple(_KEYS)
DEFAULT_BY: tuple[str, ...] = ("team",)

_SUMS = (
    "COUNT(*)",
    "SUM(prompt_tokens)",
    "SUM(completion_tokens)",
    "SUM(cost_nusd)",
    "SUM(baseline_nusd)",
    "SUM(savings_cache_nusd)",
    "SUM(savings_routing_nusd)",
    "SUM(savings_pruning_nusd)",
    "SUM(overhead_nusd)",
    "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END)",
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$")
_PERIOD = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


class ReportError(ValueError):
    """Bad report input; ``param`` names the option (``since``, ``by``, ...)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ReportQuery:
    since: datetime  # inclusive, UTC
    until: datetime  # exclusive, UTC
    by: tuple[str, ...]
    period: str | None = None  # "2026-11" when asked for by --period (or by default)

    @property
    def label(self) -> str:
        if self.period:
            return self.period
        last = self.until - timedelta(microseconds=1)
        if _midnight(self.since) and _midnight(self.until):
            first_day, last_day = self.since.date().isoformat(), last.date().isoformat()
            return first_day if first_day == last_day else f"{first_day} to {last_day}"
        return f"{_stamp(self.since)} to {_stamp(self.until)} (exclusive)"

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "label": self.label,
            "since": _iso(self.since),
            "until": _iso(self.until),
            "until_exclusive": True,
            "timezone": "UTC",
            "by": list(self.by),
        }


@dataclass(frozen=True, slots=True)
class Figures:
    """One row's sums. Money in nano-dollars; ``net_savings_nusd`` is derived, never stored."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0
    baseline_nusd: int = 0
    savings_cache_nusd: int = 0
    savings_routing_nusd: int = 0
    savings_pruning_nusd: int = 0
    overhead_nusd: int = 0
    errors: int = 0

    @property
    def net_savings_nusd(self) -> int:
        return self.savings_cache_nusd + self.savings_routing_nusd + self.savings_pruning_nusd - self.overhead_nusd

    def __add__(self, other: Figures) -> Figures:
        return Figures(*(getattr(self, f) + getattr(other, f) for f in _FIELDS))

    def value(self, metric: str) -> int:
        return int(getattr(self, metric))


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Figures))

# (metric, column title, kind): the order of columns in every rendering.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("requests", "Requests", "count"),
    ("prompt_tokens", "Prompt tokens", "count"),
    ("completion_tokens", "Completion tokens", "count"),
    ("cost_nusd", "Cost", "money"),
    ("baseline_nusd", "Baseline", "money"),
    ("savings_cache_nusd", "Saved: cache", "money"),
    ("savings_routing_nusd", "Saved: routing", "money"),
    ("savings_pruning_nusd", "Saved: pruning", "money"),
    ("overhead_nusd", "Overhead", "money"),
    ("net_savings_nusd", "Net savings", "money"),
    ("errors", "Errors", "count"),
)


@dataclass(frozen=True, slots=True)
class Row:
    key: tuple[str | None, ...]  # one value per grouping key; None where the record had none
    figures: Figures


@dataclass(frozen=True, slots=True)
class Report:
    query: ReportQuery
    rows: tuple[Row, ...]
    totals: Figures

    @property
    def empty(self) -> bool:
        return self.totals.requests == 0


def make_query(
    *,
    since: str | None = None,
    until: str | None = None,
    period: str | None = None,
    by: str | None = None,
    now: datetime | None = None,
    flag: str = "--",
) -> ReportQuery:
    """Validate the user's words; the default period is the current month (UTC).

    ``flag`` prefixes option names in messages: ``--since`` on the command line, ``since``
    for a URL parameter.
    """
    now = now or datetime.now(UTC)
    keys = parse_by(by, flag)
    if period is not None and (since is not None or until is not None):
        raise ReportError(f"{flag}period cannot be combined with {flag}since or {flag}until", "period")
    if since is None and until is not None:
        raise ReportError(f"{flag}until needs {flag}since", "until")
    if since is not None:
        start = parse_instant(since, "since", flag)
        end = parse_instant(until, "until", flag) if until is not None else _midnight_after(now)
        if start >= end:
            what = f"{flag}until ({_stamp(end)}, exclusive)" if until is not None else f"the end of today ({_stamp(end)})"
            raise ReportError(f"{flag}since ({_stamp(start)}) must be before {what}", "since")
        return ReportQuery(start, end, keys)
    period = period if period is not None else f"{now.year:04d}-{now.month:02d}"
    start, end = parse_period(period, flag)
    return ReportQuery(start, end, keys, period)


def parse_by(text: str | None, flag: str = "--") -> tuple[str, ...]:
    if text is None:
        return DEFAULT_BY
    keys: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if name not in _KEYS:
            shown = repr(part.strip()) if part.strip() else "an empty name"
            raise ReportError(f"{flag}by: unknown grouping key {shown} (choose from {', '.join(GROUP_KEYS)})", "by")
        if name not in keys:
            keys.append(name)
    return tuple(keys)


def parse_instant(text: str, param: str, flag: str = "--") -> datetime:
    """``YYYY-MM-DD`` or a full ISO datetime; without an offset it is UTC."""
    value = text.strip()
    try:
        if not _DATE.match(value):
            raise ValueError
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(
            f"{flag}{param}: {text!r} is not a date (use YYYY-MM-DD or an ISO datetime like 2026-11-23T08:00:00Z)", param
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_period(text: str, flag: str = "--") -> tuple[datetime, datetime]:
    """``YYYY`` (a year), ``YYYY-MM`` (a month) or ``YYYY-MM-DD`` (a day), as [start, end)."""
    match = _PERIOD.match(text.strip())
    try:
        if match is None:
            raise ValueError
        year, month, day = int(match[1]), match[2], match[3]
        if day is not None:
            first = date(year, int(month), int(day))
            after = first + timedelta(days=1)
        elif month is not None:
            first = date(year, int(month), 1)
            after = date(year + (first.month == 12), first.month % 12 + 1, 1)
        else:
            first, after = date(year, 1, 1), date(year + 1, 1, 1)
    except (ValueError, OverflowError):
        raise ReportError(
            f"{flag}period: {text!r} is not a period (use YYYY-MM for a month, YYYY-MM-DD for a day, YYYY for a year)",
            "period",
        ) from None
    return _at_midnight(first), _at_midnight(after)


def build_sql(dialect: str, by: tuple[str, ...]) -> str:
    """One aggregate over the period, grouped in the store (the ``ts`` index bounds the scan)."""
    exprs = [_DAY[dialect] if name == "day" else _KEYS[name] for name in by]
    select = ", ".join([*exprs, *_SUMS])
    sql = f"SELECT {select} FROM ledger WHERE ts >= ? AND ts < ?"
    if exprs:
        sql += " GROUP BY " + ", ".join(str(i) for i in range(1, len(exprs) + 1))
    return sql


async def run(db: Database, query: ReportQuery) -> Report:
    rows = await db.fetch(build_sql(db.dialect, query.by), query.since.timestamp(), query.until.timestamp())
    width = len(query.by)
    built = []
    for raw in rows:
        figures = Figures(*(int(v or 0) for v in raw[width:]))
        if figures.requests:  # an ungrouped aggregate over nothing still returns one row
            built.append(Row(tuple(_key(name, v) for name, v in zip(query.by, raw[:width], strict=True)), figures))
    return _report(query, built)


def regroup(report: Report, by: tuple[str, ...]) -> Report:
    """Fold rows into a coarser grouping (``by`` a subset of the report's), exactly."""
    index = [report.query.by.index(name) for name in by]
    sums: dict[tuple[str | None, ...], Figures] = {}
    for row in report.rows:
        key = tuple(row.key[i] for i in index)
        sums[key] = sums.get(key, Figures()) + row.figures
    query = ReportQuery(report.query.since, report.query.until, by, report.query.period)
    return _report(query, [Row(k, v) for k, v in sums.items()])


def _report(query: ReportQuery, rows: list[Row]) -> Report:
    totals = Figures()
    for row in rows:
        totals = totals + row.figures
    return Report(query, tuple(sorted(rows, key=_order(query.by))), totals)


def _order(by: tuple[str, ...]) -> Any:
    """By day first when grouped by day (a time series), then by spend, largest first."""
    day = by.index("day") if "day" in by else None

    def key(row: Row) -> tuple[Any, ...]:
        names = tuple((v is None, v or "") for v in row.key)
        return (row.key[day] or "" if day is not None else "", -row.figures.cost_nusd, *names)

    return key


def _key(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if name == "day":
        return (date(1970, 1, 1) + timedelta(days=int(value))).isoformat()
    return str(value)


def _at_midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _midnight(moment: datetime) -> bool:
    return moment.hour == moment.minute == moment.second == moment.microsecond == 0


def _midnight_after(now: datetime) -> datetime:
    return _at_midnight(now.astimezone(UTC).date() + timedelta(days=1))


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _stamp(moment: datetime) -> str:
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}"
    return text + " UTC"
