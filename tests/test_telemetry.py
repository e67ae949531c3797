"""Telemetry across processes and out of them: ``thrifty serve --workers 2`` where every scrape
reports the whole server, OTLP spans arriving at a fake collector on loopback with their
attributes, a plain gateway that never imports the OpenTelemetry SDK, the ``telemetry:``
config section, and the merge of worker snapshots."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from proxy.config import load_settings
from proxy.cost.pricing import Charge, Usage
from proxy.errors import ConfigError
from proxy.pipeline.exchange import Exchange
from proxy.settings import ModelConfig, Settings, TelemetryConfig, UpstreamConfig
from proxy.telemetry import Telemetry
from proxy.telemetry.exposition import merge, render
from proxy.telemetry.schema import FLUSH_SECONDS
from tests.api.test_metrics import samples, scrape, total
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import Served

REPO = Path(__file__).resolve().parents[1]


def test_every_worker_reports_the_whole_server(
    upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the supervisor makes its metrics directory
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        "models:\n"
        f"  - {{name: gpt-4o, provider: openai, base_url: '{upstream[1].url}/v1', api_key: sk-upstream-1}}\n"
        f"auth: {{master_key: {MASTER_KEY}}}\n"
        f"ledger: {{url: 'sqlite:///{tmp_path / 'thrifty.db'}', spill_dir: '{tmp_path / 'spill'}'}}\n",
        encoding="utf-8",
    )
    served = Served(config, "--workers", "2")
    try:
        served.wait_for("listening on", count=2)
        url = f"http://127.0.0.1:{served.port}"
        # A new connection per request: the kernel spreads them over the two workers' sockets.
        fresh = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)
        with openai.OpenAI(base_url=f"{url}/v1", api_key=MASTER_KEY, max_retries=0, http_client=fresh) as client:
            for i in range(20):
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"request {i}"}])
        (directory,) = tmp_path.glob("thrifty-metrics-*")
        time.sleep(FLUSH_SECONDS * 4)  # the promise: another worker's figures are at most FLUSH_SECONDS old
        per_worker = [f.read_bytes().count(b'"gpt-4o"') for f in directory.glob("*.json")]
        assert len(per_worker) == 2 and all(per_worker), "both workers served requests and left their figures"
        scrapes = [samples(scrape(url)) for _ in range(10)]  # each on a new connection: both workers answer
        assert [total(s, "thrifty_requests_total") for s in scrapes] == [20] * 10
        tokens = {total(s, "thrifty_tokens_total", gen_ai_token_type="input") for s in scrapes}
        assert {total(s, "thrifty_upstream_breaker_state", state="closed") for s in scrapes} == {2}  # one per worker
        assert ledger_sums(tmp_path / "thrifty.db", 20) == (20, *tokens)

        # A worker killed: the supervisor starts another; the dead one's counts stay, its gauges go.
        victim = int(next(directory.glob("*.json")).name.split("-")[0])
        os.kill(victim, signal.SIGKILL)
        served.wait_for(rf"worker {victim} exited")
        served.wait_for("listening on", count=3)
        time.sleep(FLUSH_SECONDS * 4)
        after = [samples(scrape(url)) for _ in range(6)]
        assert [total(s, "thrifty_requests_total") for s in after] == [20] * 6
        assert {total(s, "thrifty_upstream_breaker_state", state="closed") for s in after} == {2}
        served.terminate()
        assert served.exit_code() == 0
        assert not directory.exists()  # the supervisor removes it
    finally:
        served.kill()


def ledger_sums(db: Path, count: int, timeout: float = 10) -> tuple[int, int]:
    """Records and prompt tokens in the ledger, once the writer has stored ``count`` records."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            found, prompt = conn.execute("SELECT count(*), sum(prompt_tokens) FROM ledger").fetchone()
        if found >= count or time.monotonic() > deadline:
            return found, prompt
        time.sleep(0.1)


class Collector:
    """A fake OTLP/HTTP collector: decodes the protobuf the SDK's exporter sends."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        return app

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            self.resources.append({a.key: _value(a.value) for a in resource_spans.resource.attributes})
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    self.spans.append(
                        {
                            "name": span.name,
                            "id": span.span_id,
                            "parent": span.parent_span_id,
                            "trace": span.trace_id,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "error": span.status.code == 2,
                            **attributes,
                        }
                    )
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


def test_spans_reach_an_otlp_collector(
    start_gateway: Callable[[Settings], ThreadServer], settings: Settings, fake: FakeUpstream
) -> None:
    collector = Collector()
    failed = []

    async def fail_once(payload: dict[str, Any], request: web.Request) -> web.Response | None:
        if not failed:
            failed.append(True)
            return web.json_response({"error": {"message": "busy", "type": "server_error"}}, status=503)
        return None

    fake.handler = fail_once
    with ThreadServer(collector.app) as sink:
        telemetry = TelemetryConfig(otlp_endpoint=sink.url, service_name="thrifty-test")
        gateway = start_gateway(replace(settings, telemetry=telemetry, upstream=UpstreamConfig(backoff_base=0.01)))
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0) as client:
            reply = client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], temperature=0
            )
        usage = reply.parse().usage
        assert usage is not None
        gateway.stop()  # shutdown exports what the batch processor still holds
    (request,) = [s for s in collector.spans if s["parent"] == b""]
    assert request["name"] == "chat gpt-4o"
    assert request["gen_ai.operation.name"] == "chat"
    assert request["gen_ai.request.model"] == request["gen_ai.response.model"] == "gpt-4o"
    assert request["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert request["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert request["thrifty.cache.result"] == "miss"
    assert request["thrifty.cost.usd"] == pytest.approx(float(reply.headers["x-thrifty-cost-usd"]), rel=1e-6)
    assert request["thrifty.attempts"] == 2
    assert request["http.response.status_code"] == 200
    attempts = sorted((s for s in collector.spans if s["parent"] == request["id"]), key=lambda s: s["start"])
    assert [a["thrifty.attempt"] for a in attempts] == [1, 2]
    assert all(a["trace"] == request["trace"] and a["gen_ai.request.model"] == "gpt-4o" for a in attempts)
    assert attempts[0]["error"] and not attempts[1]["error"]
    assert request["start"] <= attempts[0]["start"] < attempts[1]["start"] <= attempts[1]["end"] <= request["end"]
    assert collector.resources[0]["service.name"] == "thrifty-test"


def test_plain_gateway_never_imports_the_opentelemetry_sdk(tmp_path: Path) -> None:
    # Its tracer and exporter, that is: redis-py 8 itself imports parts of the SDK's metrics
    # (redis.observability) whenever the SDK is installed, whatever thrifty does.
    script = f"""
import asyncio, sys
from aiohttp import web
from proxy.app import create_app
from proxy.settings import LedgerConfig, Settings

async def main():
    runner = web.AppRunner(create_app(Settings(ledger=LedgerConfig(url="sqlite:///{tmp_path / "t.db"}", spill_dir="{tmp_path}"))))
    await runner.setup()
    await runner.cleanup()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.exporter", "opentelemetry.sdk.trace"))))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_section(tmp_path: Path) -> None:
    path = tmp_path / "thrifty.yaml"
    path.write_text(
        "telemetry:\n  metrics_token: ${TOKEN}\n  otlp_endpoint: http://collector:4318\n  service_name: gw\n", encoding="utf-8"
    )
    got = load_settings(str(path), {"TOKEN": "a" * 20}).telemetry
    assert got == TelemetryConfig(metrics=True, metrics_token="a" * 20, otlp_endpoint="http://collector:4318", service_name="gw")
    for body, where in (
        ("telemetry:\n  metrics: yes please\n", "telemetry.metrics"),
        ("telemetry:\n  otlp_endpoint: collector:4318\n", "telemetry.otlp_endpoint"),
        ("telemetry:\n  metrics_token: short\n", "telemetry.metrics_token"),
        ("telemetry:\n  exporter: zipkin\n", "telemetry"),
    ):
        path.write_text(body, encoding="utf-8")
        with pytest.raises(ConfigError) as error:
            load_settings(str(path), {})
        assert f"{path}:2" in str(error.value) and where in str(error.value)


def test_merge_keeps_dead_workers_counts_but_not_their_gauges() -> None:
    row = ["chat", "", "gpt-4o", "gpt-4o", "", "miss", "2xx", 1.0, 10, 5, 100, 100, 0, 0, 0, 0, 1, 0, 0, 0]
    dead = 2**22 + 12345  # above the kernel's pid_max default: no such process
    merged = merge(
        [
            {"pid": os.getpid(), "rows": [row], "hist": {}, "cache_errors": {"exact": 2}, "breakers": [["gpt-4o", "closed"]]},
            {"pid": dead, "rows": [row], "hist": {}, "cache_errors": {"exact": 1}, "breakers": [["gpt-4o", "open"]]},
        ]
    )
    assert merged["rows"][tuple(row[:7])][:3] == [2.0, 20, 10]
    assert merged["cache_errors"] == {"exact": 3}
    assert merged["breakers"] == {("gpt-4o", "closed"): 1}


def test_a_semantic_hit_is_counted_with_its_similarity() -> None:
    model = ModelConfig("gpt-4o", "openai", "http://127.0.0.1:9/v1")
    telemetry = Telemetry(TelemetryConfig(), models=["gpt-4o"])
    hit = Exchange("r1", "chat/completions", requested_model="gpt-4o", target=model, cache="semantic", similarity=0.955)
    hit.usage, hit.charge = Usage(100, 20, source="cache"), Charge(0, 1500, 1500, 0, 0, 40)
    hit.finished = hit.started + 0.002
    telemetry.record(hit)
    found = samples(render(merge([telemetry.snapshot()])).decode())
    assert total(found, "thrifty_cache_similarity_bucket", le="0.96") == 1
    assert total(found, "thrifty_cache_similarity_bucket", le="0.94") == 0
    assert total(found, "thrifty_cache_similarity_sum") == pytest.approx(0.955)
    assert total(found, "thrifty_savings_usd_total", lever="cache") == pytest.approx(1.5e-6)
    assert total(found, "thrifty_overhead_usd_total") == pytest.approx(4e-8)
    assert total(found, "thrifty_requests_total", thrifty_cache_result="semantic") == 1
