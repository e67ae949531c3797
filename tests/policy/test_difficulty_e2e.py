"""The learned difficulty score end to end: a real gateway with a `difficulty` rule, the official
OpenAI SDK, the real in-process MiniLM embedder (shared with the semantic cache when both are on)
and a fake upstream that records which model it was asked for; the score lands in the ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.app_state import GATEWAY
from proxy.pipeline.route import SharedEmbed
from proxy.settings import ModelConfig, Settings
from tests.api.conftest import wait_until
from tests.conftest import MASTER_KEY, UPSTREAM_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

POLICY = """\
version: difficulty-e2e
aliases:
  small: [tiny]
  large: [gpt-4o]
rules:
  - name: auto-difficult
    match: {model: auto, difficulty: {above: 0.6}}
    action: {target: large}
  - name: auto-simple
    match: {model: auto}
    action: {target: small}
"""
HARD = (
    "A 67-year-old man with chronic kidney disease presents with muscle weakness and peaked T waves on ECG. "
    "His potassium is 7.1 mEq/L. Which of the following is the most appropriate immediate step? "
    "(A) Oral sodium polystyrene sulfonate (B) Intravenous calcium gluconate (C) Hemodialysis (D) Furosemide"
)
SIMPLE = "hi, how are you doing today?"


@pytest.fixture
def routed(upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path) -> Settings:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    base = settings_for(upstream[1].url, tmp_path)
    tiny = ModelConfig("tiny", "openai-compatible", f"{upstream[1].url}/v1", UPSTREAM_KEY, timeouts=base.models[0].timeouts)
    return replace(base, models=(*base.models, tiny), policies=str(policy))


@pytest.mark.parametrize("semantic", [False, True], ids=["router-only", "shared-with-semantic-cache"])
def test_a_hard_prompt_goes_large_and_a_simple_one_small_with_the_score_in_the_ledger(
    start_gateway: Callable[[Settings], ThreadServer], routed: Settings, fake: FakeUpstream, semantic: bool
) -> None:
    settings = replace(routed, cache=replace(routed.cache, mode="semantic")) if semantic else routed
    gateway = start_gateway(settings)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=60) as sdk:
        hard = sdk.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": HARD}])
        simple = sdk.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": SIMPLE}])
    assert (hard.headers["x-thrifty-route"], hard.headers["x-thrifty-model"]) == ("auto-difficult", "gpt-4o")
    assert (simple.headers["x-thrifty-route"], simple.headers["x-thrifty-model"]) == ("auto-simple", "tiny")
    assert gateway.app is not None
    router = gateway.app[GATEWAY].router
    assert router is not None and isinstance(router.embed, SharedEmbed)
    if semantic:  # one MiniLM in the process: the router scores with the semantic cache's embedder
        cache = gateway.app[GATEWAY].cache
        assert cache is not None and cache.semantic is not None
        assert router.embed._embedder is cache.semantic.embedder
    db = Path(settings.ledger.url.removeprefix("sqlite:///"))

    def scores() -> dict[str, float]:
        with sqlite3.connect(db) as conn:
            return dict(conn.execute("SELECT route, difficulty FROM ledger WHERE difficulty IS NOT NULL").fetchall())

    wait_until(lambda: len(scores()) == 2)
    assert scores()["auto-difficult"] > 0.6 > scores()["auto-simple"]
