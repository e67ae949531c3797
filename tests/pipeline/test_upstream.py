"""The upstream stage: retries, fallbacks, circuit breakers and timeouts (connect, first byte, total).

Pure parts (backoff, retry decisions, the retry budget) directly; the rest end to end: a real
gateway with a fallback policy, the official OpenAI SDK, a fake upstream told to fail in
the ways real ones do (429, 5xx, a closed port, a slow first byte, a stream that dies before
or after its first chunk) and the SQLite ledger, which must name the model that served and
count every call made."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from proxy.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable
from proxy.pipeline.upstream import RetryBudget, backoff, retry_delay
from proxy.providers.base import UpstreamStatus, retry_after_seconds
from proxy.settings import CacheConfig, ModelConfig, Settings, Timeouts, UpstreamConfig
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream, stream_chunks
from tests.pipeline.test_ledger_e2e import record_of
from tests.servers import ThreadServer

POLICY = """\
version: upstream
rules:
  - name: mini-first
    match: {model: auto}
    action: {target: [gpt-4o-mini, gpt-4o]}
  - name: dead-first
    match: {model: auto-dead}
    action: {target: [dead, gpt-4o]}
  - name: slow-first
    match: {model: auto-slow}
    action: {target: [slow, gpt-4o]}
  - name: all-bad
    match: {model: auto-bad}
    action: {target: [gpt-4o-mini, dead]}
  - name: renamed
    match: {model: auto-renamed}
    action: {target: [dead, fast]}
"""
MESSAGES: Any = [{"role": "user", "content": "hello there"}]


# pure parts


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    assert backoff(1, 0.1, 2.0, lambda: 1.0) == pytest.approx(0.1)
    assert backoff(3, 0.1, 2.0, lambda: 1.0) == pytest.approx(0.4)
    assert backoff(10, 0.1, 2.0, lambda: 1.0) == 2.0
    assert backoff(3, 0.1, 2.0, lambda: 0.5) == pytest.approx(0.2)
    assert backoff(3, 0.1, 2.0, lambda: 0.0) == 0.0


def test_retry_decisions() -> None:
    settings = UpstreamConfig(retries=2, backoff_base=0.1, backoff_max=1.0, retry_after_max=2.0)
    one = lambda: 1.0  # noqa: E731
    assert retry_delay(UpstreamStatus(500, "boom"), 1, settings, one) == pytest.approx(0.1)
    assert retry_delay(UpstreamStatus(503, "boom"), 2, settings, one) == pytest.approx(0.2)
    assert retry_delay(UpstreamStatus(503, "boom"), 3, settings, one) is None  # retries spent
    assert retry_delay(UpstreamUnavailable("refused"), 1, settings, one) == pytest.approx(0.1)
    assert retry_delay(UpstreamTimeout("slow"), 1, settings, one) is None  # next model at once
    assert retry_delay(UpstreamStatus(400, "bad"), 1, settings, one) is None
    assert retry_delay(BadRequest("bad"), 1, settings, one) is None
    limited = UpstreamStatus(429, "slow down")
    limited.retry_after = 1.5
    assert retry_delay(limited, 1, settings, one) == 1.5  # the upstream's word, when short
    limited.retry_after = 30
    assert retry_delay(limited, 1, settings, one) is None  # too long: the next model instead


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == 5.0


def test_the_retry_budget_allows_a_share_of_requests_as_retries() -> None:
    budget = RetryBudget(0.2)
    spent = 0
    for _ in range(100):
        budget.deposit()
        while budget.withdraw():
            spent += 1
    assert spent <= 10 + 20  # the reserve, then 0.2 a request
    assert RetryBudget(0.0).withdraw() is False


# end to end


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def routed(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    url = f"{upstream[1].url}/v1"
    extra = (
        ModelConfig("dead", "openai-compatible", f"http://127.0.0.1:{closed_port()}/v1", UPSTREAM_KEY),
        ModelConfig("slow", "openai-compatible", url, UPSTREAM_KEY, timeouts=Timeouts(connect=2, first_byte=0.4, total=30)),
    )
    fast = UpstreamConfig(retries=1, backoff_base=0.01, backoff_max=0.05, breaker_failures=50, probe_interval=0)
    # no response cache: repeated questions must reach the upstream
    return replace(base, models=(*base.models, *extra), policies=str(policy), upstream=fast, cache=CacheConfig(enabled=False))


Start = Callable[..., openai.OpenAI]


@pytest.fixture
def sdk(start_gateway: Callable[[Settings], ThreadServer], routed: Settings) -> Iterator[Start]:
    clients: list[openai.OpenAI] = []

    def start(**upstream: Any) -> openai.OpenAI:
        settings = replace(routed, upstream=replace(routed.upstream, **upstream))
        gateway = start_gateway(settings)
        clients.append(openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30))
        return clients[-1]

    yield start
    for client in clients:
        client.close()


def ledger(settings: Settings, request_id: str) -> dict[str, Any]:
    return record_of(Path(settings.ledger.url.removeprefix("sqlite:///")), request_id)


def models_asked(fake: FakeUpstream) -> list[str]:
    return [r.payload["model"] for r in fake.requests if r.path.endswith("/chat/completions")]


def error(status: int, message: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def test_a_429_is_retried_on_the_same_model_after_its_retry_after(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    calls: list[float] = []

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        calls.append(time.monotonic())
        return error(429, "rate limited", **{"Retry-After": "0.3"}) if len(calls) == 1 else None

    fake.handler = handler
    raw = sdk().chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "echo: hello there"
    assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert models_asked(fake) == ["gpt-4o-mini", "gpt-4o-mini"]
    assert calls[1] - calls[0] >= 0.28  # Retry-After honoured, not the 10 ms backoff
    record = ledger(routed, raw.headers["x-request-id"])
    assert (record["attempts"], record["served_model"], record["status"]) == (2, "gpt-4o-mini", 200)


def test_a_model_that_keeps_failing_with_5xx_falls_back_to_the_next(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return error(500, "model crashed") if payload["model"] == "gpt-4o-mini" else None

    fake.handler = handler
    raw = sdk().chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().choices[0].message.content == "echo: hello there"
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert models_asked(fake) == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]  # one retry, then the fallback
    record = ledger(routed, raw.headers["x-request-id"])
    assert (record["attempts"], record["served_model"], record["requested_model"]) == (3, "gpt-4o", "auto")
    assert record["cost_nusd"] > 0  # priced as the model that served


def test_a_closed_port_fails_over_with_no_client_error_plain_and_streamed(
    sdk: Start, fake: FakeUpstream, routed: Settings
) -> None:
    client = sdk()
    raw = client.chat.completions.with_raw_response.create(model="auto-dead", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert raw.parse().choices[0].message.content == "echo: hello there"
    with client.chat.completions.with_streaming_response.create(model="auto-dead", messages=MESSAGES, stream=True) as response:
        assert response.headers["x-thrifty-model"] == "gpt-4o"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "echo: hello there"
    assert models_asked(fake) == ["gpt-4o", "gpt-4o"]
    record = ledger(routed, raw.headers["x-request-id"])
    assert (record["attempts"], record["served_model"]) == (3, "gpt-4o")  # dead twice (one retry), then gpt-4o


def test_the_fallback_is_sent_its_own_upstream_model_name(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    raw = sdk().chat.completions.with_raw_response.create(model="auto-renamed", messages=MESSAGES, stream=False)
    assert raw.headers["x-thrifty-model"] == "fast"
    assert models_asked(fake) == ["gpt-4o-mini-2024-07-18"]  # fast's upstream_model, not "dead" nor "fast"
    record = ledger(routed, raw.headers["x-request-id"])
    assert (record["served_model"], record["requested_model"], record["route"]) == ("fast", "auto-renamed", "renamed")


def test_a_first_byte_slower_than_its_timeout_falls_back(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        if payload["model"] == "slow":
            await asyncio.sleep(2)
        return None

    client = sdk()
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # one-time start-up costs out of the way
    fake.handler = handler
    fake.requests.clear()
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="auto-slow", messages=MESSAGES)
    elapsed = time.monotonic() - started
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert 0.4 <= elapsed < 1.5  # first_byte 0.4 s, then no retry of a timeout
    assert models_asked(fake) == ["slow", "gpt-4o"]
    record = ledger(routed, raw.headers["x-request-id"])
    assert (record["attempts"], record["served_model"]) == (2, "gpt-4o")


async def _die_before_first_chunk(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)  # headers out, then the connection is cut
    assert request.transport is not None
    request.transport.close()
    return response


async def _die_after_first_chunk(request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for chunk in stream_chunks(payload, ["partial", "answer"])[:2]:
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await asyncio.sleep(0.2)  # the gateway relays them before the cut
    assert request.transport is not None
    request.transport.close()
    return response


def test_a_stream_that_dies_before_its_first_chunk_falls_back_cleanly(sdk: Start, fake: FakeUpstream, routed: Settings) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return await _die_before_first_chunk(request) if payload["model"] == "gpt-4o-mini" else None

    fake.handler = handler
    with sdk().chat.completions.with_streaming_response.create(model="auto", messages=MESSAGES, stream=True) as response:
        assert response.headers["x-thrifty-model"] == "gpt-4o"
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello there"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert models_asked(fake) == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
    record = ledger(routed, request_id)
    assert (record["attempts"], record["served_model"], record["status"]) == (3, "gpt-4o", 200)


def test_a_stream_that_dies_after_bytes_reached_the_client_ends_with_an_error_event(
    sdk: Start, fake: FakeUpstream, routed: Settings
) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return await _die_after_first_chunk(request, payload)

    fake.handler = handler
    seen: list[str] = []
    with sdk().chat.completions.with_streaming_response.create(model="auto", messages=MESSAGES, stream=True) as response:
        request_id = response.headers["x-request-id"]
        with pytest.raises(openai.APIError, match="broke off"):
            for chunk in response.parse():
                seen.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(seen) == "partial"
    assert models_asked(fake) == ["gpt-4o-mini"]  # no fallback once the client has bytes
    record = ledger(routed, request_id)
    assert (record["attempts"], record["status"], record["error_code"]) == (1, 502, "upstream_unavailable")


def test_when_every_model_fails_the_client_gets_the_last_error_in_openai_shape(
    sdk: Start, fake: FakeUpstream, routed: Settings
) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return error(503, "overloaded")

    fake.handler = handler
    with pytest.raises(openai.APIStatusError) as caught:
        sdk().chat.completions.create(model="auto-bad", messages=MESSAGES)
    assert caught.value.status_code == 502  # the last model's: a closed port
    body: Any = caught.value.body
    assert body["code"] == "upstream_unavailable" and "could not be reached" in body["message"]
    record = ledger(routed, caught.value.response.headers["x-request-id"])
    assert (record["attempts"], record["status"], record["cost_nusd"]) == (4, 502, 0)


def test_a_client_error_is_returned_at_once_without_retry_or_fallback(sdk: Start, fake: FakeUpstream) -> None:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return error(400, "max_tokens is too large")

    fake.handler = handler
    with pytest.raises(openai.BadRequestError, match="max_tokens is too large"):
        sdk().chat.completions.create(model="auto", messages=MESSAGES)
    assert models_asked(fake) == ["gpt-4o-mini"]


def test_the_total_timeout_ends_a_stream_that_runs_too_long(
    start_gateway: Callable[[Settings], ThreadServer], fake: FakeUpstream, routed: Settings
) -> None:
    short = Timeouts(connect=2, first_byte=5, total=0.6)
    models = tuple(replace(m, timeouts=short) if m.name == "gpt-4o" else m for m in routed.models)
    gateway = start_gateway(replace(routed, models=models))
    fake.chunk_delay = 0.1
    fake.handler = None
    words = [f"w{i}" for i in range(40)]

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return await fake.stream(request, payload, words)

    fake.handler = handler
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # one-time start-up costs out of the way
        started = time.monotonic()
        with pytest.raises(openai.APIError, match=r"stalled|broke off|did not"):
            for _ in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
                pass
    assert time.monotonic() - started < 3


def test_an_open_circuit_sends_requests_straight_to_the_fallback_and_a_probe_closes_it(
    sdk: Start, fake: FakeUpstream, routed: Settings
) -> None:
    broken = True

    async def handler(payload: dict[str, Any], request: web.Request) -> web.StreamResponse | None:
        return error(500, "down") if broken and payload["model"] == "gpt-4o-mini" else None

    fake.handler = handler
    client = sdk(retries=0, breaker_failures=2, breaker_cooldown=0.5)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert models_asked(fake) == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    fake.requests.clear()
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert models_asked(fake) == ["gpt-4o"]  # the open circuit is not called at all
    assert ledger(routed, raw.headers["x-request-id"])["attempts"] == 1
    time.sleep(0.6)  # the cool-down passes: one request probes the model
    broken = False
    fake.requests.clear()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-thrifty-model"] == "gpt-4o-mini"
    assert models_asked(fake) == ["gpt-4o-mini", "gpt-4o-mini"]  # closed again


def test_a_killed_local_backend_fails_over_with_no_client_error_and_its_probe_brings_it_back(
    start_gateway: Callable[[Settings], ThreadServer], fake: FakeUpstream, routed: Settings, tmp_path: Path
) -> None:
    local_fake = FakeUpstream()
    local = ThreadServer(local_fake.app).start()
    port = local.port
    policy = tmp_path / "local.yaml"
    policy.write_text("rules:\n  - name: local-first\n    match: {model: auto}\n    action: {target: [local, gpt-4o]}\n")
    model = ModelConfig("local", "llamacpp", f"{local.url}/v1", timeouts=Timeouts(connect=1, first_byte=5, total=30))
    probing = replace(routed.upstream, probe_interval=0.1, breaker_failures=2)
    gateway = start_gateway(replace(routed, models=(*routed.models, model), policies=str(policy), upstream=probing))
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-thrifty-model"] == "local"
        local.stop()  # killed: connection refused from now on
        served = []
        for _ in range(5):
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
            served.append(raw.headers["x-thrifty-model"])
            with client.chat.completions.with_streaming_response.create(model="auto", messages=MESSAGES, stream=True) as response:
                text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
                assert text == "echo: hello there"
                served.append(response.headers["x-thrifty-model"])
        assert served == ["gpt-4o"] * 10
        time.sleep(0.3)  # the probe has seen it down: no more calls to it at all
        last = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert ledger(routed, last.headers["x-request-id"])["attempts"] == 1
        revived = ThreadServer(local_fake.app)
        revived_on(revived, port)
        try:
            deadline = time.monotonic() + 5
            while (
                client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES).headers["x-thrifty-model"]
                != "local"
            ):
                assert time.monotonic() < deadline, "the revived backend was never used again"
                time.sleep(0.1)
        finally:
            revived.stop()


def revived_on(server: ThreadServer, port: int) -> None:
    """Start ``server`` on a given port (the backend restarted where it was)."""

    async def serve() -> None:
        server._stop = asyncio.Event()
        server.app = server._make_app()
        runner = web.AppRunner(server.app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        server.port = port
        server._ready.set()
        await server._stop.wait()
        await runner.cleanup()

    server._serve = serve  # type: ignore[method-assign]
    server.start()


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full: a connection attempt hangs (the SYN is dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # non-blocking: the handshake completes (or not) later
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    yield port
    for s in (*fillers, listener):
        s.close()


def test_a_connect_slower_than_its_timeout_falls_back(
    start_gateway: Callable[[Settings], ThreadServer], fake: FakeUpstream, routed: Settings, tmp_path: Path, unaccepting_port: int
) -> None:
    policy = tmp_path / "connect.yaml"
    policy.write_text("rules:\n  - name: r\n    match: {model: auto}\n    action: {target: [hung, gpt-4o]}\n")
    hung = ModelConfig("hung", "openai-compatible", f"http://127.0.0.1:{unaccepting_port}/v1", timeouts=Timeouts(0.3, 5, 30))
    gateway = start_gateway(replace(routed, models=(*routed.models, hung), policies=str(policy)))
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as client:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # one-time start-up costs out of the way
        started = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        elapsed = time.monotonic() - started
    assert raw.headers["x-thrifty-model"] == "gpt-4o"
    assert 0.3 <= elapsed < 1.5  # the connect timeout (a dropped SYN is retried after 1 s, then 3 s)
    assert (ledger(routed, raw.headers["x-request-id"])["attempts"]) == 2
