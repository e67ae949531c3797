"""Stage: telemetry, recording. Counts each finished exchange into plain per-process tables.

Sits after the ledger: ``Ledger.record`` hands every priced exchange (served, cached, failed or
cancelled) to :meth:`Telemetry.record` exactly once. Recording adds a few numbers to dicts of
lists (no locks, no I/O, no prometheus_client objects on the hot path); the text format is built
only when ``/metrics`` is scraped (``proxy.telemetry.exposition``, on a worker thread). With
``thrifty serve --workers N`` each worker also writes its tables to its file in the per-server
directory the supervisor creates (``TelemetryConfig.shared_dir``), at most ``FLUSH_SECONDS``
after a change and off the event loop, and a scrape reaching any worker sums every worker's file
with its own live tables: each scrape reports the whole server, the other workers' figures at
most ``FLUSH_SECONDS`` old.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from proxy.settings import TelemetryConfig
from proxy.telemetry.exposition import expose, write
from proxy.telemetry.schema import (
    ATTEMPTS,
    BASELINE,
    COST,
    COUNT,
    ESCALATED,
    FALLBACKS,
    FLUSH_SECONDS,
    HISTOGRAMS,
    INPUT,
    MAX_REQUESTED_MODELS,
    OUTPUT,
    OVERHEAD,
    REFUSED,
    ROW_WIDTH,
    SAVED_CACHE,
    SAVED_PRUNING,
    SAVED_ROUTING,
    SECONDS,
    SIMILARITY,
    TOKENS,
    Snapshot,
)

if TYPE_CHECKING:
    from proxy.pipeline.cache import ResponseCache
    from proxy.pipeline.exchange import Exchange
    from proxy.providers.health import Health
    from proxy.telemetry.tracing import Tracing

log = logging.getLogger("thrifty.telemetry")


class Telemetry:
    """The per-process tables, their exposition, and the tracer (when configured)."""

    def __init__(
        self,
        config: TelemetryConfig,
        health: Health | None = None,
        cache: ResponseCache | None = None,
        models: Iterable[str] = (),
        tracing: Tracing | None = None,
    ):
        self.config = config
        self.tracing = tracing
        self._health, self.cache, self._models = health, cache, tuple(models)
        self._rows: dict[tuple[str, ...], list[float]] = {}
        self._hist: dict[str, dict[tuple[str, ...], list[float]]] = {name: {} for name in HISTOGRAMS}
        self._requested: set[str] = set(self._models)
        self._dirty = False
        self._file: Path | None = None
        if config.shared_dir:
            self._file = Path(config.shared_dir) / f"{os.getpid()}-{time.time_ns()}.json"
        self._flusher: asyncio.Task[None] | None = None
        self._known: set[str] = set()  # the workers' file names seen so far (only the scrape's thread touches it)

    def record(self, ex: Exchange) -> None:
        """Count one finished exchange (``Ledger.record`` calls it once, priced). Never raises."""
        try:
            self._count(ex)
        except Exception:  # a metric must never cost a request
            log.exception("could not count request %s", ex.request_id)
        if self.tracing is not None:
            self.tracing.record(ex)

    def _count(self, ex: Exchange) -> None:
        target = ex.target
        model = target.name if target is not None else ""
        op = "chat" if ex.endpoint == "chat/completions" else ex.endpoint
        team = ex.principal.team if ex.principal is not None and ex.principal.team else ""
        requested = ex.requested_model
        if requested not in self._requested:
            if len(self._requested) >= MAX_REQUESTED_MODELS:
                requested = "other"  # a client can send any name: the label set stays bounded
            else:
                self._requested.add(requested)
        key = (op, team, requested, model, ex.route or "", ex.cache, f"{ex.status // 100}xx")
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = [0.0] * ROW_WIDTH
        row[COUNT] += 1
        row[ATTEMPTS] += ex.attempts
        usage, charge = ex.usage, ex.charge
        if usage is not None:
            row[INPUT] += usage.prompt_tokens
            row[OUTPUT] += usage.completion_tokens
        if charge is not None:
            row[COST] += charge.cost
            row[BASELINE] += charge.baseline
            row[SAVED_CACHE] += charge.savings_cache
            row[SAVED_ROUTING] += charge.savings_routing
            row[SAVED_PRUNING] += charge.savings_pruning
            row[OVERHEAD] += charge.overhead
        if ex.cascade is not None and ex.cascade.startswith("escalated"):
            row[ESCALATED] += 1
        elif ex.decision is not None and ex.decision.model and target is not None and ex.decision.model != model:
            row[FALLBACKS] += 1
        if ex.error_code == "budget_exceeded":
            row[REFUSED] += 1
        hist = self._hist
        end = ex.finished or time.perf_counter()
        _observe(hist["thrifty_request_duration_seconds"], (op, model, ex.cache), SECONDS, end - ex.started)
        if ex.upstream_started is not None:
            upstream = (op, model)
            _observe(
                hist["gen_ai_client_operation_duration_seconds"],
                upstream,
                SECONDS,
                (ex.upstream_done or end) - ex.upstream_started,
            )
            if ex.first_byte is not None:
                _observe(
                    hist["gen_ai_server_time_to_first_token_seconds"], upstream, SECONDS, ex.first_byte - ex.upstream_started
                )
        if usage is not None:
            tokens = hist["gen_ai_client_token_usage"]
            _observe(tokens, (op, requested, model, "input"), TOKENS, usage.prompt_tokens)
            _observe(tokens, (op, requested, model, "output"), TOKENS, usage.completion_tokens)
        if ex.similarity is not None:
            _observe(hist["thrifty_cache_similarity"], (model,), SIMILARITY, ex.similarity)
        self._dirty = True

    def snapshot(self) -> Snapshot:
        """This process's figures: cumulative tables plus what the cache and breakers say now."""
        errors = self.cache.errors() if self.cache is not None else {}
        breakers = [[m, self._health.state(m)] for m in self._models] if self._health is not None else []
        return {
            "pid": os.getpid(),
            "rows": [[*k, *v] for k, v in self._rows.items()],
            "hist": {name: [[*k, *v] for k, v in table.items()] for name, table in self._hist.items()},
            "cache_errors": errors,
            "breakers": breakers,
        }

    async def exposition(self) -> bytes:
        """The whole server's figures in Prometheus text format (read, summed and rendered off the loop)."""
        own = self.snapshot()
        directory = Path(self.config.shared_dir) if self.config.shared_dir else None
        return await asyncio.to_thread(expose, own, directory, self._file, self._known)

    def start(self) -> None:
        if self._file is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever(), name="telemetry-flush")

    async def _flush_forever(self) -> None:
        assert self._file is not None
        written = 0.0
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if self._dirty or time.monotonic() - written > 5:  # gauges (breakers) change without requests too
                self._dirty, written = False, time.monotonic()
                data = orjson.dumps(self.snapshot())
                try:
                    await asyncio.to_thread(write, self._file, data)
                except OSError as exc:
                    log.warning("cannot write metrics for the other workers (%s)", exc)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._file is not None:  # the last figures, for the scrapes of the workers still up
            try:
                await asyncio.to_thread(write, self._file, orjson.dumps(self.snapshot()))
            except OSError as exc:
                log.warning("cannot write metrics for the other workers (%s)", exc)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)


def _observe(table: dict[tuple[str, ...], list[float]], key: tuple[str, ...], bounds: tuple[float, ...], value: float) -> None:
    cell = table.get(key)
    if cell is None:
        cell = table[key] = [0.0] * (len(bounds) + 2)  # one count per bucket, +Inf, then the sum
    cell[bisect_left(bounds, value)] += 1
    cell[-1] += value
