"""The OpenAI wire format at the edge: request parsing and validation, SSE pieces.

Parsing is strict about what thrifty itself needs (``model``, ``messages``/``input``,
``stream``) and names the field that is wrong; every other field passes through to the
upstream untouched, including ones OpenAI adds after this was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.errors import BadRequest, ThriftyError

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    stream: bool
    payload: dict[str, Any]
    raw: bytes


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise BadRequest("The request body is empty; expected a JSON object.")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.")
    return payload


def _model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise BadRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string.", param="model", code="invalid_type")
    return model


def _stream(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    return stream


def parse_chat(raw: bytes) -> ParsedRequest:
    payload = parse_body(raw)
    model = _model(payload)
    messages = payload.get("messages")
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages", code="invalid_type")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(
                f"Each message must be an object with a 'role'; messages[{index}] is not.",
                param=f"messages[{index}]",
                code="invalid_type",
            )
    return ParsedRequest(model, _stream(payload), payload, raw)


def parse_embeddings(raw: bytes) -> ParsedRequest:
    payload = parse_body(raw)
    model = _model(payload)
    if payload.get("input") in (None, "", []):
        raise BadRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    return ParsedRequest(model, False, payload, raw)


def for_target(request: ParsedRequest, upstream_model: str) -> bytes:
    """The body to send upstream: the client's own bytes unless the model name must change."""
    if upstream_model == request.model:
        return request.raw
    payload = dict(request.payload)
    payload["model"] = upstream_model
    return orjson.dumps(payload)


def sse_error(exc: ThriftyError) -> bytes:
    """An error event in a stream: the OpenAI SDKs raise on a data event with an 'error' key."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"
