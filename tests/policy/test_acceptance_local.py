"""Issue 4's acceptance, end to end: a real llama.cpp server with Gemma 3 270M (tests/llama.py) as
the local backend, the fake upstream as the large cloud model, a real gateway and the official
OpenAI SDK. A simple request is served locally; a request with tools goes to the large model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.config import ModelConfig, Settings, Timeouts
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.llama import LlamaServer
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
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8
    )
    reply = raw.parse()
    assert (raw.headers["x-thrifty-model"], raw.headers["x-thrifty-route"]) == ("gemma", "auto-simple")
    assert reply.choices[0].message.content and reply.usage is not None and reply.usage.completion_tokens == 8
    assert fake.requests == []  # the cloud model was never asked
    record = record_of(ledger_path(shipped), raw.headers["x-request-id"])
    assert (record["requested_model"], record["served_model"], record["provider"]) == ("auto", "gemma", "llamacpp")
    assert (record["route"], record["usage_source"], record["status"]) == ("auto-simple", "upstream", 200)
    assert record["policy_version"].startswith("default-1-") and record["cost_nusd"] == 0


def test_a_streamed_simple_request_is_served_locally(sdk: openai.OpenAI, fake: FakeUpstream, shipped: Settings) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, stream=True
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
