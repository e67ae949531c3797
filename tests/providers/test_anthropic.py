"""Anthropic through litellm, end to end: the official OpenAI SDK talks to a real thrifty
gateway over loopback HTTP, which talks to a fake Anthropic speaking the Messages API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from proxy.settings import ModelConfig, Settings, Timeouts
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_anthropic import FakeAnthropic, answer, error
from tests.servers import ThreadServer

ANTHROPIC_KEY = "sk-ant-SECRET-api03-0123456789abcdefghij"
QUICK = Timeouts(connect=2.0, first_byte=5.0, total=30.0)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def anthropic_server() -> Iterator[tuple[FakeAnthropic, ThreadServer]]:
    fake = FakeAnthropic(api_key=ANTHROPIC_KEY)
    with ThreadServer(fake.app) as server:
        yield fake, server


@pytest.fixture
def anthropic(anthropic_server: tuple[FakeAnthropic, ThreadServer]) -> FakeAnthropic:
    return anthropic_server[0]


@pytest.fixture
def settings(anthropic_server: tuple[FakeAnthropic, ThreadServer], tmp_path: Path) -> Settings:
    """Overrides conftest's: the gateway's models are Anthropic ones on the fake."""
    url = anthropic_server[1].url
    models = (
        ModelConfig("claude-test", "anthropic", url, ANTHROPIC_KEY, timeouts=QUICK),
        ModelConfig("claude-fast", "anthropic", f"{url}/v1", ANTHROPIC_KEY, "claude-haiku-upstream", QUICK),
        ModelConfig("claude-slow", "anthropic", url, ANTHROPIC_KEY, timeouts=replace(QUICK, first_byte=0.5)),
        ModelConfig("claude-gone", "anthropic", "http://127.0.0.1:9", ANTHROPIC_KEY, timeouts=QUICK),
    )
    return replace(settings_for(url, tmp_path), models=models)


def status_handler(status: int, message: str, kind: str | None = None) -> Callable[..., Any]:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.Response:
        return error(status, message, kind)

    return handler


# --- plain completions ---------------------------------------------------------------


def test_plain_completion(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    completion = client.chat.completions.create(model="claude-test", messages=HELLO)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)
    assert completion.usage.total_tokens == 8
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    sent = anthropic.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.headers["anthropic-version"]
    assert sent.payload["model"] == "claude-test"
    assert sent.payload["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]


def test_system_message_becomes_anthropics_system_field(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    messages = [{"role": "system", "content": "Answer in French."}, *HELLO]
    client.chat.completions.create(model="claude-test", messages=messages)
    sent = anthropic.requests[-1].payload
    assert sent["system"] == [{"type": "text", "text": "Answer in French."}]
    assert [m["role"] for m in sent["messages"]] == ["user"]


def test_parameters_are_translated_and_unsupported_ones_dropped(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    client.chat.completions.create(
        model="claude-test",
        messages=HELLO,
        max_tokens=50,
        stop=["END"],
        temperature=0.3,
        top_p=0.9,
        user="user-42",
        seed=7,
        presence_penalty=0.5,
        metadata={"team": "search"},
        extra_body={"top_k": 5, "mock_response": "injected", "api_base": "http://evil.invalid"},
    )
    sent = anthropic.requests[-1].payload
    assert sent["max_tokens"] == 50
    assert sent["stop_sequences"] == ["END"]
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.3, 0.9, 5)
    assert sent["metadata"] == {"user_id": "user-42"}
    for absent in ("seed", "presence_penalty", "mock_response", "api_base", "stop"):
        assert absent not in sent


def test_max_completion_tokens_and_length_finish(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    completion = client.chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "one two three four"}], max_completion_tokens=2
    )
    assert anthropic.requests[-1].payload["max_tokens"] == 2
    assert completion.choices[0].message.content == "echo: one"
    assert completion.choices[0].finish_reason == "length"


def test_stop_sequence_ends_the_answer(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="claude-test", messages=[{"role": "user", "content": "alpha STOP beta"}], stop="STOP"
    )
    assert completion.choices[0].message.content == "echo: alpha "
    assert completion.choices[0].finish_reason == "stop"


def test_cached_prompt_tokens_are_reported(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    anthropic.cache_read_tokens = 40
    completion = client.chat.completions.create(model="claude-test", messages=HELLO)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 45  # OpenAI counts cached tokens in prompt_tokens
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 40


def test_upstream_model_name_and_base_url_with_v1(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    completion = client.chat.completions.create(model="claude-fast", messages=HELLO)
    assert completion.choices[0].message.content == "echo: hello there"
    assert anthropic.requests[-1].path == "/v1/messages"
    assert anthropic.requests[-1].payload["model"] == "claude-haiku-upstream"


# --- streaming -----------------------------------------------------------------------


def test_streaming_assembles_content_without_usage(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    chunks = list(client.chat.completions.create(model="claude-test", messages=HELLO, stream=True))
    assert len(chunks) >= 4
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)
    assert anthropic.requests[-1].payload["stream"] is True


def test_streaming_usage_chunk_when_asked(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    anthropic.cache_read_tokens = 10
    stream = client.chat.completions.create(
        model="claude-test", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (15, 3, 18)
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_openai_sse_ending_in_done(gateway: ThreadServer) -> None:
    body = {"model": "claude-test", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    events = [line for line in lines if not line.startswith(":")]  # SSE comments are allowed
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "echo:"}


# --- tools ---------------------------------------------------------------------------


def test_tool_call(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    completion = client.chat.completions.create(
        model="claude-test",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id == "toolu_01Fake"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    sent = anthropic.requests[-1].payload
    assert sent["tools"][0]["name"] == "get_weather"
    assert sent["tools"][0]["input_schema"]["required"] == ["city"]
    assert sent["tool_choice"] == {"type": "auto"}


def test_tool_call_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="claude-test",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    ids, names, arguments, finish = [], [], "", None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            ids += [call.id] if call.id else []
            names += [call.function.name] if call.function and call.function.name else []
            arguments += call.function.arguments or "" if call.function else ""
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    assert (ids, names) == (["toolu_01Fake"], ["get_weather"])
    assert json.loads(arguments) == {"city": "Paris"}
    assert finish == "tool_calls"


def test_tool_result_is_sent_back_in_anthropics_shape(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    call = {"id": "toolu_01Fake", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_01Fake", "content": "sunny, 21C"},
    ]
    client.chat.completions.create(model="claude-test", messages=messages)
    sent = anthropic.requests[-1].payload["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    use = next(b for b in sent[1]["content"] if b["type"] == "tool_use")
    assert (use["id"], use["name"], use["input"]) == ("toolu_01Fake", "get_weather", {"city": "Paris"})
    result = sent[2]["content"][0]
    assert (result["type"], result["tool_use_id"]) == ("tool_result", "toolu_01Fake")


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "message", "exception"),
    [
        (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit", openai.RateLimitError),
        (500, "api_error", "Internal server error", openai.InternalServerError),
        (400, "invalid_request_error", "messages.0.content: overloaded with nonsense", openai.BadRequestError),
        (529, "overloaded_error", "Overloaded", openai.APIStatusError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_error_keeps_status_and_message(
    client: openai.OpenAI,
    anthropic: FakeAnthropic,
    caplog: pytest.LogCaptureFixture,
    status: int,
    kind: str,
    message: str,
    exception: type[openai.APIStatusError],
    stream: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    anthropic.handler = status_handler(status, message, kind)
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="claude-test", messages=HELLO, stream=stream)
    assert caught.value.status_code == status
    assert caught.value.body == {"message": message, "type": kind, "param": None, "code": None}
    assert ANTHROPIC_KEY not in caught.value.response.text
    assert ANTHROPIC_KEY not in caplog.text


def test_key_in_an_upstream_message_is_scrubbed(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    anthropic.handler = status_handler(401, f"invalid x-api-key {ANTHROPIC_KEY}")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="claude-test", messages=HELLO)
    assert caught.value.status_code == 401
    assert "invalid x-api-key [redacted]" in caught.value.message
    assert ANTHROPIC_KEY not in caught.value.response.text
    assert "SECRET" not in caught.value.response.text


def test_error_event_mid_stream_reaches_the_client(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    async def overloaded(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return await anthropic.stream(request, payload, *answer(payload), error=("overloaded_error", "Overloaded"))

    anthropic.handler = overloaded
    received = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        for chunk in client.chat.completions.create(model="claude-test", messages=HELLO, stream=True):
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert received == ["echo:"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout_is_504(client: openai.OpenAI, anthropic: FakeAnthropic, stream: bool) -> None:
    async def slow(payload: dict[str, Any], request: web.Request) -> None:
        await asyncio.sleep(3)

    anthropic.handler = slow
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="claude-slow", messages=HELLO, stream=stream)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert time.monotonic() - started < 2.5


def test_stream_stalling_before_its_first_token_is_504(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    anthropic.chunk_delay = 1.0  # the headers come at once, then each event a second apart
    with pytest.raises(openai.APIStatusError) as caught:
        list(client.chat.completions.create(model="claude-slow", messages=HELLO, stream=True))
    assert caught.value.status_code == 504


def test_unreachable_upstream_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="claude-gone", messages=HELLO)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert ANTHROPIC_KEY not in caught.value.response.text


def test_embeddings_on_an_anthropic_model_is_400(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="claude-test", input="hello")
    assert caught.value.code == "unsupported_request"
    assert "embeddings" in caught.value.message
    assert anthropic.requests == []


def test_several_choices_are_refused(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude-test", messages=HELLO, n=2)
    assert caught.value.param == "n"
    assert anthropic.requests == []


# --- stream lifetime -----------------------------------------------------------------


def test_client_leaving_a_stream_closes_the_upstream(client: openai.OpenAI, anthropic: FakeAnthropic) -> None:
    anthropic.chunk_delay = 0.05
    words = " ".join(f"w{i}" for i in range(200))
    stream = client.chat.completions.create(model="claude-test", messages=[{"role": "user", "content": words}], stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 5
    while anthropic.streams_cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert anthropic.streams_cancelled == 1


async def test_concurrent_requests(aclient: openai.AsyncOpenAI) -> None:
    async def ask(i: int) -> str | None:
        completion = await aclient.chat.completions.create(
            model="claude-test", messages=[{"role": "user", "content": f"question {i}"}]
        )
        return completion.choices[0].message.content

    answers = await asyncio.gather(*(ask(i) for i in range(20)))
    assert answers == [f"echo: question {i}" for i in range(20)]
