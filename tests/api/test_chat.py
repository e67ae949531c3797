"""POST /v1/chat/completions (not streamed) through the official SDK, sync and async:
the answer comes back as the upstream gave it, every request field reaches the upstream
untouched (only an alias's model name is rewritten), and the response headers say which
request and which model this was."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageFunctionToolCall

from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    },
}

# Every parameter an application may send; thrifty must not drop, add or change any of them.
ALL_PARAMETERS: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]},
    ],
    "tools": [WEATHER_TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}},
    },
    "n": 2,
    "seed": 1234,
    "stop": ["END", "\n\n"],
    "logprobs": True,
    "top_logprobs": 3,
    "max_completion_tokens": 77,
    "temperature": 0.25,
    "top_p": 0.5,
    "presence_penalty": 0.1,
    "frequency_penalty": -0.1,
    "logit_bias": {"50256": -100},
    "user": "user-42",
    "metadata": {"team": "search", "ticket": "T-1"},
    "store": False,
}
FUTURE_FIELDS: dict[str, Any] = {"thinking_budget": {"tokens": 512, "mode": "auto"}, "x_vendor_flag": None}


def test_sync_completion_returns_the_upstream_answer(client: openai.OpenAI, fake: FakeUpstream) -> None:
    completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi there"}])

    assert completion.id == "chatcmpl-fake"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    assert len(fake.requests) == 1
    assert fake.requests[0].path == "/v1/chat/completions"


async def test_async_completion_returns_the_upstream_answer(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    raw = await aclient.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "async hello"}]
    )
    completion = raw.parse()

    assert completion.choices[0].message.content == "echo: async hello"
    assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert fake.requests[-1].payload == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "async hello"}]}


@pytest.mark.parametrize(
    ("model", "upstream_model"), [("gpt-4o", "gpt-4o"), ("fast", "gpt-4o-mini-2024-07-18")], ids=["plain", "alias"]
)
def test_every_parameter_reaches_the_upstream_untouched(
    client: openai.OpenAI, fake: FakeUpstream, model: str, upstream_model: str
) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, **ALL_PARAMETERS, extra_body=FUTURE_FIELDS)

    assert fake.requests[-1].payload == {**ALL_PARAMETERS, **FUTURE_FIELDS, "model": upstream_model}
    assert raw.headers["x-thrifty-model"] == model
    # The upstream's answer is not rewritten back: it names the model that really answered.
    assert raw.parse().model == upstream_model


async def test_every_parameter_reaches_the_upstream_untouched_async(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    await aclient.chat.completions.create(model="fast", **ALL_PARAMETERS, extra_body=FUTURE_FIELDS)

    assert fake.requests[-1].payload == {**ALL_PARAMETERS, **FUTURE_FIELDS, "model": "gpt-4o-mini-2024-07-18"}


def test_tool_calls_come_back_parsed(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], tool_choice="auto"
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.type == "function"
    assert call.id == "call_1"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_calls_come_back_parsed_async(aclient: openai.AsyncOpenAI) -> None:
    completion = await aclient.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], n=2
    )

    assert [c.index for c in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        assert call.function.name == "get_weather"


def test_upstream_is_called_with_its_own_key_never_the_clients(client: openai.OpenAI, fake: FakeUpstream) -> None:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])

    headers = {k.lower(): v for k, v in fake.requests[-1].headers.items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert MASTER_KEY not in json.dumps(headers)


def test_each_response_gets_its_own_request_id(client: openai.OpenAI) -> None:
    ids = set()
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-thrifty-model"] == "gpt-4o"
        ids.add(raw.headers["x-request-id"])
    assert len(ids) == 3
    assert all(len(i) >= 16 for i in ids)


def test_client_request_id_is_echoed(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "trace-abc-123"}
    )

    assert raw.headers["x-request-id"] == "trace-abc-123"
    assert raw.request_id == "trace-abc-123"  # what the SDK itself reports


def test_client_request_id_is_echoed_on_errors_too(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "trace-9"}
        )

    assert caught.value.response.headers["x-request-id"] == "trace-9"


def test_an_unusable_client_request_id_is_replaced(raw: httpx.Client) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    response = raw.post("/v1/chat/completions", json=body, headers={"x-request-id": "x" * 500})

    assert response.status_code == 200
    assert response.headers["x-request-id"]
    assert response.headers["x-request-id"] != "x" * 500


def test_routes_answer_without_the_v1_prefix(gateway: ThreadServer) -> None:
    with openai.OpenAI(base_url=gateway.url, api_key=MASTER_KEY, max_retries=0) as bare:
        completion = bare.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "no prefix"}])

    assert completion.choices[0].message.content == "echo: no prefix"


def test_x_api_key_header_authenticates_too(gateway: ThreadServer, fake: FakeUpstream) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "anthropic-style key"}]}
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"x-api-key": MASTER_KEY})

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: anthropic-style key"
    assert len(fake.requests) == 1
