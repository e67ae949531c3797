"""Stage: upstream. Calls the chosen model, with retries, fallbacks, circuit breakers and cascades.

Sits after the cache lookup and the budget check in ``api.routes`` and hands back a
:class:`Served`: the reply of the model that answered and, for a stream, its first chunk
already in hand, so that nothing has reached the client while another model can still be
tried. The decision's model is tried first, then each fallback in order; a model whose
circuit is open (``proxy.providers.health``) is passed over, unless every one is, when the
first is tried anyway. One model is tried again after 429, 5xx and connection errors, after a
jittered exponential ``backoff`` or the upstream's ``Retry-After`` when that is short, within
a retry budget so a dead upstream is not sent a multiple of the load; a timeout moves on to
the next model at once (it already cost its wait), and a client error (400, 413, 422) ends
the attempt: no other model would take that request either. With a cascade
(``proxy.pipeline.cascade``), the decision's model answers first without streaming; an
answer that fails a check is priced as overhead and the request escalates to the fallbacks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.api import wire
from proxy.cache.entry import Entry, replay
from proxy.cost.prices import Price
from proxy.cost.pricing import cost_nusd, usage_from_openai
from proxy.errors import ThriftyError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.pipeline.cascade import failed_check
from proxy.pipeline.exchange import Exchange
from proxy.policy.model import Cascade
from proxy.providers.base import Call, Provider, Reply, UpstreamStatus
from proxy.providers.health import Health
from proxy.settings import ModelConfig, UpstreamConfig

log = logging.getLogger("thrifty.upstream")

JSON = "application/json"
_CLIENT_FAULT = frozenset({400, 413, 422})  # the request itself is wrong: no model would take it
_BUDGET_RESERVE = 10.0  # retries a model may spend at once before the per-request share limits them


@dataclass(slots=True)
class Served:
    reply: Reply
    target: ModelConfig
    hide_usage: bool  # thrifty asked for include_usage itself: hide that chunk from the client
    first: bytes = b""  # a stream's first chunk, already read from the upstream


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): "full jitter" over base * 2^(attempt-1), capped."""
    return rand() * min(cap, base * 2.0 ** (attempt - 1))


def breaks(exc: ThriftyError) -> bool:
    """Whether the failure counts against the backend (its breaker) and is worth another try."""
    if isinstance(exc, UpstreamTimeout | UpstreamUnavailable):
        return True
    return isinstance(exc, UpstreamError) and (exc.status == 429 or exc.status >= 500)


def retry_delay(exc: ThriftyError, attempt: int, settings: UpstreamConfig, rand: Callable[[], float]) -> float | None:
    """Seconds before trying the same model again after ``exc``, or None: move on to the next."""
    if isinstance(exc, UpstreamTimeout) or not breaks(exc) or attempt > settings.retries:
        return None
    hint = exc.retry_after if isinstance(exc, UpstreamStatus) else None
    if hint is not None:
        return hint if hint <= settings.retry_after_max else None
    return backoff(attempt, settings.backoff_base, settings.backoff_max, rand)


class RetryBudget:
    """A token bucket per model: each request adds ``ratio`` of a retry, each retry takes one."""

    __slots__ = ("_balance", "_ratio")

    def __init__(self, ratio: float):
        self._ratio = ratio
        self._balance = _BUDGET_RESERVE if ratio > 0 else 0.0

    def deposit(self) -> None:
        self._balance = min(self._balance + self._ratio, _BUDGET_RESERVE)

    def withdraw(self) -> bool:
        if self._balance < 1:
            return False
        self._balance -= 1
        return True


class Upstream:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        models: Mapping[str, ModelConfig],
        health: Health,
        settings: UpstreamConfig,
        price_of: Callable[[str], Price],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ):
        self._providers = providers
        self._models = models
        self.health = health
        self.settings = settings
        self._price_of = price_of
        self._sleep = sleep
        self._rand = rand
        self._budgets: dict[str, RetryBudget] = {}

    async def serve(self, exchange: Exchange, parsed: wire.ParsedRequest) -> Served:
        """The reply of the first model that answers; raises the last failure when none does."""
        assert exchange.target is not None
        decision = exchange.decision
        fallbacks: list[ModelConfig] = []
        if decision is not None and decision.model is not None:
            fallbacks = [m for m in (self._models.get(name) for name in decision.fallbacks) if m is not None]
        if decision is not None and decision.cascade is not None and fallbacks and exchange.endpoint == "chat/completions":
            return await self._cascade(exchange, parsed, decision.cascade, fallbacks)
        served = await self._failover(exchange, parsed, [exchange.target, *fallbacks])
        exchange.target = served.target
        return served

    async def _failover(self, exchange: Exchange, parsed: wire.ParsedRequest, targets: list[ModelConfig]) -> Served:
        last: ThriftyError | None = None
        for target in targets:
            if not self.health.allow(target.name):
                log.debug("request %s: %s passed over, its circuit is open", exchange.request_id, target.name)
                continue
            try:
                return await self._with_retries(exchange, parsed, target)
            except ThriftyError as exc:
                if exc.status in _CLIENT_FAULT:
                    raise
                last = exc
                log.warning(
                    "request %s: %s failed (%s), %s", exchange.request_id, target.name, exc.message, _next(target, targets)
                )
        if last is None:  # every circuit open: the first model is tried anyway
            return await self._with_retries(exchange, parsed, targets[0])
        raise last

    async def _with_retries(self, exchange: Exchange, parsed: wire.ParsedRequest, target: ModelConfig) -> Served:
        budget = self._budgets.get(target.name)
        if budget is None:
            budget = self._budgets[target.name] = RetryBudget(self.settings.retry_budget)
        budget.deposit()
        body, hide_usage = wire.for_target(parsed, target.target_model)
        call = Call(exchange.endpoint, body, parsed.payload, parsed.stream, target)
        attempt = 0
        while True:
            try:
                return await self._once(exchange, call, hide_usage)
            except ThriftyError as exc:
                attempt += 1
                delay = retry_delay(exc, attempt, self.settings, self._rand)
                if delay is None or not budget.withdraw():
                    raise
                log.info(
                    "request %s: %s failed (%s); retry %d in %.2f s", exchange.request_id, target.name, exc.status, attempt, delay
                )
                await self._sleep(delay)
                if not self.health.allow(target.name):  # the failures so far opened its circuit
                    raise

    async def _once(self, exchange: Exchange, call: Call, hide_usage: bool) -> Served:
        """One call; a stream's first chunk is read here, so a stream that dies before it still fails over."""
        name = call.target.name
        exchange.attempts += 1
        started = time.perf_counter()
        verdict = False
        try:
            reply = await self._providers[name].send(call)
            first = b""
            if reply.chunks is not None:
                try:
                    first = await anext(reply.chunks, b"")
                    if not first:
                        raise UpstreamUnavailable(f"upstream for model {name!r} ended the stream before sending anything")
                except BaseException:
                    await reply.aclose()
                    raise
            exchange.first_byte = time.perf_counter()
            verdict = True
            self.health.succeeded(name, (exchange.first_byte - started) * 1000)
            return Served(reply, call.target, hide_usage, first)
        except ThriftyError as exc:
            if breaks(exc):
                verdict = True
                self.health.failed(name)
            raise
        finally:
            if not verdict:  # a client error, or the client left: says nothing about the backend
                self.health.released(name)

    async def _cascade(
        self, exchange: Exchange, parsed: wire.ParsedRequest, cascade: Cascade, fallbacks: list[ModelConfig]
    ) -> Served:
        """The decision's model answers first, whole; served if it passes the checks, else escalated."""
        cheap = exchange.target
        assert cheap is not None
        payload, added_logprobs = _cascade_payload(parsed.payload, cascade)
        trial = wire.ParsedRequest(parsed.model, False, payload, orjson.dumps(payload))
        reason = "unavailable"  # its circuit is open: straight to the next model
        try:
            first = await self._with_retries(exchange, trial, cheap) if self.health.allow(cheap.name) else None
        except ThriftyError as exc:
            if exc.status in _CLIENT_FAULT:
                raise
            log.warning("request %s: cascade model %s failed (%s)", exchange.request_id, cheap.name, exc.message)
            reason, first = "error", None
        if first is not None:
            response = _json(first.reply.body)
            check = "empty" if response is None else failed_check(response, parsed.payload, cascade)
            if check is None and response is not None:
                exchange.cascade, exchange.target = "accepted", cheap
                return _accepted(response, first, parsed, added_logprobs)
            reason = check or "empty"
            exchange.overhead_nusd += self._cost(cheap.name, response)
        exchange.cascade = f"escalated: {reason}"
        served = await self._failover(exchange, parsed, fallbacks)
        exchange.target = served.target
        return served

    def _cost(self, model: str, response: dict[str, Any] | None) -> int:
        """What the rejected answer cost, from its usage (none reported: not counted)."""
        usage = usage_from_openai(response.get("usage")) if response is not None else None
        if usage is None:
            return 0
        return cost_nusd(self._price_of(model), usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)


def _next(target: ModelConfig, targets: list[ModelConfig]) -> str:
    index = targets.index(target)
    return f"trying {targets[index + 1].name}" if index + 1 < len(targets) else "no model left to try"


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _cascade_payload(payload: dict[str, Any], cascade: Cascade) -> tuple[dict[str, Any], bool]:
    """The first model's request: never streamed (its answer is checked whole); with logprobs
    when the confidence check needs them and the client did not ask."""
    trial = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    added = "confidence" in cascade.checks and cascade.min_logprob is not None and not payload.get("logprobs")
    if added:
        trial["logprobs"] = True
    return trial, added


def _accepted(response: dict[str, Any], first: Served, parsed: wire.ParsedRequest, added_logprobs: bool) -> Served:
    """The first model's answer as the client asked for it: whole, or replayed as a stream."""
    reply = first.reply
    if added_logprobs:  # asked for by the confidence check only: not the client's to see
        for choice in response.get("choices") or ():
            if isinstance(choice, dict):
                choice["logprobs"] = None
        reply = Reply(reply.status, JSON, body=orjson.dumps(response), headers=reply.headers)
    if not parsed.stream:
        return Served(reply, first.target, False, b"")
    asked_usage = wire.wants_usage(parsed.payload)
    usage = usage_from_openai(response.get("usage"))
    events = replay(Entry("", response, usage, 0.0), include_usage=True) + wire.SSE_DONE
    return Served(Reply(200, "text/event-stream", chunks=_nothing_more()), first.target, not asked_usage, events)


async def _nothing_more() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator with no items
