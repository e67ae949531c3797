"""The benchmark's results: one row per target, the printed table, the verdicts and the JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tests.benchmarks.measure import WrkResult

TARGETS = {"rps_vs_litellm": 20.0, "added_p50_ms": 1.0, "rss_mb": 120.0}


@dataclass
class Result:
    name: str
    version: str = ""
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    load: WrkResult | None = None
    latency: WrkResult | None = None
    ttfb: dict[str, Any] | None = None
    rss_mb: float | None = None
    cpu_us_per_request: float | None = None
    upstream_cpu_us_per_request: float | None = None
    other_load_cores: float | None = None
    load_average_at_start: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"


def _added(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return "-"
    return "+" + _ms(value - base) if value >= base else "-" + _ms(base - value)


def table(results: list[Result]) -> str:
    base = results[0]
    base_p50 = base.latency.p50_ms if base.latency else None
    base_p99 = base.latency.p99_ms if base.latency else None
    header = (
        "target",
        "version",
        "req/s @32c",
        "p50 @1c",
        "p99 @1c",
        "added p50",
        "added p99",
        "stream TTFB p50",
        "RSS",
        "CPU/request",
        "others' CPU",
    )
    rows: list[tuple[str, ...]] = []
    failures: list[str] = []
    for r in results:
        if not r.ok or r.load is None or r.latency is None:
            rows.append((r.name, r.version or "-", "FAILED", *(["-"] * 8)))
            failures.append(f"{r.name}: {r.status}")
            continue
        ttfb = (r.ttfb or {}).get("ttfb_ms", {}).get("p50")
        ttfb_cell = _ms(ttfb) if ttfb is not None else "FAILED"
        same = r is base
        rows.append(
            (
                r.name,
                r.version,
                f"{r.load.rps:,.0f}",
                _ms(r.latency.p50_ms),
                _ms(r.latency.p99_ms),
                "" if same else _added(r.latency.p50_ms, base_p50),
                "" if same else _added(r.latency.p99_ms, base_p99),
                ttfb_cell,
                f"{r.rss_mb:.0f} MB" if r.rss_mb is not None else "-",
                f"{r.cpu_us_per_request:,.0f} µs" if r.cpu_us_per_request is not None else "-",
                f"{r.other_load_cores:.2f} cores" if r.other_load_cores is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
            + " |"
        )

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(row) for row in rows)]
    for r in results:
        out += [f"  note, {r.name}: {note}" for note in r.notes]
    out += [f"  FAILED, {f}" for f in failures]
    return "\n".join(out)


def verdicts(results: list[Result]) -> list[str]:
    by_name = {r.name: r for r in results}
    thrifty, litellm, base = by_name.get("thrifty"), by_name.get("litellm"), results[0]
    if thrifty is None or not thrifty.ok or thrifty.load is None or thrifty.latency is None:
        return ["thrifty did not run: no verdicts"]
    out = []
    if litellm is not None and litellm.ok and litellm.load is not None and litellm.load.rps > 0:
        ratio = thrifty.load.rps / litellm.load.rps
        passed = ratio >= TARGETS["rps_vs_litellm"]
        out.append(f"req/s >= 20x LiteLLM's: {thrifty.load.rps:,.0f} / {litellm.load.rps:,.1f} = {ratio:.1f}x  {_pf(passed)}")
    else:
        out.append("req/s >= 20x LiteLLM's: not measured (LiteLLM skipped or failed)")
    if base.latency is not None:
        added = thrifty.latency.p50_ms - base.latency.p50_ms
        out.append(f"added p50 <= 1 ms: {added:+.3f} ms  {_pf(added <= TARGETS['added_p50_ms'])}")
    if thrifty.rss_mb is not None:
        out.append(f"resident <= 120 MB: {thrifty.rss_mb:.0f} MB  {_pf(thrifty.rss_mb <= TARGETS['rss_mb'])}")
    return out


def _pf(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def result_json(result: Result) -> dict[str, Any]:
    data = asdict(result)
    for key in ("load", "latency"):
        wrk = getattr(result, key)
        if wrk is not None:
            data[key]["rps"] = wrk.rps
    return data
