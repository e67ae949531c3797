"""The policy engine: (policy, request features, model capabilities) -> :class:`Decision`. Pure.

Rules are tried in order and the first that matches *and* has a capable target wins. A rule
whose conditions hold but whose every target lacks what the request uses (tools, images, a
JSON schema, a context window large enough) is passed over with a note saying why, and the
next rule is tried. A weighted split picks its arm from a hash of the request id and the
rule name: the same request always lands on the same arm, and arms get their share of
traffic. The chosen arm's models come first; the other arms' follow as fallbacks. A
``cheapest`` rule orders its capable targets by blended price (``prices``: USD per 1M
tokens, 3 input : 1 output; a model with no known price goes last), a ``fastest`` one by
the backends' observed latency (unknown latency last); ties keep the written order. Then,
whatever the strategy, targets whose backend is down move after the healthy ones (never
dropped: something is always tried). A cascade answers with its first ``try`` model and
escalates to its ``then`` models, which lead the fallbacks; with no usable ``try`` model
left (unfit or down) it routes straight to ``then``.

When a token condition or a context window cannot be decided from the cheap upper bound,
the decision says ``needs_tokens``: the caller counts (off the event loop) and calls again.
Notes about rules that did not match are only written when ``explain`` is asked for, so
the hot path allocates nothing per rule.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import replace

from proxy.policy.capabilities import NEEDS_TOKENS, UNKNOWN, Capabilities, unfit
from proxy.policy.classify import classify
from proxy.policy.model import Action, Decision, Difficulty, Features, Policy, Rule

_INF = math.inf


def evaluate(
    policy: Policy,
    features: Features,
    capabilities: Mapping[str, Capabilities],
    *,
    prices: Mapping[str, float] | None = None,
    explain: bool = False,
    routed_as: bool = False,
) -> Decision:
    """The decision for one request; ``prices`` (blended USD per 1M tokens) serve ``cheapest`` rules."""
    notes: list[str] = []
    for rule in policy.rules:
        failed = None
        for condition in rule.conditions:
            verdict = condition.test(features)
            if verdict is None:
                score = isinstance(condition, Difficulty)  # the other undecided kind: exact tokens
                return Decision(None, None, policy.version, needs_tokens=not score, needs_difficulty=score, notes=tuple(notes))
            if not verdict:
                failed = condition
                break
        if failed is not None:
            if explain:
                notes.append(f"{_where(rule)}: not matched: {failed.text} is false ({failed.seen(features)})")
            continue
        action = rule.action
        if action.route_as is not None:
            if routed_as:  # once only: a request routed as another model is not routed again
                continue
            inner = evaluate(
                policy, as_model(policy, features, action.route_as), capabilities, prices=prices, explain=explain, routed_as=True
            )
            return chained(rule, inner, notes, explain)
        if not action.arms:
            if explain:
                notes.append(f"{_where(rule)}: matched, but {action.inactive}")
            continue
        usable: list[str] = []
        for model in candidates(action, features.request_id, rule.name):
            reason = unfit(capabilities.get(model, UNKNOWN), features)
            if reason is None:
                usable.append(model)
            elif reason == NEEDS_TOKENS:
                return Decision(None, None, policy.version, needs_tokens=True, notes=tuple(notes))
            else:
                notes.append(f"{_where(rule)}: skipped {model}: {reason}")
        if not usable:
            notes.append(f"{_where(rule)}: matched, but no target can serve this request")
            continue
        return _decide(policy, rule, usable, features, prices, notes, explain)
    return Decision(None, None, policy.version, notes=tuple(notes))


def as_model(policy: Policy, features: Features, model: str) -> Features:
    """The request as if it had asked for ``model`` (``route_as``), classified when the policy
    reads the task class and the requested model's features were read without it."""
    task_class = features.task_class
    if policy.classify and task_class is None:
        task_class = classify(features.last_user, json_mode=features.json_mode is not None)
    return replace(features, model=model, task_class=task_class)


def chained(rule: Rule, inner: Decision, notes: list[str], explain: bool) -> Decision:
    """A ``route_as`` rule's decision: the rules' one for the other model, named ``outer>inner``."""
    label = f"{rule.name}>{inner.rule}" if inner.rule is not None else None
    said = [f"{_where(rule)}: matched: routed as {rule.action.route_as!r}"] if explain else []
    return replace(inner, rule=label, notes=(*notes, *said, *inner.notes))


def _decide(
    policy: Policy,
    rule: Rule,
    usable: list[str],
    f: Features,
    prices: Mapping[str, float] | None,
    notes: list[str],
    explain: bool,
) -> Decision:
    """The decision of a matched rule: its capable targets put in order (strategy, then health)."""
    action = rule.action
    if action.strategy == "cheapest" and prices is not None and len(usable) > 1:
        usable.sort(key=lambda m: prices.get(m, _INF))  # stable: ties keep the written order
    backends = f.backends
    if action.strategy == "fastest" and backends is not None and len(usable) > 1:
        usable.sort(key=lambda m: _latency(backends.latency_ms(m)))
    if backends is not None:
        down = [m for m in usable if not backends.is_up(m)]
        if down and len(down) < len(usable):
            usable = [m for m in usable if m not in down] + down
            if explain:
                notes.append(f"{_where(rule)}: {', '.join(down)} down: tried after the others")
    cascade = action.cascade
    if cascade is not None:
        then = [m for m in usable if m in cascade.then]
        first = [m for m in usable if m not in cascade.then]
        if first and then and first[0] == usable[0]:
            usable = [first[0], *then, *first[1:]]
        else:  # nothing to try first (unfit or down) or nothing to escalate to: a plain route
            cascade = None
    return Decision(
        rule.name,
        usable[0],
        policy.version,
        tuple(usable[1:]),
        action.max_tokens,
        notes=tuple(notes),
        cascade=cascade,
        cache=action.cache,
        prune=action.prune,
    )


def _latency(ms: float | None) -> float:
    return _INF if ms is None else ms


def candidates(action: Action, request_id: str, rule_name: str) -> tuple[str, ...]:
    """The models to try, in order: the chosen arm's, then the others' (deterministic per request)."""
    arms = action.arms
    if len(arms) == 1:
        return arms[0].models
    bucket = zlib.crc32(f"{rule_name}\x00{request_id}".encode()) % action.total_weight
    chosen = 0
    for index, arm in enumerate(arms):
        if bucket < arm.weight:
            chosen = index
            break
        bucket -= arm.weight
    ordered = [*arms[chosen].models]
    for index, arm in enumerate(arms):
        if index != chosen:
            ordered += [m for m in arm.models if m not in ordered]
    return tuple(ordered)


def _where(rule: Rule) -> str:
    return f"rule {rule.name!r} (line {rule.line})" if rule.line else f"rule {rule.name!r}"
