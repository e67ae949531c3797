"""Benchmark: context pruning of a 100-message, ~50,000-token conversation (no summarization).

Run on purpose, never by pytest::

    .venv/bin/python -m tests.benchmarks.prune [--runs 200] [--budget 8000]

What each row covers (medians and p90 of ``--runs`` runs, one process, one thread):

- ``bound``: the pre-check every request with a budget pays: the UTF-8 byte length of the
  text, an upper bound on its tokens (a byte-level BPE token covers at least one byte);
- ``prune (sizes given)``: the pure pruner (``proxy.context.prune.prune``) on sizes already
  known: dedupe, tool-output shortening (its re-counts included), dropping turns: the <= 1 ms
  target of issue 6;
- ``sizes, cold``: counting every message exactly with tiktoken (o200k_base), as the first
  request of a conversation does: proportional to the tokens, tens of milliseconds here;
- ``sizes, warm``: the same messages again (a growing conversation resends them): a
  BLAKE2b hash of each message and a look-up in the per-process size cache;
- ``stage, warm``: the whole stage (``Pruner.prune``: budget, bound, sizes on a worker
  thread, prune, payload rewrite and re-serialization) for a conversation seen before.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from proxy.api.wire import ParsedRequest
from proxy.cache.store import MemoryStore
from proxy.context import prune as pure
from proxy.context.summarize import Summarizer
from proxy.cost.prices import Price
from proxy.cost.tokens import TokenCounter
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.prune import MessageSizer, Pruner, upper_bound
from proxy.settings import ModelConfig, PruneConfig

VOCABULARY = (
    "the a of to and in for on with deploy service cluster latency budget invoice customer order Oslo "
    "Berlin March decided agreed will must review merge branch release database index query cache token "
    "request response error retry timeout config policy route model price cost team report summary "
    "meeting Anna Jonas Priya ticket "
)
WORDS = VOCABULARY.split()
MODEL = "gpt-4o"


def text(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        out.append(str(rng.randint(1, 9999)) if rng.random() < 0.06 else rng.choice(WORDS))
        if i % 14 == 13:
            out[-1] += "."
    return " ".join(out)


def conversation(rng: random.Random, messages: int = 100, tokens: int = 50_000) -> list[dict[str, Any]]:
    """System prompt, then user / assistant turns with a tool call and its output every tenth turn."""
    per = tokens // messages
    out: list[dict[str, Any]] = [{"role": "system", "content": text(rng, 120)}]
    while len(out) < messages - 1:
        i = len(out)
        if i % 10 == 5:
            call_id = f"call_{i}"
            out.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "search", "arguments": '{"q": "logs"}'}}
            ]})  # fmt: skip
            out.append({"role": "tool", "tool_call_id": call_id, "content": text(rng, int(per * 2.2))})
        else:
            out.append({"role": "user" if i % 2 else "assistant", "content": text(rng, int(per * 0.85))})
    out.append({"role": "user", "content": "So what do we do about the latency budget?"})
    return out[:messages]


def timed(runs: int, work: Callable[[], object]) -> tuple[float, float]:
    """Median and p90 in milliseconds."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        work()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--budget", type=int, default=8000)
    args = parser.parse_args()
    counter = TokenCounter()
    counter.warm([MODEL])
    messages = conversation(random.Random(6))
    total = counter.count_messages(messages, MODEL)
    budget = pure.Budget(max_tokens=args.budget, summarize=False)
    sizer = MessageSizer(counter)
    sizes = sizer.sizes(messages, MODEL)
    assert pure.PRIMER + sum(sizes) == total

    def measure(m: pure.Message) -> int:
        return sizer.size(m, MODEL)

    result = pure.prune(messages, sizes, budget, measure)
    rows = [
        ("bound (pre-check)", timed(args.runs, lambda: upper_bound(messages))),
        ("prune (sizes given)", timed(args.runs, lambda: pure.prune(messages, sizes, budget, measure))),
        ("sizes, cold (tiktoken)", timed(max(args.runs // 10, 5), lambda: MessageSizer(counter).sizes(messages, MODEL))),
        ("sizes, warm (hash + cache)", timed(args.runs, lambda: sizer.sizes(messages, MODEL))),
        ("stage, warm (Pruner.prune)", stage_timing(counter, messages, args)),
    ]
    print(f"conversation: {len(messages)} messages, {total} tokens (o200k_base, chat framing); budget {args.budget}")
    print(f"pruned to {result.tokens} tokens, {len(result.messages)} messages; strategies {', '.join(result.strategies)}")
    print(f"{'step':<30} {'median ms':>10} {'p90 ms':>10}")
    for name, (median, p90) in rows:
        print(f"{name:<30} {median:>10.3f} {p90:>10.3f}")


def stage_timing(counter: TokenCounter, messages: list[dict[str, Any]], args: argparse.Namespace) -> tuple[float, float]:
    target = ModelConfig(MODEL, "openai", "http://127.0.0.1:9/v1")
    summarizer = Summarizer(MemoryStore(10, 1 << 20), {}, {}, lambda name: Price.free("bench"))
    config = PruneConfig(max_input_tokens=args.budget, summarize=False)
    pruner = Pruner(config, counter, {}, summarizer)
    payload = {"model": MODEL, "messages": messages}
    parsed = ParsedRequest(MODEL, False, payload, b"")

    async def once() -> None:
        exchange = Exchange("bench", "chat/completions", target=target)
        out = await pruner.prune(exchange, parsed, {})
        assert exchange.prune and len(out.payload["messages"]) < len(messages)

    async def run() -> tuple[float, float]:
        await once()  # sizes cached, worker thread started
        samples = []
        for _ in range(args.runs):
            started = time.perf_counter_ns()
            await once()
            samples.append((time.perf_counter_ns() - started) / 1e6)
        samples.sort()
        return statistics.median(samples), samples[int(len(samples) * 0.9) - 1]

    return asyncio.run(run())


if __name__ == "__main__":
    main()
