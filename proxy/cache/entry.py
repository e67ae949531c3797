"""Cache entries: what is stored for an answer, and how a hit is given back.

Pure functions over bytes and dicts, used by the cache stage. An entry keeps the answer as
one ``chat.completion`` object (a streamed answer is reassembled from its chunks), the model
that produced it, its usage and when it was stored, plus the tenant that stored it, checked
again on every read. A hit is served as that object with a fresh ``id`` and ``created``,
or, for a ``stream: true`` request, replayed as SSE chunks shaped like a live stream: a role
chunk, content chunks, tool-call chunks, a finish chunk, and a usage chunk only when the
client asked for ``stream_options.include_usage``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.api.sse import event_data
from proxy.cost.pricing import Usage, usage_from_openai

VERSION = 1
# An answer cut off or withheld is not worth repeating: content_filter, or no reason at all.
STORABLE_FINISH = frozenset({"stop", "length", "tool_calls", "function_call"})
_CONTENT_PIECE = 96  # characters per replayed content chunk


@dataclass(frozen=True, slots=True)
class Entry:
    tenant: str
    response: dict[str, Any]  # a chat.completion object
    usage: Usage | None
    stored_at: float

    @property
    def model(self) -> str:
        return str(self.response.get("model") or "")


def storable(response: Any) -> bool:
    """A complete chat completion whose every choice finished normally."""
    if not isinstance(response, dict) or response.get("object") != "chat.completion":
        return False
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in STORABLE_FINISH for c in choices)


def encode(tenant: str, response: dict[str, Any], usage: Usage | None, now: float) -> bytes:
    fields = None
    if usage is not None:
        fields = [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens, usage.source]
    return orjson.dumps(
        {"v": VERSION, "tenant": tenant, "model": response.get("model"), "usage": fields, "time": now, "response": response}
    )


def decode(raw: bytes, tenant: str) -> Entry | None:
    """The entry, or None when it is unreadable, of another version, or not this tenant's."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("v") != VERSION or data.get("tenant") != tenant:
        return None
    response = data.get("response")
    if not isinstance(response, dict) or not storable(response):
        return None
    fields = data.get("usage")
    usage = None
    if isinstance(fields, list) and len(fields) == 5:
        usage = Usage(int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3]), str(fields[4]))
    elif isinstance(response.get("usage"), dict):
        usage = usage_from_openai(response["usage"])
    return Entry(tenant, response, usage, float(data.get("time") or 0.0))


def _fresh_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(18)


def response_body(entry: Entry) -> bytes:
    """The stored answer as a non-streamed reply: a fresh id and time, usage as stored."""
    return orjson.dumps({**entry.response, "id": _fresh_id(), "created": int(time.time())})


def replay(entry: Entry, include_usage: bool) -> bytes:
    """The stored answer as SSE ``data:`` events, without ``[DONE]`` (the route adds the cost first)."""
    response = entry.response
    base: dict[str, Any] = {"id": _fresh_id(), "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = response.get("model")
    if response.get("system_fingerprint"):
        base["system_fingerprint"] = response["system_fingerprint"]
    events: list[dict[str, Any]] = []
    for choice in response["choices"]:
        events.extend(_choice_chunks(base, choice))
    if include_usage:
        usage = response.get("usage") or _usage_object(entry.usage)
        events.append({**base, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)


def _choice_chunks(base: dict[str, Any], choice: dict[str, Any]) -> list[dict[str, Any]]:
    index = choice.get("index", 0)
    message = choice.get("message") or {}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}]}

    out = [chunk({"role": message.get("role") or "assistant", "content": ""})]
    content = message.get("content")
    if isinstance(content, str) and content:
        if choice.get("logprobs"):  # the log probabilities belong to the whole text: one chunk
            out.append(chunk({"content": content}, logprobs=choice["logprobs"]))
        else:
            out += [chunk({"content": content[i : i + _CONTENT_PIECE]}) for i in range(0, len(content), _CONTENT_PIECE)]
    if message.get("refusal"):
        out.append(chunk({"refusal": message["refusal"]}))
    for position, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        delta = {"index": position, "id": call.get("id"), "type": call.get("type", "function"), "function": function}
        out.append(chunk({"tool_calls": [delta]}))
    if message.get("function_call"):
        out.append(chunk({"function_call": message["function_call"]}))
    out.append(chunk({}, choice.get("finish_reason")))
    return out


def _usage_object(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    total = usage.prompt_tokens + usage.completion_tokens
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": total}


def assemble(events: Iterable[bytes], usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A streamed answer's chunks (raw SSE events) put back together as a chat.completion object."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        chunk = event_data(event)
        if chunk is None:
            continue
        if not head:
            head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if chunk.get(k) is not None}
        for part in chunk.get("choices") or ():
            if isinstance(part, dict) and isinstance(part.get("index", 0), int):
                _merge(choices.setdefault(part.get("index", 0), {"message": {}, "tool_calls": {}}), part)
    if not head or not choices:
        return None
    response: dict[str, Any] = {**head, "object": "chat.completion", "choices": [_choice(i, choices[i]) for i in sorted(choices)]}
    if usage is not None:
        response["usage"] = usage
    return response


def _merge(state: dict[str, Any], part: dict[str, Any]) -> None:
    delta = part.get("delta") or {}
    message = state["message"]
    for name in ("role", "content", "refusal"):
        value = delta.get(name)
        if isinstance(value, str):
            message[name] = value if name == "role" else message.get(name, "") + value
    for call in delta.get("tool_calls") or ():
        slot = state["tool_calls"].setdefault(call.get("index", 0), {"function": {"name": "", "arguments": ""}})
        for name in ("id", "type"):
            if call.get(name):
                slot[name] = call[name]
        function = call.get("function") or {}
        for name in ("name", "arguments"):
            if isinstance(function.get(name), str):
                slot["function"][name] += function[name]
    logprobs = part.get("logprobs")
    if isinstance(logprobs, dict):
        for name in ("content", "refusal"):
            if isinstance(logprobs.get(name), list):
                state.setdefault("logprobs", {}).setdefault(name, []).extend(logprobs[name])
    if part.get("finish_reason"):
        state["finish_reason"] = part["finish_reason"]


def _choice(index: int, state: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": None, **state["message"]}
    if state["tool_calls"]:
        calls = [state["tool_calls"][i] for i in sorted(state["tool_calls"])]
        message["tool_calls"] = [{"id": c.get("id"), "type": c.get("type", "function"), "function": c["function"]} for c in calls]
        if not message["content"]:
            message["content"] = None  # as a non-streamed tool-call answer has it
    return {"index": index, "message": message, "logprobs": state.get("logprobs"), "finish_reason": state.get("finish_reason")}
