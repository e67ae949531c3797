"""Request features for routing, read cheaply from a chat payload, the caller and its headers.

One pass over the messages: the last user message's text, whether images, tools or JSON
mode are used, and an upper bound on the prompt's tokens (UTF-8 bytes of the counted text,
plus the framing tiktoken's chat count adds). A token is at least one byte, so the bound
decides most token conditions without loading a tokenizer; the exact count is filled in
(``with_tokens``) only when a rule or a context window needs it. The task class
(``classify``) is computed only when the policy matches on it; budget shares and backend
state are handed in by the router, also only when some rule reads them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from proxy.pipeline.auth import Principal
from proxy.policy.classify import classify as classify_task
from proxy.policy.model import BackendState, Features

# The framing of proxy.cost.tokens.TokenCounter.count_messages, so the bound stays above its count.
_PER_MESSAGE = 4
_REPLY_PRIMER = 3
_IMAGE_TOKENS = 85
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def extract(
    payload: Mapping[str, Any],
    *,
    request_id: str = "",
    principal: Principal | None = None,
    headers: Mapping[str, str] | None = None,
    header_names: Collection[str] = (),
    tags: Mapping[str, str] | None = None,
    now: float = 0.0,
    classify: bool = False,
    budget: Mapping[str, float] | None = None,
    backends: BackendState | None = None,
) -> Features:
    messages = payload.get("messages")
    messages = messages if isinstance(messages, list) else []
    bound = _REPLY_PRIMER
    images = False
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            continue
        bound += _PER_MESSAGE
        for key in ("role", "name"):
            value = message.get(key)
            if isinstance(value, str):
                bound += _size(value)
        content = message.get("content")
        text = ""
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") in _IMAGE_PARTS:
                    images = True
                    bound += _IMAGE_TOKENS
                elif isinstance(part.get("text"), str):
                    parts.append(part["text"])
            text = "\n".join(parts)
        bound += _size(text)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                bound += _size(str(function.get("name", ""))) + _size(str(function.get("arguments", "")))
        if message.get("role") == "user":
            last_user = text
    picked: dict[str, str] = {}
    if headers is not None:
        for name in header_names:
            value = headers.get(name)
            if value is not None:
                picked[name] = value
    json_mode = _json_mode(payload.get("response_format"))
    return Features(
        model=str(payload.get("model") or ""),
        request_id=request_id,
        key_id=principal.key_id if principal else None,
        team=principal.team if principal else None,
        app=principal.app if principal else None,
        tags=tags or {},
        headers=picked,
        last_user=last_user,
        last_user_lower=last_user.lower(),
        tools=bool(payload.get("tools") or payload.get("functions")),
        images=images,
        json_mode=json_mode,
        prompt_bound=bound,
        now=now,
        task_class=classify_task(last_user, json_mode=json_mode is not None) if classify else None,
        budget=budget or {},
        backends=backends,
    )


class StaticBackends:
    """A fixed :class:`BackendState` (``policy explain``, tests): the models named down, given latencies."""

    def __init__(self, down: Collection[str] = (), latency: Mapping[str, float] | None = None):
        self.down = frozenset(down)
        self.latency = dict(latency or {})

    def is_up(self, model: str) -> bool:
        return model not in self.down

    def latency_ms(self, model: str) -> float | None:
        return self.latency.get(model)


def with_tokens(features: Features, tokens: int) -> Features:
    return replace(features, prompt_tokens=tokens)


def _size(text: str) -> int:
    """UTF-8 length: the count of an ASCII string is free (``isascii`` reads a flag)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_mode(response_format: Any) -> str | None:
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            return str(kind)
    return None
