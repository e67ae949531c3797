"""The exact cache end to end: a real gateway, the official SDK, the fake upstream, the
in-process store and real Redis. A repeat is answered without the upstream, streamed or
not, with the headers and ledger record of a hit; uncacheable requests bypass the cache;
a Redis that is down or hangs never fails a request."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest

from proxy.cost.pricing import usd
from tests.api.conftest import closed_port, wait_until
from tests.cache.conftest import Cached, StartCached
from tests.fake_upstream import FakeUpstream
from tests.pipeline.test_ledger_e2e import record_of


def ask(client: openai.OpenAI, prompt: str, **fields: Any) -> Any:
    fields.setdefault("temperature", 0)
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, **fields)  # type: ignore[call-overload]


def test_a_repeat_is_served_from_the_cache(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    first = ask(cached.client, prompt)
    assert first.headers["x-thrifty-cache"] == "miss"
    cached.drain()
    second = ask(cached.client, prompt)
    assert second.headers["x-thrifty-cache"] == "exact"
    assert len(fake.requests) == 1  # the upstream answered once

    a, b = first.parse(), second.parse()
    assert b.choices[0].message.content == a.choices[0].message.content == f"echo: {prompt}"
    assert b.usage == a.usage and b.model == a.model and b.id != a.id
    assert second.headers["x-thrifty-cost-usd"] == usd(0)

    record = record_of(cached.db_path, second.headers["x-request-id"])
    paid = record_of(cached.db_path, first.headers["x-request-id"])
    assert (record["cache"], record["cost_nusd"], record["status"]) == ("exact", 0, 200)
    assert record["savings_cache_nusd"] == record["baseline_nusd"] == paid["cost_nusd"] > 0
    assert (record["prompt_tokens"], record["completion_tokens"]) == (paid["prompt_tokens"], paid["completion_tokens"])
    assert second.headers["x-thrifty-savings-usd"] == usd(record["savings_cache_nusd"])
    assert paid["cache"] == "miss"


def test_a_seed_makes_a_request_cacheable_and_fields_tell_requests_apart(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    ask(cached.client, prompt, temperature=0.8, seed=7)
    cached.drain()
    assert ask(cached.client, prompt, temperature=0.8, seed=7).headers["x-thrifty-cache"] == "exact"
    assert ask(cached.client, prompt, temperature=0.8, seed=8).headers["x-thrifty-cache"] == "miss"
    assert ask(cached.client, prompt, temperature=0.8, seed=7, max_tokens=3).headers["x-thrifty-cache"] == "miss"
    assert len(fake.requests) == 3


def streamed(client: openai.OpenAI, prompt: str, **fields: Any) -> tuple[str, list[Any], str]:
    fields.setdefault("temperature", 0)
    messages = [{"role": "user", "content": prompt}]
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=messages, stream=True, **fields
    ) as response:  # type: ignore[call-overload]
        chunks = list(response.parse())
        status = response.headers["x-thrifty-cache"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks, status


def test_a_streamed_answer_is_stored_and_replayed(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    text, live, status = streamed(cached.client, prompt)
    assert (text, status) == (f"echo: {prompt}", "miss")
    cached.drain()
    again, replayed, status = streamed(cached.client, prompt)
    assert (again, status) == (text, "exact")
    assert all(c.usage is None for c in replayed)  # the client did not ask for usage
    assert replayed[0].choices[0].delta.role == "assistant" and replayed[-1].choices[0].finish_reason == "stop"
    assert len({c.id for c in replayed}) == 1 and replayed[0].id != live[0].id

    _, with_usage, status = streamed(cached.client, prompt, stream_options={"include_usage": True})
    assert status == "exact" and with_usage[-1].choices == []
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == len(text.split())
    # the stored answer serves a non-streamed request too
    plain = ask(cached.client, prompt)
    assert plain.headers["x-thrifty-cache"] == "exact" and plain.parse().choices[0].message.content == text
    assert len(fake.requests) == 1


def test_a_non_streamed_answer_is_replayed_to_a_stream(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    ask(cached.client, prompt)
    cached.drain()
    text, chunks, status = streamed(cached.client, prompt, stream_options={"include_usage": True})
    assert (text, status) == (f"echo: {prompt}", "exact")
    assert chunks[-1].usage is not None and len(fake.requests) == 1


def test_a_stream_hit_is_in_the_ledger(cached: Cached, prompt: str) -> None:
    streamed(cached.client, prompt)
    cached.drain()
    messages = [{"role": "user", "content": prompt}]
    with cached.client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=messages, stream=True, temperature=0
    ) as response:  # type: ignore[call-overload]
        body = b"".join(response.iter_bytes())
        request_id = response.headers["x-request-id"]
    record = record_of(cached.db_path, request_id)
    assert (record["cache"], record["cost_nusd"], record["stream"]) == ("exact", 0, 1)
    assert record["savings_cache_nusd"] > 0
    assert f"cost_usd={usd(0)}".encode() in body and body.endswith(b"data: [DONE]\n\n")


def test_tool_calls_are_cached(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    first = ask(cached.client, prompt, tools=tools).parse()
    cached.drain()
    text, chunks, status = streamed(cached.client, prompt, tools=tools)
    assert status == "exact" and text == ""
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        (t.id, t.function.name, t.function.arguments)
        for t in first.choices[0].message.tool_calls  # type: ignore[union-attr]
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(fake.requests) == 1


def test_no_cache_skips_the_lookup_and_no_store_skips_both(cached: Cached, fake: FakeUpstream, prompt: str) -> None:
    ask(cached.client, prompt, extra_headers={"Cache-Control": "no-store"})
    cached.drain()
    assert ask(cached.client, prompt).headers["x-thrifty-cache"] == "miss"  # nothing was stored
    cached.drain()
    assert ask(cached.client, prompt, extra_headers={"Cache-Control": "no-store"}).headers["x-thrifty-cache"] == "bypass"
    assert ask(cached.client, prompt, extra_headers={"Cache-Control": "no-cache"}).headers["x-thrifty-cache"] == "miss"
    assert len(fake.requests) == 4
    assert ask(cached.client, prompt).headers["x-thrifty-cache"] == "exact"
    assert len(fake.requests) == 4


@pytest.mark.parametrize("fields", [{"temperature": 0.7}, {"temperature": 0, "n": 2}])
def test_uncacheable_requests_bypass(cached: Cached, fake: FakeUpstream, prompt: str, fields: dict[str, Any]) -> None:
    for _ in range(2):
        response = ask(cached.client, prompt, **fields)
        cached.drain()
        assert response.headers["x-thrifty-cache"] == "bypass"
    assert len(fake.requests) == 2
    assert record_of(cached.db_path, response.headers["x-request-id"])["cache"] == "bypass"


def test_the_cache_can_be_turned_off(start_cached: StartCached, fake: FakeUpstream, prompt: str) -> None:
    off = start_cached(enabled=False)
    for _ in range(2):
        assert "x-thrifty-cache" not in ask(off.client, prompt).headers
    assert len(fake.requests) == 2


# --- Redis down or slow ----------------------------------------------------------------------


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers a command."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("where", ["closed", "silent"])
def test_redis_down_or_silent_serves_uncached(
    start_cached: StartCached, fake: FakeUpstream, prompt: str, silent_redis: int, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = closed_port() if where == "closed" else silent_redis
    gateway = start_cached(redis_url=f"redis://127.0.0.1:{port}/0", timeout_seconds=0.05)
    for _ in range(5):
        started = time.monotonic()
        response = ask(gateway.client, prompt)
        assert response.parse().choices[0].message.content == f"echo: {prompt}"
        assert response.headers["x-thrifty-cache"] == "miss"
        assert time.monotonic() - started < 2
        text, _, status = streamed(gateway.client, prompt)
        assert (text, status) == (f"echo: {prompt}", "miss")
        gateway.drain()
    assert len(fake.requests) == 10
    warnings = [r for r in caplog.records if "cache store (Redis) unreachable" in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # rate-limited


class Relay:
    """A TCP relay to Redis on a fixed port that a test can cut (Redis "down") and restore."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = closed_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        assert self._listener is not None
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()


def test_hits_resume_when_redis_returns(start_cached: StartCached, fake: FakeUpstream, prompt: str, redis_url: str) -> None:
    address = urlsplit(redis_url)
    relay = Relay((address.hostname or "127.0.0.1", address.port or 6379))
    try:
        gateway = start_cached(redis_url=f"redis://127.0.0.1:{relay.port}/0", timeout_seconds=0.05)
        ask(gateway.client, prompt)
        gateway.drain()
        assert ask(gateway.client, prompt).headers["x-thrifty-cache"] == "exact"
        relay.cut()
        for _ in range(5):  # Redis gone: every request is still answered, by the upstream
            response = ask(gateway.client, prompt)
            assert response.headers["x-thrifty-cache"] == "miss"
            assert response.parse().choices[0].message.content == f"echo: {prompt}"
        assert len(fake.requests) == 6
        relay.restore()
        assert wait_until(lambda: ask(gateway.client, prompt).headers["x-thrifty-cache"] == "exact", timeout=15)
    finally:
        relay.cut()
