"""Summaries of dropped turns: the extractive summarizer keeps the sentences that carry facts,
the cache key separates tenants and summarizers, and a model summarizer that fails or only
repeats its instructions gives way to the extractive summary (real HTTP to the fake upstream)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cache.store import MemoryStore
from proxy.context.summarize import EXTRACTIVE, SLM_PROMPT, Summarizer, extractive, sentences, summary_key
from proxy.cost.prices import Price
from proxy.providers.openai_compat import OpenAICompatible
from proxy.redact import Redactor
from proxy.settings import ModelConfig
from tests.fake_upstream import FakeUpstream, completion
from tests.servers import ThreadServer

DROPPED = [
    {"role": "user", "content": "Hi there! Thanks for helping."},
    {"role": "assistant", "content": "Of course, happy to help with that."},
    {"role": "user", "content": "Our principal investigator is Dr. Helen Achterberg. She is great."},
    {"role": "assistant", "content": "Sounds good. It is usually worth leaving some slack."},
    {"role": "user", "content": "We decided to ship on 4 February at a price of 4.99 dollars."},
    {"role": "assistant", "content": "Sounds good. It is usually worth leaving some slack."},
    {"role": "user", "content": "The root cause was a bad push to the payments-gateway service."},
]


def test_extractive_keeps_the_fact_sentences_in_order() -> None:
    summary = extractive(DROPPED, 1000)
    lines = summary.splitlines()
    assert lines == [
        "- user: Our principal investigator is Dr. Helen Achterberg.",
        "- user: We decided to ship on 4 February at a price of 4.99 dollars.",
        "- user: The root cause was a bad push to the payments-gateway service.",
    ]


def test_extractive_stays_within_its_room_densest_first() -> None:
    summary = extractive(DROPPED, 80)
    assert len(summary) <= 80 and "4 February" in summary


def test_sentences_split_on_ends_but_not_on_titles() -> None:
    found = [text for _, text in sentences([{"role": "user", "content": "Ask Dr. Smith. Then Mrs. Jones!\nDone"}])]
    assert found == ["Ask Dr. Smith.", "Then Mrs. Jones!", "Done"]


def test_tool_call_arguments_are_summarizable() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "book", "arguments": '{"hotel": "Bristol", "nights": 3}'}}],
    }
    assert "Bristol" in extractive([call], 500)


def test_the_cache_key_separates_tenants_summarizers_rooms_and_prefixes() -> None:
    base = summary_key("team-a", "slm", 300, DROPPED)
    assert base == summary_key("team-a", "slm", 300, [dict(m) for m in DROPPED])
    assert base.startswith("thrifty:summary:{team-a}:")
    others = {
        summary_key("team-b", "slm", 300, DROPPED),
        summary_key("team-a", "other", 300, DROPPED),
        summary_key("team-a", "slm", 200, DROPPED),
        summary_key("team-a", "slm", 300, DROPPED[:-1]),
    }
    assert base not in others and len(others) == 4


@pytest.fixture
def slm() -> Iterator[tuple[FakeUpstream, ModelConfig]]:
    fake = FakeUpstream()
    with ThreadServer(fake.app) as server:
        yield fake, ModelConfig("slm", "llamacpp", f"{server.url}/v1", upstream_model="gemma-3-270m")


async def _summarize(fake: FakeUpstream, target: ModelConfig, reply: str) -> Any:
    async def handler(payload: dict[str, Any], request: web.Request) -> web.Response:
        body = completion(payload)
        body["choices"][0]["message"]["content"] = reply
        return web.json_response(body)

    fake.handler = handler
    async with aiohttp.ClientSession() as session:
        provider = OpenAICompatible(session, target, Redactor())
        summarizer = Summarizer(MemoryStore(10, 1 << 20), {"slm": provider}, {"slm": target}, lambda _: Price.free("local"))
        made = await summarizer.summarize(DROPPED, 100, "slm", "team")
        await summarizer.close()
        return made


async def test_a_model_summary_is_used(slm: tuple[FakeUpstream, ModelConfig]) -> None:
    made = await _summarize(*slm, "Helen Achterberg leads; ship 4 February at 4.99.")
    assert (made.text, made.source) == ("Helen Achterberg leads; ship 4 February at 4.99.", "model")
    sent = slm[0].requests[-1].payload
    assert sent["model"] == "gemma-3-270m" and sent["max_tokens"] == 100 and sent["temperature"] == 0


async def test_a_model_that_repeats_its_instructions_gives_way_to_extractive(slm: tuple[FakeUpstream, ModelConfig]) -> None:
    made = await _summarize(*slm, SLM_PROMPT.format(transcript="user: hi") + " mendatang")
    assert made.source == "extractive (model echo)" and "Achterberg" in made.text


async def test_an_unknown_summarizer_is_extractive() -> None:
    summarizer = Summarizer(MemoryStore(10, 1 << 20), {}, {}, lambda _: Price.free("local"))
    made = await summarizer.summarize(DROPPED, 100, "not-configured", "team")
    assert made.source == EXTRACTIVE and "payments-gateway" in made.text
