"""The ``difficulty`` matcher: loader errors with file:line, the condition's three answers, explain."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from proxy.policy.difficulty import load
from proxy.policy.engine import evaluate
from proxy.policy.model import Difficulty, Features
from tests.policy.test_loader import error_of, parse

POLICY = """\
rules:
  - name: hard
    match: {model: auto, difficulty: {above: 0.6}}
    action: {target: gpt-4o}
  - name: easy
    match: {model: auto}
    action: {target: gemma}
"""


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ("{}", "p.yaml:3"),
        ("{above: 1.5}", "between 0 and 1"),
        ("{above: high}", "between 0 and 1"),
        ("{above: 0.7, below: 0.3}", "must be below the below bound"),
        ("{over: 0.5}", "p.yaml:3"),
    ],
)
def test_bad_bounds_name_the_line(bounds: str, expected: str) -> None:
    text = f"rules:\n  - name: r\n    match: {{difficulty: {bounds}}}\n    action: {{target: gpt-4o}}\n"
    assert expected in error_of(text)


def test_condition_waits_for_the_score_then_decides() -> None:
    policy = parse(POLICY)
    assert policy.difficulty
    features = Features(model="auto", last_user="What is 2 + 2?")
    assert evaluate(policy, features, {}).needs_difficulty
    assert evaluate(policy, replace(features, difficulty=0.9), {}).model == "gpt-4o"
    assert evaluate(policy, replace(features, difficulty=0.2), {}).model == "gemma"
    assert evaluate(policy, replace(features, difficulty=math.nan), {}).model == "gemma"  # no score: no match


def test_a_policy_without_difficulty_never_asks_for_it() -> None:
    policy = parse("rules:\n  - name: r\n    match: {model: auto}\n    action: {target: gemma}\n")
    assert not policy.difficulty
    assert not evaluate(policy, Features(model="auto"), {}).needs_difficulty


def test_explain_shows_the_score() -> None:
    decision = evaluate(parse(POLICY), Features(model="auto", difficulty=0.25), {}, explain=True)
    assert any("difficulty score is 0.25" in note for note in decision.notes)


def test_narrower_bounds_imply_wider() -> None:
    assert Difficulty("difficulty", "a", above=0.7).implies(Difficulty("difficulty", "b", above=0.6))
    assert not Difficulty("difficulty", "a", above=0.5).implies(Difficulty("difficulty", "b", above=0.6))


def test_the_shipped_model_scores_between_0_and_1() -> None:
    model = load()
    vector = np.full(384, 1 / math.sqrt(384), dtype=np.float32)
    assert 0.0 <= model.score(vector, "A. one\nB. two\nC. three", 1) <= 1.0
    assert "train" in model.trained_on
