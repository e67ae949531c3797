"""Stage: route. Runs the routing policy on a chat request and rewrites it for the chosen model.

Sits after authentication and before the model lookup in ``api.routes``. Features are
read cheaply from the payload; the policy engine (pure) decides; only when a rule or a
context window needs the exact prompt size are tokens counted, on a worker thread. The
request then names the chosen model (and carries the rule's ``max_tokens`` cap), and the
exchange records the rule and the policy version for the ledger and the
``x-thrifty-route`` header. No rule applying leaves the request as it was. Embeddings are
not routed. The policy is loaded once at start-up; an invalid one stops the start. The
engine also reads the state of the world, without I/O: each model's blended price (for
``cheapest``), the backends' health and latency (``proxy.providers.health``), and the
caller's budget spend share from the budget guard's last counts; each is read per request
only when the live policy uses it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import orjson

from proxy.api.wire import ParsedRequest
from proxy.cost.prices import Price
from proxy.cost.tokens import TokenCounter
from proxy.errors import UnsupportedRequest
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.policy.capabilities import Capabilities, capabilities_for
from proxy.policy.engine import evaluate
from proxy.policy.features import extract, with_tokens
from proxy.policy.loader import load_policy
from proxy.policy.model import BackendState, Decision, Features, Policy
from proxy.settings import ModelConfig

log = logging.getLogger("thrifty.route")

COUNTING_MODEL = "gpt-4o"  # o200k_base: the encoding token conditions are measured in
EMBED_FAILURES_LOGGED_EVERY = 100  # an embedder failure is logged once per this many
Embed = Callable[[str], Awaitable[Any]]  # text -> its 384-d vector (the semantic cache's embedder)


class SpendView(Protocol):
    """The budget guard's view of spend (``proxy.pipeline.guard.Guard``): no I/O."""

    def spend_share(self, principal: Principal | None, scope: str = "*") -> float | None: ...


class Router:
    def __init__(
        self,
        policy: Policy,
        capabilities: Mapping[str, Capabilities],
        models: Collection[str],
        counter: TokenCounter | None = None,
        clock: Callable[[], float] = time.time,
        *,
        prices: Mapping[str, float] | None = None,
        backends: BackendState | None = None,
        spend: SpendView | None = None,
        embed: Embed | None = None,
    ):
        self.policy = policy
        self.capabilities = capabilities
        self._models = frozenset(models)
        self._counter = counter or TokenCounter()
        self._clock = clock
        self.prices = prices  # blended USD per 1M tokens by model, for "cheapest"
        self.backends = backends
        self.spend = spend
        # The difficulty score's embedder (a seam: the lead wires the one shared with the semantic
        # cache) and model, loaded only when some rule of the policy matches on difficulty.
        self.embed = embed
        self._difficulty: Any = None
        self._embed_failures = 0

    def attach(self, *, prices: Mapping[str, float] | None = None, spend: SpendView | None = None) -> None:
        """What start-up builds after the router (the ledger's prices, the budget guard)."""
        self.prices = prices if prices is not None else self.prices
        self.spend = spend if spend is not None else self.spend

    def swap(self, policy: Policy) -> None:
        """Hot reload (``proxy.policy.reload``): one reference replaced, so requests in flight,
        which read ``self.policy`` once, finish on the version they started with."""
        self.policy = policy

    def features(self, policy: Policy, exchange: Exchange, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Features:
        budget = None
        if policy.budget_scopes and self.spend is not None and exchange.principal is not None:
            budget = {}
            for scope in policy.budget_scopes:
                share = self.spend.spend_share(exchange.principal, scope)
                if share is not None:
                    budget[scope] = share
        return extract(
            payload,
            request_id=exchange.request_id,
            principal=exchange.principal,
            headers=headers,
            header_names=policy.header_names,
            tags=exchange.tags,
            now=self._clock(),
            classify=policy.classify and (policy.classify_for is None or payload.get("model") in policy.classify_for),
            budget=budget,
            backends=self.backends,
        )

    async def route(self, exchange: Exchange, parsed: ParsedRequest, headers: Mapping[str, str]) -> ParsedRequest:
        if exchange.endpoint != "chat/completions":
            return parsed
        policy = self.policy  # one version for the whole request
        exchange.policy_version = policy.version
        features = self.features(policy, exchange, parsed.payload, headers)
        decision = evaluate(policy, features, self.capabilities, prices=self.prices)
        for _ in range(2):  # each kind of missing value is filled in at most once
            if decision.needs_difficulty:
                features = replace(features, difficulty=await self.difficulty(features.last_user, parsed.payload))
            elif decision.needs_tokens:
                features = with_tokens(features, await asyncio.to_thread(self.count, parsed.payload))
            else:
                break
            decision = evaluate(policy, features, self.capabilities, prices=self.prices)
        exchange.features, exchange.decision = features, decision
        if decision.model is None:
            if decision.notes and parsed.model not in self._models:
                why = "; ".join(decision.notes)
                raise UnsupportedRequest(f"No configured model can serve this request: {why}", param="model")
            return parsed
        exchange.route = decision.rule
        return rewrite(parsed, decision)

    async def difficulty(self, text: str, payload: Mapping[str, Any]) -> float:
        """The learned score of the last user message; NaN (no rule matches) when it cannot be had."""
        if self._difficulty is None:
            from proxy.policy.difficulty import load

            self._difficulty = await asyncio.to_thread(load)
        try:
            if self.embed is None:
                raise RuntimeError("no embedder configured for difficulty rules")
            vector = await self.embed(text)
        except Exception as exc:  # any embedder failure: route without the score, never fail the request
            if self._embed_failures % EMBED_FAILURES_LOGGED_EVERY == 0:
                log.warning("difficulty score unavailable (%d failures so far): %s", self._embed_failures + 1, exc)
            self._embed_failures += 1
            return math.nan
        messages = payload.get("messages")
        depth = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "user") if isinstance(messages, list) else 1
        return float(self._difficulty.score(vector, text, max(depth, 1)))

    def count(self, payload: Mapping[str, Any]) -> int:
        return self._counter.count_messages(payload.get("messages") or (), COUNTING_MODEL)


def rewrite(parsed: ParsedRequest, decision: Decision) -> ParsedRequest:
    """The request as sent to the chosen model, with the rule's cap on generated tokens."""
    assert decision.model is not None
    changes: dict[str, Any] = {}
    if decision.model != parsed.model:
        changes["model"] = decision.model
    cap = decision.max_tokens
    if cap is not None:
        field = "max_completion_tokens" if "max_completion_tokens" in parsed.payload else "max_tokens"
        asked = parsed.payload.get(field)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked > cap:
            changes[field] = cap
    if not changes:
        return parsed
    payload = {**parsed.payload, **changes}
    return ParsedRequest(decision.model, parsed.stream, payload, orjson.dumps(payload))


def blended_prices(models: Iterable[str], price_of: Callable[[str], Price]) -> dict[str, float]:
    """USD per 1M tokens, 3 parts input to 1 part output (a typical chat's mix), by model; a model
    with no known price is left out, so ``cheapest`` tries it last rather than first."""
    out = {}
    for name in models:
        price = price_of(name)
        if price.source != "unknown":
            out[name] = float(price.input * 3 + price.output) / 4
    return out


async def load_router(path: str | None, models: Sequence[ModelConfig], *, backends: BackendState | None = None) -> Router | None:
    """The router for the policy at ``path`` (None: no routing); raises ConfigError when invalid.

    Its difficulty embedder is a :class:`SharedEmbed`: the app hands it the semantic cache's
    in-process embedder when there is one (one MiniLM per process, and a message embedded once for
    both, through the embedder's memo), else loads it at start when the policy has a difficulty
    rule, else on the first score a hot-reloaded policy asks for."""
    if path is None:
        return None

    def build() -> Router:
        policy = load_policy(path, models)
        return Router(policy, capabilities_for(models), [m.name for m in models], backends=backends, embed=SharedEmbed())

    router = await asyncio.to_thread(build)
    log.info("routing policy %s (version %s): %d rules", path, router.policy.version, len(router.policy.rules))
    return router


class SharedEmbed:
    """text -> vector for difficulty scores: an embedder handed in (:meth:`use`) or, failing that, an
    in-process MiniLM built off the event loop on first need (imported only then)."""

    def __init__(self) -> None:
        self._embedder: Any = None
        self._owned = False
        self._lock = asyncio.Lock()

    def use(self, embedder: Any) -> None:
        if self._embedder is None:
            self._embedder = embedder

    async def load(self) -> Any:
        async with self._lock:
            if self._embedder is None:
                from proxy.cache.embedder import LocalEmbedder

                self._embedder = await asyncio.to_thread(LocalEmbedder)
                self._owned = True
        return self._embedder

    async def __call__(self, text: str) -> Any:
        embedder = self._embedder or await self.load()
        return await embedder.embed_one(text)

    async def close(self) -> None:
        if self._owned and self._embedder is not None:
            await self._embedder.close()
