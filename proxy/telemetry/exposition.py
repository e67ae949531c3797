"""Telemetry, exposition: the whole server's figures in the Prometheus text format.

Runs on a worker thread when ``/metrics`` is scraped (``api.routes``): this process's snapshot
plus the files the other workers of ``thrifty serve --workers N`` keep in the per-server
directory, summed, then rendered by prometheus_client (which does the escaping). Files of workers
that died stay and keep counting (a counter must never go back); gauges (breaker state) count
live workers only.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson

from proxy.settings import NANO_PER_USD
from proxy.telemetry.schema import COUNTERS, HISTOGRAMS, ROW_LABELS, USD_COLUMNS, Snapshot

log = logging.getLogger("thrifty.telemetry")


def write(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(f".{threading.get_ident()}.tmp")  # two writes at shutdown never share one
    temporary.write_bytes(data)
    os.replace(temporary, path)  # a reader sees the old file or the new one, never half of one


def _read_others(directory: Path, own: Path | None, known: set[str]) -> list[Snapshot]:
    """The other workers' files. A directory listing taken while a worker renames its new file into
    place can miss that file, so every name once seen is kept in ``known`` (files stay as long as
    the server runs) and read by name: the open itself never misses."""
    known.update(path.name for path in directory.glob("*.json"))
    found = []
    for name in sorted(known):
        if own is not None and name == own.name:
            continue
        path = directory / name
        try:
            found.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError) as exc:  # a worker's file removed in between: skip it
            log.debug("metrics file %s skipped: %s", path, exc)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """The sum of the workers' figures; breaker states are counted over live workers only."""
    rows: dict[tuple[str, ...], list[float]] = {}
    hist: dict[str, dict[tuple[str, ...], list[float]]] = {name: {} for name in HISTOGRAMS}
    errors: dict[str, float] = {}
    breakers: dict[tuple[str, str], int] = {}
    width = len(ROW_LABELS)
    for snap in snapshots:
        for row in snap.get("rows", ()):
            _add(rows, tuple(row[:width]), row[width:])
        for name, table in snap.get("hist", {}).items():
            if name in hist:
                labels = len(HISTOGRAMS[name][0])
                for cell in table:
                    _add(hist[name], tuple(cell[:labels]), cell[labels:])
        for tier, count in snap.get("cache_errors", {}).items():
            errors[tier] = errors.get(tier, 0) + count
        if snap.get("pid") == os.getpid() or _alive(int(snap.get("pid", 0))):
            for model, state in snap.get("breakers", ()):
                breakers[model, state] = breakers.get((model, state), 0) + 1
    return {"rows": rows, "hist": hist, "cache_errors": errors, "breakers": breakers}


def _add(table: dict[tuple[str, ...], list[float]], key: tuple[str, ...], values: list[float]) -> None:
    cell = table.get(key)
    if cell is None or len(cell) != len(values):
        table[key] = list(values)
    else:
        for i, value in enumerate(values):
            cell[i] += value


def expose(own: Snapshot, directory: Path | None, own_file: Path | None, known: set[str]) -> bytes:
    snapshots = [own, *(_read_others(directory, own_file, known) if directory is not None else [])]
    return render(merge(snapshots))


def render(merged: Snapshot) -> bytes:
    """The Prometheus text format of merged figures (prometheus_client does the escaping)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

    families: list[Metric] = []
    rows: dict[tuple[str, ...], list[float]] = merged["rows"]
    for name, (kept, columns, doc, extra) in COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=[ROW_LABELS[i] for i in kept] + ([extra] if extra else []))
        sums: dict[tuple[str, ...], float] = {}
        for key, values in rows.items():
            for label, column in columns:
                projected = tuple(key[i] for i in kept) + ((label,) if label is not None else ())
                value = values[column] / NANO_PER_USD if column in USD_COLUMNS else values[column]
                sums[projected] = sums.get(projected, 0.0) + value
        for projected, value in sorted(sums.items()):
            family.add_metric(list(projected), value)
        families.append(family)
    errors = CounterMetricFamily(
        "thrifty_cache_errors",
        "Cache calls that failed (Redis down or slow; the embedder): those requests were served uncached.",
        labels=["tier"],
    )
    for tier, count in sorted(merged["cache_errors"].items()):
        errors.add_metric([tier], count)
    families.append(errors)
    for name, (labels, bounds, doc) in HISTOGRAMS.items():
        histogram = HistogramMetricFamily(name, doc, labels=list(labels))
        for key, cell in sorted(merged["hist"][name].items()):
            running, buckets = 0.0, []
            edges = [*(str(float(b)) for b in bounds), "+Inf"]
            for bound, count in zip(edges, cell[:-1], strict=True):
                running += count
                buckets.append((bound, running))
            histogram.add_metric(list(key), buckets, cell[-1])
        families.append(histogram)
    breaker = GaugeMetricFamily(
        "thrifty_upstream_breaker_state",
        "Worker processes whose circuit breaker for the model is in each state (closed, open, half_open).",
        labels=["gen_ai_response_model", "state"],
    )
    for (model, state), workers in sorted(merged["breakers"].items()):
        breaker.add_metric([model, state], workers)
    families.append(breaker)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Any]):
        self._families = families

    def collect(self) -> list[Any]:
        return self._families
