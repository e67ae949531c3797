"""The one seam between thrifty and model servers: ``Provider.send(call) -> Reply``.

A provider takes an OpenAI-shaped request body and returns an OpenAI-shaped reply: either
the whole body (``body``) or, for ``stream: true``, an async iterator of raw SSE bytes
(``chunks``) that the route relays as they arrive. Failures are raised as the upstream
branch of the error tree (``UpstreamError`` with the upstream's status and message,
``UpstreamUnavailable``, ``UpstreamTimeout``), with secrets already scrubbed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import orjson

from proxy.errors import UpstreamError
from proxy.redact import Redactor
from proxy.settings import ModelConfig


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


class UpstreamStatus(UpstreamError):
    """An error status from an upstream server, with the ``Retry-After`` it sent (seconds), if any."""

    retry_after: float | None = None


def upstream_error(status: int, body: bytes, redact: Redactor, retry_after: str | None = None) -> UpstreamStatus:
    """Keep the upstream's status and OpenAI-shaped error; scrub secrets from the message."""
    error = _upstream_error(status, body, redact)
    error.retry_after = retry_after_seconds(retry_after)
    return error


def _upstream_error(status: int, body: bytes, redact: Redactor) -> UpstreamStatus:
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
        return UpstreamStatus(
            status,
            redact(message),
            type=str(kind) if kind else None,
            param=str(param) if param is not None else None,
            code=str(code) if code is not None else None,
        )
    if isinstance(error, str):  # some servers (Ollama, vLLM) send {"error": "text"}
        return UpstreamStatus(status, redact(error))
    text = body[:300].decode("utf-8", "replace").strip()
    detail = f": {text}" if text else ""
    return UpstreamStatus(status, redact(f"upstream returned HTTP {status}{detail}"))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
