"""Context pruning end to end: the official SDK through the gateway to the fake upstream, which
records what it was sent and reports usage counted with the gateway's own tokenizer (as OpenAI
would). The upstream sees the conversation within budget, the system prompt first and the final
user message unchanged; the ledger shows the tokens removed, the savings and the summarizer's cost."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from aiohttp import web

from proxy.cost.tokens import TokenCounter
from proxy.settings import CacheConfig, ModelConfig, PriceConfig, PruneConfig, Settings
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream, completion
from tests.llama import LlamaServer
from tests.servers import ThreadServer
from tests.services import redis_url  # noqa: F401

SYSTEM = "You are the travel desk assistant of Fjordline AS. Answer briefly."
FINAL = "Given all that, which hotel did we settle on and for how many nights?"
SUMMARIZER_REPLY = "Anna Berg booked Hotel Bristol in Oslo for 3 nights from 14 March at 1,450 NOK a night."


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def conversation(turns: int = 120) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i in range(turns - 1):
        if i % 2 == 0:
            messages.append({"role": "user", "content": f"Question {i}: what about option {i} for the Oslo trip? " * 3})
        else:
            messages.append(
                {"role": "assistant", "content": f"Option {i} costs {i * 10} NOK and we decided to keep it in mind. " * 3}
            )
    messages.append({"role": "user", "content": FINAL})
    return messages


@pytest.fixture
def chat_fake(fake: FakeUpstream, counter: TokenCounter) -> FakeUpstream:
    """Usage as a real upstream reports it: the prompt counted with the same tokenizer."""

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload.get("stream"):
            return None
        body = completion(payload)
        prompt = counter.count_messages(payload["messages"], "gpt-4o")
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}
        return web.json_response(body)

    fake.handler = handler
    return fake


@pytest.fixture
def start(
    upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, start_gateway: Callable[[Settings], ThreadServer]
) -> Iterator[Callable[..., tuple[openai.OpenAI, Path]]]:
    clients: list[openai.OpenAI] = []

    def run(prune: PruneConfig | None = None, **changes: Any) -> tuple[openai.OpenAI, Path]:
        settings = settings_for(upstream[1].url, tmp_path)
        settings = replace(settings, prune=prune or PruneConfig(), **changes)
        server = start_gateway(settings)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)
        clients.append(client)
        return client, Path(settings.ledger.url.removeprefix("sqlite:///"))

    yield run
    for client in clients:
        client.close()


def record(db_path: Path, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db_path.exists():
            conn = sqlite3.connect(db_path, timeout=30)
            conn.row_factory = sqlite3.Row
            try:
                found = [dict(r) for r in conn.execute("SELECT * FROM ledger WHERE request_id = ?", (request_id,))]
            except sqlite3.OperationalError:
                found = []
            finally:
                conn.close()
            if found:
                return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no ledger record for {request_id}")


def ask(client: openai.OpenAI, messages: list[dict[str, Any]], headers: dict[str, str] | None = None, **extra: Any) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, extra_headers=headers or {}, **extra
    )  # type: ignore[call-overload]
    raw.parse()
    return str(raw.headers["x-request-id"])


def test_120_turns_reach_the_upstream_within_the_header_budget(
    start: Callable[..., tuple[openai.OpenAI, Path]], chat_fake: FakeUpstream, counter: TokenCounter
) -> None:
    client, db_path = start()
    messages = conversation(120)
    before = counter.count_messages(messages, "gpt-4o")
    assert before > 3 * 1500
    request_id = ask(client, messages, {"x-thrifty-max-input-tokens": "1500"})
    sent = chat_fake.requests[-1].payload["messages"]
    assert counter.count_messages(sent, "gpt-4o") <= 1500
    assert sent[0] == {"role": "system", "content": SYSTEM}
    assert sent[-1] == {"role": "user", "content": FINAL}
    assert sent[1] == messages[1]  # the first user message stays
    summaries = [m for m in sent if str(m.get("content", "")).startswith("[Summary of ")]
    assert len(summaries) == 1 and "NOK" in summaries[0]["content"]
    row = record(db_path, request_id)
    assert row["prompt_tokens_before"] == before
    assert row["prompt_tokens"] == counter.count_messages(sent, "gpt-4o")
    assert row["prompt_tokens_before"] > row["prompt_tokens"]
    assert row["savings_pruning_nusd"] > 0
    assert row["prune"] == "drop_middle,summary:extractive"


def test_without_a_budget_nothing_is_pruned(start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream) -> None:
    client, db_path = start()
    messages = conversation(120)
    request_id = ask(client, messages)
    assert fake.requests[-1].payload["messages"] == messages
    row = record(db_path, request_id)
    assert row["prune"] is None and row["savings_pruning_nusd"] == 0


def test_opt_out_header_and_a_header_that_cannot_loosen_the_config(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, counter: TokenCounter
) -> None:
    client, _ = start(PruneConfig(max_input_tokens=1000))
    messages = conversation(60)
    ask(client, messages, {"x-thrifty-max-input-tokens": "100000"})
    assert counter.count_messages(fake.requests[-1].payload["messages"], "gpt-4o") <= 1000
    ask(client, messages, {"x-thrifty-prune": "off"})
    assert fake.requests[-1].payload["messages"] == messages


def test_opt_out_is_refused_where_config_forbids_it(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, counter: TokenCounter
) -> None:
    client, _ = start(PruneConfig(max_input_tokens=1000, allow_opt_out=False))
    ask(client, conversation(60), {"x-thrifty-prune": "off"})
    assert counter.count_messages(fake.requests[-1].payload["messages"], "gpt-4o") <= 1000


def test_a_bad_budget_header_is_an_openai_shaped_400(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream
) -> None:
    client, _ = start()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, conversation(10), {"x-thrifty-max-input-tokens": "lots"})
    assert "x-thrifty-max-input-tokens" in str(caught.value)
    assert fake.requests == []


def test_a_streamed_request_is_pruned_too(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, counter: TokenCounter
) -> None:
    client, _ = start()
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=conversation(80),  # type: ignore[arg-type]
        stream=True,
        extra_headers={"x-thrifty-max-input-tokens": "800"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == f"echo: {FINAL}"
    assert counter.count_messages(fake.requests[-1].payload["messages"], "gpt-4o") <= 800


@pytest.fixture
def slm_settings(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> dict[str, Any]:
    """A "local" summarizer model served by the fake upstream, priced so its cost shows."""
    base = settings_for(upstream[1].url, tmp_path)
    slm = ModelConfig("slm", "llamacpp", f"{upstream[1].url}/v1", upstream_model="gemma-3-270m")
    return {
        "models": (*base.models, slm),
        "prices": {"slm": PriceConfig(input=Decimal("1"), output=Decimal("2"))},
    }


def _slm_handler(fake: FakeUpstream, counter: TokenCounter, delay: float = 0.0) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload["model"] == "gemma-3-270m":
            await asyncio.sleep(delay)
            body = completion(payload)
            body["choices"][0]["message"]["content"] = SUMMARIZER_REPLY
            body["usage"] = {"prompt_tokens": 900, "completion_tokens": 30, "total_tokens": 930}
            return web.json_response(body)
        return None

    fake.handler = handler


def test_a_model_summarizer_is_called_its_summary_sent_and_its_cost_recorded(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, slm_settings: dict[str, Any], counter: TokenCounter
) -> None:
    _slm_handler(fake, counter)
    client, db_path = start(PruneConfig(summarizer="slm"), **slm_settings)
    request_id = ask(client, conversation(120), {"x-thrifty-max-input-tokens": "1500"})
    calls = [r for r in fake.requests if r.payload["model"] == "gemma-3-270m"]
    assert len(calls) == 1 and "Keep every name, number, date" in calls[0].payload["messages"][0]["content"]
    sent = fake.requests[-1].payload["messages"]
    summary = next(m for m in sent if str(m.get("content", "")).startswith("[Summary of "))
    assert SUMMARIZER_REPLY in summary["content"]
    assert counter.count_messages(sent, "gpt-4o") <= 1500
    row = record(db_path, request_id)
    assert row["overhead_nusd"] == 900 * 1000 + 30 * 2000  # 900 in at $1/1M, 30 out at $2/1M, in nano-USD
    assert row["prune"].endswith("summary:model")
    # The same conversation again: the summary of that prefix comes from the cache, at no cost.
    request_id = ask(client, conversation(120), {"x-thrifty-max-input-tokens": "1500"})
    assert len([r for r in fake.requests if r.payload["model"] == "gemma-3-270m"]) == 1
    row = record(db_path, request_id)
    assert row["overhead_nusd"] == 0 and row["prune"].endswith("summary:cached")


def test_a_slow_summarizer_falls_back_to_the_extractive_summary(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, slm_settings: dict[str, Any], counter: TokenCounter
) -> None:
    _slm_handler(fake, counter, delay=3.0)
    client, db_path = start(PruneConfig(summarizer="slm", summary_timeout_seconds=0.3), **slm_settings)
    started = time.monotonic()
    request_id = ask(client, conversation(120), {"x-thrifty-max-input-tokens": "1500"})
    assert time.monotonic() - started < 2.5
    sent = fake.requests[-1].payload["messages"]
    summary = next(m for m in sent if str(m.get("content", "")).startswith("[Summary of "))
    assert "NOK" in summary["content"] and SUMMARIZER_REPLY not in summary["content"]
    assert record(db_path, request_id)["prune"].endswith("summary:extractive (model timeout)")


def test_summaries_are_shared_through_redis(
    start: Callable[..., tuple[openai.OpenAI, Path]],
    fake: FakeUpstream,
    slm_settings: dict[str, Any],
    counter: TokenCounter,
    redis_url: str,  # noqa: F811
) -> None:
    _slm_handler(fake, counter)
    cache = CacheConfig(redis_url=redis_url)
    first, _ = start(PruneConfig(summarizer="slm"), cache=cache, **slm_settings)
    second, _ = start(PruneConfig(summarizer="slm"), cache=cache, **slm_settings)  # another replica
    messages = conversation(100)
    messages[3] = {"role": "user", "content": f"Conversation {uuid.uuid4()}."}  # a dropped run no earlier test summarized
    ask(first, messages, {"x-thrifty-max-input-tokens": "1500"})
    assert _summary_calls(fake) == 1
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5
    while not client.keys("thrifty:summary:*") and time.monotonic() < deadline:  # stored in the background
        time.sleep(0.05)
    client.close()
    ask(second, messages, {"x-thrifty-max-input-tokens": "1500"})
    assert _summary_calls(fake) == 1
    assert SUMMARIZER_REPLY in str(fake.requests[-1].payload["messages"])


def _summary_calls(fake: FakeUpstream) -> int:
    return len([r for r in fake.requests if r.payload["model"] == "gemma-3-270m"])


def test_the_real_local_slm_summarizes_through_its_provider(
    start: Callable[..., tuple[openai.OpenAI, Path]],
    chat_fake: FakeUpstream,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    llama_server: LlamaServer,
    counter: TokenCounter,
) -> None:
    """Gemma 3 270M on llama.cpp as the summarizer: a real call within the timeout, its answer used
    (or, when it only repeats the instructions, the extractive summary), the request within budget."""
    base = settings_for(upstream[1].url, tmp_path)
    gemma = ModelConfig("gemma", "llamacpp", llama_server.base_url, upstream_model=llama_server.model)
    prune = PruneConfig(summarizer="gemma", summary_tokens=48, summary_timeout_seconds=60, summary_input_tokens=600)
    client, db_path = start(prune, models=(*base.models, gemma))
    started = time.monotonic()
    request_id = ask(client, conversation(120), {"x-thrifty-max-input-tokens": "1500"})
    assert time.monotonic() - started < 60
    sent = chat_fake.requests[-1].payload["messages"]
    assert counter.count_messages(sent, "gpt-4o") <= 1500
    assert sent[0]["role"] == "system" and sent[-1] == {"role": "user", "content": FINAL}
    assert any(str(m.get("content", "")).startswith("[Summary of ") for m in sent)
    row = record(db_path, request_id)
    assert row["prune"] in ("drop_middle,summary:model", "drop_middle,summary:extractive (model echo)"), row["prune"]


POLICY = """\
version: prune-e2e
rules:
  - name: long-chats
    match: {model: gpt-4o}
    action:
      target: gpt-4o-mini
      prune: {max_input_tokens: 1200, keep_last: 4, allow_opt_out: false}
"""


def test_a_routing_rule_sets_the_budget_and_forbids_opting_out(
    start: Callable[..., tuple[openai.OpenAI, Path]], chat_fake: FakeUpstream, tmp_path: Path, counter: TokenCounter
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    client, db_path = start(policies=str(policy))
    messages = conversation(120)
    request_id = ask(client, messages, {"x-thrifty-prune": "off", "x-thrifty-max-input-tokens": "50000"})
    received = chat_fake.requests[-1].payload
    assert received["model"] == "gpt-4o-mini"
    assert counter.count_messages(received["messages"], "gpt-4o") <= 1200
    assert received["messages"][-4:] == messages[-4:]
    row = record(db_path, request_id)
    assert (row["route"], row["prune"]) == ("long-chats", "drop_middle,summary:extractive")
    assert row["prompt_tokens_before"] > row["prompt_tokens"] and row["savings_pruning_nusd"] > 0


def test_a_request_within_its_budget_claims_no_pruning_savings(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, counter: TokenCounter
) -> None:
    """Over the byte bound but under the budget once counted: sent as is, and the ledger's
    before/after tokens are the upstream's own (this fake counts words, fewer than tiktoken's tokens)."""
    client, db_path = start()
    messages = conversation(20)
    tokens = counter.count_messages(messages, "gpt-4o")
    request_id = ask(client, messages, {"x-thrifty-max-input-tokens": str(tokens + 5)})
    assert fake.requests[-1].payload["messages"] == messages
    row = record(db_path, request_id)
    assert row["prune"] is None and row["savings_pruning_nusd"] == 0
    assert row["prompt_tokens_before"] == row["prompt_tokens"]


def test_the_response_says_what_pruning_did(start: Callable[..., tuple[openai.OpenAI, Path]], counter: TokenCounter) -> None:
    client, _ = start()
    messages = conversation(120)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, extra_headers={"x-thrifty-max-input-tokens": "1500"}
    )  # type: ignore[call-overload]
    before = counter.count_messages(messages, "gpt-4o")
    assert raw.headers["x-thrifty-prune"] == f"drop_middle,summary:extractive; tokens_before={before}"
    untouched = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages[-2:])  # type: ignore[call-overload]
    assert "x-thrifty-prune" not in untouched.headers


def test_an_upstream_with_another_tokenizer_is_credited_in_its_own_tokens(
    start: Callable[..., tuple[openai.OpenAI, Path]], fake: FakeUpstream, counter: TokenCounter
) -> None:
    """An upstream whose tokenizer counts 30% more (Claude, Llama): the prompt before pruning is
    what it counted plus what thrifty removed, not thrifty's count of the whole prompt."""

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        body = completion(payload)
        prompt = round(counter.count_messages(payload["messages"], "gpt-4o") * 1.3)
        body["usage"] = {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}
        return web.json_response(body)

    fake.handler = handler
    client, db_path = start()
    messages = conversation(120)
    ours_before = counter.count_messages(messages, "gpt-4o")
    request_id = ask(client, messages, {"x-thrifty-max-input-tokens": "1500"})
    ours_sent = counter.count_messages(fake.requests[-1].payload["messages"], "gpt-4o")
    row = record(db_path, request_id)
    assert row["prompt_tokens"] == round(ours_sent * 1.3)
    assert row["prompt_tokens_before"] == row["prompt_tokens"] + (ours_before - ours_sent)
    assert row["savings_pruning_nusd"] > 0
