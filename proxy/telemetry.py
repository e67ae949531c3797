"""Telemetry: every exchange counted for Prometheus ``/metrics`` and, when configured, traced over OTLP.

Sits after the ledger: ``Ledger.record`` hands each priced exchange (served, cached, failed or
cancelled) to :meth:`Telemetry.record` exactly once. Recording adds a few numbers into plain
per-process tables (no locks, no I/O, no prometheus_client objects on the hot path); the text
format is built only when ``/metrics`` is scraped, on a worker thread. With ``thrifty serve
--workers N`` each worker also writes its tables to a file in the per-server directory the
supervisor creates (``TelemetryConfig.shared_dir``), within ``FLUSH_SECONDS`` of a change and off
the event loop; a scrape reaching any worker sums every worker's file with its own live tables,
so each scrape reports the whole server. Files of workers that died stay (a counter must never go
back); gauges (breaker state) count live workers only. Names follow the OpenTelemetry GenAI
conventions mapped to Prometheus (dots become underscores: ``gen_ai.request.model`` is the label
``gen_ai_request_model``), see dashboards/README.md. Traces (``telemetry.otlp_endpoint``): one span
per request built at record time from the exchange's timings, a child per upstream attempt,
exported in batches by the SDK's background thread. This is the only module that imports the
OpenTelemetry SDK, and only when an endpoint is configured.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from proxy.settings import NANO_PER_USD, TelemetryConfig

if TYPE_CHECKING:
    from proxy.pipeline.cache import ResponseCache
    from proxy.pipeline.exchange import Exchange
    from proxy.providers.base import Call, Provider, Reply
    from proxy.providers.health import Health

log = logging.getLogger("thrifty.telemetry")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_SECONDS = 0.2  # how stale another worker's figures can be in a scrape
MAX_REQUESTED_MODELS = 200  # distinct client-named models kept as labels; beyond: "other"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)  # GenAI semconv's advice, shortened
SIMILARITY = (0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)

# Per-request counters, one row per label set; the label set is ROW_LABELS.
ROW_LABELS = (
    "gen_ai_operation_name",
    "thrifty_team",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "thrifty_route",
    "thrifty_cache_result",
    "status_class",
)
(COUNT, INPUT, OUTPUT, COST, BASELINE, SAVED_CACHE, SAVED_ROUTING, SAVED_PRUNING, OVERHEAD, ATTEMPTS, FALLBACKS, ESCALATED,
 REFUSED) = range(13)  # fmt: skip
ROW_WIDTH = 13
_OP, _TEAM, _REQ, _RESP, _ROUTE, _CACHE, _STATUS = range(7)

# Histograms: name -> (label names, bucket bounds, help).
HISTOGRAMS: dict[str, tuple[tuple[str, ...], tuple[float, ...], str]] = {
    "thrifty_request_duration_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model", "thrifty_cache_result"),
        SECONDS,
        "Time from request arrival to the end of the response, in seconds.",
    ),
    "gen_ai_client_operation_duration_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model"),
        SECONDS,
        "Time thrifty waited on the upstream model (all attempts, to the end of the response), in seconds.",
    ),
    "gen_ai_server_time_to_first_token_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model"),
        SECONDS,
        "Time from the first upstream call to the upstream's first byte, in seconds.",
    ),
    "gen_ai_client_token_usage": (
        ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "gen_ai_token_type"),
        TOKENS,
        "Tokens per request, by type (input, output), as the ledger counts them.",
    ),
    "thrifty_cache_similarity": (
        ("gen_ai_response_model",),
        SIMILARITY,
        "Cosine similarity of the semantic cache hits served.",
    ),
}

# Counters projected from the rows: name -> (labels kept (row indexes), value column(s), help, extra label).
_Projection = tuple[tuple[int, ...], tuple[tuple[str | None, int], ...], str, str | None]
COUNTERS: dict[str, _Projection] = {
    "thrifty_requests": (
        (0, 1, 2, 3, 4, 5, 6),
        ((None, COUNT),),
        "Requests, by endpoint, model, route, cache result and status.",
        None,
    ),
    "thrifty_tokens": (
        (_OP, _TEAM, _RESP),
        (("input", INPUT), ("output", OUTPUT)),
        "Tokens billed (input, output), as in the ledger.",
        "gen_ai_token_type",
    ),
    "thrifty_cost_usd": ((_OP, _TEAM, _REQ, _RESP, _ROUTE), ((None, COST),), "What the requests cost, USD.", None),
    "thrifty_baseline_usd": (
        (_OP, _TEAM, _REQ, _RESP, _ROUTE),
        ((None, BASELINE),),
        "What the requests would have cost without thrifty (requested model, uncached, unpruned), USD.",
        None,
    ),
    "thrifty_savings_usd": (
        (_TEAM, _RESP, _ROUTE),
        (("cache", SAVED_CACHE), ("routing", SAVED_ROUTING), ("pruning", SAVED_PRUNING)),
        "Savings by lever (cache, routing, pruning), USD, before overhead.",
        "lever",
    ),
    "thrifty_overhead_usd": (
        (_TEAM, _RESP),
        ((None, OVERHEAD),),
        "What thrifty spent itself (embeddings, summaries, cascade trials), USD.",
        None,
    ),
    "thrifty_upstream_attempts": (
        (_RESP,),
        ((None, ATTEMPTS),),
        "Upstream calls made (retries, fallbacks, cascade steps).",
        None,
    ),
    "thrifty_upstream_fallbacks": ((_REQ, _RESP), ((None, FALLBACKS),), "Requests served by a fallback model.", None),
    "thrifty_cascade_escalations": ((_REQ, _RESP), ((None, ESCALATED),), "Cascades whose first answer failed a check.", None),
    "thrifty_budget_refusals": ((_TEAM,), ((None, REFUSED),), "Requests refused by a hard budget (429).", None),
}
_USD_COLUMNS = frozenset({COST, BASELINE, SAVED_CACHE, SAVED_ROUTING, SAVED_PRUNING, OVERHEAD})

Snapshot = dict[str, Any]


@dataclass(slots=True)
class Attempt:
    """One upstream call, as the tracing provider saw it (perf_counter times)."""

    model: str
    started: float
    ended: float
    error: str | None


_ATTEMPTS: contextvars.ContextVar[list[Attempt] | None] = contextvars.ContextVar("thrifty_attempts", default=None)


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
        errors: dict[str, float] = {}
        if self.cache is not None:
            stats = self.cache.stats()
            errors["exact"] = stats.get("store_errors", 0)
            semantic = stats.get("semantic") or {}
            errors["semantic"] = sum(v for k, v in semantic.items() if k.startswith("errors_"))
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
        return await asyncio.to_thread(_expose, own, directory, self._file)

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
                    await asyncio.to_thread(_write, self._file, data)
                except OSError as exc:
                    log.warning("cannot write metrics for the other workers (%s)", exc)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._file is not None:  # the last figures, for the scrapes of the workers still up
            try:
                await asyncio.to_thread(_write, self._file, orjson.dumps(self.snapshot()))
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


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)  # a reader sees the old file or the new one, never half of one


def _read_others(directory: Path, own: Path | None) -> list[Snapshot]:
    found = []
    for path in directory.glob("*.json"):
        if own is not None and path.name == own.name:
            continue
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


def _expose(own: Snapshot, directory: Path | None, own_file: Path | None) -> bytes:
    snapshots = [own, *(_read_others(directory, own_file) if directory is not None else [])]
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
                value = values[column] / NANO_PER_USD if column in _USD_COLUMNS else values[column]
                sums[projected] = sums.get(projected, 0.0) + value
        for projected, value in sorted(sums.items()):
            family.add_metric(list(projected), value)
        families.append(family)
    errors = CounterMetricFamily(
        "thrifty_cache_errors", "Cache store calls that failed (Redis down or slow): served uncached.", labels=["tier"]
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


# --- traces (only with telemetry.otlp_endpoint) -----------------------------------------------


class Tracing:
    """Spans over OTLP/HTTP: one per request (GenAI attributes and thrifty's), a child per upstream attempt."""

    def __init__(self, config: TelemetryConfig, schedule_delay_ms: int = 2000):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        assert config.otlp_endpoint is not None
        endpoint = config.otlp_endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        self._provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        # The batch processor's thread exports; a full queue drops spans rather than slow requests.
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=schedule_delay_ms)
        )
        self._tracer = self._provider.get_tracer("thrifty")

    def record(self, ex: Exchange) -> None:
        try:
            self._spans(ex)
        except Exception:
            log.exception("could not trace request %s", ex.request_id)

    def _spans(self, ex: Exchange) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        def wall(at: float) -> int:  # a perf_counter time as Unix nanoseconds
            return int((ex.ts + (at - ex.started)) * 1e9)

        end = ex.finished or time.perf_counter()
        span = self._tracer.start_span(
            f"{_operation(ex)} {ex.requested_model}".strip(),
            kind=SpanKind.SERVER,
            start_time=wall(ex.started),
            attributes=request_attributes(ex),
        )
        if ex.status >= 500:
            span.set_status(Status(StatusCode.ERROR, ex.error_code or ""))
        parent = trace.set_span_in_context(span)
        attempts = [a for a in (_ATTEMPTS.get() or ()) if ex.started <= a.started <= end]
        for index, attempt in enumerate(attempts):
            served = index == len(attempts) - 1 and attempt.error is None
            child = self._tracer.start_span(
                f"{_operation(ex)} {attempt.model}",
                context=parent,
                kind=SpanKind.CLIENT,
                start_time=wall(attempt.started),
                attributes={
                    "gen_ai.operation.name": _operation(ex),
                    "gen_ai.request.model": attempt.model,
                    "thrifty.attempt": index + 1,
                },
            )
            if attempt.error is not None:
                child.set_attribute("error.type", attempt.error)
                child.set_status(Status(StatusCode.ERROR, attempt.error))
            # The answering call lasts until its response (or stream) ended, not just until its headers.
            child.end(end_time=wall(ex.upstream_done or end) if served else wall(attempt.ended))
        span.end(end_time=wall(end))

    def wrap(self, provider: Provider) -> Provider:
        return _TracedProvider(provider)

    def close(self) -> None:
        self._provider.shutdown()  # exports what is queued


def request_attributes(ex: Exchange) -> dict[str, Any]:
    usage, charge = ex.usage, ex.charge
    attributes: Mapping[str, Any] = {
        "gen_ai.operation.name": _operation(ex),
        "gen_ai.request.model": ex.requested_model,
        "gen_ai.response.model": ex.target.name if ex.target else None,
        "gen_ai.provider.name": ex.target.provider if ex.target else None,
        "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else None,
        "gen_ai.usage.output_tokens": usage.completion_tokens if usage else None,
        "thrifty.request_id": ex.request_id,
        "thrifty.route": ex.route,
        "thrifty.cache.result": ex.cache,
        "thrifty.cost.usd": charge.cost / NANO_PER_USD if charge else None,
        "thrifty.savings.usd": charge.net_savings / NANO_PER_USD if charge else None,
        "thrifty.team": ex.principal.team if ex.principal else None,
        "thrifty.attempts": ex.attempts,
        "thrifty.cascade": ex.cascade,
        "http.response.status_code": ex.status,
        "error.type": ex.error_code,
    }
    return {k: v for k, v in attributes.items() if v is not None}  # OpenTelemetry takes no None values


def _operation(ex: Exchange) -> str:
    return "chat" if ex.endpoint == "chat/completions" else ex.endpoint


class _TracedProvider:
    """A provider that notes each call's model, times and error for the request's trace."""

    def __init__(self, inner: Provider):
        self._inner = inner

    async def send(self, call: Call) -> Reply:
        attempts = _ATTEMPTS.get()
        if attempts is None or len(attempts) > 64:  # a context reused across requests is trimmed
            attempts = []
            _ATTEMPTS.set(attempts)
        attempt = Attempt(call.target.name, time.perf_counter(), 0.0, None)
        attempts.append(attempt)
        try:
            return await self._inner.send(call)
        except Exception as exc:
            attempt.error = getattr(exc, "code", None) or type(exc).__name__
            raise
        finally:
            attempt.ended = time.perf_counter()

    async def close(self) -> None:
        await self._inner.close()


def open_tracing(config: TelemetryConfig) -> Tracing | None:
    return Tracing(config) if config.otlp_endpoint else None
