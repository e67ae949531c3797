"""``/metrics``: a real gateway driven by the openai SDK, then a Prometheus scrape whose counts,
tokens and cost equal the ledger's sums; the bearer token; a Redis outage counted while requests
keep succeeding; and the Grafana dashboard's queries checked against a real scrape."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings import BudgetLimit, BudgetsConfig, CacheConfig, Settings, TelemetryConfig, UpstreamConfig
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import RedisProcess

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "thrifty.json"
TOKEN = "metrics-token-0123456789abcdef"

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def samples(text: str) -> Samples:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: Samples, name: str, **labels: str) -> float:
    return sum(value for sample, have, value in found if sample == name and all(have.get(k) == v for k, v in labels.items()))


def ledger_rows(settings: Settings) -> list[sqlite3.Row]:
    with sqlite3.connect(settings.ledger.url.removeprefix("sqlite:///")) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute("SELECT * FROM ledger"))


def chat(client: openai.OpenAI, model: str, text: str, **extra: object) -> None:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **extra)  # type: ignore[call-overload]


def test_scrape_equals_the_ledger(gateway: ThreadServer, client: openai.OpenAI, settings: Settings) -> None:
    for i in range(3):
        chat(client, "gpt-4o", f"question number {i}")
    for i in range(2):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"stream {i} please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    client.embeddings.create(model="text-embedding-3-small", input=["a", "b c"])
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model", "hello")

    found = samples(scrape(gateway.url))
    gateway.stop()  # the ledger writer flushes on shutdown
    rows = ledger_rows(settings)
    assert len(rows) == 7
    assert total(found, "thrifty_requests_total") == 7
    assert total(found, "thrifty_requests_total", gen_ai_response_model="gpt-4o", status_class="2xx") == 3
    assert total(found, "thrifty_requests_total", gen_ai_operation_name="embeddings") == 1
    assert total(found, "thrifty_requests_total", gen_ai_request_model="no-such-model", status_class="4xx") == 1
    assert total(found, "thrifty_tokens_total", gen_ai_token_type="input") == sum(r["prompt_tokens"] for r in rows)
    assert total(found, "thrifty_tokens_total", gen_ai_token_type="output") == sum(r["completion_tokens"] for r in rows)
    assert total(found, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == sum(r["prompt_tokens"] for r in rows)
    cost = sum(r["cost_nusd"] for r in rows) / 1e9
    assert cost > 0
    assert total(found, "thrifty_cost_usd_total") == pytest.approx(cost, rel=1e-9)
    assert total(found, "thrifty_cost_usd_total", gen_ai_response_model="gpt-4o-mini") == pytest.approx(
        sum(r["cost_nusd"] for r in rows if r["served_model"] == "gpt-4o-mini") / 1e9, rel=1e-9
    )
    assert total(found, "thrifty_request_duration_seconds_count") == 7
    assert total(found, "gen_ai_server_time_to_first_token_seconds_count", gen_ai_response_model="gpt-4o-mini") == 2
    assert total(found, "thrifty_upstream_attempts_total") == sum(r["attempts"] for r in rows) == 6
    assert total(found, "thrifty_upstream_breaker_state", gen_ai_response_model="gpt-4o", state="closed") == 1


def test_metrics_token_is_required(start_gateway: Callable[[Settings], ThreadServer], settings: Settings) -> None:
    server = start_gateway(replace(settings, telemetry=TelemetryConfig(metrics_token=TOKEN)))
    for headers in ({}, {"Authorization": f"Bearer {MASTER_KEY}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        response = httpx.get(f"{server.url}/metrics", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert "thrifty_requests_total" in scrape(server.url, TOKEN)


def test_metrics_off(start_gateway: Callable[[Settings], ThreadServer], settings: Settings) -> None:
    server = start_gateway(replace(settings, telemetry=TelemetryConfig(metrics=False)))
    assert httpx.get(f"{server.url}/metrics").status_code == 404


def test_redis_down_counts_cache_errors_and_requests_succeed(
    start_gateway: Callable[[Settings], ThreadServer], settings: Settings
) -> None:
    redis = RedisProcess().start()
    try:
        server = start_gateway(replace(settings, cache=CacheConfig(redis_url=redis.url, timeout_seconds=0.5)))
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0) as client:
            chat(client, "gpt-4o", "cache me", temperature=0)
            for _ in range(50):  # the store runs after the response: wait for the hit
                if total(samples(scrape(server.url)), "thrifty_requests_total", thrifty_cache_result="exact"):
                    break
                chat(client, "gpt-4o", "cache me", temperature=0)
            before = samples(scrape(server.url))
            assert total(before, "thrifty_requests_total", thrifty_cache_result="exact") >= 1
            assert total(before, "thrifty_cache_errors_total") == 0
            redis.kill()
            for i in range(3):
                chat(client, "gpt-4o", f"uncached while Redis is down {i}", temperature=0)  # no error reaches the client
        after = samples(scrape(server.url))
        assert total(after, "thrifty_cache_errors_total", tier="exact") >= 1
        assert total(after, "thrifty_requests_total", status_class="2xx") == total(after, "thrifty_requests_total")
    finally:
        redis.kill()


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries read (label names and matchers stripped)."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", ())]
    exprs += [v["query"]["query"] for v in board.get("templating", {}).get("list", ()) if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 10
    names = set()
    for expr in exprs:
        bare = re.sub(r"label_values\((\w+)[^)]*\)", r"\1", expr)  # label_values(metric, label)
        bare = re.sub(r"\{[^}]*\}", "", bare)
        bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
        names |= set(re.findall(r"\b(?:thrifty|gen_ai)_[a-z_]+", bare))
    return names


def test_dashboard_reads_metrics_that_exist(gateway: ThreadServer, client: openai.OpenAI, fake: FakeUpstream) -> None:
    chat(client, "gpt-4o", "one for the dashboard")
    families = list(text_string_to_metric_families(scrape(gateway.url)))
    exposed = set()
    for family in families:
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[family.type]
        exposed |= {family.name + s for s in suffixes}
    wanted = dashboard_metrics()
    assert {"thrifty_cost_usd_total", "thrifty_savings_usd_total", "thrifty_cache_errors_total"} <= wanted
    assert wanted <= exposed, wanted - exposed


def test_budget_refusals_and_open_breakers(
    start_gateway: Callable[[Settings], ThreadServer], settings: Settings, fake: FakeUpstream
) -> None:
    limit = BudgetLimit("key", "*", "daily", hard_nusd=1)  # a billionth of a dollar: the first request is refused
    breaker = UpstreamConfig(retries=0, breaker_failures=2, breaker_cooldown=60)
    server = start_gateway(replace(settings, budgets=BudgetsConfig(limits=(limit,)), upstream=breaker))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0)
    with client, pytest.raises(openai.RateLimitError):
        chat(client, "gpt-4o", "too expensive")
    found = samples(scrape(server.url))
    assert total(found, "thrifty_budget_refusals_total") == 1
    assert total(found, "thrifty_requests_total", status_class="4xx") == 1

    async def broken(payload: dict[str, object], request: object) -> web.Response:
        return web.json_response({"error": {"message": "down", "type": "server_error"}}, status=500)

    fake.handler = broken
    server = start_gateway(replace(settings, upstream=breaker))  # a second gateway, no budget: its breaker opens
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                chat(client, "gpt-4o", "anyone there?")
    found = samples(scrape(server.url))
    assert total(found, "thrifty_upstream_breaker_state", gen_ai_response_model="gpt-4o", state="open") == 1
    assert total(found, "thrifty_upstream_breaker_state", gen_ai_response_model="gpt-4o", state="closed") == 0
    assert total(found, "thrifty_requests_total", gen_ai_response_model="gpt-4o", status_class="5xx") == 2
    assert total(found, "thrifty_upstream_attempts_total", gen_ai_response_model="gpt-4o") == 2


def test_a_fallback_is_counted_with_its_route(
    start_gateway: Callable[[Settings], ThreadServer], settings: Settings, fake: FakeUpstream, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: metrics\nrules:\n  - name: mini-first\n    match: {model: auto}\n    action: {target: [gpt-4o-mini, gpt-4o]}\n",
        encoding="utf-8",
    )

    async def mini_down(payload: dict[str, object], request: object) -> web.Response | None:
        return (
            web.json_response({"error": {"message": "crashed", "type": "server_error"}}, status=500)
            if payload["model"] == "gpt-4o-mini"
            else None
        )

    fake.handler = mini_down
    upstream = UpstreamConfig(retries=1, backoff_base=0.01, backoff_max=0.05, probe_interval=0)
    server = start_gateway(replace(settings, policies=str(policy), upstream=upstream, cache=CacheConfig(enabled=False)))
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0) as client:
        chat(client, "auto", "hello")
    found = samples(scrape(server.url))
    labels = {"gen_ai_request_model": "auto", "gen_ai_response_model": "gpt-4o"}
    assert total(found, "thrifty_upstream_fallbacks_total", **labels) == 1
    assert total(found, "thrifty_requests_total", thrifty_route="mini-first", **labels) == 1
    assert total(found, "thrifty_upstream_attempts_total", gen_ai_response_model="gpt-4o") == 3  # a retry, then the fallback
