"""The routing policy as frozen data: rules of conditions and an action, and the decision.

``loader`` builds these from YAML (with the line of every rule); ``engine`` evaluates them.
A condition's ``test`` is pure and cheap; it answers ``None`` only when it needs the exact
prompt token count and the cheap upper bound in :class:`Features` cannot decide, so the
caller counts (off the event loop) and evaluates again. Each condition also carries a
canonical ``text``, which ``explain`` prints, and ``implies``: the loader finds a rule
shadowed by an earlier one when each earlier condition is implied by one of the rule's own
(equal texts, or a narrower set of values, a higher budget share, a tighter token range).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

_UTC = ZoneInfo("UTC")


class BackendState(Protocol):
    """What the upstream stage knows about each model's backend, read by health and latency
    matchers and the "fastest" strategy. Implemented by ``proxy.providers.health``; reads are
    plain attribute lookups (no I/O), so evaluation stays pure and cheap."""

    def is_up(self, model: str) -> bool: ...

    def latency_ms(self, model: str) -> float | None:
        """Recent time to first byte (an average), None when nothing was measured yet."""
        ...


@dataclass(frozen=True, slots=True)
class Features:
    """What routing may look at in one request; extracted cheaply by ``features.extract``."""

    model: str
    request_id: str = ""
    key_id: str | None = None
    team: str | None = None
    app: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # only those the policy names, lower-case
    last_user: str = ""
    last_user_lower: str = ""  # for keywords: lowered once, so each keyword is a plain substring search
    tools: bool = False
    images: bool = False
    json_mode: str | None = None  # "json_object" | "json_schema" | None
    prompt_bound: int = 0  # an upper bound on the prompt's tokens (its UTF-8 bytes plus framing)
    prompt_tokens: int | None = None  # the exact count, when someone paid for it
    now: float = 0.0  # epoch seconds
    task_class: str | None = None  # from the cheap classifier (``classify``), when some rule asks for it
    difficulty: float | None = None  # the learned difficulty score (0 to 1), when some rule asks for it
    # The state of the world the request is routed in, read without I/O (filled by the router
    # only when the policy looks at it): budget spend shares by scope ("team", "key", "app";
    # "*" the tightest of them), and the backends' health and latency.
    budget: Mapping[str, float] = field(default_factory=dict)
    backends: BackendState | None = None


@dataclass(frozen=True, slots=True)
class Condition(ABC):
    """One ``match`` entry; every condition of a rule must hold."""

    key: str  # the YAML key, for messages
    text: str  # canonical, e.g. "team in [a, b]": equal texts mean equal conditions

    @abstractmethod
    def test(self, f: Features) -> bool | None: ...

    @abstractmethod
    def seen(self, f: Features) -> str:
        """What the request had, for ``explain``."""

    def implies(self, other: Condition) -> bool:
        """Whenever this condition holds, ``other`` holds too (for the shadowing check; never a guess)."""
        return self.text == other.text


@dataclass(frozen=True, slots=True)
class OneOf(Condition):
    values: frozenset[str] = frozenset()
    get: Callable[[Features], str | None] = lambda f: None

    def test(self, f: Features) -> bool:
        return self.get(f) in self.values

    def seen(self, f: Features) -> str:
        return f"{self.key} is {self.get(f) or '(none)'}"

    def implies(self, other: Condition) -> bool:
        return isinstance(other, OneOf) and other.key == self.key and self.values <= other.values


@dataclass(frozen=True, slots=True)
class Pairs(Condition):
    """Tags or headers: each name must have one of its values (an empty set: any value)."""

    pairs: tuple[tuple[str, frozenset[str]], ...] = ()
    get: Callable[[Features], Mapping[str, str]] = lambda f: {}

    def test(self, f: Features) -> bool:
        source = self.get(f)
        for name, values in self.pairs:
            value = source.get(name)
            if value is None or (values and value not in values):
                return False
        return True

    def seen(self, f: Features) -> str:
        source = self.get(f)
        shown = ", ".join(f"{name}={source.get(name, '(absent)')}" for name, _ in self.pairs)
        return f"{self.key}: {shown}"


@dataclass(frozen=True, slots=True)
class Flag(Condition):
    want: bool = True
    get: Callable[[Features], bool] = lambda f: False

    def test(self, f: Features) -> bool:
        return self.get(f) is self.want

    def seen(self, f: Features) -> str:
        return f"the request has {'' if self.get(f) else 'no '}{self.key}"


@dataclass(frozen=True, slots=True)
class TokenRange(Condition):
    low: int | None = None
    high: int | None = None

    def test(self, f: Features) -> bool | None:
        tokens = f.prompt_tokens
        if tokens is None:
            # prompt_bound >= the true count: enough to decide "at most high" or "below low".
            if self.low is not None and f.prompt_bound < self.low:
                return False
            if self.low is None and self.high is not None and f.prompt_bound <= self.high:
                return True
            return None
        return (self.low is None or tokens >= self.low) and (self.high is None or tokens <= self.high)

    def implies(self, other: Condition) -> bool:
        if not isinstance(other, TokenRange):
            return False
        low_ok = other.low is None or (self.low is not None and self.low >= other.low)
        high_ok = other.high is None or (self.high is not None and self.high <= other.high)
        return low_ok and high_ok

    def seen(self, f: Features) -> str:
        if f.prompt_tokens is None:
            return f"the prompt has at most {f.prompt_bound} tokens"
        return f"the prompt has {f.prompt_tokens} tokens"


@dataclass(frozen=True, slots=True)
class Keywords(Condition):
    """Any of the words (lower-case) in the last user message, ignoring case."""

    words: tuple[str, ...] = ()

    def test(self, f: Features) -> bool:
        text = f.last_user_lower
        return any(word in text for word in self.words)

    def implies(self, other: Condition) -> bool:
        return isinstance(other, Keywords) and set(self.words) <= set(other.words)

    def seen(self, f: Features) -> str:
        return _quoted(f)


@dataclass(frozen=True, slots=True)
class Pattern(Condition):
    """Regexes (any of them), searched in the last user message."""

    patterns: tuple[re.Pattern[str], ...] = ()

    def test(self, f: Features) -> bool:
        text = f.last_user
        return any(p.search(text) is not None for p in self.patterns)

    def seen(self, f: Features) -> str:
        return _quoted(f)


def _quoted(f: Features) -> str:
    text = f.last_user if len(f.last_user) <= 60 else f.last_user[:57] + "..."
    return f"the last user message is {text!r}"


@dataclass(frozen=True, slots=True)
class Difficulty(Condition):
    """The learned difficulty score (``proxy.policy.difficulty``) is above ``above`` and/or below ``below``.

    ``test`` answers None while the score is not computed (the router embeds and evaluates again,
    as for exact token counts); a score that could not be computed (the embedder failed) is
    recorded as NaN and never matches."""

    above: float | None = None
    below: float | None = None

    def test(self, f: Features) -> bool | None:
        score = f.difficulty
        if score is None:
            return None
        if score != score:  # NaN: no score (embedder failure): the rule does not match
            return False
        return (self.above is None or score > self.above) and (self.below is None or score < self.below)

    def implies(self, other: Condition) -> bool:
        if not isinstance(other, Difficulty):
            return False
        low_ok = other.above is None or (self.above is not None and self.above >= other.above)
        high_ok = other.below is None or (self.below is not None and self.below <= other.below)
        return low_ok and high_ok

    def seen(self, f: Features) -> str:
        score = f.difficulty
        if score is None:
            return "the difficulty score is not computed"
        return (
            "the difficulty score is unknown (the embedder failed)" if score != score else f"the difficulty score is {score:.2f}"
        )


@dataclass(frozen=True, slots=True)
class TimeWindow(Condition):
    days: frozenset[int] = frozenset(range(7))  # Monday is 0
    start: int = 0  # minutes after midnight, inclusive
    end: int = 1440  # exclusive; below start: the window spans midnight
    zone: ZoneInfo = _UTC

    def _local(self, f: Features) -> datetime:
        return datetime.fromtimestamp(f.now, self.zone)

    def test(self, f: Features) -> bool:
        local = self._local(f)
        minute = local.hour * 60 + local.minute
        in_hours = self.start <= minute < self.end if self.start <= self.end else (minute >= self.start or minute < self.end)
        return in_hours and local.weekday() in self.days

    def seen(self, f: Features) -> str:
        return f"it is {self._local(f).strftime('%a %H:%M')} {self.zone.key}"


@dataclass(frozen=True, slots=True)
class BudgetShare(Condition):
    """The principal's spend has reached ``above`` (a share) of its tightest limit in ``scope``.

    The share comes from the budget guard's last view of the counters (no I/O here); a
    principal with no budget, or one the guard has not seen yet this window, never matches."""

    above: float = 0.8
    scope: str = "*"  # "team" | "key" | "app" | "*" (any of them)

    def test(self, f: Features) -> bool:
        share = f.budget.get(self.scope)
        return share is not None and share >= self.above

    def implies(self, other: Condition) -> bool:
        return isinstance(other, BudgetShare) and other.scope == self.scope and self.above >= other.above

    def seen(self, f: Features) -> str:
        share = f.budget.get(self.scope)
        whose = "the tightest budget" if self.scope == "*" else f"the {self.scope} budget"
        return f"{whose} is {'unknown (no budget, or no spend seen yet)' if share is None else f'{share:.0%} spent'}"


@dataclass(frozen=True, slots=True)
class Health(Condition):
    """Every model in ``down`` is down and every one in ``up`` is up (as the upstream stage sees
    them). With no backend state (simulation, tests) every model counts as up."""

    down: tuple[str, ...] = ()
    up: tuple[str, ...] = ()

    def test(self, f: Features) -> bool:
        if not self.down and not self.up:
            return False  # its aliases name no configured model: nothing to watch
        backends = f.backends
        if backends is None:
            return not self.down
        return all(not backends.is_up(m) for m in self.down) and all(backends.is_up(m) for m in self.up)

    def implies(self, other: Condition) -> bool:
        if not isinstance(other, Health) or not (other.down or other.up):
            return False
        return set(other.down) <= set(self.down) and set(other.up) <= set(self.up)

    def seen(self, f: Features) -> str:
        backends = f.backends
        states = [f"{m} is {'up' if backends is None or backends.is_up(m) else 'down'}" for m in (*self.down, *self.up)]
        return ", ".join(states) or "no configured model to watch"


@dataclass(frozen=True, slots=True)
class Arm:
    """One way out of a rule: models tried in order (an alias expands to several)."""

    weight: int
    models: tuple[str, ...]
    label: str  # as written: a model, an alias, or "a, b" for a fallback list


@dataclass(frozen=True, slots=True)
class RouteCache:
    """A rule's cache settings (``action.cache``); a None field: the gateway's ``cache:`` setting."""

    mode: str | None = None  # "off" | "exact" | "semantic" (semantic looks up exact first)
    ttl_seconds: float | None = None
    threshold: float | None = None  # semantic: the least cosine similarity that counts as a hit
    scope: str | None = None  # "team" | "key": whose requests may share answers


@dataclass(frozen=True, slots=True)
class RoutePrune:
    """A rule's context pruning (``action.prune``): the input token budget and how to meet it."""

    max_input_tokens: int | None = None  # absolute budget
    context_share: float | None = None  # or a share (0..1] of the target model's context window
    keep_last: int = 6  # messages kept verbatim at the end
    summarize: bool = True  # replace dropped turns with a summary by a local model
    summarizer: str | None = None  # the model that summarizes; None: the first local model
    allow_opt_out: bool = True  # whether ``x-thrifty-prune: off`` is honoured


@dataclass(frozen=True, slots=True)
class Cascade:
    """Try the decision's model first; escalate to the next when its answer fails a check."""

    checks: tuple[str, ...] = ("empty", "refusal", "json", "short")  # see ``proxy.pipeline.cascade``
    min_chars: int = 1  # "short": fewer characters than this fails
    min_logprob: float | None = None  # "confidence": a mean token logprob below this fails
    then: tuple[str, ...] = ()  # the models escalated to (the rule's ``then``); the decision's fallbacks start with them


@dataclass(frozen=True, slots=True)
class Action:
    arms: tuple[Arm, ...]  # one for target: ...; several for split: ...
    max_tokens: int | None = None
    inactive: str | None = None  # why no arm has a configured model (aliases that resolve to none)
    strategy: str = "ordered"  # "ordered" | "cheapest" (capable, by price) | "fastest" (by observed latency)
    cascade: Cascade | None = None
    cache: RouteCache | None = None
    prune: RoutePrune | None = None
    route_as: str | None = None  # routed by the policy as if it asked for this model (once; ``policy.actions``)

    @property
    def total_weight(self) -> int:
        return sum(arm.weight for arm in self.arms)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    line: int | None
    conditions: tuple[Condition, ...]
    action: Action


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    version: str  # a label from the file, if any, and a hash of its text
    source: str
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # as resolved: configured models only
    header_names: frozenset[str] = frozenset()  # headers some rule looks at (lower-case)
    classify: bool = False  # some rule matches on task_class: classify each request
    classify_for: frozenset[str] | None = None  # only requests for these models (every task_class rule names them); None: all
    budget_scopes: frozenset[str] = frozenset()  # scopes some budget condition reads ("*": the tightest)
    difficulty: bool = False  # some rule matches on the learned difficulty score: compute it

    def rule_named(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes. ``rule`` None: no rule applied, it goes to the model it names."""

    rule: str | None
    model: str | None
    policy_version: str
    fallbacks: tuple[str, ...] = ()  # recorded for the upstream stage; not yet tried
    max_tokens: int | None = None
    needs_tokens: bool = False  # count the prompt's tokens and evaluate again
    needs_difficulty: bool = False  # score the request's difficulty (an embedding) and evaluate again
    notes: tuple[str, ...] = ()  # why rules did not apply (all of them when explaining)
    cascade: Cascade | None = None  # escalate from model to fallbacks[0] when the answer fails a check
    cache: RouteCache | None = None
    prune: RoutePrune | None = None
