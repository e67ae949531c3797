"""Priced stand-ins for the models a savings replay talks to: a large cloud model and a local one.

Both speak the OpenAI wire format (``POST /v1/chat/completions`` plain and SSE, ``GET
/v1/models``) on loopback, so thrifty reaches them exactly as it reaches OpenAI or a
llama.cpp server. An answer is made from the request alone: its length comes from the
workload's plan for that question (long worked answers for hard tasks, short ones for
simple asks), the large model answers the workload's reference when there is one (so a
cached answer can be checked), the local one never does (it is no model). Every answer
ends with a visible tag, ``[answered: <hash of the last user message>]``: the replay reads
it to tell which request an answer was made for, so a cache hit is checked against the
labels without trusting thrifty's own headers. Latency is a pure function of the answer
(:func:`latency_for`), so the replay subtracts exactly the stand-in's share from what it saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.bench.workload import last_user_text
from proxy.cost.tokens import TokenCounter

TAG_PREFIX = " [answered: "
_WORDS = tuple(
    " ".join(
        (
            "the policy covers this case when the account is in good standing and the request is made in time",
            "you can check the terms in your agreement or ask an agent to confirm the details for your situation",
            "first we set up the quantities then we compare each case and combine the results to reach the value",
        )
    ).split(" ")
)
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class Plan:
    """What the large model answers for one question: words of explanation, then the reference."""

    words: int
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Speed:
    """Time to the first token and tokens per second; ``scale`` multiplies every sleep (0: none)."""

    first_token: float
    tokens_per_second: float
    scale: float = 1.0


LARGE_SPEED = Speed(first_token=0.35, tokens_per_second=90.0)
# Gemma 3 270M under llama.cpp on 2 cores: 45 to 100 ms to the first token, 31 to 35 tokens/s (ENVIRONMENT.md).
LOCAL_SPEED = Speed(first_token=0.07, tokens_per_second=33.0)


def tag_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def tagged(answer: str, text: str) -> str:
    return f"{answer}{TAG_PREFIX}{tag_of(text)}]"


def read_tag(content: str) -> tuple[str, str | None]:
    """(the answer without its tag, the tag) of a stand-in's answer; no tag: (content, None)."""
    at = content.rfind(TAG_PREFIX)
    if at < 0 or not content.endswith("]"):
        return content, None
    return content[:at], content[at + len(TAG_PREFIX) : -1]


def answer_for(text: str, plan: Plan | None, large: bool) -> str:
    """The answer to a question whose last user message is ``text`` (pure: the same every time)."""
    rng = random.Random(tag_of(text))
    words = plan.words if plan is not None else 40 + rng.randrange(80)
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    if large and plan is not None and plan.reference is not None:
        body = f"{body}\n\n{plan.reference}" if body else plan.reference
    return tagged(body.capitalize() if body else body, text)


def latency_for(completion_tokens: int, speed: Speed) -> float:
    """Seconds the stand-in takes to answer (the same for plain and streamed answers)."""
    return (speed.first_token + completion_tokens / speed.tokens_per_second) * speed.scale


class StandIn:
    """One stand-in model server; ``plans`` maps :func:`tag_of` of a question to its :class:`Plan`."""

    def __init__(self, name: str, plans: Mapping[str, Plan], speed: Speed, large: bool, counter: TokenCounter):
        self.name = name
        self.plans = plans
        self.speed = speed
        self.large = large
        self.counter = counter
        self.calls = 0

    def reply(self, payload: dict[str, Any]) -> tuple[str, int, int]:
        """(content, prompt tokens, completion tokens) for a chat body."""
        messages = payload.get("messages") if isinstance(payload.get("messages"), list) else []
        text = last_user_text(messages or [])
        content = answer_for(text, self.plans.get(tag_of(text)), self.large)
        prompt = self.counter.count_messages(messages or [], "gpt-4o")
        return content, prompt, self.counter.count_text(content, "gpt-4o")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
            app.router.add_get(f"{prefix}/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        body = {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "bench"}]}
        return web.Response(body=orjson.dumps(body), headers=_JSON)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = orjson.loads(await request.read() or b"{}")
        if not isinstance(payload, dict):
            return web.Response(status=400, body=b'{"error":{"message":"not an object","type":"invalid_request_error"}}')
        self.calls += 1
        content, prompt, completion = self.reply(payload)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        model = str(payload.get("model") or self.name)
        base = {"id": f"chatcmpl-{tag_of(content)}", "created": int(time.time()), "model": model}
        total = latency_for(completion, self.speed)
        if payload.get("stream") is not True:
            await asyncio.sleep(total)
            message = {"role": "assistant", "content": content}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return web.Response(body=orjson.dumps(body), headers=_JSON)
        return await self._stream(request, payload, base, content, usage, total)

    async def _stream(
        self,
        request: web.Request,
        payload: dict[str, Any],
        base: dict[str, Any],
        content: str,
        usage: dict[str, int],
        total: float,
    ) -> web.StreamResponse:
        base = {**base, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

        first = self.speed.first_token * self.speed.scale
        await asyncio.sleep(first)
        response = web.StreamResponse(headers=_SSE)
        await response.prepare(request)
        await response.write(event({"role": "assistant", "content": ""}))
        pieces = _pieces(content, 16)
        for piece in pieces:
            await asyncio.sleep(max(total - first, 0.0) / len(pieces))
            await response.write(event({"content": piece}))
        await response.write(event({}, "stop"))
        if isinstance(payload.get("stream_options"), dict) and payload["stream_options"].get("include_usage"):
            await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _pieces(content: str, count: int) -> list[str]:
    size = max(1, -(-len(content) // count))
    return [content[i : i + size] for i in range(0, len(content), size)] or [""]
