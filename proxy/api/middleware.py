"""The one error middleware: request ids, and every failure in OpenAI's error shape.

Each request gets an id (the client's ``x-request-id`` when it is sane, else a new one),
kept in ``request[REQUEST_ID]`` for the handlers and echoed on every response. Errors from
the pipeline (:class:`ThriftyError`), aiohttp's own HTTP errors (unknown path, wrong method,
body over the size limit) and unexpected exceptions all leave here as
``{"error": {"message", "type", "param", "code"}}``; an unexpected exception is logged with
its traceback (scrubbed of secrets) and shown to the client only as an internal error.
"""

from __future__ import annotations

import logging
import os

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.errors import MethodNotAllowed, NotFound, PayloadTooLarge, ThriftyError

log = logging.getLogger("thrifty.api")

REQUEST_ID = web.RequestKey("request_id", str)
_JSON = "application/json"


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128 and given.isprintable():
        return given
    return "req_" + os.urandom(12).hex()


def error_response(exc: ThriftyError, request_id: str) -> web.Response:
    headers = {**exc.headers, "Content-Type": _JSON, "x-request-id": request_id}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=exc.status, body=orjson.dumps(exc.body()), headers=headers)


def _from_http(exc: web.HTTPException, request: web.Request) -> ThriftyError:
    if exc.status == 413:
        return PayloadTooLarge(f"The request body is larger than the limit of this server ({exc.text}).")
    if exc.status == 404:
        return NotFound(f"Unknown path {request.path!r}; see GET /v1/models and POST /v1/chat/completions.")
    if exc.status == 405:
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path!r}.")
    error = ThriftyError(exc.text or exc.reason)
    error.status = exc.status
    return error


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    try:
        return await handler(request)
    except ThriftyError as exc:
        return error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(_from_http(exc, request), request_id)
        if "Allow" in exc.headers:  # a 405 must name the methods that are allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (ConnectionResetError, BrokenPipeError):
        raise  # the client went away; nothing to answer
    except Exception:
        log.exception("unexpected error handling %s %s (request %s)", request.method, request.path, request_id)
        return error_response(ThriftyError("Internal error in thrifty; see the server log."), request_id)
