"""Shared fixtures: a fake upstream and a thrifty gateway on real loopback HTTP,
and the official OpenAI SDK clients pointed at the gateway."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.app import create_app
from proxy.settings import AuthConfig, LedgerConfig, ModelConfig, ServerConfig, Settings, Timeouts
from tests.fake_upstream import FakeUpstream
from tests.llama import llama_server  # noqa: F401  (the real llama.cpp server fixture)
from tests.servers import ThreadServer

MASTER_KEY = "sk-test-master-key-0123456789"
UPSTREAM_KEY = "sk-upstream-SECRET-9f8e7d6c5b4a39281706"

# tiktoken must never reach for the network here (see README: offline tokenizers).
os.environ.setdefault("THRIFTY_TEST", "1")


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, ThreadServer]]:
    fake = FakeUpstream()
    with ThreadServer(fake.app) as server:
        yield fake, server


@pytest.fixture
def fake(upstream: tuple[FakeUpstream, ThreadServer]) -> FakeUpstream:
    return upstream[0]


def settings_for(upstream_url: str, tmp_path: Path, **server: object) -> Settings:
    base = f"{upstream_url}/v1"
    quick = Timeouts(connect=2.0, first_byte=5.0, total=30.0)
    models = (
        ModelConfig("gpt-4o", "openai", base, UPSTREAM_KEY, timeouts=quick),
        ModelConfig("gpt-4o-mini", "openai", base, UPSTREAM_KEY, timeouts=quick),
        ModelConfig("fast", "openai", base, UPSTREAM_KEY, upstream_model="gpt-4o-mini-2024-07-18", timeouts=quick),
        ModelConfig("text-embedding-3-small", "openai", base, UPSTREAM_KEY, timeouts=quick),
    )
    return Settings(
        models=models,
        auth=AuthConfig(master_key=MASTER_KEY),
        ledger=LedgerConfig(url=f"sqlite:///{tmp_path / 'thrifty.db'}", spill_dir=str(tmp_path / "spill")),
        server=replace(ServerConfig(), **server),  # type: ignore[arg-type]
    )


@pytest.fixture
def settings(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    return settings_for(upstream[1].url, tmp_path)


@pytest.fixture
def start_gateway() -> Iterator[Callable[[Settings], ThreadServer]]:
    started: list[ThreadServer] = []

    def start(settings: Settings) -> ThreadServer:
        server = ThreadServer(lambda: create_app(settings), shutdown_timeout=settings.server.drain_timeout)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(start_gateway: Callable[[Settings], ThreadServer], settings: Settings) -> ThreadServer:
    return start_gateway(settings)


@pytest.fixture
def client(gateway: ThreadServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
async def aclient(gateway: ThreadServer) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)
    yield c
    await c.close()
