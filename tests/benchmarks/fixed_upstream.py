"""A fixed-reply OpenAI-compatible upstream for overhead benchmarks: as cheap as aiohttp allows.

Every chat completion gets the same small canned ``chat.completion`` JSON; a request with
``"stream": true`` gets a canned SSE stream of 10 chunks (role, 8 content pieces, finish)
plus a usage chunk when ``stream_options.include_usage`` asks for it, then ``data: [DONE]``.
A few upstream model names behave otherwise, for the soak test (``soak.py``): ``bench-fail``
answers 500, ``bench-slow`` answers after 0.3 s, ``bench-nousage`` streams without a usage
chunk even when asked; ``POST /v1/embeddings`` answers a fixed 8-dimension vector per input.
No access log, uvloop when installed, loopback only. It runs as its own process:

    python -m tests.benchmarks.fixed_upstream --port 8999
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
from aiohttp import web

MODEL = "bench-model"
_BASE: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": MODEL,
}
_WORDS = ["Hello", " there,", " this", " is", " a", " canned", " reply", "."]
_USAGE = {"prompt_tokens": 12, "completion_tokens": len(_WORDS), "total_tokens": 12 + len(_WORDS)}

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(_WORDS)},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
    }
)


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {**_BASE, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


STREAM_CHUNKS: tuple[bytes, ...] = (
    _event(_choice({"role": "assistant", "content": ""})),
    *(_event(_choice({"content": word})) for word in _WORDS),
    _event(_choice({}, "stop")),
)
USAGE_CHUNK = _event({**_BASE, "choices": [], "usage": _USAGE})
DONE = b"data: [DONE]\n\n"
_JSON_HEADERS = {"Content-Type": "application/json"}
_FAIL = orjson.dumps({"error": {"message": "bench-fail always fails", "type": "server_error", "code": None}})
_VECTOR = [0.125, -0.25, 0.5, 0.0, 0.75, -0.5, 0.25, 0.125]
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    payload = orjson.loads(raw) if raw else {}
    if not isinstance(payload, dict):
        return web.Response(body=COMPLETION, headers=_JSON_HEADERS)
    model = payload.get("model")
    if model == "bench-fail":
        return web.Response(status=500, body=_FAIL, headers=_JSON_HEADERS)
    if model == "bench-slow":
        await asyncio.sleep(0.3)
    if payload.get("stream") is not True:
        return web.Response(body=COMPLETION, headers=_JSON_HEADERS)
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    for chunk in STREAM_CHUNKS:
        await response.write(chunk)
    if (payload.get("stream_options") or {}).get("include_usage") and model != "bench-nousage":
        await response.write(USAGE_CHUNK)
    await response.write(DONE)
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.Response:
    payload = orjson.loads(await request.read() or b"{}")
    texts = payload.get("input") if isinstance(payload, dict) else None
    count = len(texts) if isinstance(texts, list) else 1
    data = [{"object": "embedding", "index": i, "embedding": _VECTOR} for i in range(count)]
    usage = {"prompt_tokens": 4 * count, "total_tokens": 4 * count}
    body = {"object": "list", "data": data, "model": payload.get("model", MODEL), "usage": usage}
    return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
    return web.Response(body=orjson.dumps(body), headers=_JSON_HEADERS)


def make_app() -> web.Application:
    app = web.Application()
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", models)
    return app


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    print(f"fixed upstream listening on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args.host, args.port))
    else:
        uvloop.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
