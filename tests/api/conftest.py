"""Fixtures for the API tests: raw HTTP access to the gateway, gateways with custom models,
and small helpers to wait on something that happens on a server thread."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from proxy.settings import ModelConfig, Settings, Timeouts
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.servers import ThreadServer

StartGateway = Callable[[Settings], ThreadServer]


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.02)
    return True


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error response, checking the shape."""
    assert response.headers["content-type"].startswith("application/json")
    body = orjson.loads(response.content)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    error: dict[str, Any] = body["error"]
    return error


def sse_chunk(payload: dict[str, Any], content: str | None = None, **fields: Any) -> bytes:
    """One ``data:`` event of a chat completion stream, as an upstream would send it."""
    delta: dict[str, Any] = {} if content is None else {"content": content}
    chunk = {
        "id": "chatcmpl-custom",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": payload["model"],
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        **fields,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


@pytest.fixture
def raw(gateway: ThreadServer) -> Iterator[httpx.Client]:
    """Plain HTTP to the gateway, with the master key, for what the SDK cannot send."""
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture
def upstream_url(upstream: tuple[Any, ThreadServer]) -> str:
    return upstream[1].url


@pytest.fixture
def gateway_with(start_gateway: StartGateway, upstream_url: str, tmp_path: Path) -> Iterator[Callable[..., openai.OpenAI]]:
    """Start a gateway with extra models (and server options); returns an SDK client for it."""
    clients: list[openai.OpenAI] = []

    def start(*extra: ModelConfig, **server: object) -> openai.OpenAI:
        base = settings_for(upstream_url, tmp_path, **server)
        settings = replace(base, models=base.models + extra)
        gateway = start_gateway(settings)
        c = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)
        clients.append(c)
        return c

    yield start
    for c in clients:
        c.close()


def model(name: str, base_url: str, *, first_byte: float = 5.0) -> ModelConfig:
    """A model on ``base_url`` (ending in /v1) with the upstream key and a chosen first-byte timeout."""
    return ModelConfig(name, "openai", base_url, UPSTREAM_KEY, timeouts=Timeouts(connect=2.0, first_byte=first_byte))
