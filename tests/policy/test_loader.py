"""Policy YAML to a Policy: each kind of mistake is a ConfigError naming file:line and the key;
aliases resolve against the configured models; the shipped default validates everywhere."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.policy.loader import load_policy, parse_policy
from proxy.policy.model import Cascade, Features, Keywords, Pattern, RouteCache, RoutePrune, TimeWindow, TokenRange
from proxy.settings import DEFAULT_BASE_URLS, ModelConfig

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
            "rules:\n  - name: a\n    action: {target: gpt-4o, cascade: {try: gemma, then: gpt-4o}}\n",
            "p.yaml:3: rules[0].action: needs exactly one of target",
        ),
        (
            "rules:\n  - name: a\n    action:\n      cascade: {try: gemma}\n",
            "p.yaml:4: rules[0].action.cascade: a cascade needs then:",
        ),
        (
            "rules:\n  - name: a\n    action:\n      cascade:\n        try: gemma\n        then: gpt-4o\n"
            "        checks: [empty, vibes]\n",
            "p.yaml:7: rules[0].action.cascade.checks: unknown check 'vibes'; use empty, refusal, json, short, confidence",
        ),
        (
            "rules:\n  - name: a\n    action: {cascade: {try: gemma, then: gpt-4o, checks: [confidence]}}\n",
            "rules[0].action.cascade.checks: the confidence check needs min_logprob",
        ),
        (
            "rules:\n  - name: a\n    action: {cascade: {try: gemma, then: gpt-4o, min_logprob: 0.5}}\n",
            "rules[0].action.cascade.min_logprob: must be a negative number",
        ),
        (
            "rules:\n  - name: a\n    action: {cascade: {try: gemma, then: gpt-5x}}\n",
            "p.yaml:3: rules[0].action.cascade.then: unknown model 'gpt-5x'",
        ),
        ("rules:\n  - name: a\n    action: {cheapest: true}\n", "rules[0].action.cheapest: must be a non-empty string or a list"),
        (
            "rules:\n  - name: a\n    action: {split: {gpt-4o: 1}, strategy: cheapest}\n",
            "rules[0].action.strategy: goes with target only",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, strategy: random}\n",
            "rules[0].action.strategy: must be one of ordered, cheapest, fastest",
        ),
        (
            "rules:\n  - name: a\n    match:\n      task_class: [code, poetry]\n    action: {target: gpt-4o}\n",
            "p.yaml:4: rules[0].match.task_class: unknown task class 'poetry'; the classifier knows chat, code",
        ),
        (
            "rules:\n  - name: a\n    match: {budget: {above: 80}}\n    action: {target: gpt-4o}\n",
            "p.yaml:3: rules[0].match.budget.above: must be a share between 0 and 1 (0.8 for 80%)",
        ),
        (
            "rules:\n  - name: a\n    match: {budget: {above: 0.8, scope: org}}\n    action: {target: gpt-4o}\n",
            "rules[0].match.budget.scope: must be one of team, key, app",
        ),
        ("rules:\n  - name: a\n    match: {budget: {scope: team}}\n    action: {target: gpt-4o}\n", "budget: needs above"),
        (
            "rules:\n  - name: a\n    match: {health: {down: llama9}}\n    action: {target: gpt-4o}\n",
            "p.yaml:3: rules[0].match.health.down: unknown model 'llama9'",
        ),
        ("rules:\n  - name: a\n    match: {health: {}}\n    action: {target: gpt-4o}\n", "match.health: needs down, up or both"),
        (
            "rules:\n  - name: a\n    action:\n      target: gpt-4o\n      cache: {mode: fuzzy}\n",
            "p.yaml:5: rules[0].action.cache.mode: must be one of off, exact, semantic",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, cache: {mode: semantic, threshold: 1.5}}\n",
            "rules[0].action.cache.threshold: must be a cosine similarity between 0 and 1",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, cache: {mode: exact, threshold: 0.9}}\n",
            "rules[0].action.cache.threshold: applies to the semantic cache only (mode is exact)",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, cache: {ttl: 10 minutes}}\n",
            "rules[0].action.cache.ttl: must be a duration",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, cache: {scope: world}}\n",
            "rules[0].action.cache.scope: must be one of team, key",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, prune: {max_input_tokens: 100, context_share: 0.5}}\n",
            "rules[0].action.prune.context_share: give max_input_tokens or context_share, not both",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, prune: {context_share: 2}}\n",
            "rules[0].action.prune.context_share: must be a share of the context window in (0, 1]",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, prune: {max_input_tokens: 100, summarizer: nobody}}\n",
            "rules[0].action.prune.summarizer: unknown model 'nobody'",
        ),
        (
            "rules:\n  - name: a\n    action: {target: gpt-4o, prune: {max_input_tokens: 100, keep_last: 0}}\n",
            "rules[0].action.prune.keep_last: must be >= 1",
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


def test_matchers_and_actions_of_the_second_slice_load_into_the_model() -> None:
    policy = parse(
        """\
        aliases:
          small: ["@local", gpt-4o-mini]
          large: [gpt-4o]
        rules:
          - name: over-budget
            match: {budget: {above: 0.8, scope: team}}
            action: {target: small, cache: off}
          - name: local-down
            match: {model: auto, health: {down: "@local"}}
            action: {target: large}
          - name: hard
            match: {task_class: [math, code]}
            action:
              cascade: {try: small, then: large, checks: [empty, short, confidence], min_chars: 20, min_logprob: -1.5}
              max_tokens: 800
              cache: {mode: semantic, ttl: 10m, threshold: 0.95, scope: key}
              prune: {context_share: 0.5, keep_last: 4, summarize: false, summarizer: small, allow_opt_out: false}
          - name: cheap
            match: {model: auto, json: true}
            action: {cheapest: [gpt-4o, small], prune: {max_input_tokens: 4000}}
          - name: quick
            match: {model: auto}
            action: {target: [gpt-4o, gpt-4o-mini], strategy: fastest}
        """
    )
    budget, down, hard, cheap, quick = policy.rules
    assert policy.classify and policy.budget_scopes == frozenset({"team"})
    assert budget.action.cache == RouteCache(mode="off")
    assert [c.text for c in budget.conditions] == ["budget team >= 0.8"]
    assert [c.text for c in down.conditions] == ["model in ['auto']", "health down ['gemma'] up []"]
    cascade = hard.action.cascade
    assert cascade == Cascade(("empty", "short", "confidence"), 20, -1.5, ("gpt-4o",))
    assert hard.action.arms[0].models == ("gemma", "gpt-4o-mini", "gpt-4o")  # try first, then the escalation
    assert hard.action.max_tokens == 800
    assert hard.action.cache == RouteCache("semantic", 600.0, 0.95, "key")
    assert hard.action.prune == RoutePrune(None, 0.5, 4, False, "gemma", False)
    assert (cheap.action.strategy, cheap.action.arms[0].models) == ("cheapest", ("gpt-4o", "gemma", "gpt-4o-mini"))
    assert cheap.action.prune == RoutePrune(max_input_tokens=4000)
    assert quick.action.strategy == "fastest"
    assert parse("rules: [{name: a, match: {team: x}, action: {target: gpt-4o}}]\n").classify is False


def test_a_cascade_whose_try_overlaps_then_escalates_to_then_only() -> None:
    policy = parse("rules: [{name: c, action: {cascade: {try: [gemma, gpt-4o], then: gpt-4o}}}]\n")
    action = policy.rules[0].action
    assert action.arms[0].models == ("gemma", "gpt-4o") and action.cascade is not None
    assert action.cascade.then == ("gpt-4o",) and action.cascade.checks == ("empty", "refusal", "json", "short")


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ("{task_class: code}", "{task_class: code, team: x}", True),
        ("{task_class: code}", "{task_class: math}", False),
        ("{budget: {above: 0.8}}", "{budget: {above: 0.8}, model: auto}", True),
        ("{budget: {above: 0.8, scope: team}}", "{budget: {above: 0.8}}", False),
        ("{health: {down: gemma}}", "{health: {down: gemma}, tools: true}", True),
        ("{health: {down: gemma}}", "{health: {up: gemma}}", False),
        # implied, not only equal: a narrower condition of the same kind
        ("{team: [a, b]}", "{team: a, tools: true}", True),
        ("{team: a}", "{team: [a, b]}", False),
        ("{task_class: [code, math]}", "{task_class: code}", True),
        ("{budget: {above: 0.8}}", "{budget: {above: 0.9}}", True),
        ("{budget: {above: 0.9}}", "{budget: {above: 0.8}}", False),
        ("{prompt_tokens: {min: 1000}}", "{prompt_tokens: {min: 2000, max: 3000}}", True),
        ("{prompt_tokens: {max: 1000}}", "{prompt_tokens: {min: 10}}", False),
        ("{keywords: [prove, derive]}", "{keywords: prove}", True),
        ("{keywords: prove}", "{keywords: [prove, derive]}", False),
        ("{health: {down: gemma}}", "{health: {down: [gemma, gpt-4o-mini]}}", True),
        ("{health: {down: [gemma, gpt-4o-mini]}}", "{health: {down: gemma}}", False),
    ],
)
def test_shadowing_with_the_new_conditions(earlier: str, later: str, shadowed: bool) -> None:
    text = (
        f"rules:\n  - {{name: a, match: {earlier}, action: {{target: gpt-4o}}}}\n"
        f"  - {{name: b, match: {later}, action: {{target: gemma}}}}\n"
    )
    if shadowed:
        assert "rule 'b' is shadowed: the earlier rule 'a' (line 2)" in error_of(text)
    else:
        assert len(parse(text).rules) == 2


def shipped_examples() -> list[str]:
    """Each commented example rule of policies/default.yaml, uncommented."""
    text = (ROOT / "policies" / "default.yaml").read_text(encoding="utf-8")
    tail = text[text.index("# Examples for common needs") :].splitlines()
    examples: list[list[str]] = []
    for line in tail:
        if line.startswith("#  - name:"):
            examples.append([])
        if examples and (line.startswith("#  ") or line == "#"):
            examples[-1].append(line[1:])
    return ["\n".join(lines) for lines in examples]


def test_every_commented_example_in_the_shipped_policy_is_valid() -> None:
    text = (ROOT / "policies" / "default.yaml").read_text(encoding="utf-8")
    aliases = text[text.index("aliases:") : text.index("rules:")]
    names = ("gpt-4o", "gpt-4o-mini", "claude-haiku-4-5", "claude-sonnet-4-5", "gemma")
    models = tuple(ModelConfig(n, "llamacpp" if n == "gemma" else "openai", DEFAULT_BASE_URLS["openai"]) for n in names)
    examples = shipped_examples()
    assert len(examples) >= 15
    shipped = text[text.index("rules:") + len("rules:") : text.index("# -----")]
    for example in examples:
        if "route_as" in example:  # names a model the shipped rules route: checked with them
            policy = parse_policy(f"{aliases}rules:\n{example}\n{shipped}", "example.yaml", models)
            assert policy.rules[0].action.route_as == "auto", example
            continue
        policy = parse_policy(f"{aliases}rules:\n{example}\n", "example.yaml", models)
        assert len(policy.rules) == 1 and policy.rules[0].action.arms, example
    kinds = " ".join(examples)
    for feature in ("route_as:",):
        assert feature in kinds
    for feature in ("cascade:", "cheapest:", "fastest:", "budget:", "health:", "cache:", "prune:", "split:", "task_class:"):
        assert feature in kinds
