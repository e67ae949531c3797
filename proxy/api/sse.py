"""Server-sent events on the stream path: split, read usage, hide what was not asked for.

:class:`StreamTap` sits between the upstream's SSE bytes and the client. It splits the
bytes into events (holding back only an incomplete trailing event), reads ``usage`` from
whichever event carries it (the last chunk may carry both ``choices`` and ``usage``), and,
when thrifty itself asked the upstream for ``stream_options.include_usage``, hides that
usage from a client that did not ask for it. ``data: [DONE]`` is withheld so the route can
put the request's cost (an SSE comment, ignored by SDKs) just before it. Content events are
kept raw so tokens can be counted when no usage comes back (llama.cpp, a cut-off stream).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_DONE = b"data: [DONE]"


class StreamTap:
    def __init__(self, hide_usage: bool):
        self._hide = hide_usage
        self._pending = b""
        self._events: list[bytes] = []
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to relay now: every complete event in ``chunk`` (plus what was pending)."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:  # on the joined bytes: a chunk may end between \r and \n
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        self._pending = data[end + 2 :]
        out = []
        for event in data[: end + 2].split(b"\n\n"):
            if not event:
                continue
            kept = self._event(event)
            if kept is not None:
                out.append(kept)
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def _event(self, event: bytes) -> bytes | None:
        if event.startswith(_DONE):
            self.done = True
            return None
        if _USAGE.search(event) is None:
            self._events.append(event)
            return event
        payload = event_data(event)
        if payload is None:
            return event
        self.usage = payload.get("usage")
        if payload.get("choices"):
            self._events.append(event)  # its content counts too, whoever asked for the usage
        if not self._hide:
            return event
        if not payload.get("choices"):
            return None  # the usage-only chunk thrifty asked for
        payload.pop("usage", None)
        return b"data: " + orjson.dumps(payload)

    @property
    def events(self) -> list[bytes]:
        """The content events relayed so far, raw (the cache reassembles an answer from them)."""
        return self._events

    def text(self) -> list[str]:
        """The content relayed so far (text and tool-call arguments), for counting tokens."""
        parts: list[str] = []
        for event in self._events:
            payload = event_data(event)
            for choice in (payload or {}).get("choices") or ():
                if isinstance(choice, dict):
                    parts.extend(generated_texts(choice.get("delta")))
        return parts


def generated_texts(message: Any) -> list[str]:
    """The generated text of a message or a stream delta: content and tool-call name/arguments."""
    if not isinstance(message, dict):
        return []
    parts = [message["content"]] if isinstance(message.get("content"), str) else []
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.extend(str(function.get(k) or "") for k in ("name", "arguments"))
    return parts


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an SSE event's ``data:`` line, or None."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                value = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def usage_chunk(events: list[bytes], prompt_tokens: int, completion_tokens: int) -> bytes:
    """The final usage-only chunk a client asked for (``stream_options.include_usage``) when
    the upstream sent none (llama.cpp never does): the figures the ledger counted, shaped
    like OpenAI's (same id, model and created as the stream, empty ``choices``)."""
    last = next((p for p in map(event_data, reversed(events)) if p is not None), {})
    chunk = {
        "id": last.get("id", ""),
        "object": "chat.completion.chunk",
        "created": last.get("created", 0),
        "model": last.get("model", ""),
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def cost_comment(cost_usd: str, savings_usd: str) -> bytes:
    return f": thrifty cost_usd={cost_usd} savings_usd={savings_usd}\n\n".encode()
