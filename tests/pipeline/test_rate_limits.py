"""Rate limits: the pure window math, the ``rate_limits:`` config section, and the stage over real
HTTP (official SDK with max_retries=0, fake upstream, a private Redis per test).

The limiter's clock is pinned in the middle of a window in the HTTP tests, so a test never
straddles a window boundary; the window math itself is tested as functions.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from proxy.app_state import GATEWAY
from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.pipeline.auth import MASTER, Principal
from proxy.pipeline.ratelimit import Limit, LimitIndex, applicable, duration, headers, retry_after
from proxy.pipeline.ratelimit_store import Counts, estimate
from proxy.settings import NANO_PER_USD, BudgetLimit, BudgetsConfig, RateLimit, RateLimitsConfig, Settings
from tests.api.conftest import wait_until
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import RedisProcess

HI = [{"role": "user", "content": "hi"}]
MID_WINDOW = 1_800_000_030.0  # 30 s into a 60 s window


# --- pure decisions ---


def test_the_sliding_estimate_weighs_the_previous_window_by_its_overlap() -> None:
    assert estimate(3, 10, 0.0, 60) == 13
    assert estimate(3, 10, 30.0, 60) == 8
    assert estimate(3, 10, 60.0, 60) == 3


def test_retry_after_is_when_the_cost_fits_again() -> None:
    assert retry_after(2, 0, 1, 3, 10, 60) == 0  # fits now
    # 3 in this window, limit 3: at the next window they weigh 3 * (1 - s/60); 1 more fits when that is <= 2
    assert retry_after(3, 0, 1, 3, 10, 60) == pytest.approx(50 + 20)
    # this window has room, the previous one's 6 must fall to 2: 6 * (1 - t/60) <= 2 at t = 40
    assert retry_after(1, 6, 1, 4, 10, 60) == pytest.approx(30)
    assert retry_after(0, 0, 500, 100, 10, 60) == 60  # never fits: one window


def test_durations_in_openai_format() -> None:
    assert [duration(x) for x in (0.02, 1.5, 59, 360)] == ["20ms", "1.5s", "59s", "6m0s"]


def test_headers_report_the_tightest_limit_of_each_kind() -> None:
    limits = [Limit("key", "k", 10, None), Limit("team", "t", 3, 1000)]
    out = headers(limits, [Counts(2, 50), Counts(2, 400)], 30, 60)
    assert out == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "1m30s",
    }


def test_a_named_limit_wins_over_star_for_the_same_scope() -> None:
    index = LimitIndex([RateLimit("team", "*", 10, None), RateLimit("team", "search", 2, None), RateLimit("app", "*", None, 50)])
    principal = Principal("key_1", "search", "bot", "user")
    assert applicable(index, principal) == (Limit("team", "search", 2, None), Limit("app", "bot", None, 50))
    assert applicable(index, MASTER) == ()  # no team, no app, no key limit: nothing to count


# --- config ---


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "thrifty.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_settings(str(path), env={})


def test_the_rate_limits_section_is_read(tmp_path: Path) -> None:
    text = """
        rate_limits:
          redis_url: redis://127.0.0.1:6379/0
          limits:
            - {team: search, rpm: 60, tpm: 90000}
            - {key: '*', rpm: 10}
    """
    config = load(tmp_path, text).rate_limits
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.window_seconds == 60
    assert config.limits == (RateLimit("team", "search", 60, 90000), RateLimit("key", "*", 10, None))
    assert load(tmp_path, "models: []\n").rate_limits == RateLimitsConfig()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("rate_limits:\n  limits:\n    - {rpm: 1}\n", 3, "rate_limits.limits[0]: needs exactly one of key, team"),
        ("rate_limits:\n  limits:\n    - {team: a}\n", 3, "needs rpm, tpm or both"),
        ("rate_limits:\n  limits:\n    - team: a\n      rpm: 0\n", 4, "rpm: must be >= 1"),
        ("rate_limits:\n  limits:\n    - {team: a, rpm: 1}\n    - {team: a, tpm: 1}\n", 4, "set twice"),
        ("rate_limits:\n  redis_url: http://x\n", 2, "rate_limits.redis_url: must start with redis://"),
        ("rate_limits:\n  rpm: 3\n", 2, "rate_limits.rpm: unknown key"),
    ],
)
def test_a_rate_limit_mistake_names_the_key_and_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(f"{tmp_path / 'thrifty.yaml'}:{line}: "), str(caught.value)
    assert message in str(caught.value)


# --- the stage over HTTP ---


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.stop()


def limited(settings: Settings, url: str | None, *limits: RateLimit) -> Settings:
    return replace(settings, rate_limits=RateLimitsConfig(redis_url=url, limits=limits))


def start(start_gateway: Any, settings: Settings) -> ThreadServer:
    gateway: ThreadServer = start_gateway(settings)
    gateway.app[GATEWAY].limiter.clock = lambda: MID_WINDOW  # type: ignore[index, union-attr]
    return gateway


def sdk(gateway: ThreadServer, key: str = MASTER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30)


def ledger_rows(gateway: ThreadServer, count: int) -> list[tuple[Any, ...]]:
    async def fetch() -> list[tuple[Any, ...]]:
        return await gateway.app[GATEWAY].db.fetch("SELECT status, error_code FROM ledger ORDER BY ts")  # type: ignore[index, no-any-return]

    assert wait_until(lambda: len(gateway.call(fetch)) >= count)
    rows: list[tuple[Any, ...]] = gateway.call(fetch)
    return rows


def test_the_request_past_the_limit_is_refused_with_openai_headers(
    start_gateway: Any, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, private_redis: RedisProcess
) -> None:
    fake, server = upstream
    gateway = start(
        start_gateway, limited(settings_for(server.url, tmp_path), private_redis.url, RateLimit("key", "master", 3, None))
    )
    with sdk(gateway) as client:
        first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert first.headers["x-ratelimit-reset-requests"] == "1m30s"
        assert "x-ratelimit-limit-tokens" not in first.headers  # no tpm configured
        for _ in range(2):
            client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "Rate limit reached for key master: 3 requests" in error["message"]
    refused = caught.value.response.headers
    # 3 in this window weigh 3 * (1 - s/60) after it ends in 30 s: one more fits 20 s later
    assert (refused["Retry-After"], refused["retry-after-ms"]) == ("50", "50000")
    assert "x-should-retry" not in refused  # the SDK's own retries wait Retry-After and then fit
    assert (refused["x-ratelimit-remaining-requests"], refused["x-ratelimit-limit-requests"]) == ("0", "3")
    assert len(fake.requests) == 3  # the refused request never reached the upstream
    assert ledger_rows(gateway, 4)[-1] == (429, "rate_limit_exceeded")


def test_a_tokens_limit_counts_the_allowance_then_the_actual_usage(
    start_gateway: Any, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, private_redis: RedisProcess
) -> None:
    fake, server = upstream
    gateway = start(
        start_gateway, limited(settings_for(server.url, tmp_path), private_redis.url, RateLimit("key", "master", None, 100))
    )
    limiter = gateway.app[GATEWAY].limiter  # type: ignore[index]
    with sdk(gateway) as client:
        with pytest.raises(openai.RateLimitError) as caught:  # its allowance alone is above the limit
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=200)  # type: ignore[arg-type]
        assert caught.value.body["type"] == "tokens"  # type: ignore[index]
        assert caught.value.response.headers["x-should-retry"] == "false"  # it never fits: the SDK does not retry
        assert "Request too large for key master: it may use 2" in caught.value.body["message"]  # type: ignore[index]
        # 60 allowed + the prompt is held at admission, then corrected to the few tokens really used:
        # without the correction the second request (another ~70) would be over 100
        first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=60)  # type: ignore[arg-type]
        assert 30 <= int(first.headers["x-ratelimit-remaining-tokens"]) < 40
        assert wait_until(lambda: limiter.correcting == 0)
        second = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=60)  # type: ignore[arg-type]
        assert int(second.headers["x-ratelimit-remaining-tokens"]) < 40
    assert len(fake.requests) == 2


def test_two_gateways_sharing_redis_share_the_limit(
    start_gateway: Any, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, private_redis: RedisProcess
) -> None:
    fake, server = upstream
    gateways = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        settings = limited(settings_for(server.url, tmp_path / name), private_redis.url, RateLimit("key", "master", 4, None))
        gateways.append(start(start_gateway, settings))
    served = refused = 0
    for i in range(10):
        with sdk(gateways[i % 2]) as client:
            try:
                client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
                served += 1
            except openai.RateLimitError:
                refused += 1
    assert (served, refused) == (4, 6)  # per pod, each would have served 4
    assert len(fake.requests) == 4


def test_redis_down_fails_open_to_a_limit_per_process(
    start_gateway: Any,
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    private_redis: RedisProcess,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, server = upstream
    gateway = start(
        start_gateway, limited(settings_for(server.url, tmp_path), private_redis.url, RateLimit("key", "master", 2, None))
    )
    private_redis.kill()
    with caplog.at_level(logging.WARNING, logger="thrifty.ratelimit"), sdk(gateway) as client:
        for _ in range(2):
            assert client.chat.completions.create(model="gpt-4o", messages=HI).choices[0].message.content == "echo: hi"  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    assert len(fake.requests) == 2
    assert sum("rate limit store (Redis) unreachable" in r.message for r in caplog.records) == 1  # logged once
    private_redis.start()  # back, empty, on the same port: counting moves back to Redis within the back-off
    window = f"thrifty:rate:{{key:master}}:60:{int(MID_WINDOW // 60)}"
    with redis.Redis.from_url(private_redis.url) as r, sdk(gateway) as client:

        def counted_in_redis() -> bool:
            try:
                client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
            except openai.RateLimitError:
                return False
            return r.hget(window, "r") is not None

        assert wait_until(counted_in_redis, timeout=8)


def test_a_caller_with_no_limit_makes_no_redis_call(
    start_gateway: Any, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, private_redis: RedisProcess
) -> None:
    server = upstream[1]
    gateway = start(
        start_gateway, limited(settings_for(server.url, tmp_path), private_redis.url, RateLimit("team", "search", 5, 1000))
    )

    def scripts_run() -> int:
        with redis.Redis.from_url(private_redis.url) as r:
            stats = r.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))

    with sdk(gateway) as client:  # the master key: no team, no limit
        response = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    assert "x-ratelimit-limit-requests" not in response.headers
    assert scripts_run() == 0

    async def create() -> tuple[str, Any]:
        return await gateway.app[GATEWAY].keys.create("search")  # type: ignore[index, no-any-return]

    key, _ = gateway.call(create)
    with sdk(gateway, key) as client:  # a key of team "search": counted in Redis
        limited_response = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=20)  # type: ignore[arg-type]
    assert limited_response.headers["x-ratelimit-limit-requests"] == "5"
    assert scripts_run() >= 1


def test_the_budgets_redis_connection_is_shared_when_the_url_is_the_same(
    start_gateway: Any, upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, private_redis: RedisProcess
) -> None:
    settings = limited(settings_for(upstream[1].url, tmp_path), private_redis.url, RateLimit("key", "master", 5, None))
    limit = BudgetLimit("key", "master", "daily", None, NANO_PER_USD // 1000)  # $0.001
    gateway = start(start_gateway, replace(settings, budgets=BudgetsConfig(redis_url=private_redis.url, limits=(limit,))))
    state = gateway.app[GATEWAY]  # type: ignore[index]
    assert state.limiter.store.shared.client is state.guard.store.shared.client
    with sdk(gateway) as client:
        served = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=5)  # type: ignore[arg-type]
        assert served.headers["x-ratelimit-remaining-requests"] == "4"
        with pytest.raises(openai.RateLimitError) as caught:  # a budget refusal of a limited caller: its headers too
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=10_000)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "budget_exceeded"  # type: ignore[index]
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "3"
