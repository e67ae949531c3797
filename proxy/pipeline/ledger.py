"""Stage: ledger. Prices an exchange and hands its record to the background writer.

``price`` runs before a non-streamed response leaves (its figures go in the
``x-thrifty-cost-usd`` / ``x-thrifty-savings-usd`` headers) and at the end of a stream;
``record`` runs once per exchange, on every path (served, failed, cancelled), and never
waits on the store. Tokens come from the upstream's ``usage``; only where none came back
are they counted with tiktoken (flagged ``usage_source = "counted"``), on a worker thread:
``count`` before a response is priced, or a tracked background task for an exchange that
ended (a client gone mid-stream) before it could be priced. ``close`` waits for those.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal

import orjson

from proxy.cost.prices import Price, PriceTable
from proxy.cost.pricing import Charge, Usage, charge
from proxy.cost.record import LedgerRecord
from proxy.cost.tokens import TokenCounter, estimate_tokens
from proxy.cost.writer import LedgerWriter
from proxy.errors import ConfigError
from proxy.pipeline.exchange import Exchange
from proxy.policy.classify import classify
from proxy.policy.features import extract
from proxy.policy.model import Features
from proxy.settings import ModelConfig
from proxy.tasks import TaskSet

log = logging.getLogger("thrifty.ledger")


class Ledger:
    def __init__(self, prices: PriceTable, counter: TokenCounter, writer: LedgerWriter, models: dict[str, ModelConfig]):
        self._counter = counter
        self.writer = writer
        self._prices = prices
        self._by_model: dict[str, Price] = {name: prices.for_model(m) for name, m in models.items()}
        self._counting = TaskSet("ledger-count")
        self.observe: Callable[[Exchange], None] | None = None  # telemetry: sees each priced exchange once
        # The baseline of a request for an alias with no price ("auto"): what it would have cost
        # without thrifty (``ledger.baseline_model``, else ``default_baseline``); None: the served model.
        self.baseline_model: str | None = None

    def price_of(self, model: str) -> Price:
        found = self._by_model.get(model) or self._prices.for_name(model)
        return found or Price.free("unknown")

    def usage(self, exchange: Exchange) -> Usage:
        """The upstream's usage, or a count of what was sent and what was relayed."""
        if exchange.usage is not None:
            return exchange.usage
        model = exchange.target.target_model if exchange.target else exchange.requested_model
        payload = exchange.payload or {}
        messages = payload.get("messages") or ()
        if exchange.status == 499 and not self._counter.ready(model):
            # A client that left before any usage came back, in a deployment that never needed a
            # tokenizer: estimated from the text's size rather than loading one (50+ MB) for it.
            text = "".join(exchange.streamed_text or ())
            return Usage(estimate_tokens(messages or payload.get("input")), estimate_tokens(text), source="estimated")
        if messages:
            prompt = self._counter.count_messages(messages, model)
        else:  # embeddings: the input strings
            inputs = payload.get("input")
            texts = [inputs] if isinstance(inputs, str) else [t for t in inputs or () if isinstance(t, str)]
            prompt = sum(self._counter.count_text(t, model) for t in texts)
        text = "".join(exchange.streamed_text or ())
        completion = self._counter.count_text(text, model)
        return Usage(prompt, completion, source="counted")

    async def count(self, exchange: Exchange) -> None:
        """Fill in counted usage off the event loop (tokenizing can take milliseconds)."""
        if exchange.usage is None:
            exchange.usage = await asyncio.to_thread(self.usage, exchange)

    def price(self, exchange: Exchange) -> Charge:
        usage = exchange.usage = self.usage(exchange)
        served = self.price_of(exchange.target.name) if exchange.target else Price.free("none")
        requested = self.price_of(exchange.requested_model) if exchange.requested_model else served
        if requested.source == "unknown":
            # An alias such as "auto" names no priced model: its baseline is the configured (or the
            # policy's default) cloud model it would have gone to without thrifty; with none, the
            # served model is its own baseline (savings 0, never a made-up figure).
            alias = exchange.requested_model not in self._by_model
            requested = self.price_of(self.baseline_model) if alias and self.baseline_model is not None else served
        before = prompt_before(exchange, usage)
        exchange.charge = charge(
            requested=requested,
            served=served,
            usage=usage,
            prompt_tokens_before=before,
            cache_hit=exchange.cache in ("exact", "semantic"),
            overhead=exchange.overhead_nusd,
        )
        return exchange.charge

    def record(self, exchange: Exchange, then: Callable[[Exchange], None] | None = None) -> None:
        """Hand the exchange's record to the writer (once); ``then`` runs when it is priced."""
        if exchange.recorded:
            return
        exchange.recorded = True
        exchange.finished = time.perf_counter()
        if exchange.charge is None and exchange.usage is None and _billable(exchange):
            self._counting.spawn(self._count_then_record(exchange, then))
            return
        self._submit(exchange, then)

    async def _count_then_record(self, exchange: Exchange, then: Callable[[Exchange], None] | None) -> None:
        try:
            await self.count(exchange)
        except Exception:  # a count that fails leaves usage unknown; the record is still written
            log.exception("could not count the tokens of request %s", exchange.request_id)
        self._submit(exchange, then)

    def _submit(self, exchange: Exchange, then: Callable[[Exchange], None] | None) -> None:
        try:
            self.writer.submit(self._record(exchange))
        except Exception:  # pricing must never fail a request; the log says what was lost
            log.exception("could not build the ledger record of request %s", exchange.request_id)
        if self.observe is not None:
            self.observe(exchange)
        if then is not None:
            then(exchange)

    async def close(self) -> None:
        """Finish the counts in flight, then flush the writer (shutdown)."""
        await self._counting.drain()
        await self.writer.close()

    def _record(self, exchange: Exchange) -> LedgerRecord:
        if exchange.charge is None and (_billable(exchange) or exchange.usage is not None):
            self.price(exchange)
        usage = exchange.usage or Usage(0, 0, source="none")
        priced = exchange.charge or Charge(0, 0, 0, 0, 0)
        price = self.price_of(exchange.target.name) if exchange.target else None
        principal = exchange.principal
        payload = exchange.payload or {}
        user = payload.get("user")
        features = _features(exchange)
        return LedgerRecord(
            id=_record_id(),
            request_id=exchange.request_id,
            ts=exchange.ts,
            endpoint=exchange.endpoint,
            key_id=principal.key_id if principal else None,
            team=principal.team if principal else None,
            app=principal.app if principal else None,
            user_id=user if isinstance(user, str) else None,
            tags=orjson.dumps(exchange.tags).decode() if exchange.tags else None,
            requested_model=exchange.requested_model,
            served_model=exchange.target.name if exchange.target else None,
            provider=exchange.target.provider if exchange.target else None,
            route=exchange.route,
            policy_version=exchange.policy_version,
            cache=exchange.cache,
            stream=exchange.stream,
            prompt_tokens_before=prompt_before(exchange, usage),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            usage_source=usage.source,
            price_input=_plain(price.input) if price else None,
            price_output=_plain(price.output) if price else None,
            price_cached_input=_plain(price.cached_input) if price else None,
            price_source=price.source if price else None,
            cost_nusd=priced.cost,
            baseline_nusd=priced.baseline,
            savings_cache_nusd=priced.savings_cache,
            savings_routing_nusd=priced.savings_routing,
            savings_pruning_nusd=priced.savings_pruning,
            overhead_nusd=priced.overhead,
            latency_ms=round(((exchange.finished or time.perf_counter()) - exchange.started) * 1000, 3),
            upstream_ms=_span(exchange.upstream_started, exchange.upstream_done),
            ttft_ms=_span(exchange.upstream_started, exchange.first_byte),
            status=exchange.status,
            error_code=exchange.error_code,
            has_tools=features.tools if features else None,
            has_images=features.images if features else None,
            json_mode=features.json_mode if features else None,
            task_class=features.task_class if features else None,
            attempts=exchange.attempts,
            cascade=exchange.cascade,
            similarity=exchange.similarity,
            prune=exchange.prune,
            difficulty=_score(features.difficulty if features else None),
        )


def set_baseline(
    ledger: Ledger, configured: str | None, aliases: Mapping[str, Sequence[str]], models: Mapping[str, ModelConfig]
) -> None:
    """Start-up: the baseline of ``auto`` (``ledger.baseline_model``, checked to have a price, or the default)."""
    if configured is not None and ledger.price_of(configured).source in ("unknown", "local"):
        raise ConfigError(f"ledger.baseline_model: {configured!r} has no price (configure it, or set prices.{configured})")
    ledger.baseline_model = configured or default_baseline(aliases, models, ledger.price_of)
    log.info("baseline of requests for an unpriced alias (auto): %s", ledger.baseline_model or "the served model")


def default_baseline(
    aliases: Mapping[str, Sequence[str]], models: Mapping[str, ModelConfig], price_of: Callable[[str], Price]
) -> str | None:
    """The policy's default cloud target, the baseline of ``auto`` when ``ledger.baseline_model`` is
    unset: the first configured, priced cloud model of the ``large`` alias, else of the other
    aliases in the policy's order; None when there is none (the served model is then the baseline)."""
    ordered = [*aliases.get("large", ()), *(m for name, alias in aliases.items() if name != "large" for m in alias)]
    for name in ordered:
        model = models.get(name)
        if model is not None and not model.is_local and price_of(name).source != "unknown":
            return name
    return None


def prompt_before(exchange: Exchange, usage: Usage) -> int:
    """The prompt's size before pruning, in the upstream's own tokens where it reported them:
    what it counted plus what thrifty removed. Another tokenizer (Claude's, Llama's) than the
    one thrifty counts with then skews only the removed part, not the whole prompt."""
    if exchange.pruned_tokens is not None and usage.source == "upstream":
        return usage.prompt_tokens + exchange.pruned_tokens
    if exchange.prompt_tokens_before is not None:
        return exchange.prompt_tokens_before
    return usage.prompt_tokens


def _features(exchange: Exchange) -> Features | None:
    """What routing saw, for ``policy simulate``: read here (after the response left) when no
    policy ran or no rule needed the task class, so every chat record can be replayed."""
    features = exchange.features
    if exchange.endpoint != "chat/completions" or exchange.payload is None:
        return features
    if features is None:
        return extract(exchange.payload, classify=True)
    if features.task_class is None:
        return replace(features, task_class=classify(features.last_user, json_mode=features.json_mode is not None))
    return features


def _billable(exchange: Exchange) -> bool:
    """Priced when the upstream answered (its usage, or a count of what it sent) or when the
    client left while the upstream was at work (it may bill for that); an error returned
    instead of an answer was not billed, and is recorded with no tokens at no cost."""
    answered = exchange.first_byte is not None
    abandoned = exchange.upstream_started is not None and exchange.status == 499
    return answered or abandoned


def _record_id() -> str:
    """Time-ordered (nanoseconds, then 64 random bits): new rows append to the primary-key index."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


def _plain(value: Decimal) -> str:
    """A unit price as a plain decimal (litellm's 1e-05 a token is "10" per 1M, never "1E+1")."""
    return format(value, "f")


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 3)


def _score(value: float | None) -> float | None:
    """A difficulty score for the ledger: NaN (the embedder failed) is stored as no score, the same in
    SQLite (which would make it NULL) and PostgreSQL (which would keep NaN)."""
    return None if value is None or value != value else value
