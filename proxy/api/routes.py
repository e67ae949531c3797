"""Routes: thin handlers that run a request through the pipeline stages.

``/v1/chat/completions`` and ``/v1/embeddings`` (also without the ``/v1`` prefix, for
clients whose base URL omits it), ``/v1/models``, ``/health`` and ``/ready``. A streamed
reply is relayed chunk by chunk; the response starts only once the upstream's first chunk
is in hand, so a failure before that is still an ordinary error response.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Callable

import orjson
from aiohttp import web

from proxy.api import wire
from proxy.api.admin import add_admin_routes
from proxy.api.admin_page import add_admin_page_route
from proxy.api.feedback import add_feedback_routes
from proxy.api.middleware import REQUEST_ID
from proxy.api.reports import add_report_routes
from proxy.api.sse import StreamTap, cost_comment, usage_chunk
from proxy.app_state import GATEWAY, Gateway
from proxy.cache.entry import Entry, replay, response_body
from proxy.cost.pricing import usage_from_openai, usd
from proxy.errors import AuthenticationFailed, ModelNotFound, NotFound, NotReady, ThriftyError, UpstreamUnavailable
from proxy.pipeline.auth import Principal, bearer_token
from proxy.pipeline.cache import Plan
from proxy.pipeline.exchange import Exchange
from proxy.pipeline.guard import Ticket, hold_price
from proxy.pipeline.ratelimit import Pass
from proxy.pipeline.upstream import Served
from proxy.telemetry import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("thrifty.api")

_JSON = "application/json"
_EVENT_STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BUDGET = web.RequestKey("budget_ticket", Ticket)  # the request's budget hold, settled once in _proxied
_RATE = web.RequestKey("rate_pass", Pass)  # the request's rate-limit count, its tokens corrected once in _proxied


async def _authenticate(gateway: Gateway, request: web.Request) -> Principal:
    headers = request.headers
    token = bearer_token(headers.get("Authorization"), headers.get("x-api-key"))
    return await gateway.auth.authenticate(token)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxied(request, "chat/completions", wire.parse_chat)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _proxied(request, "embeddings", wire.parse_embeddings)


async def _proxied(request: web.Request, endpoint: str, parse: Callable[[bytes], wire.ParsedRequest]) -> web.StreamResponse:
    """Authenticate, then run the pipeline; every authenticated request leaves one ledger record."""
    gateway = request.app[GATEWAY]
    principal = await _authenticate(gateway, request)
    exchange = Exchange(request[REQUEST_ID], endpoint, principal=principal)
    try:
        parsed = parse(await request.read())
        return await _forward(request, gateway, parsed, exchange)
    except ThriftyError as exc:
        exchange.status, exchange.error_code = exc.status, exc.code or exc.type
        if _RATE in request:  # a limited caller's error responses carry its x-ratelimit-* headers too
            exc.add_headers(request[_RATE].headers)
        raise
    except asyncio.CancelledError:
        exchange.status, exchange.error_code = 499, "client_disconnected"
        raise
    except Exception:
        exchange.status, exchange.error_code = 500, "internal_error"
        raise
    finally:
        settle: Callable[[Exchange], None] | None = None
        if _BUDGET in request and gateway.guard is not None:
            settle = functools.partial(gateway.guard.settle, request[_BUDGET])
        if _RATE in request and gateway.limiter is not None:
            settle = _both(settle, functools.partial(gateway.limiter.settle, request[_RATE]))
        gateway.ledger.record(exchange, then=settle)  # prices the exchange if nothing did yet


def _both(first: Callable[[Exchange], None] | None, second: Callable[[Exchange], None]) -> Callable[[Exchange], None]:
    def settle(exchange: Exchange) -> None:
        if first is not None:
            first(exchange)
        second(exchange)

    return settle


async def _forward(request: web.Request, gateway: Gateway, parsed: wire.ParsedRequest, exchange: Exchange) -> web.StreamResponse:
    exchange.requested_model, exchange.payload, exchange.stream = parsed.model, parsed.payload, parsed.stream
    tag_header = request.headers.get("x-thrifty-tags")
    if tag_header or "metadata" in parsed.payload:
        exchange.tags = wire.parse_tags(tag_header, parsed.payload.get("metadata"))
    if gateway.router is not None:
        parsed = await gateway.router.route(exchange, parsed, request.headers)
    target = gateway.models.get(parsed.model)
    if target is None:
        raise ModelNotFound(f"The model '{parsed.model}' does not exist or is not configured on this gateway.", param="model")
    exchange.target = target
    plan = gateway.cache.plan(exchange, request.headers.get("Cache-Control")) if gateway.cache else None
    if plan is not None and plan.read and gateway.cache is not None:
        hit = await gateway.cache.lookup(plan)
        if hit is not None:
            return await _answer_cached(request, gateway, exchange, hit)
    parsed = await gateway.pruner.prune(exchange, parsed, request.headers) if gateway.pruner else parsed
    rate = await gateway.limiter.admit(exchange) if gateway.limiter else None
    if rate is not None:
        request[_RATE] = rate
    ticket = await gateway.guard.admit(exchange, hold_price(exchange, gateway.ledger.price_of)) if gateway.guard else None
    if ticket is not None:
        request[_BUDGET] = ticket
    assert gateway.upstream is not None  # built at start-up
    exchange.upstream_started = time.perf_counter()
    served = await gateway.upstream.serve(exchange, parsed)  # retries, fallbacks, cascade; sets exchange.target
    reply = served.reply
    headers = {"x-request-id": exchange.request_id, "x-thrifty-model": served.target.name}
    if rate is not None:
        headers.update(rate.headers)
    if exchange.route is not None:
        headers["x-thrifty-route"] = exchange.route
    if gateway.cache is not None and exchange.endpoint == "chat/completions":
        headers["x-thrifty-cache"] = exchange.cache
    if ticket is not None and ticket.warning:
        headers["x-thrifty-budget-warning"] = ticket.warning
    if exchange.prune is not None:  # what pruning did, and the prompt's size before it
        headers["x-thrifty-prune"] = f"{exchange.prune}; tokens_before={exchange.prompt_tokens_before}"
    if reply.chunks is not None:
        return await _relay(request, gateway, exchange, served, headers, plan)
    exchange.upstream_done = time.perf_counter()
    exchange.usage = wire.usage_of(reply.body)
    if exchange.usage is None:  # an upstream that reports no usage: the ledger counts
        exchange.streamed_text = wire.reply_texts(reply.body)
        await gateway.ledger.count(exchange)
    priced = gateway.ledger.price(exchange)
    headers["x-thrifty-cost-usd"] = usd(priced.cost)
    headers["x-thrifty-savings-usd"] = usd(priced.net_savings)
    headers["Content-Type"] = reply.content_type
    if plan is not None and reply.status == 200 and gateway.cache is not None:
        gateway.cache.store_reply(plan, reply.body, exchange.usage)
    return web.Response(status=reply.status, body=reply.body, headers=headers)


async def _relay(
    request: web.Request,
    gateway: Gateway,
    exchange: Exchange,
    served: Served,
    headers: dict[str, str],
    plan: Plan | None = None,
) -> web.StreamResponse:
    reply = served.reply
    chunks = reply.chunks
    assert chunks is not None
    tap = StreamTap(served.hide_usage)
    try:
        # The first chunk is in hand (the upstream stage read it, so a stream that died before
        # it could still fall back); from here on a failure ends the stream with an error event.
        response = web.StreamResponse(status=reply.status, headers={**_EVENT_STREAM_HEADERS, **headers})
        await response.prepare(request)
        try:
            out = tap.feed(served.first)
            if out:
                await response.write(out)
            async for chunk in chunks:
                out = tap.feed(chunk)
                if out:
                    await response.write(out)
        except ThriftyError as exc:  # the upstream broke off after bytes reached the client
            log.warning("stream for request %s broke off: %s", exchange.request_id, exc.message)
            exchange.status, exchange.error_code = exc.status, exc.code or exc.type
            await response.write(wire.sse_error(exc))
            return response
        exchange.upstream_done = time.perf_counter()
        if not tap.done:
            incomplete = UpstreamUnavailable("The upstream ended the stream before it was complete.")
            exchange.status, exchange.error_code = incomplete.status, incomplete.code
            await response.write(wire.sse_error(incomplete))
            return response
        _settle(exchange, tap)
        await gateway.ledger.count(exchange)
        priced = gateway.ledger.price(exchange)
        if plan is not None and reply.status == 200 and gateway.cache is not None:
            gateway.cache.store_stream(plan, tap.events, tap.usage, exchange.usage)
        tail = cost_comment(usd(priced.cost), usd(priced.net_savings)) + wire.SSE_DONE
        if tap.usage is None and exchange.usage is not None and wire.wants_usage(exchange.payload or {}):
            tail = usage_chunk(tap.events, exchange.usage.prompt_tokens, exchange.usage.completion_tokens) + tail
        await response.write(tail)
        await response.write_eof()
        return response
    except ConnectionResetError:  # the client closed while its stream was being written
        exchange.status, exchange.error_code = 499, "client_disconnected"
        log.info("client of request %s disconnected mid-stream", exchange.request_id)
        return response  # aiohttp's own write_eof then meets the closed transport quietly
    finally:
        if exchange.usage is None:
            _settle(exchange, tap)
        await reply.aclose()


async def _answer_cached(request: web.Request, gateway: Gateway, exchange: Exchange, hit: Entry) -> web.StreamResponse:
    """A cache hit: the stored answer (replayed as a stream if one was asked for), at no cost."""
    exchange.cache, exchange.usage = exchange.cache, hit.usage
    if hit.usage is None:
        exchange.streamed_text = wire.reply_texts(response_body(hit))
        await gateway.ledger.count(exchange)
    priced = gateway.ledger.price(exchange)
    assert exchange.target is not None
    headers = {
        "x-request-id": exchange.request_id,
        "x-thrifty-model": exchange.target.name,
        "x-thrifty-cache": exchange.cache,
        "x-thrifty-cost-usd": usd(priced.cost),
        "x-thrifty-savings-usd": usd(priced.net_savings),
    }
    if exchange.route is not None:
        headers["x-thrifty-route"] = exchange.route
    if not exchange.stream:
        return web.Response(body=response_body(hit), headers={**headers, "Content-Type": _JSON})
    include_usage = wire.wants_usage(exchange.payload or {})
    exchange.first_byte = time.perf_counter()
    response = web.StreamResponse(status=200, headers={**_EVENT_STREAM_HEADERS, **headers})
    await response.prepare(request)
    body = replay(hit, include_usage) + cost_comment(usd(priced.cost), usd(priced.net_savings)) + wire.SSE_DONE
    await response.write(body)
    await response.write_eof()
    return response


def _settle(exchange: Exchange, tap: StreamTap) -> None:
    """Usage from the stream, or the relayed text for the ledger to count."""
    exchange.usage = usage_from_openai(tap.usage) if tap.usage else None
    if exchange.usage is None:
        exchange.streamed_text = tap.text()


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
    body = {
        "status": "ready",
        "models": len(gateway.models),
        "config": gateway.settings.source or "(none: zero-config)",
    }
    return web.Response(body=orjson.dumps(body), headers={"Content-Type": _JSON})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus scrape: the whole server's figures (every worker's), see ``proxy.telemetry``."""
    telemetry = request.app[GATEWAY].telemetry
    if telemetry is None or not telemetry.config.metrics:
        raise NotFound("Metrics are turned off (telemetry.metrics: false).")
    wanted = telemetry.config.metrics_token
    if wanted is not None:
        given = bearer_token(request.headers.get("Authorization"), None)
        if given is None or not secrets.compare_digest(given.encode(), wanted.encode()):
            raise AuthenticationFailed("/metrics needs the telemetry.metrics_token as a bearer token.")
    return web.Response(body=await telemetry.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    add_report_routes(app)
    add_feedback_routes(app)
    add_admin_routes(app)
    add_admin_page_route(app)
