"""Issue 4's acceptance, end to end: a real llama.cpp server with Gemma 3 270M (tests/llama.py) as
the local backend, the fake upstream as the large cloud model, a real gateway and the official
OpenAI SDK. A simple request is served locally; a request with tools goes to the large model; a
cascade escalates when the local answer fails its check (3 tokens are "short", never valid JSON)
and serves it when it passes, plain and streamed; a local backend killed (a private llama.cpp
server, SIGKILL) fails over to the large model with no client error, and a stream it was already
sending ends with an error event, never a clean end."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.policy.loader import load_policy
from proxy.settings import ModelConfig, Settings, Timeouts
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.llama import LlamaServer, require_llama
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

SHIPPED_POLICY = Path(__file__).resolve().parents[2] / "policies" / "default.yaml"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def local_model(llama: LlamaServer, base_url: str | None = None) -> ModelConfig:
    timeouts = Timeouts(connect=2.0, first_byte=30.0, total=60.0)
    return ModelConfig("gemma", "llamacpp", base_url or llama.base_url, None, upstream_model=llama.model, timeouts=timeouts)


def ledger_path(settings: Settings) -> Path:
    return Path(settings.ledger.url.removeprefix("sqlite:///"))


@pytest.fixture
def shipped(llama_server: LlamaServer, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    """The shipped policies/default.yaml over a local llama.cpp model and the fake cloud models."""
    base = settings_for(upstream[1].url, tmp_path)
    return replace(base, models=(local_model(llama_server), *base.models), policies=str(SHIPPED_POLICY))


@pytest.fixture
def sdk(start_gateway: Callable[[Settings], ThreadServer], shipped: Settings) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(shipped)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        yield client


def test_a_simple_request_to_auto_is_served_by_the_local_model(sdk: openai.OpenAI, fake: FakeUpstream, shipped: Settings) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gemma", "auto-simple")
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 8
    assert fake.requests == []  # the cloud model was never asked
    record = record_of(ledger_path(shipped), raw.headers["x-request-id"])
    assert (record["requested_model"], record["served_model"], record["provider"]) == ("auto", "gemma", "llamacpp")
    assert (record["route"], record["usage_source"], record["status"]) == ("auto-simple", "upstream", 200)
    assert record["policy_version"] == load_policy(str(SHIPPED_POLICY), shipped.models).version
    assert record["cost_nusd"] == 0  # local models cost nothing unless a price is configured


def test_a_streamed_simple_request_is_served_locally(sdk: openai.OpenAI, fake: FakeUpstream, shipped: Settings) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, temperature=0, stream=True
    ) as response:
        assert (response.headers["x-thrifty-model"], response.headers["x-thrifty-route"]) == ("gemma", "auto-simple")
        request_id = response.headers["x-request-id"]
        pieces = [c.choices[0].delta.content for c in response.parse() if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 6 and fake.requests == []
    record = record_of(ledger_path(shipped), request_id)
    assert (record["served_model"], record["route"], record["usage_source"]) == ("gemma", "auto-simple", "counted")
    assert record["completion_tokens"] > 0


def test_a_request_with_tools_goes_to_the_large_model(sdk: openai.OpenAI, fake: FakeUpstream, shipped: Settings) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, max_tokens=16
    )
    reply = raw.parse()
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gpt-4o", "auto-tools")
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "weather"
    assert [r.payload["model"] for r in fake.requests] == ["gpt-4o"] and fake.requests[0].payload["tools"] == TOOLS
    record = record_of(ledger_path(shipped), raw.headers["x-request-id"])
    assert (record["served_model"], record["provider"], record["route"]) == ("gpt-4o", "openai", "auto-tools")
    assert record["has_tools"] == 1 and record["cost_nusd"] > 0


def test_a_hard_request_goes_to_the_large_model(sdk: openai.OpenAI, fake: FakeUpstream, shipped: Settings) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Prove it step by step: 2 + 2 = 4."}], max_tokens=16
    )
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gpt-4o", "auto-hard")
    assert raw.parse().choices[0].message.content == "echo: Prove it step by step: 2 + 2 = 4."
    assert [r.payload["model"] for r in fake.requests] == ["gpt-4o"]


FAILOVER_POLICY = """\
version: failover
rules:
  - name: local-first
    match: {model: auto}
    action: {target: [gemma, gpt-4o]}
"""


@pytest.fixture
def doomed() -> Iterator[LlamaServer]:
    """A private llama.cpp server for a test to kill (the session's one stays up for the others)."""
    require_llama()
    server = LlamaServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def failover(
    doomed: LlamaServer,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    start_gateway: Callable[[Settings], ThreadServer],
) -> Iterator[tuple[openai.OpenAI, Settings]]:
    policy = tmp_path / "failover.yaml"
    policy.write_text(FAILOVER_POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    settings = replace(base, models=(local_model(doomed), *base.models), policies=str(policy))
    gateway = start_gateway(settings)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        yield client, settings


def ask(client: openai.OpenAI, text: str, max_tokens: int = 4) -> tuple[str, str, str]:
    """(the model that served, the request id, the answer) of one plain request to ``auto``."""
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )
    content = raw.parse().choices[0].message.content or ""
    return raw.headers["x-thrifty-model"], raw.headers["x-request-id"], content


def test_a_killed_local_backend_fails_over_with_no_client_error(
    failover: tuple[openai.OpenAI, Settings], doomed: LlamaServer, fake: FakeUpstream
) -> None:
    client, settings = failover
    assert ask(client, "Name a colour.")[0] == "gemma" and fake.requests == []
    # Killed in the middle of generating a plain answer (64 tokens take about 2 s on 2 cores).
    threading.Timer(0.7, doomed.kill).start()
    served, request_id, content = ask(client, "Tell me a long story.", max_tokens=64)
    assert not doomed.running
    assert (served, content) == ("gpt-4o", "echo: Tell me a long story.")
    record = record_of(ledger_path(settings), request_id)
    assert (record["served_model"], record["status"], record["route"]) == ("gpt-4o", 200, "local-first")
    assert record["attempts"] >= 2  # gemma (cut off, then refused), then gpt-4o
    # Dead from the start: plain and streamed requests are served by the next target.
    assert ask(client, "Name a fruit.")[:1] == ("gpt-4o",)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a tree."}], max_tokens=4, stream=True
    ) as response:
        assert response.headers["x-thrifty-model"] == "gpt-4o"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "echo: Name a tree."
    # Consecutive failures open gemma's circuit: later requests go straight to gpt-4o.
    attempts = []
    for i in range(6):
        served, request_id, _ = ask(client, f"Count to {i}.")
        assert served == "gpt-4o"
        attempts.append(record_of(ledger_path(settings), request_id)["attempts"])
    assert attempts[-3:] == [1, 1, 1], attempts


def test_a_local_backend_killed_mid_stream_ends_the_stream_with_an_error(
    failover: tuple[openai.OpenAI, Settings], doomed: LlamaServer
) -> None:
    client, settings = failover
    pieces = []
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=64, stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        with pytest.raises(openai.APIError):
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 3:
                        doomed.kill()  # bytes already reached the client: no fallback, an error event instead
    assert 3 <= len(pieces) < 64
    record = record_of(ledger_path(settings), request_id)
    assert (record["served_model"], record["status"], record["error_code"]) == ("gemma", 502, "upstream_unavailable")
    assert record["usage_source"] == "counted" and record["completion_tokens"] > 0  # what was relayed is recorded


CASCADE_POLICY = """\
version: cascade
rules:
  - name: strict
    match: {model: auto, headers: {x-check: strict}}
    action: {cascade: {try: gemma, then: gpt-4o, checks: [short], min_chars: 200}}
  - name: json
    match: {model: auto, json: true}
    action: {cascade: {try: gemma, then: gpt-4o, checks: [json]}}
  - name: lenient
    match: {model: auto}
    action: {cascade: {try: gemma, then: gpt-4o, checks: [empty, short]}}
"""
STRICT = {"x-check": "strict"}


@pytest.fixture
def cascading(
    llama_server: LlamaServer,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    start_gateway: Callable[[Settings], ThreadServer],
) -> Iterator[tuple[openai.OpenAI, Settings]]:
    policy = tmp_path / "cascade.yaml"
    policy.write_text(CASCADE_POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    settings = replace(base, models=(local_model(llama_server), *base.models), policies=str(policy))
    gateway = start_gateway(settings)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        yield client, settings


def test_a_cascade_escalates_when_the_local_answer_is_too_short(
    cascading: tuple[openai.OpenAI, Settings], fake: FakeUpstream
) -> None:
    client, settings = cascading
    # Three tokens from the 270M model are always under 200 characters: the check fails for sure.
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=3, extra_headers=STRICT
    )
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gpt-4o", "strict")
    assert raw.parse().choices[0].message.content == "echo: Name a colour."
    assert [r.payload["model"] for r in fake.requests] == ["gpt-4o"]
    record = record_of(ledger_path(settings), raw.headers["x-request-id"])
    assert (record["served_model"], record["cascade"], record["attempts"], record["status"]) == (
        "gpt-4o", "escalated: short", 2, 200,
    )  # fmt: skip


def test_a_cascade_serves_the_local_answer_when_it_passes(cascading: tuple[openai.OpenAI, Settings], fake: FakeUpstream) -> None:
    client, settings = cascading
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    reply = raw.parse()
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gemma", "lenient")
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 8
    assert fake.requests == []
    record = record_of(ledger_path(settings), raw.headers["x-request-id"])
    assert (record["served_model"], record["cascade"], record["attempts"]) == ("gemma", "accepted", 1)


def test_a_cascade_escalates_invalid_json(cascading: tuple[openai.OpenAI, Settings], fake: FakeUpstream) -> None:
    client, settings = cascading
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Reply in JSON: the capital of France."}],
        response_format={"type": "json_object"},
        max_tokens=3,
    )
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gpt-4o", "json")
    record = record_of(ledger_path(settings), raw.headers["x-request-id"])
    assert (record["cascade"], record["served_model"]) == ("escalated: json", "gpt-4o")
    assert fake.requests[0].payload["response_format"] == {"type": "json_object"}


def test_a_streamed_request_is_cascaded_too(cascading: tuple[openai.OpenAI, Settings], fake: FakeUpstream) -> None:
    client, settings = cascading
    answers = {}
    for name, headers in (("escalated", STRICT), ("accepted", {})):
        with client.chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=0, stream=True,
            extra_headers=headers,
        ) as response:  # fmt: skip
            model, request_id = response.headers["x-thrifty-model"], response.headers["x-request-id"]
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        answers[name] = (model, text, record_of(ledger_path(settings), request_id)["cascade"])
    assert answers["escalated"] == ("gpt-4o", "echo: Name a colour.", "escalated: short")
    assert answers["accepted"][0] == "gemma" and answers["accepted"][1] and answers["accepted"][2] == "accepted"
    assert len(fake.requests) == 1 and fake.requests[0].payload["stream"] is True
