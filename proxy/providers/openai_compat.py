"""The hot path: any OpenAI-compatible server (OpenAI, Ollama, llama.cpp, vLLM, LM Studio).

One pooled aiohttp client session serves every target; headers and timeouts per target are
built once. Bodies are sent as given (the route passes the client's bytes through unless
it had to change them), replies are returned whole or, for streams, as the raw SSE bytes
in the order and sizes they arrive: nothing is buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.providers.base import Call, Reply, upstream_error
from proxy.redact import Redactor
from proxy.settings import ModelConfig

JSON = "application/json"


class OpenAICompatible:
    def __init__(self, session: aiohttp.ClientSession, target: ModelConfig, redact: Redactor):
        self._session = session
        self._target = target
        self._redact = redact
        self._headers = {"Content-Type": JSON, "Accept-Encoding": "identity"}
        if target.api_key:
            self._headers["Authorization"] = f"Bearer {target.api_key}"
        t = target.timeouts
        self._timeout = aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_read=t.first_byte)

    async def send(self, call: Call) -> Reply:
        url = f"{self._target.base_url}/{call.endpoint}"
        try:
            resp = await self._session.post(url, data=call.body, headers=self._headers, timeout=self._timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream for model {self._target.name!r} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(self._unreachable(exc)) from None
        content_type = resp.headers.get("Content-Type", JSON)
        if resp.status >= 400:
            try:
                body = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                body = b""
            finally:
                resp.release()
            raise upstream_error(resp.status, body, self._redact, resp.headers.get("Retry-After"))
        if call.stream and content_type.startswith("text/event-stream"):
            return Reply(resp.status, content_type, chunks=self._relay(resp))
        try:
            body = await resp.read()
        except TimeoutError:
            resp.close()
            raise UpstreamTimeout(f"upstream for model {self._target.name!r} did not finish in time") from None
        except aiohttp.ClientError as exc:
            resp.close()
            raise UpstreamUnavailable(self._unreachable(exc)) from None
        return Reply(resp.status, content_type, body=body)

    async def _relay(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
            finished = True
        except TimeoutError:
            raise UpstreamTimeout(f"upstream for model {self._target.name!r} stalled mid-stream") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(self._unreachable(exc, mid_stream=True)) from None
        finally:
            # A stream abandoned early (client gone, error) must close the upstream
            # connection so the model stops generating; a finished one goes back to the pool.
            if finished:
                resp.release()
            else:
                resp.close()

    def _unreachable(self, exc: BaseException, *, mid_stream: bool = False) -> str:
        when = "broke off mid-stream" if mid_stream else "could not be reached"
        detail = self._redact(str(exc)) or type(exc).__name__
        return f"upstream for model {self._target.name!r} {when}: {detail}"

    async def close(self) -> None:
        """The shared session is closed by the app, not by each provider."""
