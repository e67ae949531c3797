"""Backend health: a circuit breaker and a latency average per model, and probes of local servers.

Read by the routing policy (health and latency matchers, the "fastest" strategy) through the
``BackendState`` protocol of ``proxy.policy.model``, and written by the upstream stage
(``proxy.pipeline.upstream``) after every call. The breaker is a pure state machine on an
injected clock: closed, then open after ``failures`` consecutive failures (connection errors,
timeouts, 429 and 5xx; a client error is the request's fault, not the backend's), then
half-open once ``cooldown`` seconds have passed, when one request is let through as a probe:
its success closes the circuit, its failure opens it again. Local backends (Ollama,
llama.cpp, ...) are also probed in the background with ``GET {base_url}/models`` (llama.cpp's
server has no ``/health``); a failed probe marks every model on that server down at once, a
successful one ends an open circuit's cool-down early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp

from proxy.settings import ModelConfig, UpstreamConfig

log = logging.getLogger("thrifty.health")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_EWMA_WEIGHT = 0.3  # of the newest sample: a few requests move the average, one outlier does not
_PROBE_TIMEOUT = 3.0  # seconds, at most: a probe must finish well within its interval


class Breaker:
    """One model's circuit. ``allow`` is asked before a call, ``success``/``failure`` after it."""

    __slots__ = ("_clock", "_cooldown", "_limit", "_opened_at", "_probing", "failures", "state")

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]):
        self._limit = failures
        self._cooldown = cooldown
        self._clock = clock
        self.state = CLOSED
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False  # half-open: the one probe request is out

    def _refresh(self) -> None:
        if self.state == OPEN and self._clock() - self._opened_at >= self._cooldown:
            self.state, self._probing = HALF_OPEN, False

    def available(self) -> bool:
        """Would a call be let through now? (No side effect: for routing and ordering.)"""
        self._refresh()
        return self.state == CLOSED or (self.state == HALF_OPEN and not self._probing)

    def allow(self) -> bool:
        """Take the way through: in half-open state only one caller gets it until it reports back."""
        if not self.available():
            return False
        if self.state == HALF_OPEN:
            self._probing = True
        return True

    def success(self) -> None:
        self.state, self.failures, self._probing = CLOSED, 0, False

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self._limit:
            self.trip()

    def trip(self) -> None:
        self.state, self._opened_at, self._probing = OPEN, self._clock(), False

    def release(self) -> None:
        """A call let through ended without a verdict on the backend (a client error, the client left)."""
        self._probing = False

    def half_open(self) -> None:
        """End the cool-down now (a health probe saw the backend answer)."""
        if self.state == OPEN:
            self.state, self._probing = HALF_OPEN, False


class Backend:
    __slots__ = ("breaker", "latency", "probe_down")

    def __init__(self, breaker: Breaker):
        self.breaker = breaker
        self.latency: float | None = None  # EWMA of time to first byte, ms
        self.probe_down = False


class Health:
    """Implements ``proxy.policy.model.BackendState``; one per process, on the Gateway."""

    def __init__(
        self,
        models: Iterable[ModelConfig],
        settings: UpstreamConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings or UpstreamConfig()
        self._clock = clock
        self._models = {m.name: m for m in models}
        self._backends = {name: self._new() for name in self._models}
        self._prober: asyncio.Task[None] | None = None

    def _new(self) -> Backend:
        return Backend(Breaker(self.settings.breaker_failures, self.settings.breaker_cooldown, self._clock))

    def backend(self, model: str) -> Backend:
        found = self._backends.get(model)
        if found is None:  # a model discovered or named later: state is made on first use
            found = self._backends[model] = self._new()
        return found

    # BackendState, read by routing
    def is_up(self, model: str) -> bool:
        backend = self._backends.get(model)
        return backend is None or (not backend.probe_down and backend.breaker.available())

    def latency_ms(self, model: str) -> float | None:
        backend = self._backends.get(model)
        return None if backend is None else backend.latency

    # written by the upstream stage
    def allow(self, model: str) -> bool:
        backend = self.backend(model)
        return not backend.probe_down and backend.breaker.allow()

    def succeeded(self, model: str, first_byte_ms: float | None = None) -> None:
        backend = self.backend(model)
        backend.breaker.success()
        backend.probe_down = False  # it just answered, whatever the last probe saw
        if first_byte_ms is not None:
            last = backend.latency
            backend.latency = first_byte_ms if last is None else last + _EWMA_WEIGHT * (first_byte_ms - last)

    def failed(self, model: str) -> None:
        self.backend(model).breaker.failure()

    def released(self, model: str) -> None:
        self.backend(model).breaker.release()

    def probed(self, base_url: str, up: bool) -> None:
        """A probe's verdict for every model served at ``base_url``."""
        for name, model in self._models.items():
            if model.base_url != base_url:
                continue
            backend = self.backend(name)
            if up and backend.probe_down:
                log.info("local backend %s (model %s) answers again", base_url, name)
            elif not up and not backend.probe_down:
                log.warning("local backend %s (model %s) does not answer its health probe", base_url, name)
            backend.probe_down = not up
            if up:
                backend.breaker.half_open()

    def state(self, model: str) -> str:
        breaker = self.backend(model).breaker
        breaker.available()  # moves an expired open circuit to half-open
        return breaker.state

    # probes of local backends
    def start(self, session: aiohttp.ClientSession) -> None:
        """Probe local backends in the background (none configured, or interval 0: nothing runs)."""
        bases = {m.base_url: m for m in self._models.values() if m.is_local}
        if bases and self.settings.probe_interval > 0:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever(session, list(bases.values())))

    async def _probe_forever(self, session: aiohttp.ClientSession, targets: list[ModelConfig]) -> None:
        while True:
            results = await asyncio.gather(*(probe(session, m) for m in targets))
            for model, up in zip(targets, results, strict=True):
                self.probed(model.base_url, up)
            await asyncio.sleep(self.settings.probe_interval)

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None


async def probe(session: aiohttp.ClientSession, model: ModelConfig) -> bool:
    """Whether the server at the model's base URL answers ``GET /models`` with a 2xx."""
    headers = {"Authorization": f"Bearer {model.api_key}"} if model.api_key else None
    limit = min(_PROBE_TIMEOUT, model.timeouts.connect + model.timeouts.first_byte)
    timeout = aiohttp.ClientTimeout(total=limit, connect=min(model.timeouts.connect, limit))
    try:
        async with session.get(f"{model.base_url}/models", headers=headers, timeout=timeout) as resp:
            await resp.read()
            return 200 <= resp.status < 300
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
