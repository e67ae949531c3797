"""Streamed chat completions through the official SDK, sync and async.

The relay is proved chunk by chunk: the upstream sends the next chunk only once the
client has acknowledged the previous one, so any buffering in thrifty stalls the
lockstep (and the upstream records that it gave up waiting). A client that goes away
mid-stream must cancel the upstream request; an upstream that breaks off mid-stream must
end the client's stream with an error event, never with a clean end.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from tests.api.conftest import model, sse_chunk, start_sse, wait_until
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream, Handler
from tests.servers import ThreadServer

WORDS = ["one", "two", "three", "four", "five"]
ACK_TIMEOUT = 10.0


class Lockstep:
    """An upstream handler that waits for the client's ack of each chunk before the next.

    With ``crlf`` it ends events with ``\r\n\r\n`` (as sse-starlette does) and writes each
    event in two pieces split between the last ``\r`` and ``\n``, the boundary a relay must not trip on.
    """

    def __init__(self, crlf: bool = False) -> None:
        self.acks: queue.Queue[str] = queue.Queue()
        self.events: list[str] = []
        self.crlf = crlf

    async def __call__(self, payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        waiting = True
        for word in WORDS:
            self.events.append(f"sent {word}")  # before the write, which the client may beat
            await self._write(response, sse_chunk(payload, word))
            if waiting:
                try:
                    await asyncio.to_thread(self.acks.get, timeout=ACK_TIMEOUT)
                except queue.Empty:
                    self.events.append(f"gave up waiting for the client to get {word}")
                    waiting = False  # buffering detected; finish quickly so the test can fail
        await self._write(response, b"data: [DONE]\n\n")
        return response

    async def _write(self, response: web.StreamResponse, event: bytes) -> None:
        if not self.crlf:
            await response.write(event)
            return
        event = event.replace(b"\n", b"\r\n")
        await response.write(event[:-1])  # ends in "\r\n\r"
        await asyncio.sleep(0.05)  # lets the first piece reach the gateway on its own
        await response.write(event[-1:])


def test_sync_stream_relays_every_chunk_with_headers(client: openai.OpenAI, fake: FakeUpstream) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream me please"}], stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert raw.headers["x-request-id"]

    chunks = list(raw.parse())

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: stream me please"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 1 + 4 + 1  # role, one per word, finish
    assert fake.requests[-1].payload["stream"] is True


async def test_async_stream_relays_every_chunk(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    stream = await aclient.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "async stream"}], stream=True
    )
    texts = [c.choices[0].delta.content or "" async for c in stream if c.choices]

    assert "".join(texts) == "echo: async stream"
    assert fake.requests[-1].payload["model"] == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_sync_stream_is_relayed_as_it_arrives(client: openai.OpenAI, fake: FakeUpstream, crlf: bool) -> None:
    upstream = Lockstep(crlf)
    fake.handler = upstream
    received = []
    for chunk in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True):
        received.append(chunk.choices[0].delta.content)
        upstream.events.append(f"client got {received[-1]}")
        upstream.acks.put("ack")

    assert received == WORDS
    expected = [e for w in WORDS for e in (f"sent {w}", f"client got {w}")]
    assert upstream.events == expected


async def test_async_stream_is_relayed_as_it_arrives(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    upstream = Lockstep()
    fake.handler = upstream
    received = []
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    async for chunk in stream:
        received.append(chunk.choices[0].delta.content)
        upstream.events.append(f"client got {received[-1]}")
        upstream.acks.put("ack")

    assert received == WORDS
    assert upstream.events == [e for w in WORDS for e in (f"sent {w}", f"client got {w}")]


def test_stream_with_include_usage_passes_the_usage_chunk(client: openai.OpenAI, fake: FakeUpstream) -> None:
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "count my tokens"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert fake.requests[-1].payload["stream_options"] == {"include_usage": True}
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4


def long_prompt() -> list[ChatCompletionMessageParam]:
    # With fake.chunk_delay = 0.01 the upstream needs 30+ s to send all of these words.
    return [{"role": "user", "content": " ".join(["word"] * 3000)}]


def test_sync_client_disconnect_cancels_the_upstream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.chunk_delay = 0.01
    stream = client.chat.completions.create(model="gpt-4o", messages=long_prompt(), stream=True)
    for _ in range(3):
        next(stream)
    stream.close()

    # streams_cancelled only counts a stream cut off before the upstream wrote its end.
    assert wait_until(lambda: fake.streams_cancelled == 1, timeout=15)


async def test_async_client_disconnect_cancels_the_upstream(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.chunk_delay = 0.01
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=long_prompt(), stream=True)
    for _ in range(3):
        await stream.__anext__()
    await stream.close()

    assert await asyncio.to_thread(wait_until, lambda: fake.streams_cancelled == 1, 15)


def test_disconnect_while_the_upstream_is_silent_cancels_it(client: openai.OpenAI, fake: FakeUpstream) -> None:
    """A model that 'thinks' between chunks: nothing to write, yet the upstream call must stop."""
    cancelled: list[str] = []

    async def thinking(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse_chunk(payload, "hmm"))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("cancelled")
            raise
        return response

    fake.handler = thinking
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    assert next(stream).choices[0].delta.content == "hmm"
    stream.close()

    assert wait_until(lambda: cancelled == ["cancelled"], timeout=15)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_times_out_cancels_the_upstream(gateway: ThreadServer, fake: FakeUpstream, stream: bool) -> None:
    """The client gives up before the first byte (its own timeout): the upstream call stops too."""
    cancelled: list[str] = []

    async def slow(payload: dict[str, Any], request: web.Request) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append("cancelled")
            raise

    fake.handler = slow
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=0.5) as impatient,
        pytest.raises(openai.APITimeoutError),
    ):
        impatient.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=stream)

    assert wait_until(lambda: cancelled == ["cancelled"], timeout=15)


def broken_upstream(ending: str) -> Handler:
    """Two chunks, then the upstream dies (``close``), stalls (``stall``) or ends without [DONE] (``eof``)."""

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        response = await start_sse(request)
        await response.write(sse_chunk(payload, "partial"))
        await response.write(sse_chunk(payload, " answer"))
        if ending == "close":
            assert request.transport is not None
            request.transport.close()
        elif ending == "stall":
            await asyncio.sleep(60)  # cancelled when the gateway gives up and closes the connection
        return response

    return handler


@pytest.mark.parametrize(
    ("ending", "code"),
    [("close", "upstream_unavailable"), ("eof", "upstream_unavailable"), ("stall", "upstream_timeout")],
)
def test_a_stream_the_upstream_breaks_off_ends_in_an_sdk_error(
    gateway_with: Callable[..., openai.OpenAI], upstream_url: str, fake: FakeUpstream, ending: str, code: str
) -> None:
    fake.handler = broken_upstream(ending)
    # A short first-byte timeout (aiohttp's sock_read) is what catches the stall.
    client = gateway_with(model("impatient", f"{upstream_url}/v1", first_byte=0.5))
    received: list[str] = []

    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="impatient", messages=[{"role": "user", "content": "x"}], stream=True):
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "partial answer"
    assert not isinstance(caught.value, openai.APIStatusError)  # raised from the stream, after a 200
    assert caught.value.code == code
    assert caught.value.type == "upstream_error"
    assert caught.value.message


async def test_async_stream_broken_off_raises_too(aclient: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.handler = broken_upstream("close")
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "partial answer"
    assert caught.value.code == "upstream_unavailable"
