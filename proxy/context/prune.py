"""Pure context pruning: a conversation and its per-message token sizes in, a smaller one out.

Called by the prune stage (``proxy.pipeline.prune``) after the cache lookup missed and before
the budget hold, only when the request is over its token budget. No I/O and no awaits: the
caller measures each message once and hands the sizes in (plus ``measure`` for the few
messages this module rewrites), so the work here is a few passes over a list. Strategies run
in order, each only while the conversation is still over budget:

1. ``dedupe``: drop exact duplicates of another message (the latest copy is the one kept);
2. ``tool_output``: shorten oversized tool / function outputs, oldest first, keeping their
   head and tail around a marker that says how much was cut;
3. ``drop_middle``: drop the oldest turns between the protected head (system prompts and the
   first user message) and the last ``keep_last`` messages, leaving room for a summary;
4. ``drop_recent``: the last resort, the same among the last ``keep_last`` messages.

Never dropped or altered: system / developer messages and the last user message. Never
dropped: the first user message and the last message's unit (in an agent loop, the latest
tool call and its results; older ones after the last user message can go). An assistant
message with tool calls and the tool results that follow it are one unit, kept or dropped
together; a message with images is never rewritten, so it is kept or dropped whole; order
is preserved. What ``drop_*`` removed is returned for summarizing, with
the place the summary goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

Message = dict[str, Any]
Measure = Callable[[Message], int]

PRIMER = 3  # the reply primer OpenAI adds to every chat prompt (see proxy.cost.tokens)
SUMMARY_STEP = 8
MIN_SUMMARY_TOKENS = 24  # less room than this and a summary is not worth its framing
_PROTECTED_ROLES = frozenset({"system", "developer"})
_TOOL_ROLES = frozenset({"tool", "function"})


@dataclass(frozen=True, slots=True)
class Budget:
    """How one request is pruned (resolved from policy, config and headers by the stage)."""

    max_tokens: int
    keep_last: int = 6
    summarize: bool = True
    summary_tokens: int = 300  # room reserved for the summary (at most a fifth of the budget)
    tool_output_tokens: int = 1000  # a tool output over this is shortened to it
    summary_step: int = SUMMARY_STEP  # dropped runs end on multiples of this index: a growing conversation reuses its summary

    @property
    def reserve(self) -> int:
        """Tokens kept free for the summary when turns are dropped."""
        return min(self.summary_tokens, self.max_tokens // 5) if self.summarize else 0


@dataclass(frozen=True, slots=True)
class Pruned:
    messages: list[Message]  # what is sent, without the summary
    tokens: int  # their size, reply primer included
    dropped: list[Message]  # the turns dropped by drop_middle / drop_recent, in order, for the summary
    summary_at: int | None  # index in ``messages`` where the summary goes (None: no summary)
    summary_tokens: int  # room left for the summary within the budget
    strategies: tuple[str, ...]
    fits: bool


def units(messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Index ranges kept or dropped whole: an assistant tool call with the tool results after it, else one message."""
    out = []
    i, n = 0, len(messages)
    while i < n:
        j = i + 1
        message = messages[i]
        if message.get("role") == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            while j < n and messages[j].get("role") in _TOOL_ROLES:
                j += 1
        out.append((i, j))
        i = j
    return out


class _State:
    """The conversation being pruned: which messages are kept, their current form and sizes."""

    def __init__(self, messages: Sequence[Message], sizes: Sequence[int]):
        self.messages = list(messages)
        self.sizes = list(sizes)
        self.keep = [True] * len(messages)
        self.total = PRIMER + sum(sizes)
        self.dropped: set[int] = set()  # by drop_* (summarized), not by dedupe

    def drop(self, start: int, end: int, summarized: bool) -> None:
        for i in range(start, end):
            if self.keep[i]:
                self.keep[i] = False
                self.total -= self.sizes[i]
                if summarized:
                    self.dropped.add(i)


def prune(messages: Sequence[Message], sizes: Sequence[int], budget: Budget, measure: Measure) -> Pruned:
    """The conversation cut to ``budget.max_tokens`` where the invariants allow (``fits`` says whether it does)."""
    state = _State(messages, sizes)
    strategies: list[str] = []
    limit = budget.max_tokens
    if state.total <= limit:
        return _result(state, budget, strategies)
    spans = units(messages)
    protected, recent = _classify(messages, spans, budget.keep_last)
    droppable = [u for u in spans if u not in protected]
    if _dedupe(state, droppable, protected):
        strategies.append("dedupe")
        if state.total <= limit:
            return _result(state, budget, strategies)
    if _shorten_tools(state, budget, measure):
        strategies.append("tool_output")
        if state.total <= limit:
            return _result(state, budget, strategies)
    reserve = budget.reserve
    middle = [u for u in droppable if u not in recent]
    if _drop(state, middle, limit - reserve, budget.summary_step if budget.summarize else 0):
        strategies.append("drop_middle")
    if state.total + reserve > limit and _drop(state, [u for u in droppable if u in recent], limit - reserve, 0):
        strategies.append("drop_recent")
    return _result(state, budget, strategies)


def _classify(
    messages: Sequence[Message], spans: list[tuple[int, int]], keep_last: int
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """The units never dropped and the recent ones (dropped only as a last resort).

    Never dropped: system prompts, the first and the last user message, and the last unit (the
    latest answer or tool result the model responds to). An agent loop's older tool calls after
    the last user message can go: they are often most of its history.
    """
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    keep = {users[0], users[-1]} if users else set()
    protected = {spans[-1]}
    for start, end in spans:
        if any(i in keep or messages[i].get("role") in _PROTECTED_ROLES for i in range(start, end)):
            protected.add((start, end))
    recent_from = len(messages) - keep_last
    recent = {(s, e) for s, e in spans if e > recent_from}
    return protected, recent


def _key(message: Message) -> bytes:
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


def _dedupe(state: _State, droppable: list[tuple[int, int]], protected: set[tuple[int, int]]) -> bool:
    """Drop a plain message that repeats a protected one or a later one (tool units are never deduplicated)."""
    seen = {_key(state.messages[i]) for s, e in protected for i in range(s, e) if e - s == 1}
    changed = False
    for start, end in reversed(droppable):
        message = state.messages[start]
        if end - start != 1 or message.get("role") in _TOOL_ROLES:
            continue
        key = _key(message)
        if key in seen:
            state.drop(start, end, summarized=False)
            changed = True
        else:
            seen.add(key)
    return changed


def _shorten_tools(state: _State, budget: Budget, measure: Measure) -> bool:
    """Cut tool outputs over the cap to their head and tail, oldest first, until the conversation fits."""
    cap = max(min(budget.tool_output_tokens, budget.max_tokens // 4), 32)
    changed = False
    for i, message in enumerate(state.messages):
        if state.total <= budget.max_tokens:
            break
        if not state.keep[i] or message.get("role") not in _TOOL_ROLES or state.sizes[i] <= cap:
            continue
        content = message.get("content")
        if not isinstance(content, str):
            continue
        short = {**message, "content": cut_text(content, state.sizes[i], cap)}
        size = measure(short)
        if size < state.sizes[i]:
            state.total += size - state.sizes[i]
            state.messages[i], state.sizes[i] = short, size
            changed = True
    return changed


def cut_text(text: str, tokens: int, cap: int) -> str:
    """``text`` (about ``tokens`` long) cut to about ``cap`` tokens: two thirds head, one third tail, a marker between."""
    keep = max(int(len(text) * (cap - 20) / max(tokens, 1)), 0)  # 20 tokens for the marker
    head = keep * 2 // 3
    tail = keep - head
    cut = len(text) - keep
    marker = f"\n[... thrifty cut {cut} characters (about {max(tokens - cap, 0)} tokens) from the middle of this output ...]\n"
    return text[:head] + marker + (text[-tail:] if tail else "")


def _drop(state: _State, candidates: list[tuple[int, int]], limit: int, step: int) -> bool:
    """Drop units oldest first until the conversation is within ``limit``; with ``step``, on to the next multiple of it."""
    last_end = 0
    for start, end in candidates:
        if state.total <= limit and (not step or not last_end or last_end % step == 0):
            break
        if not any(state.keep[start:end]):
            continue
        state.drop(start, end, summarized=True)
        last_end = end
    return last_end > 0


def _result(state: _State, budget: Budget, strategies: list[str]) -> Pruned:
    kept = [m for m, k in zip(state.messages, state.keep, strict=True) if k]
    dropped = [state.messages[i] for i in sorted(state.dropped)]
    summary_at = None
    room = 0
    if dropped and budget.summarize:
        room = min(budget.reserve, budget.max_tokens - state.total)
        if room >= MIN_SUMMARY_TOKENS:
            first = min(state.dropped)
            summary_at = sum(state.keep[:first])
        else:
            room = 0
    fits = state.total + room <= budget.max_tokens
    return Pruned(kept, state.total, dropped, summary_at, room, tuple(strategies), fits)
