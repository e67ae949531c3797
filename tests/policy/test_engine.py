"""The pure engine: first match wins, each matcher, deterministic weighted split, caps,
capability safety, and the lazy token count (asked for only when the cheap bound cannot decide)."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime

import orjson
import pytest

from proxy.api.wire import ParsedRequest
from proxy.pipeline.auth import Principal
from proxy.pipeline.route import rewrite
from proxy.policy.capabilities import Capabilities, capabilities_for
from proxy.policy.engine import evaluate
from proxy.policy.features import extract, with_tokens
from proxy.policy.loader import parse_policy
from proxy.policy.model import Decision, Features, Policy
from proxy.settings import DEFAULT_BASE_URLS, ModelCapabilities, ModelConfig

MODELS = (
    ModelConfig("big", "openai", DEFAULT_BASE_URLS["openai"]),
    ModelConfig("mini", "openai", DEFAULT_BASE_URLS["openai"]),
    ModelConfig("local", "llamacpp", DEFAULT_BASE_URLS["llamacpp"]),
)
CAPS = {
    "big": Capabilities(tools=True, vision=True, json_schema=True, context_window=100_000),
    "mini": Capabilities(tools=True, vision=True, json_schema=False, context_window=1_000),
    "local": Capabilities(context_window=None),
}


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text), "p.yaml", MODELS)


def decide(p: Policy, f: Features, explain: bool = False) -> Decision:
    return evaluate(p, f, CAPS, explain=explain)


def chat(text: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": "auto", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}], **extra}


def test_first_match_wins_and_no_match_leaves_the_request_alone() -> None:
    p = policy(
        """\
        rules:
          - {name: one, match: {model: auto}, action: {target: mini}}
          - {name: two, match: {model: [auto, other]}, action: {target: big}}
        """
    )
    d = decide(p, extract(chat()))
    assert (d.rule, d.model, d.policy_version) == ("one", "mini", p.version)
    d = decide(p, extract({**chat(), "model": "other"}))
    assert (d.rule, d.model) == ("two", "big")
    d = decide(p, extract({**chat(), "model": "big"}))
    assert (d.rule, d.model) == (None, None)


@pytest.mark.parametrize(
    ("match", "features", "expected"),
    [
        ("{team: eng}", {"team": "eng"}, True),
        ("{team: eng}", {"team": "ops"}, False),
        ("{key: [k1, k2]}", {"key_id": "k2"}, True),
        ("{app: web}", {"app": None}, False),
        ("{tags: {env: prod}}", {"tags": {"env": "prod", "x": "y"}}, True),
        ("{tags: {env: [prod, stage]}}", {"tags": {"env": "dev"}}, False),
        ("{tags: {env: true}}", {"tags": {"env": "dev"}}, True),
        ("{tags: {env: true}}", {"tags": {}}, False),
        ("{headers: {x-prio: high}}", {"headers": {"x-prio": "high"}}, True),
        ("{tools: true}", {"tools": True}, True),
        ("{tools: false}", {"tools": True}, False),
        ("{images: true}", {"images": False}, False),
        ("{json: true}", {"json_mode": "json_object"}, True),
        ("{keywords: [Refactor, step by step]}", {"last_user_lower": "think step by step"}, True),
        ("{keywords: refactor}", {"last_user_lower": "hello"}, False),
        ("{regex: '^ticket #\\d+'}", {"last_user": "ticket #42 is open"}, True),
        ("{regex: ['^x', 'y$']}", {"last_user": "a y"}, True),
        ("{prompt_tokens: {max: 100}}", {"prompt_tokens": 100}, True),
        ("{prompt_tokens: {min: 101}}", {"prompt_tokens": 100}, False),
        ("{prompt_tokens: {min: 10, max: 20}}", {"prompt_tokens": 15}, True),
    ],
)
def test_each_matcher(match: str, features: dict[str, object], expected: bool) -> None:
    p = policy(f"rules:\n  - {{name: r, match: {match}, action: {{target: big}}}}\n")
    f = replace(Features(model="auto"), **features)  # type: ignore[arg-type]
    assert (decide(p, f).rule == "r") is expected


def test_time_windows_in_a_zone_and_across_midnight() -> None:
    p = policy(
        """\
        rules:
          - {name: night, match: {time: {from: "22:00", to: "06:00", tz: Europe/Berlin}}, action: {target: local}}
          - {name: weekday, match: {time: {days: [mon, tue, wed, thu, fri], from: "09:00", to: "17:00"}}, action: {target: big}}
        """
    )

    def at(iso: str) -> str | None:
        return decide(p, Features(model="m", now=datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())).rule

    assert at("2026-11-23T22:30") == "night"  # 23:30 in Berlin (Monday)
    assert at("2026-11-23T04:59") == "night"  # 05:59 in Berlin
    assert at("2026-11-23T10:00") == "weekday"  # Monday 10:00 UTC
    assert at("2026-11-22T10:00") is None  # Sunday
    assert at("2026-11-23T17:00") is None  # the end is exclusive


def test_token_conditions_use_the_cheap_bound_and_ask_for_a_count_only_when_needed() -> None:
    p = policy(
        """\
        rules:
          - {name: long, match: {prompt_tokens: {min: 50}}, action: {target: big}}
          - {name: short, match: {prompt_tokens: {max: 40}}, action: {target: mini}}
        """
    )
    small = extract(chat("hi"))
    assert small.prompt_bound < 50
    assert decide(p, small).rule == "short"  # bound < min and bound <= max: no count needed
    large = extract(chat("word " * 30))
    assert large.prompt_bound >= 50 and decide(p, large).needs_tokens
    assert decide(p, with_tokens(large, 60)).rule == "long"
    assert decide(p, with_tokens(large, 40)).rule == "short"


def test_the_bound_is_never_below_the_real_count() -> None:
    from proxy.cost.tokens import TokenCounter

    counter = TokenCounter()
    for text in ("hello there", "ünïcödé → 漢字 🎉" * 20, "x" * 5000, "def f(x):\n    return x ** 2\n" * 30):
        payload = chat(text)
        assert extract(payload).prompt_bound >= counter.count_messages(payload["messages"], "gpt-4o")  # type: ignore[arg-type]


def test_weighted_split_is_deterministic_per_request_and_roughly_proportional() -> None:
    p = policy("rules:\n  - {name: ab, match: {model: auto}, action: {split: {big: 1, mini: 3}}}\n")
    first = decide(p, extract(chat(), request_id="req-1"))
    assert all(decide(p, extract(chat(), request_id="req-1")) == first for _ in range(5))
    shares = Counter(decide(p, extract(chat(), request_id=f"req-{i}")).model for i in range(4000))
    assert 0.70 < shares["mini"] / 4000 < 0.80
    d = decide(p, extract(chat(), request_id="req-1"))
    assert set(d.fallbacks) == {"big", "mini"} - {d.model}  # the other arm follows as a fallback


def test_caps_are_recorded_and_applied_to_the_request() -> None:
    p = policy("rules:\n  - {name: capped, match: {model: auto}, action: {target: [mini, big], max_tokens: 256}}\n")
    d = decide(p, extract(chat()))
    assert (d.model, d.fallbacks, d.max_tokens) == ("mini", ("big",), 256)
    for asked, field, sent in ((None, "max_tokens", 256), (1000, "max_tokens", 256), (100, "max_tokens", 100)):
        payload = chat() if asked is None else chat(**{field: asked})
        out = rewrite(ParsedRequest("auto", False, payload, orjson.dumps(payload)), d)
        assert out.model == "mini" and orjson.loads(out.raw)[field] == sent and out.payload["model"] == "mini"
    payload = chat(max_completion_tokens=4096)
    out = rewrite(ParsedRequest("auto", False, payload, orjson.dumps(payload)), d)
    assert out.payload["max_completion_tokens"] == 256 and "max_tokens" not in out.payload


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "local: no tool calling"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "mini: no JSON-schema output"),
    ],
)
def test_capability_safety_skips_unfit_targets_and_says_why(extra: dict[str, object], reason: str) -> None:
    p = policy("rules:\n  - {name: cheap, match: {model: auto}, action: {target: [local, mini, big]}}\n")
    d = decide(p, extract(chat(**extra)))
    assert d.rule == "cheap" and d.model in ("mini", "big")
    assert any(reason in note for note in d.notes)


def test_images_and_context_windows_are_safe_too() -> None:
    p = policy(
        """\
        rules:
          - {name: local-only, match: {model: auto}, action: {target: local}}
          - {name: cloud, action: {target: [mini, big]}}
        """
    )
    image = {
        "role": "user",
        "content": [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": "x"}}],
    }
    d = decide(p, extract({"model": "auto", "messages": [image]}))
    assert (d.rule, d.model) == ("cloud", "mini")
    assert "rule 'local-only' (line 2): skipped local: no image input" in d.notes
    assert "rule 'local-only' (line 2): matched, but no target can serve this request" in d.notes
    p2 = policy("rules:\n  - {name: cloud, match: {model: auto}, action: {target: [mini, big]}}\n")
    long = extract(chat("word " * 400))  # bound above mini's 1,000-token window: count first
    assert decide(p2, long).rule is None and decide(p2, long).needs_tokens
    assert decide(p2, with_tokens(long, 900)).model == "mini"
    d = decide(p2, with_tokens(long, 1500))
    assert d.model == "big" and "prompt of 1500 tokens exceeds its context window of 1000" in " ".join(d.notes)


def test_no_capable_target_anywhere_means_no_rule() -> None:
    p = policy("rules:\n  - {name: local, match: {model: auto}, action: {target: local}}\n")
    d = decide(p, extract(chat(tools=[{"type": "function", "function": {"name": "f"}}])))
    assert d.rule is None and d.notes


def test_explain_says_why_each_earlier_rule_did_not_match() -> None:
    p = policy(
        """\
        rules:
          - {name: eng, match: {team: eng}, action: {target: big}}
          - {name: tools, match: {tools: true}, action: {target: big}}
          - {name: rest, match: {model: auto}, action: {target: mini}}
        """
    )
    principal = Principal("key_1", "ops", None, "user")
    d = decide(p, extract(chat(), principal=principal), explain=True)
    assert d.rule == "rest"
    assert d.notes == (
        "rule 'eng' (line 2): not matched: team in ['eng'] is false (team is ops)",
        "rule 'tools' (line 3): not matched: tools is True is false (the request has no tools)",
    )


def test_capabilities_come_from_litellm_and_the_config_overrides_them() -> None:
    price_map = {"gpt-4o": {"supports_function_calling": True, "supports_vision": True, "max_input_tokens": 128000}}
    models = [
        ModelConfig("gpt-4o", "openai", "http://x"),
        ModelConfig("q", "ollama", "http://x", capabilities=ModelCapabilities(tools=True, context_window=32768)),
        ModelConfig("alias", "openai", "http://x", upstream_model="gpt-4o", capabilities=ModelCapabilities(vision=False)),
    ]
    caps = capabilities_for(models, price_map)
    assert caps["gpt-4o"] == Capabilities(tools=True, vision=True, json_schema=False, context_window=128000)
    assert caps["q"] == Capabilities(tools=True, context_window=32768)
    assert caps["alias"] == Capabilities(tools=True, vision=False, context_window=128000)
    real = capabilities_for([ModelConfig("gpt-4o-mini", "openai", "http://x")])
    assert real["gpt-4o-mini"].tools and real["gpt-4o-mini"].json_schema and real["gpt-4o-mini"].context_window


class FakeBackends:
    """A BackendState: which models are down and their latencies (ms)."""

    def __init__(self, down: set[str] | None = None, latency: dict[str, float] | None = None):
        self.down = down or set()
        self.latency = latency or {}

    def is_up(self, model: str) -> bool:
        return model not in self.down

    def latency_ms(self, model: str) -> float | None:
        return self.latency.get(model)


def test_targets_whose_backend_is_down_move_after_the_healthy_ones() -> None:
    p = policy("rules:\n  - {name: r, match: {model: auto}, action: {target: [local, mini, big]}}\n")
    d = decide(p, replace(extract(chat()), backends=FakeBackends(down={"local"})), explain=True)
    assert (d.model, d.fallbacks) == ("mini", ("big", "local"))
    assert "rule 'r' (line 2): local down: tried after the others" in d.notes
    everything_down = FakeBackends(down={"local", "mini", "big"})
    d = decide(p, replace(extract(chat()), backends=everything_down))
    assert (d.model, d.fallbacks) == ("local", ("mini", "big"))  # all down: the written order, something is tried


def test_health_matcher_routes_to_the_cloud_while_the_local_backend_is_down() -> None:
    p = policy(
        """\
        rules:
          - {name: local-down, match: {model: auto, health: {down: local}}, action: {target: big}}
          - {name: local-up, match: {model: auto, health: {up: [local]}}, action: {target: local}}
        """
    )
    f = extract(chat())
    assert decide(p, replace(f, backends=FakeBackends(down={"local"}))).rule == "local-down"
    assert decide(p, replace(f, backends=FakeBackends(down={"mini"}))).rule == "local-up"
    assert decide(p, f).rule == "local-up"  # no backend state (simulate, explain): every model counts as up
    d = decide(p, replace(f, backends=FakeBackends()), explain=True)
    assert d.notes == ("rule 'local-down' (line 2): not matched: health down ['local'] up [] is false (local is up)",)


def test_cheapest_orders_capable_targets_by_price_and_unknown_prices_last() -> None:
    p = policy("rules:\n  - {name: c, match: {model: auto}, action: {cheapest: [big, mini, local]}}\n")
    prices = {"big": 5.0, "mini": 0.3, "local": 0.0}
    d = evaluate(p, extract(chat()), CAPS, prices=prices)
    assert (d.rule, d.model, d.fallbacks) == ("c", "local", ("mini", "big"))
    d = evaluate(p, extract(chat(tools=[{"type": "function"}])), CAPS, prices=prices)
    assert (d.model, d.fallbacks) == ("mini", ("big",))  # local has no tools: the cheapest capable one
    d = evaluate(p, extract(chat()), CAPS, prices={"big": 5.0, "mini": 0.3})
    assert (d.model, d.fallbacks) == ("mini", ("big", "local"))  # no known price: tried last
    tie = policy("rules:\n  - {name: c, match: {model: auto}, action: {target: [big, mini], strategy: cheapest}}\n")
    assert evaluate(tie, extract(chat()), CAPS, prices={"big": 1.0, "mini": 1.0}).model == "big"  # ties keep order
    assert evaluate(tie, extract(chat()), CAPS).model == "big"  # no prices at all: the written order


def test_fastest_orders_by_observed_latency_unknown_last_and_down_after_up() -> None:
    p = policy("rules:\n  - {name: f, match: {model: auto}, action: {fastest: [local, mini, big]}}\n")
    f = extract(chat())
    d = decide(p, replace(f, backends=FakeBackends(latency={"big": 120.0, "mini": 300.0})))
    assert (d.model, d.fallbacks) == ("big", ("mini", "local"))
    d = decide(p, replace(f, backends=FakeBackends(down={"big"}, latency={"big": 120.0, "mini": 300.0})))
    assert (d.model, d.fallbacks) == ("mini", ("local", "big"))
    assert decide(p, f).model == "local"  # no backend state: the written order


def test_a_cascade_tries_the_small_model_and_escalates_to_then_first() -> None:
    p = policy(
        """\
        rules:
          - name: c
            match: {model: auto}
            action: {cascade: {try: [local, mini], then: big, checks: [empty, json], min_chars: 5}, max_tokens: 300}
        """
    )
    d = decide(p, extract(chat()))
    assert (d.model, d.fallbacks, d.max_tokens) == ("local", ("big", "mini"), 300)
    assert d.cascade is not None and d.cascade.checks == ("empty", "json") and d.cascade.then == ("big",)
    d = decide(p, extract(chat(tools=[{"type": "function"}])))
    assert (d.model, d.fallbacks) == ("mini", ("big",)) and d.cascade is not None  # local cannot: mini is tried
    d = decide(p, replace(extract(chat()), backends=FakeBackends(down={"local", "mini"})))
    assert (d.model, d.cascade) == ("big", None)  # nothing to try first: straight to the large model
    d = decide(p, replace(extract(chat()), backends=FakeBackends(down={"local"})))
    assert (d.model, d.fallbacks) == ("mini", ("big", "local")) and d.cascade is not None


def test_route_cache_and_prune_settings_ride_on_the_decision() -> None:
    p = policy(
        """\
        rules:
          - name: r
            match: {model: auto}
            action:
              target: mini
              cache: {mode: semantic, threshold: 0.97, ttl: 1h}
              prune: {max_input_tokens: 2000, keep_last: 4}
        """
    )
    d = decide(p, extract(chat()))
    assert d.cache is not None and (d.cache.mode, d.cache.threshold, d.cache.ttl_seconds) == ("semantic", 0.97, 3600.0)
    assert d.prune is not None and (d.prune.max_input_tokens, d.prune.keep_last, d.prune.summarize) == (2000, 4, True)


def test_task_class_is_computed_only_when_a_rule_asks_and_routes_by_it() -> None:
    p = policy(
        """\
        rules:
          - {name: hard, match: {model: auto, task_class: [code, math]}, action: {target: big}}
          - {name: easy, match: {model: auto}, action: {target: local}}
        """
    )
    assert p.classify
    code = extract(chat("Write a Python function that reverses a string"), classify=p.classify)
    assert code.task_class == "code" and decide(p, code).model == "big"
    chat_f = extract(chat("hello there!"), classify=p.classify)
    d = decide(p, chat_f, explain=True)
    assert d.model == "local"
    assert d.notes == ("rule 'hard' (line 2): not matched: task_class in ['code', 'math'] is false (task_class is chat)",)
    assert extract(chat("Write a Python function")).task_class is None  # not asked for: not computed


def test_budget_share_matcher_per_scope_and_unknown_never_matches() -> None:
    p = policy(
        """\
        rules:
          - {name: team-hot, match: {budget: {above: 0.8, scope: team}}, action: {target: local}}
          - {name: any-hot, match: {budget: {above: 0.95}}, action: {target: mini}}
          - {name: rest, action: {target: big}}
        """
    )
    assert p.budget_scopes == frozenset({"team", "*"})
    f = extract(chat())
    assert decide(p, replace(f, budget={"team": 0.8, "*": 0.8})).rule == "team-hot"  # reached counts
    assert decide(p, replace(f, budget={"team": 0.5, "*": 0.97})).rule == "any-hot"
    d = decide(p, f, explain=True)
    assert d.rule == "rest"
    assert d.notes[0] == (
        "rule 'team-hot' (line 2): not matched: budget team >= 0.8 is false "
        "(the team budget is unknown (no budget, or no spend seen yet))"
    )


def test_requests_are_classified_only_for_the_models_task_class_rules_name() -> None:
    named = policy("rules:\n  - {name: hard, match: {model: [auto, smart], task_class: code}, action: {target: big}}\n")
    assert named.classify and named.classify_for == frozenset({"auto", "smart"})
    anyone = policy(
        """\
        rules:
          - {name: a, match: {model: auto, task_class: code}, action: {target: big}}
          - {name: b, match: {team: x, task_class: math}, action: {target: big}}
        """
    )
    assert anyone.classify and anyone.classify_for is None
