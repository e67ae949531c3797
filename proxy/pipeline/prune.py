"""Stage: prune. Cuts a chat request to its input-token budget before it goes upstream.

Sits in ``api.routes._forward`` after the cache lookup missed (the cache is keyed on the
conversation as the client sent it) and before the budget hold (which then holds for what
is really sent). The budget comes from the routing rule's ``prune`` settings, else the
gateway's ``prune:`` section, else nothing: no pruning unless the request sends
``x-thrifty-max-input-tokens: N``, which may only tighten a configured budget;
``x-thrifty-prune: off`` opts out where the rule (or config) allows it. A
``context_share`` budget is that share of the target model's context window.

Cost on the request path: a request that cannot be over budget (its text's UTF-8 bytes,
an upper bound on its tokens, are under it) is passed through after one look at its
sizes. Otherwise each message is counted exactly once with the target's tokenizer (the
counts are kept in a bounded cache by message hash, so a growing conversation counts only
its new messages) on a worker thread when the conversation is large, the pure pruner
(``proxy.context.prune``) runs, and the dropped turns are summarized
(``proxy.context.summarize``). The exchange records the tokens before, the strategies
applied and the summarizer's cost, for the ledger.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from proxy.api.wire import ParsedRequest
from proxy.cache.exact import tenant as cache_tenant
from proxy.cache.store import CacheStore, MemoryStore
from proxy.context import prune as pure
from proxy.context.summarize import CHARS_PER_TOKEN, EXTRACTIVE, Summarizer, header
from proxy.cost.prices import Price
from proxy.cost.tokens import TokenCounter
from proxy.errors import BadRequest
from proxy.pipeline.cache import ResponseCache
from proxy.pipeline.exchange import Exchange
from proxy.policy.capabilities import Capabilities, capabilities_for
from proxy.policy.model import RoutePrune
from proxy.providers.base import Provider
from proxy.settings import CacheConfig, ModelConfig, PruneConfig

log = logging.getLogger("thrifty.prune")

MAX_HEADER = "x-thrifty-max-input-tokens"
OPT_OUT_HEADER = "x-thrifty-prune"
OFF_THREAD_BYTES = 32_768  # counting more text than this (~8k tokens, ~1 ms) runs on a worker thread
SIZE_CACHE_ENTRIES = 50_000
SUMMARY_MEMORY_ENTRIES = 10_000  # the summaries' own LRU when the response cache is off
SUMMARY_MEMORY_BYTES = 16 * 1024 * 1024
_PER_MESSAGE_BOUND = 8  # framing, role and name tokens of one message, generously
_IMAGE_TOKENS = 85


def resolve_budget(
    rule: RoutePrune | None, config: PruneConfig, window: int | None, headers: Mapping[str, str]
) -> tuple[pure.Budget | None, str]:
    """The request's budget (None: no pruning) and which summarizer applies. Pure."""
    allow_opt_out = rule.allow_opt_out if rule is not None else config.allow_opt_out
    if allow_opt_out and headers.get(OPT_OUT_HEADER, "").strip().lower() in ("off", "false", "0", "no"):
        return None, ""
    source: Any = rule if rule is not None and (rule.max_input_tokens or rule.context_share) else config
    limit: int | None = source.max_input_tokens
    if limit is None and source.context_share is not None and window is not None:
        limit = int(window * source.context_share)
    asked = _header_budget(headers.get(MAX_HEADER))
    if asked is not None:
        limit = asked if limit is None else min(limit, asked)
    if limit is None:
        return None, ""
    summarize = rule.summarize if rule is not None else config.summarize
    summarizer = (rule.summarizer if rule is not None else None) or config.summarizer
    budget = pure.Budget(
        max_tokens=limit,
        keep_last=rule.keep_last if rule is not None else config.keep_last,
        summarize=summarize,
        summary_tokens=config.summary_tokens,
        tool_output_tokens=config.tool_output_tokens,
        # Dropped runs move in steps only for a model summarizer, whose summaries are cached per run;
        # an extractive summary costs microseconds, so it drops no more than it must.
        summary_step=0 if summarizer == EXTRACTIVE else pure.SUMMARY_STEP,
    )
    return budget, summarizer


def _header_budget(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        tokens = int(value.strip())
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise BadRequest(f"The header {MAX_HEADER} must be a positive whole number of tokens.", param=MAX_HEADER)
    return tokens


def upper_bound(messages: Sequence[Any]) -> int:
    """More tokens than ``messages`` can hold: a byte-level BPE token covers at least one byte."""
    total = pure.PRIMER
    for message in messages:
        total += _PER_MESSAGE_BOUND
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif content is not None:
            total += len(orjson.dumps(content))
            if isinstance(content, list):
                total += _IMAGE_TOKENS * sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
        if message.get("tool_calls"):
            total += len(orjson.dumps(message["tool_calls"]))
        name = message.get("name")
        if isinstance(name, str):
            total += len(name.encode())
    return total


class MessageSizer:
    """Exact token sizes of messages (``count_messages`` framing), each counted once across requests."""

    def __init__(self, counter: TokenCounter, entries: int = SIZE_CACHE_ENTRIES):
        self._counter = counter
        self._sizes: OrderedDict[bytes, int] = OrderedDict()
        self._entries = entries
        self._lock = threading.Lock()  # sizing runs on worker threads as well as on the loop

    def size(self, message: pure.Message, model: str) -> int:
        encoding = self._counter.encoding_name(model)
        key = hashlib.blake2b(
            orjson.dumps(message, option=orjson.OPT_SORT_KEYS), digest_size=16, person=encoding[:16].encode()
        ).digest()
        with self._lock:
            found = self._sizes.get(key)
            if found is not None:
                self._sizes.move_to_end(key)
                return found
        size = self._counter.count_messages((message,), model) - pure.PRIMER
        with self._lock:
            self._sizes[key] = size
            if len(self._sizes) > self._entries:
                self._sizes.popitem(last=False)
        return size

    def sizes(self, messages: Sequence[pure.Message], model: str) -> list[int]:
        return [self.size(m, model) for m in messages]


class Pruner:
    def __init__(
        self,
        config: PruneConfig,
        counter: TokenCounter,
        capabilities: Mapping[str, Capabilities],
        summarizer: Summarizer,
        cache_scope: str = "team",
    ):
        self.config = config
        self._counter = counter
        self.sizer = MessageSizer(counter)
        self._capabilities = capabilities
        self.summarizer = summarizer
        self._scope = cache_scope

    async def close(self) -> None:
        await self.summarizer.close()

    async def prune(self, exchange: Exchange, parsed: ParsedRequest, headers: Mapping[str, str]) -> ParsedRequest:
        """The request as it goes upstream: unchanged, or cut to its budget (the exchange says how)."""
        target = exchange.target
        if exchange.endpoint != "chat/completions" or target is None:
            return parsed
        rule = exchange.decision.prune if exchange.decision is not None else None
        window = self._capabilities.get(target.name, Capabilities()).context_window
        budget, summarizer = resolve_budget(rule, self.config, window, headers)
        messages = parsed.payload.get("messages")
        if budget is None or not isinstance(messages, list):
            return parsed
        bound = upper_bound(messages)
        if bound <= budget.max_tokens:
            return parsed
        model = target.target_model
        if bound > OFF_THREAD_BYTES or not self._counter.ready(model):  # a first load of an encoding takes a second
            result = await asyncio.to_thread(self._plan, messages, budget, model)
        else:
            result = self._plan(messages, budget, model)
        sizes, pruned = result
        if not pruned.strategies:  # within budget after all: nothing removed, nothing to attribute to pruning
            return parsed
        exchange.prompt_tokens_before = pure.PRIMER + sum(sizes)
        kept = pruned.messages
        sent = pruned.tokens
        strategies = list(pruned.strategies)
        if pruned.summary_at is not None:
            summary = await self._summary(exchange, pruned, summarizer, model)
            if summary is not None:
                kept = [*kept[: pruned.summary_at], summary[0], *kept[pruned.summary_at :]]
                sent += self.sizer.size(summary[0], model)  # counted already, while it was fitted
                strategies.append(f"summary:{summary[1]}")
        exchange.pruned_tokens = max(exchange.prompt_tokens_before - sent, 0)
        if not pruned.fits:
            strategies.append("over_budget")
            log.info("request %s stays over its budget of %d tokens after pruning", exchange.request_id, budget.max_tokens)
        exchange.prune = ",".join(strategies)
        payload = {**parsed.payload, "messages": kept}
        exchange.payload = payload  # what the ledger counts when the upstream reports no usage
        return ParsedRequest(parsed.model, parsed.stream, payload, orjson.dumps(payload))

    def _plan(self, messages: list[pure.Message], budget: pure.Budget, model: str) -> tuple[list[int], pure.Pruned]:
        sizes = self.sizer.sizes(messages, model)
        return sizes, pure.prune(messages, sizes, budget, lambda m: self.sizer.size(m, model))

    async def _summary(
        self, exchange: Exchange, pruned: pure.Pruned, summarizer: str, model: str
    ) -> tuple[pure.Message, str] | None:
        """The summary message within the room the pruner left, and where it came from; None when empty."""
        tenant = cache_tenant(exchange.principal, self._scope)
        made = await self.summarizer.summarize(pruned.dropped, pruned.summary_tokens, summarizer, tenant)
        exchange.overhead_nusd += made.cost_nusd
        text = made.text.strip()
        for _ in range(4):  # the room is in tokens, the summarizers write to a character estimate: trim to fit
            if not text:
                return None
            message = {"role": self.config.summary_role, "content": f"{header(len(pruned.dropped))}\n{text}"}
            size = self.sizer.size(message, model)
            if size <= pruned.summary_tokens:
                return message, made.source
            text = text[: max(int(len(text) * pruned.summary_tokens / size) - CHARS_PER_TOKEN * 4, 0)].rstrip()
        return None


async def open_pruner(
    config: PruneConfig,
    models: Sequence[ModelConfig],
    providers: Mapping[str, Provider],
    counter: TokenCounter,
    price_of: Callable[[str], Price],
    cache: ResponseCache | None,
    cache_config: CacheConfig,
) -> Pruner:
    """The stage as configured: summaries kept in the response cache's store (Redis when set), else its own LRU."""
    store: CacheStore = cache.store if cache is not None else MemoryStore(SUMMARY_MEMORY_ENTRIES, SUMMARY_MEMORY_BYTES)
    summarizer = Summarizer(
        store,
        providers,
        {m.name: m for m in models},
        price_of,
        timeout=config.summary_timeout_seconds,
        input_tokens=config.summary_input_tokens,
    )
    capabilities = await asyncio.to_thread(capabilities_for, models)
    if config.max_input_tokens is not None or config.context_share is not None:  # every request may be counted
        await asyncio.to_thread(counter.warm, {m.target_model for m in models} or {"gpt-4o"})
    return Pruner(config, counter, capabilities, summarizer, cache_config.scope)
