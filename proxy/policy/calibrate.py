"""Propose a difficulty threshold from the gateway's own outcomes (pure), for ``thrifty policy calibrate``.

Beside the pipeline, like ``simulate``: the CLI (``proxy.policy.cli``) reads the chat
records that carry a learned difficulty score (ledger v5), each with its cascade outcome
and the latest feedback on it (``POST /v1/thrifty/feedback``). An outcome is *bad* when a
cascade escalated (the small model's answer failed a check) or a user scored a
small-model answer below 0.5, *good* otherwise (accepted, or scored 0.5 and above). For
each threshold 0.05 ... 0.95 a request at or below it would go small; the curve is the
share that would and the share of bad outcomes among them, and the proposal is the
threshold that sends the most small while keeping that share at or under the target. Then,
reusing simulate's replay (stored features, the real engine, today's prices), the policy's
difficulty rule is evaluated at its current threshold and at the proposed one, and the
projected costs compared. Outcomes of requests a large model answered say nothing of how a
small one would have done: the curve counts them as seen, and says how many they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.cost.prices import Price
from proxy.cost.pricing import cost_nusd, usd
from proxy.policy.capabilities import Capabilities
from proxy.policy.engine import evaluate
from proxy.policy.model import Condition, Features, Policy, Rule
from proxy.policy.simulate import COLUMNS, Record, features_of, gap

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
MIN_RECORDS = 30  # fewer outcomes than this: "not enough data", no proposal
BAD_SCORE = 0.5
# simulate's columns, then what calibrate adds, from the ledger (l) and the feedback (f)
SELECT = ", ".join(f"l.{c.strip()}" for c in COLUMNS.split(",")) + ", l.difficulty, l.cascade, f.score"


@dataclass(frozen=True, slots=True)
class Outcome:
    record: Record
    difficulty: float
    bad: bool
    small: bool  # a small model answered (or tried first, in a cascade)


@dataclass(frozen=True, slots=True)
class Threshold(Condition):
    """``difficulty above/below X`` at a chosen X: the policy's own rule, moved."""

    above: bool = True
    value: float = 0.5

    def test(self, f: Features) -> bool | None:
        if f.difficulty is None:
            return None
        return f.difficulty > self.value if self.above else f.difficulty < self.value

    def seen(self, f: Features) -> str:
        return f"the difficulty score is {f.difficulty}"


@dataclass(frozen=True, slots=True)
class DifficultyRule:
    rule: Rule
    index: int  # of its difficulty condition
    above: bool  # above: the rule's targets take the hard requests; below: the easy ones
    threshold: float
    targets: frozenset[str]

    def small_answer(self, served: str | None) -> bool:
        return (served not in self.targets) if self.above else (served in self.targets)

    def at(self, policy: Policy, value: float) -> Policy:
        """The policy with this rule's threshold moved to ``value``."""
        moved = Threshold("difficulty", f"difficulty {'above' if self.above else 'below'} {value}", self.above, value)
        conditions = tuple(moved if i == self.index else c for i, c in enumerate(self.rule.conditions))
        rule = replace(self.rule, conditions=conditions)
        return replace(policy, rules=tuple(rule if r is self.rule else r for r in policy.rules))


def difficulty_rule(policy: Policy) -> DifficultyRule | None:
    """The first rule matching on ``difficulty``, its direction and threshold, found by probing
    the condition itself (0.001 steps), so any matcher with ``above`` or ``below`` will do."""
    for rule in policy.rules:
        for index, condition in enumerate(rule.conditions):
            if condition.key != "difficulty":
                continue
            probe = Features(model="calibrate")
            grid = [i / 1000 for i in range(1001)]
            holds = [bool(condition.test(replace(probe, difficulty=x))) for x in grid]
            above = holds[-1] and not holds[0]
            threshold = max((x for x, h in zip(grid, holds, strict=True) if not h), default=0.0) if above else (
                min((x for x, h in zip(grid, holds, strict=True) if not h), default=1.0)
            )  # fmt: skip
            targets = frozenset(m for arm in rule.action.arms for m in arm.models)
            return DifficultyRule(rule, index, above, threshold, targets)
    return None


def outcome_of(row: tuple[Any, ...], rule: DifficultyRule | None) -> Outcome | None:
    """One ledger row (``SELECT``) as an outcome; None when it has none (no cascade ran and nobody
    scored it, or only a low score on a large model's answer, which says nothing of a small one).
    Without a difficulty rule every answer counts as a small model's."""
    record = Record.of(row[:-3])
    difficulty, cascade, score = row[-3], row[-2], row[-1]
    escalated = isinstance(cascade, str) and cascade.startswith("escalated")
    small = escalated or rule is None or rule.small_answer(record.served_model)
    scored_bad = score is not None and float(score) < BAD_SCORE
    if escalated or (scored_bad and small):
        return Outcome(record, float(difficulty), True, small)
    if cascade == "accepted" or (score is not None and not scored_bad):
        return Outcome(record, float(difficulty), False, small)
    return None


def curve(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    total = len(outcomes)
    rows = []
    for t in THRESHOLDS:
        small = [o for o in outcomes if o.difficulty <= t]
        bad = sum(o.bad for o in small)
        rows.append({
            "threshold": t,
            "small_share": round(len(small) / total, 4) if total else 0.0,
            "bad_small_share": round(bad / len(small), 4) if small else 0.0,
            "small": len(small),
            "bad": bad,
            "seen_on_small": sum(o.small for o in small),
        })  # fmt: skip
    return rows


def propose(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The threshold sending the most small with bad-small at or under ``target`` (the lowest of equals)."""
    fits = [r for r in rows if r["small"] and r["bad_small_share"] <= target]
    if not fits:
        return None
    best = max(r["small_share"] for r in fits)
    return min((r for r in fits if r["small_share"] == best), key=lambda r: r["threshold"])


@dataclass
class Projection:
    """Projected cost of the same records under two policies (simulate's replay, both sides projected)."""

    capabilities: Mapping[str, Capabilities]
    prices: Mapping[str, Price]
    blended: Mapping[str, float] | None = None
    replayed: int = 0
    undecided: int = 0
    cost: list[int] = field(default_factory=lambda: [0, 0])
    small: list[int] = field(default_factory=lambda: [0, 0])

    def run(self, policies: tuple[Policy, Policy], scored: Iterable[tuple[Record, float]], rule: DifficultyRule) -> None:
        """Every scored record, with an outcome or not: the cost is of the traffic, not of the labels."""
        for record, difficulty in scored:
            f = features_of(record)
            if f is None:
                self.undecided += 1
                continue
            f = replace(f, difficulty=difficulty)
            if any(gap(p, f, self.capabilities) is not None for p in policies):
                self.undecided += 1
                continue
            models = [self._model(p, f, record) for p in policies]
            if None in models:
                self.undecided += 1
                continue
            self.replayed += 1
            for side, model in enumerate(models):
                assert model is not None
                self.small[side] += rule.small_answer(model)
                if record.cache not in ("exact", "semantic"):
                    cached = record.cached_tokens if model == record.served_model else 0
                    self.cost[side] += cost_nusd(self.prices[model], record.prompt_tokens, cached, record.completion_tokens)

    def _model(self, policy: Policy, f: Features, record: Record) -> str | None:
        decision = evaluate(policy, f, self.capabilities, prices=self.blended)
        model = decision.model or record.requested_model
        return model if model in self.prices else None

    def report(self) -> dict[str, Any]:
        now, then = self.cost
        return {
            "replayed": self.replayed,
            "undecided": self.undecided,
            "current_usd": usd(now),
            "proposed_usd": usd(then),
            "difference_usd": usd(then - now),
            "difference_pct": round(100 * (then - now) / now, 2) if now else None,
            "small_share_current": round(self.small[0] / self.replayed, 4) if self.replayed else 0.0,
            "small_share_proposed": round(self.small[1] / self.replayed, 4) if self.replayed else 0.0,
        }


def build_report(
    policy: Policy | None,
    window: str,
    scored: list[tuple[Record, float]],
    outcomes: list[Outcome],
    target: float,
    projection: Projection | None,
) -> dict[str, Any]:
    """The curve, the proposal and (given a policy with a difficulty rule) the cost projection."""
    rule = difficulty_rule(policy) if policy is not None else None
    unlabelled = len(scored) - len(outcomes)
    report: dict[str, Any] = {
        "policy": policy.source if policy is not None else "(none)",
        "window": window,
        "records": len(scored),
        "with_outcome": len(outcomes),
        "without_outcome": unlabelled,
        "target": target,
        "current_threshold": rule.threshold if rule is not None else None,
        "not_enough_data": len(outcomes) < MIN_RECORDS,
        "curve": [],
        "proposed": None,
        "cost": None,
    }
    if report["not_enough_data"]:
        return report
    report["curve"] = curve(outcomes)
    report["proposed"] = propose(report["curve"], target)
    if policy is not None and rule is not None and report["proposed"] is not None and projection is not None:
        moved = rule.at(policy, report["proposed"]["threshold"])
        projection.run((policy, moved), scored, rule)
        report["cost"] = projection.report()
    return report


def render_table(report: dict[str, Any]) -> str:
    lines = [f"policy {report['policy']}, ledger {report['window']}: {report['records']} chat records with a difficulty score"]
    if report.get("not_enough_data"):
        lines.append(
            f"not enough data: calibrate needs at least {MIN_RECORDS} of them with an outcome (a cascade verdict or "
            f"feedback); it found {report['with_outcome']}"
        )
        return "\n".join(lines)
    lines.append(f"  {report['with_outcome']} with an outcome (cascade verdict or feedback), {report['without_outcome']} without")
    lines.append(f"  threshold  small  bad among small  (n small, bad, answered small)  target {report['target']:.2%}")
    for r in report["curve"]:
        mark = " <- proposed" if report["proposed"] and r["threshold"] == report["proposed"]["threshold"] else ""
        lines.append(
            f"  {r['threshold']:>9.2f}  {r['small_share']:>5.1%}  {r['bad_small_share']:>15.1%}"
            f"  ({r['small']}, {r['bad']}, {r['seen_on_small']}){mark}"
        )
    current = report["current_threshold"]
    if report["proposed"] is None:
        lines.append(f"no threshold keeps bad outcomes among small-model requests at or under {report['target']:.2%}")
    else:
        now = "" if current is None else f" (now {current:.2f})"
        lines.append(f"proposed threshold: {report['proposed']['threshold']:.2f}{now}")
    cost = report["cost"]
    if cost is None:
        lines.append("no cost projection: the policy has no difficulty rule (match: {difficulty: {above: X}})")
    elif report["proposed"] is not None:
        pct = "" if cost["difference_pct"] is None else f" ({cost['difference_pct']:+.2f}%)"
        lines.append(
            f"projected cost of {cost['replayed']} replayed requests: ${cost['current_usd']} at {current:.2f}, "
            f"${cost['proposed_usd']} at {report['proposed']['threshold']:.2f}, difference ${cost['difference_usd']}{pct}; "
            f"sent small {cost['small_share_current']:.1%} -> {cost['small_share_proposed']:.1%}"
            f"; {cost['undecided']} not replayed (unstored data)"
        )
    lines.append(
        "note: outcomes of requests a large model answered say nothing of a small model's answer; "
        "the last column is how many of each threshold's small requests a small model did answer"
    )
    return "\n".join(lines)
