"""The ledger end to end: real gateway, official SDK, SQLite ledger. Every request leaves
exactly one priced record; the cost header and the stream's cost comment are that record's
figure; tokens are counted where the upstream reports none; prompt text is never stored."""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from proxy.cost.prices import Price, load_litellm_prices
from proxy.cost.pricing import cost_nusd, usd
from proxy.cost.tokens import TokenCounter, estimate_tokens
from proxy.settings import ModelConfig, Settings
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream, usage
from tests.servers import ThreadServer

WORDS = [f"w{i}" for i in range(200)]


@pytest.fixture(scope="module")
def gpt_4o() -> Price:
    return load_litellm_prices()["gpt-4o"]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


@pytest.fixture
def db_path(settings: Settings) -> Path:
    return Path(settings.ledger.url.removeprefix("sqlite:///"))


@pytest.fixture
def raw(gateway: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30) as c:
        yield c


def rows(db_path: Path, where: str = "1 = 1", *args: Any) -> list[dict[str, Any]]:
    if not db_path.exists():
        return []
    conn = sqlite3.connect(db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM ledger WHERE {where}", args)]
    except sqlite3.OperationalError:  # not migrated yet, or the table is renamed by a test
        return []
    finally:
        conn.close()


def record_of(db_path: Path, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The one record of ``request_id``, once the background writer has written it."""
    deadline = time.monotonic() + timeout
    while True:
        found = rows(db_path, "request_id = ?", request_id)
        assert len(found) <= 1, f"{len(found)} records for one request"
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found, f"no record for request {request_id} after {timeout} s"
    time.sleep(0.1)  # and no second one turns up
    assert len(rows(db_path, "request_id = ?", request_id)) == 1
    return found[0]


def sse_events(body: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The data events and the comment lines of an SSE body."""
    events = [orjson.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    comments = [line for line in body.splitlines() if line.startswith(":")]
    return events, comments


def test_a_plain_request_leaves_one_priced_record(
    client: openai.OpenAI, fake: FakeUpstream, db_path: Path, gpt_4o: Price
) -> None:
    messages: list[Any] = [{"role": "user", "content": "what does a ledger hold"}]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
    answer = raw.parse()
    rec = record_of(db_path, raw.headers["x-request-id"])

    assert answer.usage is not None
    expected = usage(fake.requests[-1].payload, len(["echo:", "what", "does", "a", "ledger", "hold"]))
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (expected["prompt_tokens"], expected["completion_tokens"])
    assert rec["usage_source"] == "upstream" and rec["status"] == 200 and rec["error_code"] is None
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0
    assert raw.headers["x-thrifty-cost-usd"] == usd(rec["cost_nusd"])
    assert raw.headers["x-thrifty-savings-usd"] == usd(0)
    assert (rec["requested_model"], rec["served_model"], rec["provider"]) == ("gpt-4o", "gpt-4o", "openai")
    assert rec["key_id"] == "master"
    # no temperature 0 and no seed: not cacheable, so the cache stood aside
    assert rec["price_source"] == "litellm" and rec["stream"] == 0 and rec["cache"] == "bypass"
    stored = (rec["price_input"], rec["price_output"], rec["price_cached_input"])
    assert tuple(Decimal(p) for p in stored) == (gpt_4o.input, gpt_4o.output, gpt_4o.cached_input)
    assert not any("E" in p for p in stored), f"unit prices stored in exponent form: {stored}"
    assert rec["latency_ms"] > 0 and rec["upstream_ms"] is not None


def test_a_record_keeps_the_routing_features_policy_simulate_replays_even_without_a_policy(
    client: openai.OpenAI, db_path: Path
) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    code = "Write a Python function that parses ISO dates and raises on bad input"
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": code}],
        tools=[tool],  # type: ignore[list-item]
        response_format={"type": "json_object"},
    )
    rec = record_of(db_path, raw.headers["x-request-id"])
    assert (rec["has_tools"], rec["has_images"], rec["json_mode"], rec["task_class"]) == (1, 0, "json_object", "code")
    assert rec["route"] is None and rec["policy_version"] is None  # no policy ran: only the features were read
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "hi there"}])
    rec = record_of(db_path, plain.headers["x-request-id"])
    assert (rec["has_tools"], rec["has_images"], rec["json_mode"], rec["task_class"]) == (0, 0, None, "chat")


def test_a_stream_is_priced_from_a_usage_chunk_the_client_never_sees(
    client: openai.OpenAI, fake: FakeUpstream, db_path: Path, gpt_4o: Price
) -> None:
    messages: list[Any] = [{"role": "user", "content": "stream a priced answer"}]
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True)
    chunks: list[Any] = list(raw.parse())
    rec = record_of(db_path, raw.headers["x-request-id"])

    assert fake.requests[-1].payload["stream_options"] == {"include_usage": True}
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert rec["usage_source"] == "upstream" and rec["stream"] == 1 and rec["status"] == 200
    assert rec["completion_tokens"] == len(["echo:", "stream", "a", "priced", "answer"])
    assert rec["prompt_tokens"] == usage(fake.requests[-1].payload, 0)["prompt_tokens"]
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0
    assert rec["ttft_ms"] is not None


def test_a_client_that_asks_for_usage_gets_the_same_usage_as_the_record(client: openai.OpenAI, db_path: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fast",
        messages=[{"role": "user", "content": "usage please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    seen = [c.usage for c in chunks if c.usage is not None]
    rec = record_of(db_path, raw.headers["x-request-id"])
    assert len(seen) == 1
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (seen[0].prompt_tokens, seen[0].completion_tokens)
    assert rec["served_model"] == "fast" and rec["cost_nusd"] > 0


def test_the_streams_cost_comment_is_the_records_cost(raw: httpx.Client, db_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "comment please"}], "stream": True}
    response = raw.post("/v1/chat/completions", json=body)
    events, comments = sse_events(response.text)
    rec = record_of(db_path, response.headers["x-request-id"])
    assert comments == [f": thrifty cost_usd={usd(rec['cost_nusd'])} savings_usd={usd(0)}"]
    assert response.text.endswith(comments[0] + "\n\n" + "data: [DONE]\n\n")
    assert all("usage" not in e for e in events)


def test_an_upstream_5xx_is_recorded_with_its_status_and_code(client: openai.OpenAI, fake: FakeUpstream, db_path: Path) -> None:
    async def overloaded(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        error = {
            "message": "The engine is currently overloaded",
            "type": "server_error",
            "param": None,
            "code": "engine_overloaded",
        }
        return web.json_response({"error": error}, status=503)

    fake.handler = overloaded
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "are you there"}])
    rec = record_of(db_path, caught.value.response.headers["x-request-id"])
    assert (rec["status"], rec["error_code"]) == (503, "engine_overloaded")
    assert (rec["cost_nusd"], rec["prompt_tokens"], rec["completion_tokens"]) == (0, 0, 0)  # nothing was billed
    assert rec["usage_source"] == "none" and rec["served_model"] == "gpt-4o"


def test_an_unknown_model_is_recorded_as_a_404(client: openai.OpenAI, fake: FakeUpstream, db_path: Path) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hello"}])
    rec = record_of(db_path, caught.value.response.headers["x-request-id"])
    assert (rec["status"], rec["error_code"], rec["requested_model"]) == (404, "model_not_found", "no-such-model")
    assert rec["served_model"] is None and rec["cost_nusd"] == 0 and rec["usage_source"] == "none"
    assert fake.requests == []


def abandon_stream(client: openai.OpenAI, fake: FakeUpstream, messages: list[Any]) -> tuple[str, str]:
    """Read six chunks of a long streamed answer, then leave; the request id and what was seen."""

    async def long_answer(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return await fake.stream(request, payload, WORDS)

    fake.handler, fake.chunk_delay = long_answer, 0.02
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True)
    stream: Any = raw.parse()
    seen = ""
    for _, chunk in zip(range(6), stream, strict=False):
        seen += chunk.choices[0].delta.content or ""
    stream.close()
    return raw.headers["x-request-id"], seen


def test_a_client_gone_mid_stream_is_recorded_as_499_with_counted_tokens(
    start_gateway: Callable[[Settings], ThreadServer],
    settings: Settings,
    fake: FakeUpstream,
    gpt_4o: Price,
    counter: TokenCounter,
) -> None:
    # A gateway with a local model loads its tokenizer at start-up (local streams carry no usage).
    local = ModelConfig("local-small", "llamacpp", settings.models[0].base_url)
    gateway = start_gateway(replace(settings, models=(*settings.models, local)))
    messages: list[Any] = [{"role": "user", "content": "tell me a long story"}]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0) as client:
        request_id, seen = abandon_stream(client, fake, messages)
    rec = record_of(Path(settings.ledger.url.removeprefix("sqlite:///")), request_id)

    assert (rec["status"], rec["error_code"], rec["usage_source"]) == (499, "client_disconnected", "counted")
    assert rec["prompt_tokens"] == counter.count_messages(messages, "gpt-4o")
    assert counter.count_text(seen, "gpt-4o") <= rec["completion_tokens"] < counter.count_text(" ".join(WORDS), "gpt-4o")
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0


def test_a_client_gone_mid_stream_without_a_tokenizer_is_estimated(
    client: openai.OpenAI, fake: FakeUpstream, db_path: Path, gpt_4o: Price
) -> None:
    # Only remote models, no budgets: no tokenizer is loaded just to price an abandoned stream.
    messages: list[Any] = [{"role": "user", "content": "tell me a long story"}]
    request_id, seen = abandon_stream(client, fake, messages)
    rec = record_of(db_path, request_id)

    assert (rec["status"], rec["error_code"], rec["usage_source"]) == (499, "client_disconnected", "estimated")
    assert rec["prompt_tokens"] == estimate_tokens(messages) > 0
    assert estimate_tokens(seen) <= rec["completion_tokens"] < estimate_tokens(" ".join(WORDS))
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0


def test_a_stream_without_usage_is_counted_with_tiktoken(
    raw: httpx.Client, fake: FakeUpstream, db_path: Path, gpt_4o: Price, counter: TokenCounter
) -> None:
    async def llama_cpp(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return await fake.stream(request, {**payload, "stream_options": None})  # ignores include_usage

    fake.handler = llama_cpp
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count me with tiktoken"}]
    response = raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages, "stream": True})
    events, comments = sse_events(response.text)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    rec = record_of(db_path, response.headers["x-request-id"])

    assert text == "echo: count me with tiktoken"
    assert rec["usage_source"] == "counted" and rec["status"] == 200
    assert rec["prompt_tokens"] == counter.count_messages(messages, "gpt-4o")
    assert rec["completion_tokens"] == counter.count_text(text, "gpt-4o") > 0
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0
    assert comments == [f": thrifty cost_usd={usd(rec['cost_nusd'])} savings_usd={usd(0)}"]


def test_a_client_that_asks_for_usage_gets_the_counted_usage_when_the_upstream_sends_none(
    client: openai.OpenAI, fake: FakeUpstream, db_path: Path
) -> None:
    async def llama_cpp(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return await fake.stream(request, {**payload, "stream_options": None})  # ignores include_usage

    fake.handler = llama_cpp
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "count me for the client too"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())
    rec = record_of(db_path, raw.headers["x-request-id"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (rec["prompt_tokens"], rec["completion_tokens"])
    assert last.usage.total_tokens == rec["prompt_tokens"] + rec["completion_tokens"]
    assert last.id == chunks[0].id and last.model == chunks[0].model
    assert rec["usage_source"] == "counted" and sum(c.usage is not None for c in chunks) == 1


def test_a_plain_reply_without_usage_is_counted_with_tiktoken(
    raw: httpx.Client, fake: FakeUpstream, db_path: Path, gpt_4o: Price, counter: TokenCounter
) -> None:
    async def no_usage(payload: dict[str, Any], request: web.Request) -> web.Response:
        reply = {"id": "x", "object": "chat.completion", "created": 1, "model": payload["model"]}
        message = {"role": "assistant", "content": "a reply with no usage at all"}
        reply["choices"] = [{"index": 0, "message": message, "finish_reason": "stop"}]
        return web.json_response(reply)

    fake.handler = no_usage
    messages = [{"role": "user", "content": "price me anyway"}]
    response = raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages})
    rec = record_of(db_path, response.headers["x-request-id"])

    assert rec["usage_source"] == "counted"
    assert rec["prompt_tokens"] == counter.count_messages(messages, "gpt-4o")
    assert rec["completion_tokens"] == counter.count_text("a reply with no usage at all", "gpt-4o") > 0
    assert usd(rec["cost_nusd"]) == response.headers["x-thrifty-cost-usd"]
    assert rec["cost_nusd"] == cost_nusd(gpt_4o, rec["prompt_tokens"], 0, rec["completion_tokens"]) > 0


def test_tags_and_user_are_recorded(client: openai.OpenAI, db_path: Path) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "tag me"}],
        user="user-123",
        metadata={"project": "apollo", "env": "staging"},
        extra_headers={"x-thrifty-tags": "env=prod, team=blue"},
    )
    rec = record_of(db_path, raw.headers["x-request-id"])
    assert rec["user_id"] == "user-123"
    assert orjson.loads(rec["tags"]) == {"project": "apollo", "env": "prod", "team": "blue"}


def test_prompt_text_is_never_stored(
    gateway: ThreadServer, client: openai.OpenAI, raw: httpx.Client, fake: FakeUpstream, db_path: Path
) -> None:
    marker = f"zebra-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": f"my secret is {marker}"}]
    ids = [ask(client, messages).headers["x-request-id"], stream(raw, messages).headers["x-request-id"]]

    async def no_usage(payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return await fake.stream(request, {**payload, "stream_options": None})

    fake.handler = no_usage  # the counted path keeps the relayed text for a while: it must not leak either
    ids.append(stream(raw, messages).headers["x-request-id"])
    for request_id in ids:
        record_of(db_path, request_id)
    gateway.stop()  # the writer flushes, the database closes

    assert len(rows(db_path)) == len(ids)
    stored = b"".join(p.read_bytes() for p in db_path.parent.rglob("*") if p.is_file())
    assert ids[0].encode() in stored  # the search does see what is stored
    assert marker.encode() not in stored
    assert b"my secret is" not in stored


def test_requests_never_wait_on_the_store(client: openai.OpenAI, db_path: Path) -> None:
    record_of(db_path, ask(client, [{"role": "user", "content": "warm"}]).headers["x-request-id"])
    lock = sqlite3.connect(db_path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the writer now waits up to its 30 s busy timeout on every batch
    try:
        started = time.monotonic()
        ids = []
        for i in range(20):
            response = ask(client, [{"role": "user", "content": f"q{i}"}])
            assert response.parse().choices[0].message.content == f"echo: q{i}"
            ids.append(response.headers["x-request-id"])
        assert time.monotonic() - started < 10, "requests waited on the locked ledger"
        assert rows(db_path, f"request_id IN ({','.join('?' * len(ids))})", *ids) == []
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    for request_id in ids:
        record_of(db_path, request_id, timeout=60)


def ask(client: openai.OpenAI, messages: list[Any], **options: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, **options)


def stream(raw: httpx.Client, messages: list[dict[str, Any]]) -> httpx.Response:
    return raw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages, "stream": True})
