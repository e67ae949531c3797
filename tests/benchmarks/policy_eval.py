"""Policy evaluation: p50 / p99 microseconds to evaluate a 50-rule policy (target: p50 <= 50 µs).

Run on purpose, from the repository root (it is not part of the pytest suite):

    .venv/bin/python -m tests.benchmarks.policy_eval [--iterations 20000]

The policy mixes every matcher (model, team, tags, headers, keywords, regexes, tools,
prompt-token ranges, time windows) with splits and fallback lists. Three requests are
measured: one that matches the first rule, one that falls through all 49 earlier rules to
the last (the worst case for first-match-wins), and a tools request for which capability
safety skips the rule's first target. ``evaluate`` is timed on its own; ``extract`` (the
features read from the payload) is timed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from proxy.config import DEFAULT_BASE_URLS, ModelConfig
from proxy.pipeline.auth import Principal
from proxy.policy.capabilities import Capabilities
from proxy.policy.engine import evaluate
from proxy.policy.features import extract
from proxy.policy.loader import parse_policy

MODELS = tuple(ModelConfig(n, "openai", DEFAULT_BASE_URLS["openai"]) for n in ("big", "mini", "local", "other"))
CAPS = {
    "big": Capabilities(tools=True, vision=True, json_schema=True, context_window=128_000),
    "mini": Capabilities(tools=True, vision=True, context_window=128_000),
    "local": Capabilities(context_window=8192),
    "other": Capabilities(tools=True),
}
_MATCHERS = (
    "{{team: team-{i}}}",
    "{{model: auto, tags: {{project: p{i}}}}}",
    "{{headers: {{x-tenant: t{i}}}}}",
    "{{model: auto, keywords: [word{i}, phrase number {i}]}}",
    "{{regex: '^ticket-{i}\\\\b'}}",
    "{{model: m{i}, tools: true}}",
    "{{app: app-{i}, prompt_tokens: {{max: 100}}}}",
    "{{key: key-{i}, time: {{days: [sat, sun], from: '08:00', to: '20:00', tz: Europe/Berlin}}}}",
)
_ACTIONS = ("{{target: big}}", "{{target: [local, mini]}}", "{{split: {{big: 1, mini: 4}}}}", "{{target: mini, max_tokens: 256}}")


def fifty_rule_policy() -> str:
    lines = ["version: bench", "rules:"]
    for i in range(49):
        match, action = _MATCHERS[i % len(_MATCHERS)], _ACTIONS[i % len(_ACTIONS)]
        lines.append(f"  - {{name: r{i}, match: {match.format(i=i)}, action: {action.format(i=i)}}}")
    lines.append("  - {name: last, match: {model: auto}, action: {target: [local, mini, big]}}")
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
    print(f"policy: 50 rules, {args.iterations} iterations each; microseconds")
    print(f"{'request':38} {'evaluate p50':>13} {'p99':>8} {'extract p50':>12}  decision")
    for label, (payload, who) in cases.items():
        features = extract(payload, request_id="req-1", principal=who, headers=headers, header_names=policy.header_names, now=now)
        decision = evaluate(policy, features, CAPS)
        p50, p99 = measure(lambda f=features: evaluate(policy, f, CAPS), args.iterations)  # type: ignore[misc]
        x50, _ = measure(
            lambda p=payload, w=who: extract(  # type: ignore[misc]
                p, request_id="req-1", principal=w, headers=headers, header_names=policy.header_names, now=now
            ),
            args.iterations,
        )
        print(f"{label:38} {p50:13.2f} {p99:8.2f} {x50:12.2f}  {decision.rule} -> {decision.model}")


if __name__ == "__main__":
    main()
