"""The OpenAI wire format at the edge: request parsing and validation, SSE pieces.

Parsing is strict about what thrifty itself needs (``model``, ``messages``/``input``,
``stream``) and names the field that is wrong; every other field passes through to the
upstream untouched, including ones OpenAI adds after this was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.api.sse import generated_texts
from proxy.cost.pricing import Usage, usage_from_openai
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
        raise BadRequest("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
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


def wants_usage(payload: dict[str, Any]) -> bool:
    """Whether the client asked for a stream's final usage chunk (``stream_options.include_usage``)."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def for_target(request: ParsedRequest, upstream_model: str) -> tuple[bytes, bool]:
    """The body to send upstream, and whether thrifty added ``include_usage`` itself.

    The client's own bytes go through unless something must change: the model name (an
    alias), or ``stream_options.include_usage``, which every stream asks for so that it
    can be priced; the route then hides that usage chunk from a client that did not ask.
    """
    changes: dict[str, Any] = {}
    if upstream_model != request.model:
        changes["model"] = upstream_model
    added_usage = False
    if request.stream:
        options = request.payload.get("stream_options")
        if not wants_usage(request.payload):
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            added_usage = True
    if not changes:
        return request.raw, False
    return orjson.dumps({**request.payload, **changes}), added_usage


def parse_tags(header: str | None, metadata: Any) -> dict[str, str] | None:
    """Tags from ``x-thrifty-tags: a=1, b`` and the request's ``metadata`` object."""
    tags: dict[str, str] = {}
    if isinstance(metadata, dict):
        tags.update({str(k): str(v) for k, v in metadata.items()})
    if header:
        for item in header.split(","):
            key, _, value = item.partition("=")
            if key.strip():
                tags[key.strip()[:64]] = value.strip()[:256]
    return tags or None


def usage_of(body: bytes) -> Usage | None:
    """The ``usage`` of a JSON reply, if it has one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_from_openai(data.get("usage")) if isinstance(data, dict) else None


def reply_texts(body: bytes) -> list[str]:
    """The generated text of a JSON reply (content and tool-call arguments), for counting."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    choices = data.get("choices") or () if isinstance(data, dict) else ()
    return [text for choice in choices if isinstance(choice, dict) for text in generated_texts(choice.get("message"))]


def sse_error(exc: ThriftyError) -> bytes:
    """An error event in a stream: the OpenAI SDKs raise on a data event with an 'error' key."""
    return b"data: " + orjson.dumps(exc.body()) + b"\n\n"
