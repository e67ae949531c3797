"""Telemetry, traces: one OTLP span per request with the GenAI attributes and thrifty's, a child per upstream attempt.

Only with ``telemetry.otlp_endpoint``: this is the only module that imports the OpenTelemetry
SDK and exporter, and only then (inside :class:`Tracing`). Spans are built at record time from
the exchange's timings (so nothing is opened on the request's way in) and exported in batches by
the SDK's background thread; a full queue drops spans rather than slow requests. The upstream
attempts are noted by a thin provider wrapper (:meth:`Tracing.wrap`) in a context variable of the
request's task.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.settings import NANO_PER_USD, TelemetryConfig

if TYPE_CHECKING:
    from proxy.pipeline.exchange import Exchange
    from proxy.providers.base import Call, Provider, Reply

log = logging.getLogger("thrifty.telemetry")


@dataclass(slots=True)
class Attempt:
    """One upstream call, as the tracing provider saw it (perf_counter times)."""

    model: str
    started: float
    ended: float
    error: str | None


_ATTEMPTS: contextvars.ContextVar[list[Attempt] | None] = contextvars.ContextVar("thrifty_attempts", default=None)


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
        # The batch processor's thread exports; a full queue drops spans rather than slow requests,
        # and a collector that does not answer holds the shutdown (last export) about 5 s at most.
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=schedule_delay_ms)
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
