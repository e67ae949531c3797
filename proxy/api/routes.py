"""Routes: thin handlers that run a request through the pipeline stages.

``/v1/chat/completions`` and ``/v1/embeddings`` (also without the ``/v1`` prefix, for
clients whose base URL omits it), ``/v1/models``, ``/health`` and ``/ready``. A streamed
reply is relayed chunk by chunk; the response starts only once the upstream's first chunk
is in hand, so a failure before that is still an ordinary error response.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from proxy.api import wire
from proxy.api.middleware import REQUEST_ID
from proxy.app_state import GATEWAY, Gateway
from proxy.errors import ModelNotFound, NotReady, ThriftyError, UpstreamUnavailable
from proxy.pipeline.auth import Principal, bearer_token
from proxy.providers.base import Call, Reply

log = logging.getLogger("thrifty.api")

_JSON = "application/json"
_EVENT_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _authenticate(gateway: Gateway, request: web.Request) -> Principal:
    headers = request.headers
    token = bearer_token(headers.get("Authorization"), headers.get("x-api-key"))
    return await gateway.auth.authenticate(token)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    await _authenticate(gateway, request)
    parsed = wire.parse_chat(await request.read())
    return await _forward(request, gateway, parsed, "chat/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    await _authenticate(gateway, request)
    parsed = wire.parse_embeddings(await request.read())
    return await _forward(request, gateway, parsed, "embeddings")


async def _forward(request: web.Request, gateway: Gateway, parsed: wire.ParsedRequest, endpoint: str) -> web.StreamResponse:
    target = gateway.models.get(parsed.model)
    if target is None:
        raise ModelNotFound(f"The model '{parsed.model}' does not exist or is not configured on this gateway.", param="model")
    call = Call(endpoint, wire.for_target(parsed, target.target_model), parsed.payload, parsed.stream, target)
    reply = await gateway.providers[target.name].send(call)
    headers = {"x-request-id": request[REQUEST_ID], "x-thrifty-model": target.name}
    if reply.chunks is None:
        headers["Content-Type"] = reply.content_type
        return web.Response(status=reply.status, body=reply.body, headers=headers)
    return await _relay(request, reply, headers)


async def _relay(request: web.Request, reply: Reply, headers: dict[str, str]) -> web.StreamResponse:
    chunks = reply.chunks
    assert chunks is not None
    try:
        first = await anext(chunks, b"")  # errors here still become a normal error response
        response = web.StreamResponse(status=reply.status, headers={**_EVENT_STREAM_HEADERS, **headers})
        await response.prepare(request)
        tail = first[-32:]
        try:
            if first:
                await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
                tail = (tail + chunk)[-32:]
        except ThriftyError as exc:  # the upstream broke off after bytes reached the client
            log.warning("stream for request %s broke off: %s", request[REQUEST_ID], exc.message)
            await response.write(wire.sse_error(exc))
            return response
        if b"[DONE]" not in tail:
            incomplete = UpstreamUnavailable("The upstream ended the stream before it was complete.")
            await response.write(wire.sse_error(incomplete))
            return response
        await response.write_eof()
        return response
    finally:
        await reply.aclose()


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    await _authenticate(gateway, request)
    return web.Response(body=gateway.models_body, headers={"Content-Type": _JSON, "x-request-id": request[REQUEST_ID]})


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', headers={"Content-Type": _JSON})


async def ready(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    problems = await gateway.check_stores()
    if problems:
        raise NotReady("Not ready: " + "; ".join(problems))
    body = {"status": "ready", "models": len(gateway.models), "config": gateway.settings.source or "(none: zero-config)"}
    return web.Response(body=orjson.dumps(body), headers={"Content-Type": _JSON})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
