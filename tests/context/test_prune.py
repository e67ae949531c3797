"""The pure pruner: invariants under arbitrary conversations (hypothesis) and each strategy's effect."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.context.prune import PRIMER, Budget, Message, prune, units


def measure(message: Message) -> int:
    """A deterministic stand-in for the tokenizer: the pruner only needs sizes that add up."""
    return len(orjson.dumps(message)) // 4 + 3


def sizes(messages: list[Message]) -> list[int]:
    return [measure(m) for m in messages]


_ids = iter(range(10**9))
TEXT = st.text(alphabet="abcdefghij klmnop.,0123456789", min_size=0, max_size=400)


@st.composite
def turn(draw: st.DrawFn) -> list[Message]:
    kind = draw(st.sampled_from(["user", "assistant", "tools", "image", "system"]))
    if kind == "user":
        return [{"role": "user", "content": draw(TEXT)}]
    if kind == "assistant":
        return [{"role": "assistant", "content": draw(TEXT)}]
    if kind == "system":
        return [{"role": "system", "content": draw(TEXT)}]
    if kind == "image":
        parts = [{"type": "text", "text": draw(TEXT)}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
        return [{"role": "user", "content": parts}]
    calls = [
        {"id": f"call_{next(_ids)}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for _ in range(draw(st.integers(1, 3)))
    ]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": draw(st.text(min_size=0, max_size=3000))} for c in calls]
    return [{"role": "assistant", "content": None, "tool_calls": calls}, *results]


@st.composite
def conversation(draw: st.DrawFn) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for chunk in draw(st.lists(turn(), min_size=0, max_size=40)):
        messages += chunk
    if draw(st.booleans()) and messages:  # exact duplicates of earlier plain messages
        plain = [m for m in messages if m["role"] in ("user", "assistant") and "tool_calls" not in m]
        for m in draw(st.lists(st.sampled_from(plain), max_size=5)) if plain else ():
            messages.append(dict(m))
    messages.append({"role": "user", "content": draw(TEXT) or "last"})
    if draw(st.booleans()):  # an agent loop: the final turn goes on after the last user message
        messages += draw(turn().filter(lambda t: "tool_calls" in t[0]))
    return messages


def origin(message: Message, source: list[Message]) -> int:
    """The index in ``source`` of a kept message (a shortened tool output is found by its call id)."""
    for i, m in enumerate(source):
        if m is message:
            return i
    for i, m in enumerate(source):
        if m.get("role") == "tool" and m.get("tool_call_id") == message.get("tool_call_id"):
            return i
    raise AssertionError(f"not from the conversation: {message}")


@settings(max_examples=300, deadline=None)
@given(conversation(), st.integers(50, 6000), st.integers(0, 8), st.booleans())
def test_invariants(messages: list[Message], limit: int, keep_last: int, summarize: bool) -> None:
    original = orjson.dumps(messages)
    budget = Budget(max_tokens=limit, keep_last=keep_last, summarize=summarize, tool_output_tokens=200)
    out = prune(messages, sizes(messages), budget, measure)
    assert orjson.dumps(messages) == original, "the input is never mutated"
    kept = out.messages
    # order preserved: kept messages come from the conversation, in its order
    positions = [origin(m, messages) for m in kept]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # system prompts are never dropped or altered
    assert [m for m in kept if m["role"] == "system"] == [m for m in messages if m["role"] == "system"]
    assert all(m is messages[p] for m, p in zip(kept, positions, strict=True) if m["role"] == "system")
    # the last user message is kept unaltered, and the first user message is kept
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    assert users[-1] in positions and kept[positions.index(users[-1])] is messages[users[-1]]
    assert users[0] in positions
    # the last message's unit (the latest tool call and its results, or the last message) is kept
    last_start, last_end = units(messages)[-1]
    assert set(range(last_start, last_end)) <= set(positions)
    # a tool call and its results are kept or dropped together
    for start, end in units(messages):
        inside = [p for p in positions if start <= p < end]
        assert inside == [] or inside == list(range(start, end))
    # a message with images is kept whole or dropped
    for m, p in zip(kept, positions, strict=True):
        if isinstance(messages[p]["content"], list):
            assert m is messages[p]
    # only tool outputs are ever rewritten
    for m, p in zip(kept, positions, strict=True):
        if m is not messages[p]:
            assert m["role"] == "tool" and "thrifty cut" in m["content"]
    # the sizes add up, and a result that says it fits does, with the summary's room
    assert out.tokens == PRIMER + sum(measure(m) for m in kept)
    if out.fits:
        assert out.tokens + out.summary_tokens <= limit
    if out.summary_at is not None:
        assert summarize and out.dropped and 0 <= out.summary_at <= len(kept)
    if PRIMER + sum(sizes(messages)) <= limit:
        assert kept == messages and out.strategies == ()


def _chat(n: int, words: int = 40) -> list[Message]:
    messages: list[Message] = [{"role": "system", "content": "You are helpful."}]
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": f"turn {i} " + "lorem ipsum " * words})
    messages.append({"role": "user", "content": "final question?"})
    return messages


def test_under_budget_is_untouched() -> None:
    messages = _chat(4, 2)
    out = prune(messages, sizes(messages), Budget(10_000), measure)
    assert out.messages == messages and out.fits and out.strategies == () and out.summary_at is None


def test_dedupe_drops_earlier_copies_first() -> None:
    repeated = {"role": "user", "content": "continue " * 100}
    messages: list[Message] = [{"role": "system", "content": "s"}, {"role": "user", "content": "first"}]
    messages += [dict(repeated), {"role": "assistant", "content": "ok"}, dict(repeated), {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "last"})
    total = PRIMER + sum(sizes(messages))
    out = prune(messages, sizes(messages), Budget(total - 10, keep_last=0), measure)
    assert out.strategies == ("dedupe",)
    assert [m["content"] for m in out.messages] == ["s", "first", repeated["content"], "ok", "last"]


def test_tool_output_keeps_head_and_tail_with_marker() -> None:
    output = "HEAD " + "x" * 20_000 + " TAIL"
    messages: list[Message] = [
        {"role": "user", "content": "run it"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "sh", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": output},
        {"role": "user", "content": "and?"},
    ]
    out = prune(messages, sizes(messages), Budget(2000, tool_output_tokens=500), measure)
    assert out.strategies == ("tool_output",) and out.fits
    short = out.messages[2]["content"]
    assert short.startswith("HEAD ") and short.endswith(" TAIL") and "thrifty cut" in short
    assert measure(out.messages[2]) <= 520


def test_drops_oldest_middle_turns_and_leaves_room_for_the_summary() -> None:
    messages = _chat(40)
    budget = Budget(800, keep_last=4, summary_step=1)
    out = prune(messages, sizes(messages), budget, measure)
    assert out.strategies == ("drop_middle",) and out.fits
    assert out.messages[:2] == messages[:2] and out.messages[-4:] == messages[-4:]
    assert out.summary_at == 2 and out.summary_tokens == budget.reserve
    assert out.dropped == messages[2 : 2 + len(out.dropped)]
    assert out.tokens + out.summary_tokens <= 800


def test_dropped_run_ends_on_a_step_so_a_growing_conversation_reuses_its_summary() -> None:
    ends = set()
    for n in range(80, 88):  # eight requests of one conversation, one message longer each time
        messages = _chat(n)
        out = prune(messages, sizes(messages), Budget(2000, keep_last=6, summary_step=8), measure)
        end = len(out.dropped) + 2
        ends.add(end)
        assert end % 8 == 0 or end == len(messages) - 6  # a step, or where the recent messages begin
    assert len(ends) <= 3


def test_last_resort_drops_recent_turns_but_never_the_final_one() -> None:
    messages = _chat(10, words=200)
    out = prune(messages, sizes(messages), Budget(600, keep_last=8), measure)
    assert "drop_recent" in out.strategies
    assert out.messages[0] == messages[0] and out.messages[-1] == messages[-1] and out.messages[1] == messages[1]


def test_cannot_fit_says_so() -> None:
    messages: list[Message] = [{"role": "system", "content": "rules " * 2000}, {"role": "user", "content": "hi"}]
    out = prune(messages, sizes(messages), Budget(100), measure)
    assert not out.fits and out.messages == messages


def test_units_group_a_tool_call_with_its_results() -> None:
    call: dict[str, Any] = {"role": "assistant", "tool_calls": [{"id": "a"}, {"id": "b"}]}
    messages: list[Message] = [{"role": "user"}, call, {"role": "tool"}, {"role": "tool"}, {"role": "assistant"}]
    assert units(messages) == [(0, 1), (1, 4), (4, 5)]


def test_an_agent_loop_drops_its_older_tool_calls_after_the_user_message() -> None:
    messages: list[Message] = [{"role": "system", "content": "agent"}, {"role": "user", "content": "fix the build"}]
    for i in range(30):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "sh", "arguments": f'{{"cmd": "step {i}"}}'}}
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"output {i} " * 60},
        ]
    out = prune(messages, sizes(messages), Budget(1500, keep_last=4), measure)
    assert out.fits and "drop_middle" in out.strategies
    assert out.messages[:2] == messages[:2] and out.messages[-4:] == messages[-4:]
    assert out.summary_at == 2 and len(out.dropped) % 2 == 0  # whole call/result pairs
