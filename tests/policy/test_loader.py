"""Policy YAML to a Policy: each kind of mistake is a ConfigError naming file:line and the key;
aliases resolve against the configured models; the shipped default validates everywhere."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import DEFAULT_BASE_URLS, ModelConfig, load_settings
from proxy.errors import ConfigError
from proxy.policy.loader import load_policy, parse_policy
from proxy.policy.model import Features, Keywords, Pattern, TimeWindow, TokenRange

ROOT = Path(__file__).resolve().parents[2]
MODELS = (
    ModelConfig("gpt-4o", "openai", DEFAULT_BASE_URLS["openai"]),
    ModelConfig("gpt-4o-mini", "openai", DEFAULT_BASE_URLS["openai"]),
    ModelConfig("gemma", "llamacpp", DEFAULT_BASE_URLS["llamacpp"]),
)


def parse(text: str, models: tuple[ModelConfig, ...] = MODELS):  # type: ignore[no-untyped-def]
    return parse_policy(textwrap.dedent(text), "p.yaml", models)


def error_of(text: str, models: tuple[ModelConfig, ...] = MODELS) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, models)
    return str(info.value)


def test_a_full_policy_loads_with_lines_aliases_and_a_version() -> None:
    policy = parse(
        """\
        version: v7
        aliases:
          small: ["@local", gpt-4o-mini, not-configured]
        rules:
          - name: tools
            match: {model: auto, tools: true, team: [a, b]}
            action: {target: [gpt-4o, small], max_tokens: 500}
          - name: split
            match: {model: auto, tags: {exp: x}, headers: {X-Prio: true}, prompt_tokens: {max: 100}}
            action: {split: {gpt-4o: 1, small: 3}}
          - name: words
            match: {keywords: [Prove, "step by step"], regex: ["^a+", "b$"], time: {days: [mon, Fri], from: "09:00", to: 17:00}}
            action: {target: gemma}
        """
    )
    assert policy.version.startswith("v7-") and len(policy.version) == 15
    assert policy.aliases == {"small": ("gemma", "gpt-4o-mini")}
    assert policy.header_names == frozenset({"x-prio"})
    tools, split, words = policy.rules
    assert (tools.name, tools.line, split.line, words.line) == ("tools", 5, 8, 11)
    assert tools.action.arms[0].models == ("gpt-4o", "gemma", "gpt-4o-mini")
    assert tools.action.max_tokens == 500
    assert [(a.weight, a.models) for a in split.action.arms] == [(1, ("gpt-4o",)), (3, ("gemma", "gpt-4o-mini"))]
    assert any(isinstance(c, TokenRange) and c.high == 100 for c in split.conditions)
    window = next(c for c in words.conditions if isinstance(c, TimeWindow))
    assert (window.days, window.start, window.end) == (frozenset({0, 4}), 540, 1020)
    assert [type(c) for c in words.conditions] == [Keywords, Pattern, TimeWindow]  # cheapest first
    assert words.conditions[0].test(replace(Features(model="m"), last_user_lower="please prove it"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: a\n    action: {target: gpt-4o\n", "p.yaml:4: YAML syntax error"),
        ("rules:\n  - name: a\n    action: {target: gpt-5x}\n", "p.yaml:3: rules[0].action.target: unknown model 'gpt-5x'"),
        (
            "rules:\n  - name: a\n    action: {split: {gpt-4o: 1, nope: 2}}\n",
            "p.yaml:3: rules[0].action.split.nope: unknown model 'nope'",
        ),
        (
            "rules:\n  - name: all\n    action: {target: gpt-4o}\n"
            "  - name: later\n    match: {team: x}\n    action: {target: gpt-4o}\n",
            "p.yaml:4: rules[1]: rule 'later' is shadowed: the earlier catch-all rule 'all' (line 2) matches every request",
        ),
        (
            "rules:\n  - name: a\n    match: {model: auto}\n    action: {target: gpt-4o}\n"
            "  - name: b\n    match: {model: auto, tools: true}\n    action: {target: gpt-4o}\n",
            "p.yaml:5: rules[1]: rule 'b' is shadowed: the earlier rule 'a' (line 2)",
        ),
        (
            "rules:\n  - name: a\n    match:\n      regex: '[a-'\n    action: {target: gpt-4o}\n",
            "p.yaml:4: rules[0].match.regex: bad regular expression '[a-': unterminated character set at position 0",
        ),
        (
            "rules:\n  - name: a\n    match: {colour: red}\n    action: {target: gpt-4o}\n",
            "p.yaml:3: rules[0].match.colour: unknown key",
        ),
        (
            "rules:\n  - name: a\n    match: {tools: yes please}\n    action: {target: gpt-4o}\n",
            "rules[0].match.tools: must be true or false",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, cascade: [gemma, gpt-4o]}\n",
            "p.yaml:3: rules[0].action.cascade: not supported yet",
        ),
        ("rules:\n  - name: a\n    action: {cheapest: true}\n", "p.yaml:3: rules[0].action.cheapest: not supported yet"),
        (
            "rules:\n  - name: a\n    match: {task_class: code}\n    action: {target: gpt-4o}\n",
            "p.yaml:3: rules[0].match.task_class: not supported yet",
        ),
        (
            "rules:\n  - name: a\n    match: {budget: {above: 80}}\n    action: {target: gpt-4o}\n",
            "rules[0].match.budget: not supported yet",
        ),
        ("rules:\n  - name: a\n    match: {model: auto}\n", "p.yaml:2: rules[0]: every rule needs an action"),
        ("rules:\n  - match: {model: auto}\n    action: {target: gpt-4o}\n", "p.yaml:2: rules[0].name: every rule needs a name"),
        (
            "rules:\n  - name: a\n    match: {team: x}\n    action: {target: gpt-4o}\n"
            "  - name: a\n    action: {target: gpt-4o}\n",
            "p.yaml:5: rules[1].name: rule name 'a' is used twice",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, split: {gpt-4o: 1}}\n",
            "rules[0].action: needs exactly one of target",
        ),
        ("rules:\n  - name: a\n    action: {target: gpt-4o, max_tokens: 0}\n", "rules[0].action.max_tokens: must be >= 1"),
        (
            "rules:\n  - name: a\n    match: {prompt_tokens: {min: 10, max: 5}}\n    action: {target: gpt-4o}\n",
            "p.yaml:3: rules[0].match.prompt_tokens.min: must not be above max",
        ),
        (
            "rules:\n  - name: a\n    match: {time: {tz: Mars/Olympus}}\n    action: {target: gpt-4o}\n",
            "rules[0].match.time.tz: unknown time zone 'Mars/Olympus'",
        ),
        (
            "rules:\n  - name: a\n    match: {time: {from: 25:99}}\n    action: {target: gpt-4o}\n",
            "rules[0].match.time.from: must be a time",
        ),
        (
            "aliases: {gpt-4o: [gpt-4o-mini]}\nrules: []\n",
            "p.yaml:1: aliases.gpt-4o: alias 'gpt-4o' has the name of a configured model",
        ),
        ("rule:\n  - name: a\n", "p.yaml:1: (top level): a policy is a mapping with a list of rules"),
        ("rules:\n  - name: a\n    action: {split: {gpt-4o: 0}}\n", "rules[0].action.split.gpt-4o: must be >= 1"),
    ],
)
def test_each_mistake_names_file_line_and_key(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_an_alias_with_no_configured_candidate_makes_its_rule_inactive_not_invalid() -> None:
    policy = parse(
        """\
        aliases: {big: [claude-opus, gpt-9]}
        rules:
          - name: big-first
            action: {target: big}
          - name: after
            match: {team: x}
            action: {target: gpt-4o}
        """
    )
    first, after = policy.rules
    assert first.action.arms == () and first.action.inactive
    assert after.action.arms[0].models == ("gpt-4o",)  # an inactive catch-all shadows nothing


def test_a_missing_file_is_one_error() -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read policy file"):
        load_policy("nowhere.yaml", MODELS)


@pytest.mark.parametrize("models", [(), MODELS, MODELS[2:]])
def test_the_shipped_default_validates_with_any_model_set(models: tuple[ModelConfig, ...]) -> None:
    policy = load_policy(str(ROOT / "policies" / "default.yaml"), models)
    assert [r.name for r in policy.rules][-1] == "auto-simple"
    active = [r for r in policy.rules if r.action.arms]
    assert len(active) == (0 if not models else len(policy.rules))


def test_config_policies_key_and_model_capabilities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        "policies: mine.yaml\nmodels:\n  - name: q\n    provider: ollama\n"
        "    capabilities: {tools: true, context_window: 32768}\n",
        encoding="utf-8",
    )
    settings = load_settings(str(config), env={})
    assert settings.policies == "mine.yaml"
    assert settings.models[0].capabilities.tools is True and settings.models[0].capabilities.context_window == 32768
    assert settings.models[0].capabilities.vision is None
    config.write_text("models: []\n", encoding="utf-8")
    assert load_settings(str(config), env={}).policies is None  # no policies/default.yaml here
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "default.yaml").write_text("rules: []\n", encoding="utf-8")
    assert load_settings(str(config), env={}).policies == "policies/default.yaml"
    config.write_text("policies: false\n", encoding="utf-8")
    assert load_settings(str(config), env={}).policies is None
    config.write_text("models:\n  - name: q\n    capabilities: {tools: maybe}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"thrifty.yaml:3: models\[0\].capabilities.tools: must be true or false"):
        load_settings(str(config), env={})
