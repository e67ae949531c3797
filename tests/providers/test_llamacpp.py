"""thrifty in front of a real llama.cpp server (Gemma 3 270M, see tests/llama.py), driven by the
official OpenAI SDK: plain and streamed chat, usage from the server or counted by thrifty when a
stream brings none, and zero-config discovery of the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import openai
import pytest

from proxy.config import load_settings
from proxy.discovery import discover_local
from proxy.settings import ModelConfig, Settings, Timeouts
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.llama import LlamaServer
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def local_model(llama: LlamaServer, name: str = "gemma") -> ModelConfig:
    timeouts = Timeouts(connect=2.0, first_byte=30.0, total=60.0)
    return ModelConfig(name, "llamacpp", llama.base_url, None, upstream_model=llama.model, timeouts=timeouts)


@pytest.fixture
def local_settings(llama_server: LlamaServer, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    base = settings_for(upstream[1].url, tmp_path)
    return replace(base, models=(*base.models, local_model(llama_server)))


@pytest.fixture
def sdk(start_gateway: Callable[[Settings], ThreadServer], local_settings: Settings) -> Iterator[openai.OpenAI]:
    gateway = start_gateway(local_settings)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        yield client


def ledger_path(settings: Settings) -> Path:
    return Path(settings.ledger.url.removeprefix("sqlite:///"))


def test_a_plain_chat_is_served_by_llamacpp_with_the_servers_usage(sdk: openai.OpenAI, local_settings: Settings) -> None:
    raw = sdk.chat.completions.with_raw_response.create(model="gemma", messages=QUESTION, max_tokens=8, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-thrifty-model"] == "gemma"
    assert reply.choices[0].message.content  # real generated text
    assert reply.choices[0].finish_reason == "length"  # the base model never ends its turn by itself
    assert reply.usage is not None and reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 5
    record = record_of(ledger_path(local_settings), raw.headers["x-request-id"])
    assert (record["served_model"], record["provider"], record["usage_source"]) == ("gemma", "llamacpp", "upstream")
    assert (record["prompt_tokens"], record["completion_tokens"]) == (reply.usage.prompt_tokens, 8)
    assert record["cost_nusd"] == 0 and record["status"] == 200  # a local model costs nothing by default


def test_a_system_message_reaches_the_model(sdk: openai.OpenAI) -> None:
    # The chat template in tests/data/gemma-chat.json keeps it (llama.cpp's "gemma" format drops it).
    plain = sdk.chat.completions.create(model="gemma", messages=QUESTION, max_tokens=1)
    system = [{"role": "system", "content": "Answer in one word."}, *QUESTION]
    with_system = sdk.chat.completions.create(model="gemma", messages=system, max_tokens=1)
    assert plain.usage is not None and with_system.usage is not None
    assert with_system.usage.prompt_tokens >= plain.usage.prompt_tokens + 4


def test_a_stream_from_llamacpp_is_relayed_and_its_tokens_counted(sdk: openai.OpenAI, local_settings: Settings) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model="gemma", messages=QUESTION, max_tokens=12, temperature=0, stream=True
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 12  # llama.cpp sends one chunk per generated token
    assert chunks[-1].usage is None  # the client did not ask for usage, none is added
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    record = record_of(ledger_path(local_settings), request_id)
    # llama-cpp-python ignores stream_options.include_usage: thrifty counts what it sent and relayed
    assert (record["usage_source"], record["stream"], record["status"]) == ("counted", 1, 200)
    assert record["prompt_tokens"] > 5
    # counted with another tokenizer than Gemma's, so close to the number of chunks, not equal
    assert 0.5 * len(pieces) <= record["completion_tokens"] <= 1.5 * len(pieces)


def test_a_client_asking_for_usage_gets_the_counted_figures_from_llamacpp(sdk: openai.OpenAI, local_settings: Settings) -> None:
    with sdk.chat.completions.with_streaming_response.create(
        model="gemma", messages=QUESTION, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ) as response:
        request_id = response.headers["x-request-id"]
        chunks = list(response.parse())
    record = record_of(ledger_path(local_settings), request_id)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []  # llama.cpp sent none: thrifty adds what it counted
    assert (usage.prompt_tokens, usage.completion_tokens) == (record["prompt_tokens"], record["completion_tokens"])
    assert record["usage_source"] == "counted"


async def test_a_llamacpp_server_is_discovered_and_listed(
    llama_server: LlamaServer, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path,
    start_gateway: Callable[[Settings], ThreadServer],
) -> None:  # fmt: skip
    # Zero-config probes 127.0.0.1:8080; the probe itself is pointed at the test server's port.
    async with aiohttp.ClientSession() as session:
        found = await discover_local(session, (("ollama", "http://127.0.0.1:9/v1"), ("llamacpp", llama_server.base_url)))
    assert [(m.name, m.provider, m.base_url, m.target_model, m.is_local) for m in found] == [
        ("gemma-3-270m", "llamacpp", llama_server.base_url, "gemma-3-270m", True)
    ]
    settings = replace(settings_for(upstream[1].url, tmp_path), models=tuple(found))
    gateway = start_gateway(settings)
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        listed = [m.id async for m in client.models.list()]
        reply = await client.chat.completions.create(model="gemma-3-270m", messages=QUESTION, max_tokens=4)
    assert listed == ["gemma-3-270m"]
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_zero_config_serves_a_llamacpp_server_named_by_the_environment(
    llama_server: LlamaServer, start_gateway: Callable[[Settings], ThreadServer], tmp_path: Path
) -> None:
    env = {"LLAMACPP_BASE_URL": llama_server.base_url, "OLLAMA_HOST": "127.0.0.1:9", "THRIFTY_MASTER_KEY": MASTER_KEY}
    settings = load_settings(None, env=env)
    settings = replace(settings, ledger=replace(settings.ledger, url=f"sqlite:///{tmp_path / 'zero.db'}"), policies=None)
    gateway = start_gateway(settings)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as client:
        assert [m.id for m in client.models.list()] == ["gemma-3-270m"]
        reply = client.chat.completions.create(model="gemma-3-270m", messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.completion_tokens == 3
