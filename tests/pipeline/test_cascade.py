"""Cascades: the checks on their own (pure), then end to end through the official SDK: the cheap
model's answer served when it passes (whole, or replayed as a stream), escalated to the large
model when it fails a check, and the ledger naming the outcome and charging the rejected
answer as overhead."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from proxy.app_state import GATEWAY
from proxy.cost.prices import load_litellm_prices
from proxy.cost.pricing import cost_nusd
from proxy.pipeline.cascade import failed_check, is_refusal, mean_logprob
from proxy.pipeline.exchange import Exchange
from proxy.policy.model import Cascade
from proxy.settings import CacheConfig, Settings, UpstreamConfig
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream, completion
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

POLICY = """\
version: cascade
rules:
  - name: local-first
    match: {model: auto}
    action: {target: [gpt-4o-mini, gpt-4o]}
"""
MESSAGES: Any = [{"role": "user", "content": "what is 2 + 2?"}]
CHEAP, LARGE = "gpt-4o-mini", "gpt-4o"


def answer(content: str | None, **message: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}]}


# the checks, pure

ALL = Cascade(checks=("empty", "refusal", "json", "short", "confidence"), min_chars=5, min_logprob=-1.0)


@pytest.mark.parametrize(
    ("response", "payload", "failed"),
    [
        (answer("Four: 2 + 2 = 4."), {}, None),
        (answer(""), {}, "empty"),
        (answer("   \n"), {}, "empty"),
        (answer(None), {}, "empty"),
        ({"choices": []}, {}, "empty"),
        (answer(None, tool_calls=[{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]), {}, None),
        (answer("I'm sorry, but I can't help with that."), {}, "refusal"),
        (answer("I cannot assist with this request."), {}, "refusal"),
        (answer("As an AI, I do not have opinions."), {}, "refusal"),
        (answer("I can\u2019t do that."), {}, "refusal"),
        (answer("", refusal="No."), {}, "empty"),  # checks run in the cascade's order
        (answer("Sure. I cannot stress enough how simple this is: 4."), {}, None),  # not at the start
        (answer("not json at all"), {"response_format": {"type": "json_object"}}, "json"),
        (answer('{"answer": 4}'), {"response_format": {"type": "json_object"}}, None),
        (answer('{"answer": 4'), {"response_format": {"type": "json_schema", "json_schema": {}}}, "json"),
        (answer("plain text is fine"), {"response_format": {"type": "text"}}, None),
        (answer("4"), {}, "short"),
    ],
)
def test_each_check(response: dict[str, Any], payload: dict[str, Any], failed: str | None) -> None:
    assert failed_check(response, payload, ALL) == failed


def test_confidence_uses_the_mean_token_logprob_only_when_present() -> None:
    low = answer("Four, I think.")
    low["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": -0.2}, {"token": "b", "logprob": -3.0}]}
    assert mean_logprob(low["choices"][0]) == pytest.approx(-1.6)
    assert failed_check(low, {}, ALL) == "confidence"
    high = answer("Four, I think.")
    high["choices"][0]["logprobs"] = {"content": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.3}]}
    assert failed_check(high, {}, ALL) is None
    assert failed_check(answer("Four, I think."), {}, ALL) is None  # no logprobs: nothing to judge


def test_only_the_named_checks_run_and_every_choice_is_checked() -> None:
    only_empty = Cascade(checks=("empty",))
    assert failed_check(answer("I'm sorry, I can't."), {}, only_empty) is None
    two = {"choices": [answer("Four.")["choices"][0], {**answer("")["choices"][0], "index": 1}]}
    assert failed_check(two, {}, only_empty) == "empty"


def test_refusal_patterns() -> None:
    assert is_refusal("Sorry, but I won't write that.")
    assert is_refusal("  I am unable to browse the internet.")
    assert is_refusal("Unfortunately, I cannot share that.")
    assert not is_refusal("The capital of France is Paris.")
    assert not is_refusal("x" * 200 + " I cannot help")  # only the head counts


# end to end


@pytest.fixture
def routed(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    quick = UpstreamConfig(retries=0, probe_interval=0)
    return replace(base, policies=str(policy), upstream=quick, cache=CacheConfig(enabled=False))


Start = Callable[[Cascade], openai.OpenAI]


@pytest.fixture
def sdk(start_gateway: Callable[[Settings], ThreadServer], routed: Settings) -> Iterator[Start]:
    """A gateway whose routing decisions carry the given cascade (the policy's fallback list is its escalation)."""
    clients: list[openai.OpenAI] = []

    def start(cascade: Cascade) -> openai.OpenAI:
        server = start_gateway(routed)
        assert server.app is not None
        router = server.app[GATEWAY].router
        assert router is not None
        original = router.route

        async def route(exchange: Exchange, parsed: Any, headers: Any) -> Any:
            out = await original(exchange, parsed, headers)
            if exchange.decision is not None and exchange.decision.model is not None:
                exchange.decision = replace(exchange.decision, cascade=cascade)
            return out

        router.route = route  # type: ignore[method-assign]
        clients.append(openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30))
        return clients[-1]

    yield start
    for client in clients:
        client.close()


def cheap_says(fake: FakeUpstream, content: str | None, logprobs: list[float] | None = None) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload["model"] != CHEAP:
            return None
        body = completion(payload)
        body["choices"][0]["message"]["content"] = content
        if logprobs is not None and payload.get("logprobs"):
            tokens = [{"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": []} for i, lp in enumerate(logprobs)]
            body["choices"][0]["logprobs"] = {"content": tokens, "refusal": None}
        return web.json_response(body)

    fake.handler = handler


def asked(fake: FakeUpstream) -> list[tuple[str, bool]]:
    return [(r.payload["model"], bool(r.payload.get("stream"))) for r in fake.requests]


def record(settings: Settings, request_id: str) -> dict[str, Any]:
    return record_of(Path(settings.ledger.url.removeprefix("sqlite:///")), request_id)


def test_an_answer_that_passes_is_served_from_the_cheap_model(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    cheap_says(fake, "Two plus two is four.")
    client = sdk(Cascade())
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "Two plus two is four."
    assert raw.headers["x-thrifty-model"] == CHEAP
    assert asked(fake) == [(CHEAP, False)]
    row = record(routed, raw.headers["x-request-id"])
    assert (row["cascade"], row["served_model"], row["attempts"], row["overhead_nusd"]) == ("accepted", CHEAP, 1, 0)


@pytest.mark.parametrize(
    ("content", "cascade", "extra", "check"),
    [
        ("", Cascade(), {}, "empty"),
        ("I'm sorry, but I can't help with that.", Cascade(), {}, "refusal"),
        ("four", Cascade(), {"response_format": {"type": "json_object"}}, "json"),
        ("4", Cascade(min_chars=10), {}, "short"),
    ],
)
def test_an_answer_that_fails_a_check_escalates_to_the_large_model(
    sdk: Start, fake: FakeUpstream, routed: Settings, content: str, cascade: Cascade, extra: dict[str, Any], check: str
) -> None:
    cheap_says(fake, content)
    raw = sdk(cascade).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, **extra)
    assert raw.parse().choices[0].message.content == "echo: what is 2 + 2?"
    assert raw.headers["x-thrifty-model"] == LARGE
    assert asked(fake) == [(CHEAP, False), (LARGE, False)]
    assert fake.requests[1].payload.get("response_format") == extra.get("response_format")
    row = record(routed, raw.headers["x-request-id"])
    assert (row["cascade"], row["served_model"], row["attempts"]) == (f"escalated: {check}", LARGE, 2)
    usage = completion(fake.requests[0].payload)["usage"]
    rejected = cost_nusd(load_litellm_prices()[CHEAP], usage["prompt_tokens"], 0, usage["completion_tokens"])
    assert rejected > 0 and row["overhead_nusd"] == rejected  # the ledger is honest about what the cascade cost


def test_confidence_asks_the_cheap_model_for_logprobs_and_escalates_when_low(
    sdk: Start, fake: FakeUpstream, routed: Settings
) -> None:
    cascade = Cascade(checks=("empty", "confidence"), min_logprob=-1.0)
    client = sdk(cascade)
    cheap_says(fake, "Probably four.", logprobs=[-0.1, -0.2])
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    reply = raw.parse()
    assert reply.choices[0].message.content == "Probably four." and raw.headers["x-thrifty-model"] == CHEAP
    assert fake.requests[0].payload["logprobs"] is True
    assert reply.choices[0].logprobs is None  # asked for by thrifty, not shown to a client that did not ask
    fake.requests.clear()
    cheap_says(fake, "Probably four.", logprobs=[-2.5, -0.5])
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == LARGE
    assert record(routed, raw.headers["x-request-id"])["cascade"] == "escalated: confidence"


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_streamed_request_gets_the_accepted_answer_replayed_as_a_live_stream(
    sdk: Start, fake: FakeUpstream, routed: Settings, include_usage: bool
) -> None:
    text = "Two plus two is four, as any calculator will tell you. " * 3
    cheap_says(fake, text)
    options: Any = {"stream_options": {"include_usage": True}} if include_usage else {}
    with sdk(Cascade()).chat.completions.with_streaming_response.create(
        model="auto", messages=MESSAGES, stream=True, **options
    ) as response:
        assert response.headers["x-thrifty-model"] == CHEAP
        assert response.headers["Content-Type"].startswith("text/event-stream")
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
    assert asked(fake) == [(CHEAP, False)]
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == text and len(content) > 2  # in pieces, like a live stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if include_usage else 0)
    row = record(routed, request_id)
    assert (row["cascade"], row["served_model"], row["stream"], row["usage_source"]) == ("accepted", CHEAP, 1, "upstream")


def test_a_streamed_request_escalates_to_a_streamed_large_answer(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    cheap_says(fake, "I'm sorry, I cannot answer that.")
    with sdk(Cascade()).chat.completions.with_streaming_response.create(model="auto", messages=MESSAGES, stream=True) as response:
        assert response.headers["x-thrifty-model"] == LARGE
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        request_id = response.headers["x-request-id"]
    assert text == "echo: what is 2 + 2?"
    assert asked(fake) == [(CHEAP, False), (LARGE, True)]
    row = record(routed, request_id)
    assert (row["cascade"], row["served_model"], row["attempts"]) == ("escalated: refusal", LARGE, 2)
    assert row["overhead_nusd"] > 0


def test_a_cheap_model_that_errors_escalates_too(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload["model"] == CHEAP:
            return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)
        return None

    fake.handler = handler
    raw = sdk(Cascade()).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == LARGE
    row = record(routed, raw.headers["x-request-id"])
    assert (row["cascade"], row["overhead_nusd"], row["attempts"]) == ("escalated: error", 0, 2)


def test_a_cascade_written_in_the_policy_runs_end_to_end(
    start_gateway: Callable[[Settings], ThreadServer], fake: FakeUpstream, routed: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "cascade.yaml"
    policy.write_text(
        "rules:\n"
        "  - name: try-small\n"
        "    match: {model: auto}\n"
        "    action: {cascade: {try: gpt-4o-mini, then: gpt-4o, checks: [empty, refusal], min_chars: 3}}\n"
    )
    gateway = start_gateway(replace(routed, policies=str(policy)))
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        cheap_says(fake, "As an AI language model, I cannot do arithmetic.")
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == (LARGE, "try-small")
        assert record(routed, raw.headers["x-request-id"])["cascade"] == "escalated: refusal"
        cheap_says(fake, "Four.")
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-thrifty-model"] == CHEAP
        assert record(routed, raw.headers["x-request-id"])["cascade"] == "accepted"
