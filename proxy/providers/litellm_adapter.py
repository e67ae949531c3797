"""The provider for upstreams that do not speak OpenAI's wire format (Anthropic), via litellm.

It sits where :mod:`proxy.providers.openai_compat` sits in the pipeline, behind the same
``send(call) -> Reply`` seam: the OpenAI-shaped request is handed to ``litellm.acompletion``
(which translates it to Anthropic's Messages API), and litellm's answer is rebuilt as a clean
OpenAI ``chat.completion`` body or a stream of ``chat.completion.chunk`` SSE events ending in
``[DONE]``. Only parameters from an allowlist reach litellm (a client must not be able to set
litellm's own ``api_base``, ``api_key`` or ``mock_response``); OpenAI parameters Anthropic
lacks are dropped by litellm (``drop_params``). Failures are mapped onto the error tree from
the real HTTP status and Anthropic's own error body found in the exception chain, not from
litellm's guessed exception class (it turns a 400 whose message says "overloaded" into a 500).

litellm is imported by the constructor, i.e. at app start-up, never per request: the import
takes seconds and, without ``LITELLM_LOCAL_MODEL_COST_MAP``, reaches for the network. Its
process-wide switches are set once there: no debug banners, no bug-report links, no
callbacks, prompts redacted from its exceptions, its loggers routed through thrifty's
redacting root handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson

from proxy.errors import ThriftyError, UnsupportedRequest, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from proxy.providers.base import Call, Reply
from proxy.redact import RedactingFilter, Redactor
from proxy.settings import ModelConfig

log = logging.getLogger("thrifty.providers.litellm")

JSON = "application/json"
SSE_DONE = b"data: [DONE]\n\n"

# OpenAI chat parameters handed to litellm; it maps the ones Anthropic knows (max_tokens,
# stop -> stop_sequences, user -> metadata.user_id, tools, tool_choice, parallel_tool_calls,
# response_format, reasoning_effort...) and drops the rest. "metadata" is not among them:
# litellm takes it as its own logging metadata, and Anthropic's metadata holds only user_id.
_OPENAI_PARAMS = frozenset(
    {
        "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools", "tool_choice",
        "parallel_tool_calls", "user", "response_format", "reasoning_effort", "web_search_options",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "seed",
        "service_tier", "store", "modalities", "audio", "prediction", "functions", "function_call",
        "prompt_cache_key", "safety_identifier", "verbosity",
    }
)  # fmt: skip
# Anthropic's own knobs that OpenAI clients send through extra_body.
_NATIVE_PARAMS = frozenset({"top_k", "thinking"})
# thrifty's provider name -> litellm's model prefix, where they differ.
_LITELLM_PREFIXES: dict[str, str] = {}

# Modules litellm imports lazily on its first call (seen with 1.106): importing them at
# start-up keeps that first request from stalling the event loop for half a second.
_WARM_MODULES = (
    "litellm.litellm_core_utils.default_encoding",
    "litellm.llms.anthropic.completion.transformation",
    "litellm.proxy._types",
    "litellm._service_logger",
    "litellm.types.litellm_core_utils.streaming_chunk_builder_utils",
    "anyio._backends._asyncio",
)
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


def load_litellm(redact: Redactor) -> Any:
    """Import litellm once, offline and quiet; returns the module."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_DISABLE_BUG_REPORT_LINK", "true")
    os.environ.setdefault("LITELLM_LOG", "WARNING")
    loggers = [logging.getLogger(name) for name in _LITELLM_LOGGERS]
    for logger in loggers:  # before the import: litellm logs at DEBUG while it loads
        logger.setLevel(logging.WARNING)
    litellm: Any = importlib.import_module("litellm")
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.telemetry = False
    litellm.turn_off_message_logging = True
    litellm.redact_messages_in_exceptions = True
    litellm.drop_params = True
    for name in ("callbacks", "success_callback", "failure_callback", "input_callback", "service_callback"):
        setattr(litellm, name, [])
    for name in ("_async_success_callback", "_async_failure_callback"):
        setattr(litellm, name, [])
    for logger in loggers:
        logger.handlers.clear()  # its own stderr handler would bypass thrifty's redaction
        for old in [f for f in logger.filters if isinstance(f, RedactingFilter)]:
            logger.removeFilter(old)  # the latest app's keys (tests build several apps)
        logger.addFilter(RedactingFilter(redact))
    for module in _WARM_MODULES:
        with contextlib.suppress(ImportError):  # another litellm version: a slower first call
            importlib.import_module(module)
    with warnings.catch_warnings():  # pydantic builds the response schemas on first use
        warnings.simplefilter("ignore")
        litellm.ModelResponse()
        litellm.ModelResponseStream()
    return litellm


class LiteLLMProvider:
    def __init__(self, model: ModelConfig, redact: Redactor):
        self._target = model
        self._redact = redact
        self._prefix = _LITELLM_PREFIXES.get(model.provider, model.provider)
        self._litellm = load_litellm(redact)
        t = model.timeouts
        self._timeout = httpx.Timeout(connect=t.connect, read=t.first_byte, write=t.first_byte, pool=t.connect)
        # An HTTP client owned by this provider (pooled, closed with the app) rather than
        # litellm's process-wide cached one, which outlives the event loop it was made on.
        handlers = importlib.import_module("litellm.llms.custom_httpx.http_handler")
        self._client = handlers.AsyncHTTPHandler(timeout=self._timeout)
        base = model.base_url.rstrip("/")
        # litellm appends /v1/messages itself; accept a base given with /v1 as well.
        self._api_base = base.removesuffix("/v1/messages").removesuffix("/v1")

    async def send(self, call: Call) -> Reply:
        if call.endpoint != "chat/completions":
            raise UnsupportedRequest(
                f"The model '{self._target.name}' is served by {self._target.provider}, which has no "
                f"{call.endpoint} endpoint; use an embeddings model for /v1/{call.endpoint}.",
                param="model",
            )
        # The body, not ``call.payload``, is what the pipeline decided to send (it may have
        # added stream_options.include_usage, or pruned the conversation); parsing it also
        # hands litellm a private copy to transform.
        payload = orjson.loads(call.body)
        arguments = self._arguments(payload, call.stream)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._target.timeouts.total
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._litellm.acompletion(**arguments)
        except Exception as exc:  # litellm raises anything from anywhere: map it at this one seam
            raise self._failure(exc) from None
        if call.stream:
            include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
            return Reply(200, "text/event-stream", chunks=self._relay(response, include_usage, deadline))
        return Reply(200, JSON, body=orjson.dumps(completion_body(response.model_dump())))

    def _arguments(self, payload: dict[str, Any], stream: bool) -> dict[str, Any]:
        n = payload.get("n")
        if n is not None and n != 1:
            raise UnsupportedRequest(
                f"The model '{self._target.name}' ({self._target.provider}) returns one choice per request; 'n' must be 1.",
                param="n",
            )
        arguments: dict[str, Any] = {
            key: value for key, value in payload.items() if (key in _OPENAI_PARAMS or key in _NATIVE_PARAMS) and value is not None
        }
        arguments.update(
            model=f"{self._prefix}/{self._target.target_model}",
            messages=payload["messages"],
            api_base=self._api_base,
            api_key=self._target.api_key,
            timeout=self._timeout,
            client=self._client,
            drop_params=True,
            max_retries=0,
            num_retries=0,
            # Without this, litellm 1.106 imports its MCP gateway (and the absent `mcp`
            # package) for any request that carries tools.
            _skip_mcp_handler=True,
        )
        if stream:
            arguments.update(stream=True, stream_options={"include_usage": True})
        return arguments

    async def _relay(self, stream: Any, include_usage: bool, deadline: float) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        last: dict[str, Any] = {}
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # see send()
                    raise self._failure(exc, mid_stream=True) from None
                data = chunk.model_dump()
                if data.get("usage"):
                    usage = data["usage"]
                out = chunk_body(data)
                if out is not None:
                    last = out
                    yield b"data: " + orjson.dumps(out) + b"\n\n"
            if include_usage and usage is not None:
                final = {**last, "object": "chat.completion.chunk", "choices": [], "usage": usage_body(usage)}
                yield b"data: " + orjson.dumps(final) + b"\n\n"
            yield SSE_DONE
        finally:
            # Closing litellm's stream closes the upstream response, so Anthropic stops
            # generating for a client that went away.
            try:
                await stream.aclose()
            except Exception as exc:  # a failed close must not hide the stream's own outcome
                log.debug("closing the litellm stream failed: %s", type(exc).__name__)

    def _failure(self, exc: BaseException, *, mid_stream: bool = False) -> ThriftyError:
        name = self._target.name
        status, kind, message = _upstream_error(exc)
        if status is not None:
            text = message or f"upstream for model {name!r} returned HTTP {status}"
            return UpstreamError(status, self._redact(text[:1000]), type=kind)
        chain = list(_causes(exc))
        if any(isinstance(e, (TimeoutError, httpx.TimeoutException, self._litellm.Timeout)) for e in chain):
            when = "stalled mid-stream" if mid_stream else "did not answer in time"
            return UpstreamTimeout(f"upstream for model {name!r} {when}")
        if any(isinstance(e, (httpx.TransportError, OSError)) for e in chain):
            when = "broke off mid-stream" if mid_stream else "could not be reached"
            detail = self._redact(str(chain[-1]))[:300] or type(chain[-1]).__name__
            return UpstreamUnavailable(f"upstream for model {name!r} {when}: {detail}")
        detail = self._redact(message or _first_line(str(exc)))[:300] or type(exc).__name__
        if mid_stream and message:  # an error event inside the stream (e.g. overloaded_error)
            return UpstreamError(502, detail, type=kind)
        if getattr(exc, "status_code", None) == 400:  # litellm refused to translate the request
            return UpstreamError(400, detail, type="invalid_request_error")
        log.warning("litellm call for model %r failed: %s: %s", name, type(exc).__name__, detail)
        return UpstreamUnavailable(f"upstream for model {name!r} failed: {detail}")

    async def close(self) -> None:
        await self._client.close()
        # litellm queues its (here empty) logging work on a process-wide worker task bound to
        # the loop of its first call; stop it with the app so no task outlives its loop.
        workers = importlib.import_module("litellm.litellm_core_utils.logging_worker")
        worker = getattr(workers, "GLOBAL_LOGGING_WORKER", None)
        if worker is not None and getattr(worker, "_bound_loop", None) is asyncio.get_running_loop():
            await worker.stop()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what caused it, and so on (litellm wraps the real error several times)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        yield current
        original = getattr(current, "original_exception", None)
        nxt = current.__cause__ or current.__context__
        current = nxt if nxt is not None else original if isinstance(original, BaseException) else None


def _upstream_error(exc: BaseException) -> tuple[int | None, str | None, str | None]:
    """The upstream's real HTTP status, and Anthropic's error type and message, if in the chain.

    litellm's provider exception (``AnthropicError``) carries the upstream body as its
    ``message`` and the ``httpx.HTTPStatusError`` below it the real status; litellm's own
    wrappers carry messages of their own making ("litellm.RateLimitError: ..."), skipped.
    """
    status: int | None = None
    kind: str | None = None
    message: str | None = None
    for cause in _causes(exc):
        if status is None and isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
        body = getattr(cause, "message", None)
        if message is None and hasattr(cause, "status_code") and isinstance(body, str | bytes):
            kind, message = _anthropic_error(body)
    return status, kind, message


def _anthropic_error(body: str | bytes) -> tuple[str | None, str | None]:
    """Parse ``{"type": "error", "error": {"type", "message"}}``; else the bare text."""
    text = (body.decode("utf-8", "replace") if isinstance(body, bytes) else body).strip()
    if not text or text.startswith("litellm."):
        return None, None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, text
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        kind = error.get("type")
        return (str(kind) if kind else None), str(error.get("message") or "") or None
    return None, text


_LITELLM_PREFIX = re.compile(r"^(?:litellm\.\w+: )+(?:Anthropic(?:Exception|Error) - )?")


def _first_line(text: str) -> str:
    """litellm's message without its class-name prefix, traceback and advice."""
    line = text.strip().split("\n", 1)[0]
    return _LITELLM_PREFIX.sub("", line).split(". Handle with `litellm", 1)[0]


def usage_body(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage: prompt_tokens counts cached ones too; cached_tokens says how many."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    prompt_details = usage.get("prompt_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") or usage.get("cache_read_input_tokens") or 0
    details: dict[str, int] = {"cached_tokens": int(cached)}
    written = usage.get("cache_creation_input_tokens") or prompt_details.get("cache_creation_tokens") or 0
    if written:  # Anthropic bills prompt-cache writes above the input price
        details["cache_creation_tokens"] = int(written)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
        "completion_tokens_details": {"reasoning_tokens": int(reasoning)},
    }


def _tool_calls(calls: list[dict[str, Any]] | None, *, delta: bool) -> list[dict[str, Any]]:
    out = []
    for position, call in enumerate(calls or []):
        function = call.get("function") or {}
        item: dict[str, Any] = {}
        if delta:
            item["index"] = call.get("index", position)
        if call.get("id"):
            item.update(id=call["id"], type="function")
        fields = {"arguments": function.get("arguments") or ""}
        if function.get("name"):
            fields = {"name": function["name"], **fields}
        item["function"] = fields
        out.append(item)
    return out


def completion_body(data: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` with OpenAI's fields only, from litellm's ModelResponse dump."""
    choices = []
    for choice in data.get("choices") or []:
        source = choice.get("message") or {}
        message: dict[str, Any] = {"role": source.get("role") or "assistant", "content": source.get("content")}
        calls = _tool_calls(source.get("tool_calls"), delta=False)
        if calls:
            message["tool_calls"] = calls
        if source.get("reasoning_content"):
            message["reasoning_content"] = source["reasoning_content"]
        choices.append(
            {"index": choice.get("index", 0), "message": message, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        )
    body: dict[str, Any] = {
        "id": data.get("id"),
        "object": "chat.completion",
        "created": data.get("created"),
        "model": data.get("model"),
        "choices": choices,
    }
    if data.get("usage"):
        body["usage"] = usage_body(data["usage"])
    return body


def chunk_body(data: dict[str, Any]) -> dict[str, Any] | None:
    """A ``chat.completion.chunk`` from litellm's stream chunk; None when it carries nothing."""
    choices = []
    for choice in data.get("choices") or []:
        source = choice.get("delta") or {}
        delta: dict[str, Any] = {}
        if source.get("role"):
            delta["role"] = source["role"]
        if source.get("content") or "role" in delta:
            delta["content"] = source.get("content") or ""
        if source.get("reasoning_content"):
            delta["reasoning_content"] = source["reasoning_content"]
        calls = _tool_calls(source.get("tool_calls"), delta=True)
        if calls:
            delta["tool_calls"] = calls
        finish = choice.get("finish_reason")
        if delta or finish is not None:
            choices.append({"index": choice.get("index", 0), "delta": delta, "logprobs": None, "finish_reason": finish})
    if not choices:
        return None
    return {
        "id": data.get("id"),
        "object": "chat.completion.chunk",
        "created": data.get("created"),
        "model": data.get("model"),
        "choices": choices,
    }
