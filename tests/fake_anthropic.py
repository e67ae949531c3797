"""A fake Anthropic upstream: a small aiohttp app that speaks the real Messages API wire format.

``POST /v1/messages`` with ``x-api-key`` and ``anthropic-version`` headers, answered the way
Anthropic answers: a ``message`` object with content blocks, ``stop_reason`` and ``usage``
(``input_tokens``, ``output_tokens``, ``cache_read_input_tokens``), or, for ``stream: true``,
the real SSE event sequence (``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` with ``text_delta`` / ``input_json_delta``, ``content_block_stop``,
``message_delta`` with usage, ``message_stop``). Errors come in Anthropic's shape
``{"type": "error", "error": {"type", "message"}}`` with Anthropic's statuses.

By default it echoes the last user text and calls the first tool when tools are offered. A
test changes its behaviour by assigning ``handler`` (``(payload, request) -> response or
None``); every request is recorded (path, headers, parsed JSON) in ``requests``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[dict[str, Any], web.Request], Awaitable[web.StreamResponse | None]]

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    payload: dict[str, Any]


@dataclass
class FakeAnthropic:
    api_key: str
    handler: Handler | None = None
    requests: list[Recorded] = field(default_factory=list)
    chunk_delay: float = 0.0
    # Tokens reported as read from Anthropic's prompt cache (usage.cache_read_input_tokens).
    cache_read_tokens: int = 0
    # Streams the client abandoned before their end (the connection was closed on us).
    streams_cancelled: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error(400, "There was an error parsing the body of your request.")
        self.requests.append(Recorded(request.path, dict(request.headers), payload))
        if request.headers.get("x-api-key") != self.api_key:
            return error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return error(400, "anthropic-version: header is required")
        for name in ("model", "messages", "max_tokens"):
            if name not in payload:
                return error(400, f"{name}: Field required")
        if self.handler is not None:
            custom = await self.handler(payload, request)
            if custom is not None:
                return custom
        blocks, stop_reason = answer(payload)
        if payload.get("stream"):
            return await self.stream(request, payload, blocks, stop_reason)
        return web.json_response(self.message(payload, blocks, stop_reason))

    def usage(self, payload: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "input_tokens": input_tokens(payload),
            "output_tokens": sum(len(_block_text(b).split()) for b in blocks),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cache_read_tokens,
        }

    def message(self, payload: dict[str, Any], blocks: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
        return {
            "id": "msg_01FakeAnthropic",
            "type": "message",
            "role": "assistant",
            "model": payload["model"],
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": self.matched_stop(payload) if stop_reason == "stop_sequence" else None,
            "usage": self.usage(payload, blocks),
        }

    async def stream(
        self,
        request: web.Request,
        payload: dict[str, Any],
        blocks: list[dict[str, Any]],
        stop_reason: str,
        *,
        error: tuple[str, str] | None = None,
    ) -> web.StreamResponse:
        """Stream ``blocks`` as Anthropic does; with ``error`` (type, message), an ``error``
        event replaces the rest of the stream after the first text delta, as on overload."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        usage = self.usage(payload, blocks)
        start = {**self.message(payload, [], ""), "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": start})]
        events.append(("ping", {"type": "ping"}))
        for index, block in enumerate(blocks):
            events += block_events(index, block)
        if error is not None:
            first = next(i for i, (name, _) in enumerate(events) if name == "content_block_delta")
            failure = {"type": "error", "error": {"type": error[0], "message": error[1]}}
            events = [*events[: first + 1], ("error", failure)]
        else:
            delta = {"stop_reason": stop_reason, "stop_sequence": None}
            if stop_reason == "stop_sequence":
                delta["stop_sequence"] = self.matched_stop(payload)
            final = {"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["output_tokens"]}}
            events += [("message_delta", final), ("message_stop", {"type": "message_stop"})]
        try:
            for name, data in events:
                await response.write(sse(name, data))
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
        except (asyncio.CancelledError, ConnectionResetError):
            self.streams_cancelled += 1
            raise
        return response

    @staticmethod
    def matched_stop(payload: dict[str, Any]) -> str | None:
        text = f"echo: {last_user_text(payload)}"
        return next((s for s in payload.get("stop_sequences") or [] if s in text), None)


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One content block as Anthropic streams it: start, deltas in pieces, stop."""
    if block["type"] == "text":
        start = {"type": "text", "text": ""}
        words = block["text"].split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        deltas = [{"type": "text_delta", "text": p} for p in pieces]
    else:  # tool_use: the input arrives as partial JSON strings
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        raw = orjson.dumps(block["input"]).decode()
        half = len(raw) // 2
        deltas = [{"type": "input_json_delta", "partial_json": part} for part in ("", raw[:half], raw[half:])]
    events = [("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def error(status: int, message: str, kind: str | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": kind or ERROR_TYPES.get(status, "api_error"), "message": message}}
    return web.json_response(body, status=status, headers={"request-id": "req_fake"})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _block_text(block: dict[str, Any]) -> str:
    return str(block.get("text", "")) if block["type"] == "text" else orjson.dumps(block["input"]).decode()


def last_user_text(payload: dict[str, Any]) -> str:
    for message in reversed(payload.get("messages", [])):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def input_tokens(payload: dict[str, Any]) -> int:
    system = len(_text(payload.get("system")).split())
    return system + sum(len(_text(m.get("content")).split()) + 3 for m in payload.get("messages", []))


def answer(payload: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Echo the last user text; call the first tool when tools are offered and allowed."""
    tools = payload.get("tools")
    choice = (payload.get("tool_choice") or {}).get("type")
    if tools and choice != "none":
        block = {"type": "tool_use", "id": "toolu_01Fake", "name": tools[0]["name"], "input": {"city": "Paris"}}
        return [{"type": "text", "text": "Let me check."}, block], "tool_use"
    text = f"echo: {last_user_text(payload)}"
    for stop in payload.get("stop_sequences") or []:
        if stop in text:
            return [{"type": "text", "text": text[: text.index(stop)]}], "stop_sequence"
    words = text.split(" ")
    if len(words) > payload["max_tokens"]:
        return [{"type": "text", "text": " ".join(words[: payload["max_tokens"]])}], "max_tokens"
    return [{"type": "text", "text": text}], "end_turn"
