"""The prune stage's decisions: which budget applies (rule, config, header, opt-out), the byte bound
that lets most requests skip counting, exact per-message sizes, and the ``prune:`` config section."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import load_settings
from proxy.cost.tokens import TokenCounter
from proxy.errors import BadRequest, ConfigError
from proxy.pipeline.prune import MessageSizer, resolve_budget, upper_bound
from proxy.policy.model import RoutePrune
from proxy.settings import PruneConfig

COUNTER = TokenCounter()


def budget_of(rule: RoutePrune | None, config: PruneConfig, headers: dict[str, str], window: int | None = None) -> int | None:
    budget, _ = resolve_budget(rule, config, window, headers)
    return None if budget is None else budget.max_tokens


def test_no_rule_no_config_no_header_means_no_pruning() -> None:
    assert budget_of(None, PruneConfig(), {}) is None


def test_the_header_sets_a_budget_or_tightens_one_but_never_loosens_it() -> None:
    assert budget_of(None, PruneConfig(), {"x-thrifty-max-input-tokens": "1500"}) == 1500
    assert budget_of(None, PruneConfig(max_input_tokens=1000), {"x-thrifty-max-input-tokens": "5000"}) == 1000
    assert budget_of(None, PruneConfig(max_input_tokens=1000), {"x-thrifty-max-input-tokens": "400"}) == 400
    rule = RoutePrune(max_input_tokens=2000)
    assert budget_of(rule, PruneConfig(max_input_tokens=1000), {}) == 2000  # the rule wins over the config
    assert budget_of(rule, PruneConfig(), {"x-thrifty-max-input-tokens": "99999"}) == 2000


def test_a_context_share_is_of_the_target_models_window() -> None:
    rule = RoutePrune(context_share=0.25)
    assert budget_of(rule, PruneConfig(), {}, window=128_000) == 32_000
    assert budget_of(rule, PruneConfig(), {}, window=None) is None  # unknown window: no budget from the share
    assert budget_of(None, PruneConfig(context_share=0.5), {}, window=8192) == 4096


def test_opt_out_where_allowed() -> None:
    off = {"x-thrifty-prune": "off", "x-thrifty-max-input-tokens": "100"}
    assert budget_of(None, PruneConfig(max_input_tokens=1000), off) is None
    assert budget_of(None, PruneConfig(max_input_tokens=1000, allow_opt_out=False), off) == 100
    assert budget_of(RoutePrune(max_input_tokens=900, allow_opt_out=False), PruneConfig(), {"x-thrifty-prune": "off"}) == 900


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5"])
def test_a_bad_header_is_a_bad_request(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        resolve_budget(None, PruneConfig(), None, {"x-thrifty-max-input-tokens": value})
    assert caught.value.param == "x-thrifty-max-input-tokens"


def test_the_summarizer_and_keep_last_come_from_the_rule_else_the_config() -> None:
    config = PruneConfig(max_input_tokens=1000, summarizer="local", keep_last=4)
    budget, summarizer = resolve_budget(None, config, None, {})
    assert budget is not None and (budget.keep_last, summarizer) == (4, "local")
    budget, summarizer = resolve_budget(RoutePrune(max_input_tokens=800, keep_last=2, summarizer=None), config, None, {})
    assert budget is not None and (budget.keep_last, summarizer) == (2, "local")
    budget, summarizer = resolve_budget(RoutePrune(max_input_tokens=800, summarize=False, summarizer="x"), config, None, {})
    assert budget is not None and (budget.summarize, summarizer) == (False, "x")


MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": st.text(max_size=300)},
    optional={"name": st.text(alphabet="abcxyz_", min_size=1, max_size=8)},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(MESSAGE, max_size=12))
def test_the_byte_bound_is_never_below_the_exact_count(messages: list[dict[str, str]]) -> None:
    """Any text, emoji and CJK included: a request under the bound is surely under the budget."""
    assert upper_bound(messages) >= COUNTER.count_messages(messages, "gpt-4o")


def test_sizes_add_up_to_the_chat_count_and_are_counted_once() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "name": "ann",
            "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}],
        },
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "result " * 50},
    ]
    counted = []

    class Counting(TokenCounter):
        def count_messages(self, items, model):  # type: ignore[no-untyped-def]
            counted.append(1)
            return super().count_messages(items, model)

    sizer = MessageSizer(Counting())
    sizes = sizer.sizes(messages, "gpt-4o")
    assert 3 + sum(sizes) == COUNTER.count_messages(messages, "gpt-4o")
    assert sizer.sizes([dict(m) for m in messages], "gpt-4o") == sizes  # equal messages, new objects
    assert len(counted) == len(messages)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "thrifty.yaml"
    path.write_text("models:\n  - name: local\n    provider: llamacpp\n" + text, encoding="utf-8")
    return path


def test_the_prune_section_is_read(tmp_path: Path) -> None:
    text = "prune:\n  max_input_tokens: 4000\n  keep_last: 4\n  summarizer: local\n  summary_role: user\n  allow_opt_out: false\n"
    prune = load_settings(str(_config(tmp_path, text)), env={}).prune
    assert prune == PruneConfig(max_input_tokens=4000, keep_last=4, summarizer="local", summary_role="user", allow_opt_out=False)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("prune:\n  summarizer: gpt-9\n", 5, "prune.summarizer: must be extractive or a configured model name"),
        ("prune:\n  context_share: 1.5\n", 5, "prune.context_share: must be a number in (0, 1]"),
        ("prune:\n  max_input_tokens: 10\n", 5, "prune.max_input_tokens: must be >= 64"),
        ("prune:\n  summary_role: assistant\n", 5, "prune.summary_role: must be one of system, user"),
        ("prune:\n  budget: 5\n", 5, "prune.budget: unknown key"),
        ("prune:\n  max_input_tokens: 900\n  context_share: 0.5\n", 6, "give max_input_tokens or context_share, not both"),
    ],
)
def test_a_bad_prune_section_names_the_key_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), env={})
    assert str(caught.value).startswith(f"{path}:{line}: ") and message in str(caught.value)
