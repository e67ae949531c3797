"""Replay the recorded ledger through a candidate policy: projected cost and route shares (pure).

Used by ``thrifty policy simulate`` (``proxy.policy.cli``), beside the pipeline rather than
in it. Each chat record since migration 3 stores what routing looked at, except content:
the requested model, the key / team / app, tags, whether tools, images or JSON mode were
used, the task class (when some rule asked for it) and the prompt's size. From those a
:class:`Features` is rebuilt (the prompt tokens before pruning as the exact count, the
record's time as "now"), the candidate is evaluated by the real engine, and the request is
priced at the chosen model's unit prices on the recorded prompt and completion tokens.

What cannot be replayed is counted, never guessed: records without stored features (older
than migration 3; every chat record since has them); requests that reach a rule whose outcome
depends on data the ledger does not keep (keywords and regexes read the message text,
headers, budget state at the time) are set apart, by rule,
with their actual cost, and kept out of both sides of the comparison. Failed requests
(status 400 and above) are skipped. Cache hits stay hits (cost 0 on both sides).
Completion lengths are assumed unchanged; provider-side cached prompt tokens count as
cached only when the model stays the same.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.cost.prices import Price
from proxy.cost.pricing import cost_nusd, usd
from proxy.policy.capabilities import NEEDS_TOKENS, UNKNOWN, Capabilities, unfit
from proxy.policy.engine import candidates, evaluate
from proxy.policy.model import Condition, Features, Policy, Rule

# The ledger columns a replay reads, in this order (see ``Record``).
COLUMNS = (
    "id, ts, request_id, requested_model, served_model, route, key_id, team, app, tags, has_tools, has_images,"
    " json_mode, task_class, prompt_tokens_before, prompt_tokens, completion_tokens, cached_tokens, cache, status, cost_nusd"
)
# What a condition reads that the ledger does not store.
UNSTORED = {
    "keywords": "the message text (keywords)",
    "regex": "the message text (regex)",
    "headers": "request headers",
    "budget": "the budget state at the time",
}
NO_RULE = "(no rule)"
ASSUMPTIONS = (
    "completion lengths are assumed unchanged (the recorded completion tokens, priced at the new model's rate)",
    "prompt tokens as recorded; provider-cached prompt tokens stay cached only when the model is unchanged",
    "cache hits stay hits (cost 0 on both sides); prices are today's unit prices from the configuration and litellm",
    "health conditions see every backend up",
)


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    ts: float
    request_id: str
    requested_model: str
    served_model: str | None
    route: str | None
    key_id: str | None
    team: str | None
    app: str | None
    tags: str | None
    has_tools: bool | None
    has_images: bool | None
    json_mode: str | None
    task_class: str | None
    prompt_tokens_before: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache: str
    status: int
    cost_nusd: int

    @classmethod
    def of(cls, row: Sequence[Any]) -> Record:
        return cls(*row)


def features_of(record: Record) -> Features | None:
    """The routing features a record stored; None for records made without them."""
    if record.has_tools is None:
        return None
    try:
        tags = json.loads(record.tags) if record.tags else {}
    except ValueError:
        tags = {}
    tokens = max(record.prompt_tokens_before, record.prompt_tokens)
    return Features(
        model=record.requested_model,
        request_id=record.request_id,
        key_id=record.key_id,
        team=record.team,
        app=record.app,
        tags={str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {},
        tools=bool(record.has_tools),
        images=bool(record.has_images),
        json_mode=record.json_mode,
        prompt_bound=tokens,
        prompt_tokens=tokens,
        now=record.ts,
        task_class=record.task_class,
    )


def _unknowable(condition: Condition, f: Features) -> str | None:
    if condition.key in UNSTORED:
        return UNSTORED[condition.key]
    if condition.key == "task_class" and f.task_class is None:
        return "a task class (not computed when the request was served)"
    if condition.key == "difficulty" and f.difficulty is None:
        return "a difficulty score (not computed when the request was served)"
    return None


def gap(policy: Policy, f: Features, capabilities: Mapping[str, Capabilities]) -> tuple[Rule, str] | None:
    """The first rule the request reaches whose outcome depends on unstored data, and what it needs.

    Walks the rules as the engine does: a rule whose stored conditions fail, or that has no
    capable target, is passed; the first rule that would match on stored data alone ends
    the walk (None: the engine decides from here)."""
    for rule in policy.rules:
        needs = None
        passed = False
        for condition in rule.conditions:
            missing = _unknowable(condition, f)
            if missing is not None:
                needs = needs or missing
            elif condition.test(f) is False:
                passed = True
                break
        if not passed and needs is None and rule.action.route_as is not None:
            f = replace(f, model=rule.action.route_as)  # the later rules see it as the engine does
            continue
        if passed or not rule.action.arms or not _capable(rule, f, capabilities):
            continue
        return (rule, needs) if needs else None
    return None


def _capable(rule: Rule, f: Features, capabilities: Mapping[str, Capabilities]) -> bool:
    for model in candidates(rule.action, f.request_id, rule.name):
        reason = unfit(capabilities.get(model, UNKNOWN), f)
        if reason is None or reason == NEEDS_TOKENS:
            return True
    return False


@dataclass
class _Routes:
    counts: Counter[str] = field(default_factory=Counter)
    models: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, rule: str, model: str) -> None:
        self.counts[rule] += 1
        self.models.setdefault(rule, Counter())[model] += 1

    def rows(self, total: int) -> list[dict[str, Any]]:
        return [
            {
                "rule": rule,
                "count": count,
                "share": round(count / total, 4) if total else 0.0,
                "models": dict(self.models[rule].most_common()),
            }
            for rule, count in self.counts.most_common()
        ]


@dataclass
class Simulation:
    """Tallies of a replay; feed records with :meth:`add`, read :meth:`report`."""

    policy: Policy
    capabilities: Mapping[str, Capabilities]
    prices: Mapping[str, Price]  # by configured model name
    blended: Mapping[str, float] | None = None  # for "cheapest" rules, as the router has them (route.blended_prices)
    seen: int = 0
    no_features: int = 0
    failed: int = 0
    refused: int = 0
    replayed: int = 0
    actual: int = 0  # nano-USD
    projected: int = 0
    now: _Routes = field(default_factory=_Routes)
    then: _Routes = field(default_factory=_Routes)
    undecided: dict[str, list[Any]] = field(default_factory=dict)  # rule -> [needs, count, actual nano-USD]

    def add(self, record: Record) -> None:
        self.seen += 1
        if record.status >= 400:
            self.failed += 1
            return
        f = features_of(record)
        if f is None:
            self.no_features += 1
            return
        blocked = gap(self.policy, f, self.capabilities)
        if blocked is not None:
            rule, needs = blocked
            entry = self.undecided.setdefault(_label(rule), [needs, 0, 0])
            entry[1] += 1
            entry[2] += record.cost_nusd
            return
        decision = evaluate(self.policy, f, self.capabilities, prices=self.blended)
        model = decision.model or (record.requested_model if record.requested_model in self.prices else None)
        if model is None:
            self.refused += 1  # no rule applies and the requested model is not configured: a 400 today
            return
        self.replayed += 1
        self.actual += record.cost_nusd
        self.now.add(record.route or NO_RULE, record.served_model or record.requested_model)
        self.then.add(decision.rule or NO_RULE, model)
        if record.cache in ("exact", "semantic"):
            return
        cached = record.cached_tokens if model == record.served_model else 0
        self.projected += cost_nusd(self.prices[model], record.prompt_tokens, cached, record.completion_tokens)

    def report(self) -> dict[str, Any]:
        difference = self.projected - self.actual
        return {
            "policy": {"source": self.policy.source, "version": self.policy.version},
            "requests": {
                "seen": self.seen,
                "replayed": self.replayed,
                "skipped_no_stored_features": self.no_features,
                "skipped_failed": self.failed,
                "undecided_unstored_data": sum(e[1] for e in self.undecided.values()),
                "refused_by_candidate": self.refused,
            },
            "cost_usd": {
                "actual": usd(self.actual),
                "projected": usd(self.projected),
                "difference": usd(difference),
                "difference_pct": round(100 * difference / self.actual, 2) if self.actual else None,
            },
            "routes_actual": self.now.rows(self.replayed),
            "routes_projected": self.then.rows(self.replayed),
            "undecided": [
                {"rule": rule, "needs": needs, "count": count, "actual_usd": usd(cost)}
                for rule, (needs, count, cost) in self.undecided.items()
            ],
            "assumptions": list(ASSUMPTIONS),
        }


def _label(rule: Rule) -> str:
    return f"{rule.name} (line {rule.line})" if rule.line else rule.name


def render_table(report: dict[str, Any], window: str) -> str:
    r, c = report["requests"], report["cost_usd"]
    pct = "" if c["difference_pct"] is None else f" ({c['difference_pct']:+.2f}%)"
    lines = [
        f"policy {report['policy']['source']} (version {report['policy']['version']}), ledger {window}",
        f"requests: {r['seen']} chat records; replayed {r['replayed']}; skipped {r['skipped_no_stored_features']} with no "
        f"stored features and {r['skipped_failed']} failed; {r['undecided_unstored_data']} undecided (unstored data); "
        f"{r['refused_by_candidate']} refused by the candidate (no rule, model not configured)",
        f"cost of the replayed requests: actual ${c['actual']}, projected ${c['projected']}, difference ${c['difference']}{pct}",
        "",
    ]
    for title, key in (("routes now", "routes_actual"), ("routes projected", "routes_projected")):
        lines.append(f"{title}:")
        rows = report[key] or [{"rule": "-", "count": 0, "share": 0.0, "models": {}}]
        width = max(len(row["rule"]) for row in rows)
        for row in rows:
            models = ", ".join(f"{m} {n}" for m, n in row["models"].items())
            lines.append(f"  {row['rule']:<{width}}  {row['count']:>7}  {row['share']:>6.1%}  {models}")
    if report["undecided"]:
        lines += ["", "not replayed: the outcome depends on data the ledger does not store:"]
        lines += [
            f"  {u['count']} requests reach rule {u['rule']}, which reads {u['needs']} (actual ${u['actual_usd']})"
            for u in report["undecided"]
        ]
    lines += ["", "assumptions:", *(f"  - {a}" for a in report["assumptions"])]
    return "\n".join(lines)
