"""The client side of a savings replay: every workload request sent to thrifty over real HTTP.

Requests go out in workload order, at most ``concurrency`` at a time, each with its
tenant's key, exactly as an application sends them (plain JSON, or SSE when the body asks
for a stream). For each one the replay keeps what an application sees: status, the answer's
text, ``x-thrifty-*`` headers (or, for a stream, the cost comment before ``[DONE]``) and the
wall time from sending to the last byte. Nothing is judged here; ``figures.py`` does that.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy.bench.workload import Item


@dataclass(slots=True)
class Outcome:
    """What the application saw for one request."""

    id: str
    status: int = 0
    content: str = ""
    seconds: float = 0.0
    request_id: str | None = None
    model: str | None = None
    cache: str | None = None
    cost_usd: str | None = None
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Progress:
    """tqdm on stderr when it is installed (a dependency of thrifty), else a plain counter."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self._bar: Any = None
        self._done, self._total, self._label, self._enabled = 0, total, label, enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)

    def step(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._enabled and (self._done % 50 == 0 or self._done == self._total):
            print(f"\r{self._label}: {self._done}/{self._total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            print(file=sys.stderr)


async def replay(
    base_url: str,
    items: list[Item],
    keys: Mapping[str, str],
    concurrency: int,
    rewrite: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> list[Outcome]:
    """Send every item; outcomes come back in workload order."""
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, timeout=timeout, connector=connector) as session:

        async def one(item: Item) -> Outcome:
            async with gate:
                body = rewrite(item.request) if rewrite else item.request
                outcome = await send(session, item.id, body, keys[item.tenant])
            if progress is not None:
                progress.step()
            return outcome

        return list(await asyncio.gather(*(one(item) for item in items)))


async def send(session: aiohttp.ClientSession, rid: str, body: dict[str, Any], key: str) -> Outcome:
    outcome = Outcome(id=rid)
    started = time.perf_counter()
    try:
        async with session.post("/v1/chat/completions", data=orjson.dumps(body), headers=_headers(key)) as response:
            outcome.status = response.status
            outcome.headers = {k.lower(): v for k, v in response.headers.items() if k.lower().startswith("x-")}
            if response.content_type == "text/event-stream":
                await _read_stream(response, outcome)
            else:
                _read_body(await response.read(), outcome)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - started
    outcome.request_id = outcome.headers.get("x-request-id")
    outcome.model = outcome.headers.get("x-thrifty-model")
    outcome.cache = outcome.headers.get("x-thrifty-cache")
    outcome.cost_usd = outcome.cost_usd or outcome.headers.get("x-thrifty-cost-usd")
    return outcome


def _headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def _read_body(raw: bytes, outcome: Outcome) -> None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        outcome.error = raw[:200].decode(errors="replace")
        return
    if outcome.status != 200:
        error = data.get("error") if isinstance(data, dict) else None
        outcome.error = str(error.get("message")) if isinstance(error, dict) else raw[:200].decode(errors="replace")
        return
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        outcome.content = message.get("content") or "" if isinstance(message, dict) else ""


async def _read_stream(response: aiohttp.ClientResponse, outcome: Outcome) -> None:
    parts: list[str] = []
    async for raw_line in response.content:
        line = raw_line.strip()
        if line.startswith(b": thrifty "):  # the cost comment: ": thrifty cost_usd=... savings_usd=..."
            for word in line.decode().split():
                if word.startswith("cost_usd="):
                    outcome.cost_usd = word.split("=", 1)[1]
            continue
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = orjson.loads(line[6:])
        if isinstance(event, dict) and "error" in event:
            outcome.error = str(event["error"])
        for choice in event.get("choices") or [] if isinstance(event, dict) else []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                parts.append(delta["content"])
    outcome.content = "".join(parts)
