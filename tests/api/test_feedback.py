"""``POST /v1/thrifty/feedback`` on a real gateway: chat requests made with the openai SDK,
then feedback over plain HTTP. A key scores its own requests (the latest score wins, the
comment is stored), another key's or an unknown id is the same OpenAI-shaped 404, a bad
score or body a 400 naming the field; a record still in the writer's buffer is found."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.api.feedback import parse_feedback
from proxy.cost.record import LedgerRecord
from proxy.cost.writer import LedgerWriter
from proxy.errors import BadRequest
from proxy.settings import Settings
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.api.conftest import StartGateway, error_of, wait_until
from tests.conftest import MASTER_KEY

HELLO = [{"role": "user", "content": "a private question about my invoice"}]


async def make_keys(url: str) -> tuple[str, str]:
    db = await open_database(url)
    try:
        store = KeyStore(db)
        return (await store.create("alpha", None, "user"))[0], (await store.create("beta", None, "user"))[0]
    finally:
        await db.close()


async def fetch(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = await open_database(url)
    try:
        return await db.fetch(sql, *args)
    finally:
        await db.close()


def ask(base: str, key: str) -> str:
    """One chat completion through the SDK; its request id (the x-request-id header)."""
    with openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
        raw.parse()
        return raw.headers["x-request-id"]


def post(base: str, key: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(
        f"{base}/v1/thrifty/feedback",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=content,
        json=None if content is not None else body,
        timeout=30,
    )


@pytest.fixture
def keys(settings: Settings) -> tuple[str, str]:
    return asyncio.run(make_keys(settings.ledger.url))


def test_a_key_scores_its_own_request_and_the_latest_feedback_wins(
    settings: Settings, start_gateway: StartGateway, keys: tuple[str, str]
) -> None:
    gateway = start_gateway(settings)
    alpha, _ = keys
    request_id = ask(gateway.url, alpha)

    first = post(gateway.url, alpha, {"request_id": request_id, "score": 0.2})  # at once: maybe still buffered
    assert first.status_code == 200, first.text
    assert first.json()["score"] == 0.2 and first.json()["object"] == "thrifty.feedback"
    again = post(gateway.url, alpha, {"request_id": request_id, "score": 1, "comment": "right after all"})
    assert again.status_code == 200, again.text

    rows = asyncio.run(fetch(settings.ledger.url, "SELECT request_id, score, comment FROM feedback"))
    assert rows == [(request_id, 1.0, "right after all")]
    joined = "SELECT f.key_id = l.key_id FROM feedback f JOIN ledger l USING (request_id)"
    assert wait_until(lambda: bool(asyncio.run(fetch(settings.ledger.url, joined))))  # the writer flushes every 0.25 s
    owner = asyncio.run(fetch(settings.ledger.url, joined))
    assert owner == [(1,)]
    # the master key may score any request (stored against the key that made it)
    master = post(gateway.url, MASTER_KEY, {"request_id": request_id, "score": 0.0})
    assert master.status_code == 200
    assert asyncio.run(fetch(settings.ledger.url, "SELECT COUNT(*), MAX(score) FROM feedback")) == [(1, 0.0)]


def test_another_keys_request_and_an_unknown_id_are_the_same_404(
    settings: Settings, start_gateway: StartGateway, keys: tuple[str, str]
) -> None:
    gateway = start_gateway(settings)
    alpha, beta = keys
    request_id = ask(gateway.url, alpha)

    for body in ({"request_id": request_id, "score": 0.9}, {"request_id": "req_never_made", "score": 0.9}):
        response = post(gateway.url, beta, body)
        assert response.status_code == 404
        error = error_of(response)
        assert error["param"] == "request_id" and error["type"] == "invalid_request_error"
        assert error["code"] == "request_not_found"
    assert asyncio.run(fetch(settings.ledger.url, "SELECT COUNT(*) FROM feedback")) == [(0,)]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"request_id": "r", "score": 1.5}, "score"),
        ({"request_id": "r", "score": -0.1}, "score"),
        ({"request_id": "r", "score": "good"}, "score"),
        ({"request_id": "r", "score": True}, "score"),
        ({"request_id": "r"}, "score"),
        ({"score": 0.5}, "request_id"),
        ({"request_id": "r", "score": 0.5, "comment": "x" * 1001}, "comment"),
        ({"request_id": "r", "score": 0.5, "prompt": "hi"}, "prompt"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    settings: Settings, start_gateway: StartGateway, keys: tuple[str, str], body: dict[str, Any], param: str
) -> None:
    gateway = start_gateway(settings)
    response = post(gateway.url, keys[0], body)
    assert response.status_code == 400
    assert error_of(response)["param"] == param


def test_bad_json_and_no_key(settings: Settings, start_gateway: StartGateway, keys: tuple[str, str]) -> None:
    gateway = start_gateway(settings)
    bad = post(gateway.url, keys[0], b"{not json")
    assert bad.status_code == 400 and "JSON" in error_of(bad)["message"]
    anonymous = httpx.post(f"{gateway.url}/v1/thrifty/feedback", json={"request_id": "r", "score": 1}, timeout=30)
    assert anonymous.status_code == 401


def test_parse_keeps_the_comment_and_takes_integers() -> None:
    parsed = parse_feedback(b'{"request_id": "req_1", "score": 1, "comment": "ok"}')
    assert (parsed.request_id, parsed.score, parsed.comment) == ("req_1", 1.0, "ok")
    with pytest.raises(BadRequest):
        parse_feedback(b'{"request_id": "req_1", "score": NaN}')


def test_a_record_not_yet_flushed_is_found_in_the_writers_buffer(tmp_path: Path) -> None:
    async def main() -> list[LedgerRecord]:
        db = await open_database(f"sqlite:///{tmp_path / 'l.db'}")
        try:
            writer = LedgerWriter(db, tmp_path / "spill")  # not started: nothing is flushed
            writer.submit(record("req_buffered"))
            writer.submit(record("req_other"))
            return writer.pending_for("req_buffered")
        finally:
            await db.close()

    found = asyncio.run(main())
    assert [r.request_id for r in found] == ["req_buffered"]


def record(request_id: str) -> LedgerRecord:
    return LedgerRecord(
        id=request_id, request_id=request_id, ts=0.0, endpoint="chat/completions", key_id="k", team=None, app=None,
        user_id=None, tags=None, requested_model="m", served_model="m", provider="openai", route=None,
        policy_version=None, cache="miss", stream=False, prompt_tokens_before=1, prompt_tokens=1, completion_tokens=1,
        cached_tokens=0, reasoning_tokens=0, usage_source="upstream", price_input=None, price_output=None,
        price_cached_input=None, price_source=None, cost_nusd=0, baseline_nusd=0, savings_cache_nusd=0,
        savings_routing_nusd=0, savings_pruning_nusd=0, overhead_nusd=0, latency_ms=1.0, upstream_ms=None,
        ttft_ms=None, status=200, error_code=None,
    )  # fmt: skip
