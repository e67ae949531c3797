"""Study: do planted facts survive pruning? Extractive summary vs the real Gemma 3 270M (llama.cpp).

Run on purpose, never by pytest::

    .venv/bin/python -m tests.benchmarks.summary_retention [--budget 1000] [--skip-slm] [--out results.json]

The conversations are ``tests/data/retention/conversations.json`` (11 conversations of 56 to
62 messages, ~2,500 to 2,800 tokens each, 55 planted facts: names, numbers, dates, decisions, all stated
in early turns; written for this study, see the README there). Each is sent through the prune
stage exactly as the gateway runs it (``Pruner.prune``: budget, exact sizes, pruning, the
summary, trimming it to the room left) with the budget ``--budget`` (as the header
``x-thrifty-max-input-tokens`` would set it), three ways:

- ``no summary``: the turns are dropped and nothing replaces them (the floor);
- ``extractive``: the fact-carrying sentences of the dropped turns;
- ``gemma-3-270m``: raw (the echo guard off, see below), a chat call to a real llama.cpp server (``tests/llama.py``, Gemma 3 270M
  Q4_K_M, temperature 0) with the summarizer's prompt; the dropped turns it is shown are the
  full transcript when it fits ``summary_input_tokens`` (1,000 here: the server's context is
  2,048), else their fact-carrying sentences.

A fact counts as kept when every one of its ``must_contain`` strings appears (case-insensitive)
in the messages sent upstream. Tokens are counted with the gateway's tokenizer (o200k_base).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.api.wire import ParsedRequest
from proxy.cache.store import MemoryStore
from proxy.context import summarize
from proxy.context.summarize import EXTRACTIVE, Summarizer
from proxy.cost.prices import Price
from proxy.cost.tokens import TokenCounter
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.prune import Pruner
from proxy.providers.base import Provider
from proxy.providers.openai_compat import OpenAICompatible
from proxy.redact import Redactor
from proxy.settings import ModelConfig, PruneConfig, Timeouts

DATA = Path(__file__).resolve().parent.parent / "data" / "retention" / "conversations.json"
TARGET = ModelConfig("gpt-4o", "openai", "http://127.0.0.1:9/v1")
SLM = "gemma-3-270m"
ECHO = summarize._ECHO


def kept(facts: list[dict[str, Any]], sent: list[dict[str, Any]]) -> list[bool]:
    text = json.dumps(sent, ensure_ascii=False).lower()
    return [all(key.lower() in text for key in fact["must_contain"]) for fact in facts]


async def run_variant(
    name: str,
    conversations: list[dict[str, Any]],
    budget: int,
    counter: TokenCounter,
    providers: dict[str, Provider],
    models: dict[str, ModelConfig],
) -> dict[str, Any]:
    summarizer_name = SLM if name == SLM else EXTRACTIVE
    config = PruneConfig(
        max_input_tokens=budget,
        summarize=name != "no summary",
        summarizer=summarizer_name,
        summary_timeout_seconds=180.0,
        summary_input_tokens=1000,
    )
    summarizer = Summarizer(
        MemoryStore(100, 1 << 22), providers, models, lambda _: Price.free("local"), timeout=180.0, input_tokens=1000
    )
    pruner = Pruner(config, counter, {}, summarizer)
    rows = []
    for conversation in conversations:
        payload = {"model": "gpt-4o", "messages": conversation["messages"]}
        exchange = Exchange(conversation["id"], "chat/completions", target=TARGET)
        started = time.perf_counter()
        out = await pruner.prune(exchange, ParsedRequest("gpt-4o", False, payload, b""), {})
        seconds = time.perf_counter() - started
        sent = out.payload["messages"]
        flags = kept(conversation["facts"], sent)
        summary = next((m["content"] for m in sent if str(m.get("content", "")).startswith("[Summary of ")), "")
        rows.append(
            {
                "id": conversation["id"],
                "held_out": conversation.get("held_out", False),
                "facts": len(flags),
                "kept": sum(flags),
                "tokens_before": exchange.prompt_tokens_before,
                "tokens_sent": counter.count_messages(sent, "gpt-4o"),
                "seconds": round(seconds, 3),
                "prune": exchange.prune,
                "summary": summary,
                "echo": ECHO in summary,  # the model repeated the instructions (shipped code falls back then)
            }
        )
    await summarizer.close()
    return {"variant": name, "rows": rows}


def report(results: list[dict[str, Any]], budget: int) -> None:
    print(f"budget {budget} tokens; {len(results[0]['rows'])} conversations")
    print(f"{'variant':<26} {'facts kept':>11} {'share':>6} {'tokens before':>14} {'sent':>6} {'saved':>6} {'s/request':>10}")
    for result in results:
        for subset, rows in (("", result["rows"]), (" (held out)", [r for r in result["rows"] if r["held_out"]])):
            _line(result["variant"] + subset, rows)
    for result in results:
        echoes = sum(r["echo"] for r in result["rows"])
        if echoes:
            print(f"  {result['variant']}: {echoes} of {len(result['rows'])} summaries repeat the summarizer's instructions")
    for result in results:
        odd = {r["prune"] for r in result["rows"]}
        print(f"  {result['variant']}: strategies seen {sorted(str(o) for o in odd)}")


def _line(name: str, rows: list[dict[str, Any]]) -> None:
    facts = sum(r["facts"] for r in rows)
    got = sum(r["kept"] for r in rows)
    before = statistics.mean(r["tokens_before"] for r in rows)
    sent = statistics.mean(r["tokens_sent"] for r in rows)
    seconds = statistics.mean(r["seconds"] for r in rows)
    print(
        f"{name:<26} {got:>5} / {facts:<3} {got / facts:>6.0%} {before:>14.0f} {sent:>6.0f}"
        f" {1 - sent / before:>6.0%} {seconds:>10.2f}"
    )


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    conversations = json.loads(DATA.read_text(encoding="utf-8"))["conversations"]
    counter = TokenCounter()
    counter.warm(["gpt-4o"])
    results = [await run_variant(v, conversations, args.budget, counter, {}, {}) for v in ("no summary", EXTRACTIVE)]
    if args.skip_slm:
        return results
    from tests.llama import LlamaServer, require_llama

    require_llama()
    server = LlamaServer().start()
    print(f"llama.cpp server up in {server.startup_seconds:.1f} s")
    try:
        async with aiohttp.ClientSession() as session:
            target = ModelConfig(SLM, "llamacpp", server.base_url, timeouts=Timeouts(connect=5, first_byte=180, total=300))
            providers: dict[str, Provider] = {SLM: OpenAICompatible(session, target, Redactor())}
            # Measured raw: the echo guard (an answer repeating the instructions falls back to the
            # extractive summary) is switched off here, so the table shows what the model itself wrote.
            summarize._ECHO = "\0 never matches"
            results.append(await run_variant(SLM, conversations, args.budget, counter, providers, {SLM: target}))
            summarize._ECHO = ECHO
    finally:
        server.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=1000)
    parser.add_argument("--skip-slm", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    report(results, args.budget)
    for result in results[1:]:
        print(f"\n--- {result['variant']}, summary sent for '{result['rows'][0]['id']}':\n{result['rows'][0]['summary']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
