"""A fake OpenAI-compatible upstream: a small aiohttp app that speaks the real wire format.

It stands in for cloud model APIs, which cannot be reached here. By default it answers
chat completions (plain and SSE, with ``usage``, and a tool call when tools are offered),
embeddings and ``/v1/models``. A test changes its behaviour by assigning ``handler``: an
async function taking ``(payload, request)`` and returning a response, or None for the
default. Every request is recorded (path, headers, parsed JSON) in ``requests``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[dict[str, Any], web.Request], Awaitable[web.StreamResponse | None]]


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class FakeUpstream:
    handler: Handler | None = None
    requests: list[Recorded] = field(default_factory=list)
    chunk_delay: float = 0.0
    # Set when a streaming client went away before the stream ended (cancellation seen).
    stream_cancelled: asyncio.Event | None = None
    streams_cancelled: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _record(self, request: web.Request) -> dict[str, Any]:
        payload = orjson.loads(await request.read())
        self.requests.append(Recorded(request.path, dict(request.headers), payload))
        return payload

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await self._record(request)
        if self.handler is not None:
            custom = await self.handler(payload, request)
            if custom is not None:
                return custom
        if payload.get("stream"):
            return await self.stream(request, payload)
        return web.json_response(completion(payload))

    async def stream(self, request: web.Request, payload: dict[str, Any], words: list[str] | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        words = words if words is not None else reply_text(payload).split(" ")
        try:
            for chunk in stream_chunks(payload, words):
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.streams_cancelled += 1
            raise
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        payload = await self._record(request)
        if self.handler is not None:
            custom = await self.handler(payload, request)
            if custom is not None:
                return custom  # type: ignore[return-value]
        inputs = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        data = [{"object": "embedding", "index": i, "embedding": vector(str(text))} for i, text in enumerate(inputs)]
        tokens = sum(len(str(t).split()) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": payload["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]})


def last_user_text(payload: dict[str, Any]) -> str:
    for message in reversed(payload.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else str(content)
    return ""


def reply_text(payload: dict[str, Any]) -> str:
    return f"echo: {last_user_text(payload)}"


def usage(payload: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) + 3 for m in payload.get("messages", []))
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def completion(payload: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply_text(payload)}
    finish = "stop"
    tools = payload.get("tools")
    if tools and payload.get("tool_choice") != "none":
        name = tools[0]["function"]["name"]
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": '{"city": "Paris"}'}}],
        }
        finish = "tool_calls"
    n = int(payload.get("n") or 1)
    choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish} for i in range(n)]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload["model"],
        "choices": choices,
        "usage": usage(payload, len(reply_text(payload).split())),
    }


def stream_chunks(payload: dict[str, Any], words: list[str]) -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": payload["model"]}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if (payload.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": usage(payload, len(words))})
    return chunks


def vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255 for b in digest[:dims]]
