"""Backend health: the circuit breaker as a pure state machine on a fake clock, the latency
average, and the background probes of a local backend over real loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.providers.health import CLOSED, HALF_OPEN, OPEN, Breaker, Health, probe
from proxy.settings import ModelConfig, Timeouts, UpstreamConfig
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_a_success_resets_the_count() -> None:
    clock = Clock()
    breaker = Breaker(3, 10.0, clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive any more
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN
    assert not breaker.allow() and not breaker.available()


def test_after_the_cooldown_one_probe_goes_through_and_its_success_closes_the_circuit() -> None:
    clock = Clock()
    breaker = Breaker(2, 10.0, clock)
    breaker.failure()
    breaker.failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.available()  # no side effect: routing may look
    assert breaker.allow()  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # only one probe at a time
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


def test_a_failed_probe_opens_the_circuit_again_for_a_whole_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(5, 10.0, clock)
    for _ in range(5):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()
    breaker.failure()  # one failure in half-open state is enough
    assert breaker.state == OPEN and not breaker.allow()
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_a_probe_that_ends_without_a_verdict_lets_the_next_caller_probe() -> None:
    clock = Clock()
    breaker = Breaker(1, 5.0, clock)
    breaker.failure()
    clock.now += 5
    assert breaker.allow() and not breaker.allow()
    breaker.release()  # e.g. the upstream answered 400: says nothing about its health
    assert breaker.allow()


def test_health_is_up_follows_the_breaker_and_the_probe() -> None:
    clock = Clock()
    health = Health([ModelConfig("a", "openai", "http://x/v1")], UpstreamConfig(breaker_failures=2, breaker_cooldown=30), clock)
    assert health.is_up("a") and health.is_up("never-seen")
    health.failed("a")
    assert health.is_up("a")
    health.failed("a")
    assert not health.is_up("a") and health.state("a") == OPEN
    clock.now += 30
    assert health.is_up("a") and health.state("a") == HALF_OPEN
    assert health.allow("a")
    assert not health.is_up("a")  # its one probe is out
    health.succeeded("a", 50.0)
    assert health.is_up("a") and health.state("a") == CLOSED


def test_latency_is_an_average_that_moves_with_recent_samples() -> None:
    health = Health([ModelConfig("a", "openai", "http://x/v1")])
    assert health.latency_ms("a") is None
    health.succeeded("a", 100.0)
    assert health.latency_ms("a") == 100.0
    health.succeeded("a", 200.0)
    first = health.latency_ms("a")
    assert first is not None and 100.0 < first < 200.0
    for _ in range(30):
        health.succeeded("a", 200.0)
    last = health.latency_ms("a")
    assert last is not None and last == pytest.approx(200.0, abs=1.0)


def test_a_probe_verdict_applies_to_every_model_on_that_server() -> None:
    models = [
        ModelConfig("small", "llamacpp", "http://127.0.0.1:8080/v1"),
        ModelConfig("tiny", "llamacpp", "http://127.0.0.1:8080/v1"),
        ModelConfig("other", "ollama", "http://127.0.0.1:11434/v1"),
    ]
    clock = Clock()
    health = Health(models, UpstreamConfig(breaker_failures=1, breaker_cooldown=60), clock)
    health.probed("http://127.0.0.1:8080/v1", False)
    assert not health.is_up("small") and not health.is_up("tiny") and health.is_up("other")
    assert not health.allow("small")
    health.failed("small")  # the circuit opens too
    health.probed("http://127.0.0.1:8080/v1", True)
    # the server answers again: the open circuit need not wait out its cool-down
    assert health.is_up("small") and health.state("small") == HALF_OPEN


async def test_probes_mark_a_local_backend_down_when_it_stops_and_up_when_it_returns() -> None:
    fake = FakeUpstream()
    runner, port = await _serve(fake.app(), 0)
    quick = Timeouts(connect=0.5, first_byte=1.0, total=2.0)
    local = ModelConfig("local", "llamacpp", f"http://127.0.0.1:{port}/v1", timeouts=quick)
    cloud = ModelConfig("cloud", "openai", "http://127.0.0.1:9/v1")  # never probed: not local
    health = Health([local, cloud], UpstreamConfig(probe_interval=0.05))
    async with aiohttp.ClientSession() as session:
        assert await probe(session, local)
        health.start(session)
        try:
            await asyncio.sleep(0.2)
            assert health.is_up("local")
            await runner.cleanup()  # the backend is killed
            await _until(lambda: not health.is_up("local"))
            assert health.is_up("cloud")
            runner, _ = await _serve(fake.app(), port)  # and comes back
            await _until(lambda: health.is_up("local"))
        finally:
            await health.close()
            await runner.cleanup()


async def test_a_probe_answered_with_an_error_status_counts_as_down() -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503)

    def make() -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", broken)
        return app

    with ThreadServer(make) as server:
        async with aiohttp.ClientSession() as session:
            assert not await probe(session, ModelConfig("local", "llamacpp", f"{server.url}/v1"))


async def _serve(app: web.Application, port: int) -> tuple[web.AppRunner, int]:
    """An app on this test's own loop (so it can be stopped and started again on the same port)."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, runner.addresses[0][1]


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polls state a background task changes
            await asyncio.sleep(0.02)
