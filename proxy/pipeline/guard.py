"""Stage: guard (budgets). Holds a request's worst-case cost against its budgets before the
upstream call, and settles its actual cost after.

It sits after authentication and target resolution, before any upstream call. The decisions
are pure functions: which budgets apply to a principal (:func:`applicable`: a named key,
team or app, or ``"*"`` for each one separately, the named entry winning over ``"*"`` for
the same period), the UTC window of a period (:func:`window`), the estimate (prompt tokens
counted with tiktoken, plus ``max_completion_tokens`` / ``max_tokens``, else the model's
maximum output, else 4,096, times ``n``, all at the served model's price: :func:`estimate`),
and the verdicts (:func:`refusal`, :func:`warning`). The I/O is two calls on a
:class:`~proxy.cost.budgets.BudgetStore` (see there for the overspend bound). A principal
with no budget costs one dict lookup: nothing is counted. The settle runs as a tracked
background task, so neither a response nor a cancellation waits on Redis, and
:meth:`Guard.close` awaits the ones still running at shutdown. :meth:`Guard.spend_share`
answers the routing policy's ``budget`` matcher without I/O, from the settled spend each
reservation reads back (the whole fleet's, through Redis) plus this process's settles since.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from proxy.cost.budgets import EXPIRE_GRACE, BudgetStore, Counter, Reservation, counter_key, open_store
from proxy.cost.prices import Price, entry_for, litellm_models
from proxy.cost.pricing import cost_nusd
from proxy.cost.tokens import TokenCounter
from proxy.errors import BudgetExceeded
from proxy.pipeline.auth import Principal
from proxy.pipeline.exchange import Exchange
from proxy.settings import NANO_PER_USD, BudgetLimit, BudgetsConfig, ModelConfig
from proxy.tasks import TaskSet

log = logging.getLogger("thrifty.budgets")

DEFAULT_OUTPUT_CAP = 4096
# A hold outlives the model's total timeout by this much before it counts as abandoned.
HOLD_GRACE = 60.0
# Prompts longer than this (characters) are counted on a worker thread, off the event loop.
INLINE_CHARS = 32_000
_MAX_WARNED = 10_000
_MAX_SEEN = 100_000  # budget windows whose spend is remembered for routing


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget as it applies to one principal (a ``"*"`` entry resolved to the name)."""

    scope: str
    name: str
    period: str
    soft: int | None
    hard: int | None

    @property
    def label(self) -> str:
        return f"{self.scope} {self.name}"


@dataclass(frozen=True, slots=True)
class Window:
    id: str  # 2025-01-15 (daily) or 2025-01 (monthly)
    end: datetime  # UTC


class BudgetIndex:
    """The configured limits by (scope, name), and the ``"*"`` ones by scope."""

    def __init__(self, limits: Iterable[BudgetLimit]):
        self.named: dict[tuple[str, str], list[BudgetLimit]] = {}
        self.every: dict[str, list[BudgetLimit]] = {}
        for limit in limits:
            if limit.name == "*":
                self.every.setdefault(limit.scope, []).append(limit)
            else:
                self.named.setdefault((limit.scope, limit.name), []).append(limit)


def applicable(index: BudgetIndex, principal: Principal) -> tuple[Budget, ...]:
    out: list[Budget] = []
    for scope, name in (("key", principal.key_id), ("team", principal.team), ("app", principal.app)):
        if not name:
            continue
        named = index.named.get((scope, name), [])
        periods = {limit.period for limit in named}
        chosen = named + [limit for limit in index.every.get(scope, ()) if limit.period not in periods]
        out += [Budget(scope, name, limit.period, limit.soft_nusd, limit.hard_nusd) for limit in chosen]
    return tuple(out)


def window(period: str, now: float) -> Window:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return Window(day.strftime("%Y-%m-%d"), day + timedelta(days=1))
    month = day.replace(day=1)
    following = month.replace(year=month.year + 1, month=1) if month.month == 12 else month.replace(month=month.month + 1)
    return Window(month.strftime("%Y-%m"), following)


def output_allowance(endpoint: str, payload: Mapping[str, Any], model_cap: int | None) -> int:
    """The most completion tokens the request may be billed for."""
    if endpoint == "embeddings":
        return 0
    per_choice = model_cap or DEFAULT_OUTPUT_CAP
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            per_choice = value
            break
    n = payload.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1
    return per_choice * choices


def hold_price(exchange: Exchange, price_of: Callable[[str], Price]) -> Price:
    """The unit prices a hold is made at: the dearest of the models the request may end on
    (the target, then a rule's fallbacks or a cascade's escalation), so that a fallback to a
    dearer model never spends past a hard limit. The settle charges what was really spent."""
    assert exchange.target is not None
    price = price_of(exchange.target.name)
    decision = exchange.decision
    if decision is None or decision.model is None or not decision.fallbacks:
        return price
    prices = [price, *(price_of(name) for name in decision.fallbacks)]
    return Price(
        max(p.input for p in prices),
        max(p.output for p in prices),
        max(p.cached_input for p in prices),
        "dearest of target and fallbacks",
    )


def estimate(price: Price, prompt_tokens: int, output_tokens: int) -> int:
    """The worst-case cost in nano-USD (cached-input discounts ignored: an upper bound)."""
    return cost_nusd(price, prompt_tokens, 0, output_tokens)


def prompt_tokens(counter: TokenCounter, endpoint: str, payload: Mapping[str, Any], model: str) -> int:
    if endpoint == "embeddings":
        items = payload.get("input")
        items = items if isinstance(items, list) else [items]
        return sum(len(i) if isinstance(i, list) else counter.count_text(str(i or ""), model) for i in items)
    messages = payload.get("messages")
    total = counter.count_messages(messages, model) if isinstance(messages, list) else 0
    extras = [payload[k] for k in ("tools", "functions", "response_format") if payload.get(k)]
    return total + (counter.count_text(orjson.dumps(extras).decode(), model) if extras else 0)


def payload_size(payload: Mapping[str, Any]) -> int:
    """Roughly how much text a request carries (characters), cheaply."""
    messages = payload.get("messages") or payload.get("input") or ()
    if isinstance(messages, str):
        return len(messages)
    return sum(len(str(m.get("content") or "")) if isinstance(m, dict) else len(str(m)) for m in messages)


def dollars(nano: int) -> str:
    """``$1,000.00``, ``$0.015``: cents at least, down to micro-dollars where they matter."""
    whole, _, frac = f"{Decimal(nano) / NANO_PER_USD:,.6f}".partition(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def refusal(budget: Budget, window: Window, spent: int, reserved: int, amount: int) -> BudgetExceeded:
    held = f" and {dollars(reserved)} is held by requests in flight" if reserved else ""
    return BudgetExceeded(
        f"Budget exceeded: the {budget.period} budget of {budget.label} is {dollars(budget.hard or 0)}; "
        f"{dollars(spent)} is spent{held}, and this request could cost up to {dollars(amount)}. "
        f"The budget resets at {window.end.strftime('%Y-%m-%dT%H:%M:%SZ')}."
    )


def warning(budget: Budget, spent: int) -> str | None:
    """The ``x-thrifty-budget-warning`` text once a soft limit is crossed, else None."""
    if budget.soft is None or spent < budget.soft:
        return None
    if budget.hard:
        return _ascii(f"{budget.label}: {spent * 100 // budget.hard}% of {budget.period} budget")
    of_soft = spent * 100 // budget.soft if budget.soft else 100
    return _ascii(f"{budget.label}: {of_soft}% of {budget.period} soft limit")


def _ascii(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a request holds: settle it exactly once."""

    rid: str
    counters: tuple[Counter, ...]
    amount: int
    warning: str | None = None


class Guard:
    def __init__(
        self,
        limits: Sequence[BudgetLimit],
        store: BudgetStore,
        counter: TokenCounter,
        output_caps: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.index = BudgetIndex(limits)
        self.store = store
        self._counter = counter
        self._caps = output_caps or {}
        self._clock = clock
        self._settling = TaskSet("budget-settle")
        self._logged: set[str] = set()
        self._seen: dict[str, int] = {}  # counter key -> settled spend, as last read (for routing)
        self._windows: dict[str, tuple[str, float]] = {}  # period -> (current window id, its end)

    @property
    def settling(self) -> int:
        """Settles still running in the background."""
        return len(self._settling)

    def budgets_for(self, principal: Principal | None) -> tuple[Budget, ...]:
        return applicable(self.index, principal) if principal is not None else ()

    async def admit(self, exchange: Exchange, price: Price) -> Ticket | None:
        """Hold the request's worst-case cost on every budget that applies; raise if one would overflow."""
        budgets = self.budgets_for(exchange.principal)
        if not budgets or exchange.target is None:
            return None
        target, payload = exchange.target, exchange.payload or {}
        if payload_size(payload) > INLINE_CHARS or not self._counter.ready(target.target_model):
            prompt = await asyncio.to_thread(prompt_tokens, self._counter, exchange.endpoint, payload, target.target_model)
        else:
            prompt = prompt_tokens(self._counter, exchange.endpoint, payload, target.target_model)
        amount = estimate(price, prompt, output_allowance(exchange.endpoint, payload, self._caps.get(target.name)))
        now = self._clock()
        windows = [window(b.period, now) for b in budgets]
        counters = tuple(
            Counter(counter_key(b.scope, b.name, b.period, w.id), b.hard, int(w.end.timestamp()) + EXPIRE_GRACE)
            for b, w in zip(budgets, windows, strict=True)
        )
        rid = uuid.uuid4().hex
        reserving = asyncio.ensure_future(self.store.reserve(counters, rid, amount, target.timeouts.total + HOLD_GRACE))
        try:
            result = await asyncio.shield(reserving)
        except asyncio.CancelledError:  # the client left mid-reserve: release the hold once it is made
            reserving.add_done_callback(lambda done: self._release(done, Ticket(rid, counters, amount)))
            raise
        if not result.granted:
            i = result.refused_by or 0
            self._log_once(counters[i].key + ":hard", "budget %s: the hard limit is reached; requests are refused", counters[i])
            raise refusal(budgets[i], windows[i], result.spent[i], result.reserved[i], amount)
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        for counter, spent in zip(counters, result.spent, strict=True):
            self._seen[counter.key] = spent
        warnings = []
        for budget, counter, spent in zip(budgets, counters, result.spent, strict=True):
            text = warning(budget, spent)
            if text is not None:
                warnings.append(text)
                self._log_once(counter.key + ":soft", "budget %s: soft limit crossed (%s)", counter, text)
        return Ticket(rid, counters, amount, "; ".join(warnings) or None)

    def settle(self, ticket: Ticket, exchange: Exchange) -> None:
        """Release the hold and add the actual cost, in the background (never raises)."""
        charge = exchange.charge
        actual = max(charge.cost + charge.overhead, 0) if charge is not None else 0
        for counter in ticket.counters:
            if counter.key in self._seen:
                self._seen[counter.key] += actual
        self._settling.spawn(self._settle(ticket, actual))

    def spend_share(self, principal: Principal | None, scope: str = "*") -> float | None:
        """The largest share of a limit (hard, else soft) that the principal has spent in the current
        window, among its budgets in ``scope`` ("key", "team", "app"; "*": all): settled spend as the
        last reservation read it plus this process's settles since. No I/O. None when no budget
        applies or none was reserved against in this process during its current window."""
        if principal is None:
            return None
        now = self._clock()
        best = None
        for budget in self.budgets_for(principal):
            limit = budget.hard if budget.hard is not None else budget.soft
            if limit is None or (scope != "*" and budget.scope != scope):
                continue
            spent = self._seen.get(counter_key(budget.scope, budget.name, budget.period, self._window_id(budget.period, now)))
            if spent is not None:
                share = spent / limit if limit > 0 else 1.0
                best = share if best is None or share > best else best
        return best

    def _window_id(self, period: str, now: float) -> str:
        cached = self._windows.get(period)
        if cached is None or now >= cached[1]:
            current = window(period, now)
            cached = self._windows[period] = (current.id, current.end.timestamp())
        return cached[0]

    def _release(self, reserving: asyncio.Future[Reservation], ticket: Ticket) -> None:
        if not reserving.cancelled() and reserving.exception() is None and reserving.result().granted:
            self._settling.spawn(self._settle(ticket, 0))

    async def _settle(self, ticket: Ticket, actual: int) -> None:
        try:
            await self.store.settle(ticket.counters, ticket.rid, actual)
        except Exception:  # the store falls back on its own; this is a defect, logged, never raised
            log.exception("could not settle budget hold %s (%d nano-USD)", ticket.rid, actual)

    def _log_once(self, ident: str, message: str, counter: Counter, *args: object) -> None:
        if ident in self._logged:
            return
        if len(self._logged) >= _MAX_WARNED:
            self._logged.clear()
        self._logged.add(ident)
        log.warning(message, counter.key.removeprefix("thrifty:budget:"), *args)

    async def drain(self) -> None:
        """Wait for the settles still running."""
        await self._settling.drain()

    async def close(self) -> None:
        await self.drain()
        await self.store.close()


def output_caps(models: Iterable[ModelConfig], raw: Mapping[str, Any]) -> dict[str, int]:
    """Each model's maximum output tokens from litellm's map, where it is known."""
    caps = {}
    for model in models:
        entry = entry_for(raw, model)
        cap = entry.get("max_output_tokens") or entry.get("max_tokens") if isinstance(entry, dict) else None
        if isinstance(cap, int) and cap > 0:
            caps[model.name] = cap
    return caps


def read_output_caps(models: list[ModelConfig]) -> dict[str, int]:
    return output_caps(models, litellm_models())


async def open_guard(config: BudgetsConfig, models: Iterable[ModelConfig]) -> Guard | None:
    """The guard when budgets are configured (None otherwise: the hot path stays free)."""
    if not config.limits:
        return None
    counter = TokenCounter()
    await asyncio.to_thread(counter.warm)
    caps = await asyncio.to_thread(read_output_caps, list(models))
    store = open_store(config.redis_url, cluster=config.redis_cluster)
    if config.redis_url is None:
        log.info("budgets are kept per process (no budgets.redis_url): each replica enforces them alone")
    return Guard(config.limits, store, counter, caps)
