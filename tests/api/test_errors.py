"""Every failure reaches the client in OpenAI's error shape, with the status the official
SDK maps to the right exception class: the client's own mistakes (key, body, model), the
upstream's errors (status and message kept), and an upstream that is slow or gone.
Upstream API keys never show in a response or in a log record."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from tests.api.conftest import closed_port, error_of, model
from tests.conftest import MASTER_KEY, UPSTREAM_KEY
from tests.fake_upstream import FakeUpstream, Handler
from tests.servers import ThreadServer

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
CHAT = "/v1/chat/completions"


def reply_with(status: int, body: Any, content_type: str = "application/json") -> Handler:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.Response:
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type=content_type)
        return web.json_response(body, status=status)

    return handler


def openai_error(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- the client's mistakes ------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer", "Basic dXNlcjpwYXNz"], ids=["none", "empty", "basic"])
def test_missing_key_is_401_in_openai_shape(gateway: ThreadServer, fake: FakeUpstream, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = httpx.post(f"{gateway.url}{CHAT}", json={"model": "gpt-4o", "messages": HELLO}, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"]
    error = error_of(response)
    assert error["code"] == "invalid_api_key"
    assert "Missing API key" in error["message"]
    assert fake.requests == []


@pytest.mark.parametrize("key", ["sk-wrong-key-000000000000", MASTER_KEY + "x", "junk with spaces"])
def test_invalid_key_raises_authentication_error(gateway: ThreadServer, fake: FakeUpstream, key: str) -> None:
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        bad.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert fake.requests == []


def test_invalid_key_is_refused_on_models_too(gateway: ThreadServer) -> None:
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-nope-0000000000", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()


@pytest.mark.parametrize(
    ("body", "words"),
    [(b'{"model": "gpt-4o", "messages": [', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "empty")],
    ids=["truncated", "not-an-object", "empty"],
)
def test_malformed_body_is_400(raw: httpx.Client, fake: FakeUpstream, body: bytes, words: str) -> None:
    response = raw.post(CHAT, content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": HELLO}, "model"),
        (CHAT, {"model": "gpt-4o"}, "messages"),
        (CHAT, {"model": 42, "messages": HELLO}, "model"),
        (CHAT, {"model": "gpt-4o", "messages": HELLO, "stream": "yes"}, "stream"),
        ("/v1/embeddings", {"input": "x"}, "model"),
        ("/v1/embeddings", {"model": "text-embedding-3-small"}, "input"),
    ],
)
def test_a_missing_or_wrong_field_is_named_in_param(
    raw: httpx.Client, fake: FakeUpstream, path: str, body: dict[str, Any], param: str
) -> None:
    response = raw.post(path, json=body)

    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param
    assert f"'{param}'" in error["message"]
    assert fake.requests == []


def test_sdk_raises_bad_request_naming_the_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"content": "no role"}])  # type: ignore[list-item]

    assert caught.value.status_code == 400
    assert caught.value.param == "messages[0]"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_model_not_found(client: openai.OpenAI, fake: FakeUpstream, stream: bool) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9-ultra", messages=HELLO, stream=stream)

    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "gpt-9-ultra" in error_of(caught.value.response)["message"]
    assert fake.requests == []


def test_body_over_the_limit_is_413(gateway_with: Callable[..., openai.OpenAI], fake: FakeUpstream) -> None:
    small = gateway_with(max_body_bytes=2048)
    assert small.chat.completions.create(model="gpt-4o", messages=HELLO).choices  # under the limit: served

    with pytest.raises(openai.APIStatusError) as caught:
        small.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * 5000}])

    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    assert caught.value.type == "invalid_request_error"
    assert len(fake.requests) == 1


# --- the upstream's errors ------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_5xx_keeps_status_and_message(client: openai.OpenAI, fake: FakeUpstream, stream: bool) -> None:
    body = openai_error("The engine is currently overloaded, please try again later.", "server_error", "overloaded")
    fake.handler = reply_with(503, body)

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=stream)

    assert caught.value.status_code == 503
    assert caught.value.body == body["error"]


def test_upstream_429_keeps_status(client: openai.OpenAI, fake: FakeUpstream) -> None:
    body = openai_error("Rate limit reached for gpt-4o on tokens per min.", "tokens", "rate_limit_exceeded")
    fake.handler = reply_with(429, body)

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.body == body["error"]  # message, type and code as the upstream sent them


@pytest.mark.parametrize(
    ("body", "message"),
    [("<html>Bad Gateway</html>", "upstream returned HTTP 500: <html>Bad Gateway</html>"), ({"error": "boom"}, "boom")],
    ids=["html", "error-string"],
)
def test_upstream_errors_not_in_openai_shape_are_reshaped(
    client: openai.OpenAI, fake: FakeUpstream, body: Any, message: str
) -> None:
    fake.handler = reply_with(500, body, content_type="text/html")

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)

    assert caught.value.status_code == 500
    assert error_of(caught.value.response)["message"] == message


async def never_answer(payload: dict[str, Any], request: web.Request) -> None:
    await asyncio.sleep(60)  # cancelled when the gateway gives up and closes the connection


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_timeout_is_504(
    gateway_with: Callable[..., openai.OpenAI], upstream_url: str, fake: FakeUpstream, stream: bool
) -> None:
    fake.handler = never_answer
    client = gateway_with(model("slow", f"{upstream_url}/v1", first_byte=0.3))

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="slow", messages=HELLO, stream=stream)

    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert "slow" in error_of(caught.value.response)["message"]


def test_unreachable_upstream_is_502(gateway_with: Callable[..., openai.OpenAI]) -> None:
    client = gateway_with(model("gone", f"http://127.0.0.1:{closed_port()}/v1"))

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gone", messages=HELLO)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    assert "could not be reached" in error_of(caught.value.response)["message"]


# --- secrets --------------------------------------------------------------------------


LEAKY = f"Incorrect API key provided: {UPSTREAM_KEY}. You can find your API key at platform."


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "handler",
    [
        reply_with(401, openai_error(LEAKY, "invalid_request_error", "invalid_api_key")),
        reply_with(500, LEAKY, content_type="text/plain"),
        reply_with(400, {"error": LEAKY}),
    ],
    ids=["openai-json", "plain-text", "error-string"],
)
def test_upstream_key_never_reaches_the_client_or_the_log(
    raw: httpx.Client, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, handler: Handler, stream: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.handler = handler
    response = raw.post(CHAT, json={"model": "gpt-4o", "messages": HELLO, "stream": stream})

    assert response.status_code >= 400
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the key was really in play
    error = error_of(response)
    assert "[redacted]" in error["message"]
    assert UPSTREAM_KEY not in response.text
    assert "SECRET" not in response.text
    assert caplog.records  # DEBUG capture is on: the HTTP clients log at least
    assert UPSTREAM_KEY not in caplog.text
    assert MASTER_KEY not in caplog.text
