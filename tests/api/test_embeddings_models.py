"""/v1/embeddings and /v1/models through the official SDK, the probes /health and /ready,
and the answers to paths and methods that do not exist (OpenAI's error shape there too)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.api.conftest import error_of
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream, vector
from tests.servers import ThreadServer

EMBEDDING_MODEL = "text-embedding-3-small"


def test_embedding_of_one_input(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input="hello world")
    result = raw.parse()

    assert raw.headers["x-thrifty-model"] == EMBEDDING_MODEL
    assert raw.headers["x-request-id"]
    assert len(result.data) == 1
    assert result.data[0].embedding == vector("hello world")
    assert result.usage.prompt_tokens == 2
    assert fake.requests[-1].path == "/v1/embeddings"
    # The SDK asks for base64 by default; that request goes through as it was sent.
    assert fake.requests[-1].payload == {"model": EMBEDDING_MODEL, "input": "hello world", "encoding_format": "base64"}


def test_embeddings_of_a_list_keep_their_order(client: openai.OpenAI, fake: FakeUpstream) -> None:
    inputs = ["alpha", "beta gamma", "delta epsilon zeta"]
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=inputs, dimensions=8, encoding_format="float")

    assert [d.index for d in result.data] == [0, 1, 2]
    assert [d.embedding for d in result.data] == [vector(text) for text in inputs]
    assert result.usage.total_tokens == 6
    assert fake.requests[-1].payload == {
        "model": EMBEDDING_MODEL,
        "input": inputs,
        "dimensions": 8,
        "encoding_format": "float",
    }


async def test_embeddings_async_with_token_input(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    result = await aclient.embeddings.create(model=EMBEDDING_MODEL, input=[[1, 2, 3], [4, 5]], user="u-1")

    assert len(result.data) == 2
    assert fake.requests[-1].payload["input"] == [[1, 2, 3], [4, 5]]
    assert fake.requests[-1].payload["user"] == "u-1"


def test_base64_embeddings_are_relayed_for_the_sdk_to_decode(client: openai.OpenAI, fake: FakeUpstream) -> None:
    floats = [0.5, -0.25, 0.125]

    async def base64_upstream(payload: dict[str, Any], request: web.Request) -> web.Response:
        encoded = base64.b64encode(struct.pack("<3f", *floats)).decode()
        data = [{"object": "embedding", "index": 0, "embedding": encoded}]
        usage = {"prompt_tokens": 1, "total_tokens": 1}
        return web.json_response({"object": "list", "data": data, "model": payload["model"], "usage": usage})

    fake.handler = base64_upstream
    result = client.embeddings.create(model=EMBEDDING_MODEL, input="x")

    assert result.data[0].embedding == floats


def test_embeddings_of_an_unknown_model_are_404(client: openai.OpenAI, fake: FakeUpstream) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-embedder", input="x")

    assert caught.value.code == "model_not_found"
    assert fake.requests == []


def test_upstream_embedding_errors_keep_their_status(client: openai.OpenAI, fake: FakeUpstream) -> None:
    async def too_long(payload: dict[str, Any], request: web.Request) -> web.Response:
        error = {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error"}
        return web.json_response({"error": {**error, "param": "input", "code": "context_length_exceeded"}}, status=400)

    fake.handler = too_long
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBEDDING_MODEL, input="x")

    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "input"


def test_models_lists_the_configured_models(client: openai.OpenAI) -> None:
    raw = client.models.with_raw_response.list()
    models = list(raw.parse())

    assert [m.id for m in models] == ["gpt-4o", "gpt-4o-mini", "fast", EMBEDDING_MODEL]
    assert {m.object for m in models} == {"model"}
    assert {m.owned_by for m in models} == {"openai"}
    assert raw.headers["x-request-id"]


async def test_models_async_and_without_prefix(aclient: openai.AsyncOpenAI, gateway: ThreadServer) -> None:
    page = await aclient.models.list()
    assert "fast" in [m.id for m in page.data]

    async with httpx.AsyncClient(base_url=gateway.url) as http:
        response = await http.get("/models", headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [m.id for m in page.data]


def test_health_needs_no_key(gateway: ThreadServer) -> None:
    response = httpx.get(f"{gateway.url}/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_reports_the_models(gateway: ThreadServer) -> None:
    response = httpx.get(f"{gateway.url}/ready")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["models"] == 4


@pytest.mark.parametrize("path", ["/v2/chat/completions", "/v1/completion", "/", "/v1/models/extra/segment"])
def test_unknown_path_is_404_in_openai_shape(raw: httpx.Client, path: str) -> None:
    response = raw.post(path, json={"model": "gpt-4o"})

    assert response.status_code == 404
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "not_found"
    assert response.headers["x-request-id"]


def test_an_endpoint_thrifty_does_not_serve_raises_not_found_in_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4o", prompt="legacy completions")

    assert caught.value.status_code == 404
    assert caught.value.code == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/embeddings", "POST"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", "/health", "GET"),
    ],
)
def test_wrong_method_is_405_in_openai_shape(raw: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = raw.request(method, path)

    assert response.status_code == 405
    error = error_of(response)
    assert error["code"] == "method_not_allowed"
    assert method in error["message"]
    assert allowed in response.headers["allow"]  # RFC 9110: a 405 names the allowed methods
