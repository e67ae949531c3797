"""The one seam between thrifty and model servers: ``Provider.send(call) -> Reply``.

A provider takes an OpenAI-shaped request body and returns an OpenAI-shaped reply: either
the whole body (``body``) or, for ``stream: true``, an async iterator of raw SSE bytes
(``chunks``) that the route relays as they arrive. Failures are raised as the upstream
branch of the error tree (``UpstreamError`` with the upstream's status and message,
``UpstreamUnavailable``, ``UpstreamTimeout``), with secrets already scrubbed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from proxy.config import ModelConfig
from proxy.errors import UpstreamError
from proxy.redact import Redactor


@dataclass(frozen=True, slots=True)
class Call:
    endpoint: str  # "chat/completions" or "embeddings"
    body: bytes  # the JSON body to send: the model name rewritten, include_usage added to streams
    payload: dict[str, Any]  # the client's request as it came, parsed (may differ from body)
    stream: bool
    target: ModelConfig


@dataclass(slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes = b""
    chunks: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop a stream early: closes the upstream connection."""
        if self.chunks is not None:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class Provider(Protocol):
    async def send(self, call: Call) -> Reply: ...

    async def close(self) -> None: ...


def upstream_error(status: int, body: bytes, redact: Redactor) -> UpstreamError:
    """Keep the upstream's status and OpenAI-shaped error; scrub secrets from the message."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or f"upstream returned HTTP {status}")
        kind = error.get("type")
        param = error.get("param")
        code = error.get("code")
        return UpstreamError(
            status,
            redact(message),
            type=str(kind) if kind else None,
            param=str(param) if param is not None else None,
            code=str(code) if code is not None else None,
        )
    if isinstance(error, str):  # some servers (Ollama, vLLM) send {"error": "text"}
        return UpstreamError(status, redact(error))
    text = body[:300].decode("utf-8", "replace").strip()
    detail = f": {text}" if text else ""
    return UpstreamError(status, redact(f"upstream returned HTTP {status}{detail}"))
