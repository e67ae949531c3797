"""Policy evaluation: p50 / p99 microseconds to evaluate a 50-rule policy (target: p50 <= 50 µs).

Run on purpose, from the repository root (it is not part of the pytest suite):

    .venv/bin/python -m tests.benchmarks.policy_eval [--iterations 20000]

The policy mixes every matcher (model, team, tags, headers, keywords, regexes, tools,
prompt-token ranges, time windows, task class, budget share, backend health) with splits,
fallback lists, cheapest/fastest strategies, cascades and per-route cache/prune settings;
the new matchers are written so that they are evaluated (their rule's cheap conditions
hold) rather than skipped. Three requests are measured: one that matches the first rule,
one that falls through all 49 earlier rules to the last (the worst case for
first-match-wins; the last rule is ``cheapest`` with a backend down), and a tools request
for which capability safety skips targets. ``evaluate`` is timed on its own (with backend
state and budget shares handed in); ``extract`` (the features read from the payload, the
task classifier included, since the policy uses ``task_class``) is timed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from proxy.pipeline.auth import Principal
from proxy.policy.capabilities import Capabilities
from proxy.policy.classify import classify
from proxy.policy.engine import evaluate
from proxy.policy.features import extract
from proxy.policy.loader import parse_policy
from proxy.settings import DEFAULT_BASE_URLS, ModelConfig

MODELS = tuple(ModelConfig(n, "openai", DEFAULT_BASE_URLS["openai"]) for n in ("big", "mini", "local", "other"))
CAPS = {
    "big": Capabilities(tools=True, vision=True, json_schema=True, context_window=128_000),
    "mini": Capabilities(tools=True, vision=True, context_window=128_000),
    "local": Capabilities(context_window=8192),
    "other": Capabilities(tools=True),
}
_MATCHERS = (
    "{{team: team-{i}}}",
    "{{model: auto, app: [app-x, a{i}], task_class: [chat, summarize], prompt_tokens: {{min: 1{i:03d}0}}}}",
    "{{model: auto, app: [app-x, b{i}], budget: {{above: 0.9{i:02d}, scope: team}}}}",
    "{{model: auto, health: {{up: [big]}}, keywords: [zzz{i}]}}",
    "{{model: auto, tags: {{project: p{i}}}}}",
    "{{headers: {{x-tenant: t{i}}}}}",
    "{{model: auto, keywords: [word{i}, phrase number {i}]}}",
    "{{regex: '^ticket-{i}\\\\b'}}",
    "{{model: m{i}, tools: true}}",
    "{{app: app-{i}, prompt_tokens: {{max: 100}}}}",
    "{{key: key-{i}, time: {{days: [sat, sun], from: '08:00', to: '20:00', tz: Europe/Berlin}}}}",
)
_ACTIONS = (
    "{{target: big}}",
    "{{target: [local, mini]}}",
    "{{split: {{big: 1, mini: 4}}}}",
    "{{target: mini, max_tokens: 256}}",
    "{{cheapest: [big, mini, local], cache: {{mode: semantic, threshold: 0.95}}}}",
    "{{cascade: {{try: local, then: big}}, prune: {{max_input_tokens: 4000}}}}",
    "{{fastest: [big, mini]}}",
)
PRICES = {"big": 5.0, "mini": 0.3, "local": 0.0, "other": 1.0}


class Backends:
    """A BackendState as the upstream stage keeps it: dict lookups."""

    def __init__(self, down: set[str], latency: dict[str, float]):
        self.down = down
        self.latency = latency

    def is_up(self, model: str) -> bool:
        return model not in self.down

    def latency_ms(self, model: str) -> float | None:
        return self.latency.get(model)


def fifty_rule_policy() -> str:
    lines = ["version: bench", "rules:"]
    for i in range(49):
        match, action = _MATCHERS[i % len(_MATCHERS)], _ACTIONS[i % len(_ACTIONS)]
        lines.append(f"  - {{name: r{i}, match: {match.format(i=i)}, action: {action.format(i=i)}}}")
    lines.append("  - {name: last, match: {model: auto}, action: {cheapest: [big, mini, local]}}")
    return "\n".join(lines) + "\n"


def measure(fn: Callable[[], object], iterations: int) -> tuple[float, float]:
    for _ in range(min(1000, iterations)):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    policy = parse_policy(fifty_rule_policy(), "bench.yaml", MODELS)
    assert len(policy.rules) == 50
    principal = Principal("key-x", "team-x", "app-x", "user")
    headers = {"x-tenant": "none", "content-type": "application/json"}
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Summarize this paragraph. " * 20}]
    plain: dict[str, Any] = {"model": "auto", "messages": messages}
    cases: dict[str, tuple[dict[str, Any], Principal]] = {
        "first rule matches": (plain, Principal("k", "team-0", None, "user")),
        "last rule (49 misses)": (plain, principal),
        "last rule, tools (capability skip)": ({**plain, "tools": [{"type": "function"}]}, principal),
    }
    now = time.time()
    backends = Backends({"local"}, {"big": 300.0, "mini": 150.0})
    world: dict[str, Any] = {"budget": {"team": 0.3}, "backends": backends, "classify": policy.classify}
    print(f"policy: 50 rules, {args.iterations} iterations each; microseconds")
    print(f"{'request':38} {'evaluate p50':>13} {'p99':>8} {'extract p50':>12}  decision")
    for label, (payload, who) in cases.items():
        features = extract(
            payload, request_id="req-1", principal=who, headers=headers, header_names=policy.header_names, now=now, **world
        )
        decision = evaluate(policy, features, CAPS, prices=PRICES)
        p50, p99 = measure(lambda f=features: evaluate(policy, f, CAPS, prices=PRICES), args.iterations)  # type: ignore[misc]
        x50, _ = measure(
            lambda p=payload, w=who: extract(  # type: ignore[misc]
                p, request_id="req-1", principal=w, headers=headers, header_names=policy.header_names, now=now, **world
            ),
            args.iterations,
        )
        chain = ", ".join((decision.model or "-", *decision.fallbacks))
        print(f"{label:38} {p50:13.2f} {p99:8.2f} {x50:12.2f}  {decision.rule} ({features.task_class}) -> {chain}")
    print("task classifier alone (inside extract above):")
    for text in ("Write a Python function that checks whether a string is a palindrome.", "Summarize this paragraph. " * 20):
        c50, c99 = measure(lambda t=text: classify(t), args.iterations)  # type: ignore[misc]
        print(f"  {len(text):4} characters: p50 {c50:.2f}, p99 {c99:.2f} -> {classify(text)}")


if __name__ == "__main__":
    main()
