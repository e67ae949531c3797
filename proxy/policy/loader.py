"""Policy YAML to a validated :class:`Policy`, or a :class:`ConfigError` naming ``file:line``.

Everything is checked before anything is used, so an invalid file is never half-applied:
unknown keys, wrong types, bad regexes, unknown time zones, targets that are neither a
configured model nor an alias, and rules that can never match because an earlier rule
(a catch-all, or one whose conditions are a subset of theirs) takes every request first.
Aliases resolve against the configured models here: a candidate that is not configured is
skipped (so one shipped policy fits many deployments), ``@local`` stands for every local
model, and a rule whose targets all resolve to nothing is kept but inactive. This module
reads the document, the rules and their ``match`` conditions; ``proxy.policy.actions`` reads
each rule's ``action`` (targets, split, cheapest, fastest, cascade, per-route cache and prune).
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections.abc import Sequence
from pathlib import Path as FilePath
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy import yamlsource
from proxy.errors import ConfigError
from proxy.policy.actions import Resolver, check_route_as, read_action, read_share, strings
from proxy.policy.classify import CLASSES
from proxy.policy.model import (
    BudgetShare,
    Condition,
    Difficulty,
    Flag,
    Health,
    Keywords,
    OneOf,
    Pairs,
    Pattern,
    Policy,
    Rule,
    TimeWindow,
    TokenRange,
)
from proxy.settings import ModelConfig
from proxy.yamlread import read_int, read_section, reject_unknown
from proxy.yamlsource import Document, Path

_TOP = {"version", "description", "aliases", "rules"}
_RULE = {"name", "description", "match", "action"}
_MATCH = {"model", "key", "team", "app", "tags", "headers", "prompt_tokens", "tools", "images", "json", "keywords", "regex"}
_MATCH |= {"time", "task_class", "budget", "health", "difficulty"}
_BUDGET_SCOPES = ("team", "key", "app")
_COST = {"Difficulty": 5, "BudgetShare": 1, "TokenRange": 1, "Health": 2, "Keywords": 2, "Pattern": 3, "TimeWindow": 4}
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_IDENTITY: dict[str, Any] = {
    "model": operator.attrgetter("model"),
    "key": operator.attrgetter("key_id"),
    "team": operator.attrgetter("team"),
    "app": operator.attrgetter("app"),
}
_FLAGS: dict[str, Any] = {
    "tools": operator.attrgetter("tools"),
    "images": operator.attrgetter("images"),
    "json": lambda f: f.json_mode is not None,
}


def load_policy(path: str, models: Sequence[ModelConfig]) -> Policy:
    try:
        text = FilePath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy file: {exc.strerror}", source=path) from None
    return parse_policy(text, path, models)


def parse_policy(text: str, source: str, models: Sequence[ModelConfig]) -> Policy:
    doc = yamlsource.parse(text, source)
    data = doc.data
    if not isinstance(data, dict) or "rules" not in data:
        raise doc.error((), "a policy is a mapping with a list of rules (rules:)")
    reject_unknown(doc, (), data, _TOP)
    resolver = Resolver(doc, models, data.get("aliases"))
    items = data["rules"] or []
    if not isinstance(items, list):
        raise doc.error(("rules",), "must be a list of rules")
    rules: list[Rule] = []
    for index, item in enumerate(items):
        rule = _rule(doc, ("rules", index), item, resolver)
        if any(r.name == rule.name for r in rules):
            raise doc.error(("rules", index, "name"), f"rule name {rule.name!r} is used twice")
        _check_reachable(doc, ("rules", index), rule, rules)
        rules.append(rule)
    check_route_as(doc, rules)
    label = data.get("version")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    version = f"{label}-{digest}" if isinstance(label, str | int) and not isinstance(label, bool) else digest
    conditions = [c for r in rules for c in r.conditions]
    headers = frozenset(name for c in conditions if c.key == "headers" for name, _ in _pairs_of(c))
    scopes = frozenset(c.scope for c in conditions if isinstance(c, BudgetShare))
    classify, classify_for = _classify_for(rules)
    difficulty = any(isinstance(c, Difficulty) for c in conditions)
    return Policy(tuple(rules), version, source, resolver.resolved, headers, classify, classify_for, scopes, difficulty)


def _classify_for(rules: list[Rule]) -> tuple[bool, frozenset[str] | None]:
    """Whether to classify requests, and for which requested models only (when every rule that
    reads the task class also names the model: the shipped policy's ``auto``)."""
    readers = [r for r in rules if any(c.key == "task_class" for c in r.conditions)]
    models: set[str] = set()
    for rule in readers:
        named = [c for c in rule.conditions if c.key == "model" and isinstance(c, OneOf)]
        if not named:
            return True, None
        models |= named[0].values
    return bool(readers), frozenset(models) if readers else None


def _pairs_of(condition: Condition) -> tuple[tuple[str, frozenset[str]], ...]:
    return condition.pairs if isinstance(condition, Pairs) else ()


def _check_reachable(doc: Document, path: Path, rule: Rule, earlier: list[Rule]) -> None:
    for before in earlier:
        if before.action.arms and all(any(mine.implies(c) for mine in rule.conditions) for c in before.conditions):
            what = "the earlier catch-all rule" if not before.conditions else "the earlier rule"
            tail = "matches every request" if not before.conditions else "matches every request this one matches"
            hint = "; to fall back when its targets cannot serve a request, list them in its target instead"
            raise doc.error(path, f"rule {rule.name!r} is shadowed: {what} {before.name!r} (line {before.line}) {tail}{hint}")


def _rule(doc: Document, path: Path, item: Any, resolver: Resolver) -> Rule:
    if not isinstance(item, dict):
        raise doc.error(path, "a rule is a mapping with name, match and action")
    reject_unknown(doc, path, item, _RULE)
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise doc.error((*path, "name"), "every rule needs a name (a non-empty string)")
    match = item.get("match")
    if match is not None and not isinstance(match, dict):
        raise doc.error((*path, "match"), "must be a mapping of conditions (leave it out to match every request)")
    conditions = _conditions(doc, (*path, "match"), match or {}, resolver)
    if "action" not in item:
        raise doc.error(path, "every rule needs an action (target, split, cheapest, fastest or cascade)")
    action = read_action(doc, (*path, "action"), item["action"], resolver)
    return Rule(name, doc.line(path), conditions, action)


def _conditions(doc: Document, path: Path, match: dict[str, Any], resolver: Resolver) -> tuple[Condition, ...]:
    reject_unknown(doc, path, match, _MATCH)
    out: list[Condition] = []
    for key, value in match.items():
        at = (*path, key)
        if key in _IDENTITY:
            values = strings(doc, at, value)
            out.append(OneOf(key, f"{key} in {sorted(values)}", frozenset(values), _IDENTITY[key]))
        elif key in _FLAGS:
            if not isinstance(value, bool):
                raise doc.error(at, "must be true or false")
            out.append(Flag(key, f"{key} is {value}", value, _FLAGS[key]))
        elif key in ("tags", "headers"):
            out.append(_pairs(doc, at, key, value))
        elif key == "prompt_tokens":
            out.append(_token_range(doc, at, value))
        elif key == "keywords":
            words = sorted({w.lower() for w in strings(doc, at, value)})
            out.append(Keywords(key, f"keywords {words}", tuple(words)))
        elif key == "regex":
            sources = strings(doc, at, value)
            out.append(Pattern(key, f"regex {sorted(sources)}", tuple(_compile(doc, at, s) for s in sources)))
        elif key == "task_class":
            out.append(_task_class(doc, at, value))
        elif key == "budget":
            out.append(_budget(doc, at, value))
        elif key == "health":
            out.append(_health(doc, at, value, resolver))
        elif key == "difficulty":
            out.append(_difficulty(doc, at, value))
        else:
            out.append(_time_window(doc, at, value))
    return tuple(sorted(out, key=lambda c: _COST.get(type(c).__name__, 0)))  # cheap tests first: a miss stops early


def _compile(doc: Document, path: Path, source: str) -> re.Pattern[str]:
    try:
        return re.compile(source)
    except re.error as exc:
        raise doc.error(path, f"bad regular expression {source!r}: {exc.msg} at position {exc.pos}") from None


def _pairs(doc: Document, path: Path, key: str, value: Any) -> Pairs:
    if not isinstance(value, dict) or not value:
        raise doc.error(path, f"must map {key[:-1]} names to a value, a list of values, or true (present)")
    pairs = []
    for name, wanted in value.items():
        name = name.lower() if key == "headers" else name
        values = frozenset() if wanted is True else frozenset(strings(doc, (*path, name), wanted))
        pairs.append((name, values))
    pairs.sort(key=lambda p: p[0])
    text = f"{key} " + ", ".join(f"{n}={sorted(v) if v else '*'}" for n, v in pairs)
    get = operator.attrgetter(key)
    return Pairs(key, text, tuple(pairs), get)


def _token_range(doc: Document, path: Path, value: Any) -> TokenRange:
    value = read_section(doc, path, value, {"min", "max"})
    if not value:
        raise doc.error(path, "needs min, max or both (tokens, inclusive)")
    low = None if value.get("min") is None else read_int(doc, (*path, "min"), value["min"], 0)
    high = None if value.get("max") is None else read_int(doc, (*path, "max"), value["max"], 0)
    if low is not None and high is not None and low > high:
        raise doc.error((*path, "min"), "must not be above max")
    return TokenRange("prompt_tokens", f"prompt_tokens in [{low}, {high}]", low, high)


def _time_window(doc: Document, path: Path, value: Any) -> TimeWindow:
    value = read_section(doc, path, value, {"days", "from", "to", "tz"})
    days = frozenset(range(7))
    if "days" in value:
        names = [d.lower()[:3] for d in strings(doc, (*path, "days"), value["days"])]
        bad = [d for d in names if d not in _DAYS]
        if bad:
            raise doc.error((*path, "days"), f"unknown day {bad[0]!r}; use {', '.join(_DAYS)}")
        days = frozenset(_DAYS.index(d) for d in names)
    start = _minute(doc, (*path, "from"), value.get("from", "00:00"))
    end = _minute(doc, (*path, "to"), value.get("to", "24:00"))
    tz = value.get("tz", "UTC")
    try:
        zone = ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise doc.error((*path, "tz"), f"unknown time zone {tz!r} (an IANA name like Europe/Berlin)") from None
    text = f"time {sorted(days)} {start}-{end} {zone.key}"
    return TimeWindow("time", text, days, start, end, zone)


def _minute(doc: Document, path: Path, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1440:
        return value  # YAML 1.1 reads an unquoted 17:00 as 1020 (base 60): minutes already
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", str(value))
    if match is None or int(match[1]) * 60 + int(match[2]) > 1440 or int(match[2]) > 59:
        raise doc.error(path, 'must be a time of day "HH:MM" (quoted)')
    return int(match[1]) * 60 + int(match[2])


def _task_class(doc: Document, path: Path, value: Any) -> OneOf:
    classes = strings(doc, path, value)
    bad = [c for c in classes if c not in CLASSES]
    if bad:
        raise doc.error(path, f"unknown task class {bad[0]!r}; the classifier knows {', '.join(CLASSES)}")
    return OneOf("task_class", f"task_class in {sorted(set(classes))}", frozenset(classes), operator.attrgetter("task_class"))


def _budget(doc: Document, path: Path, value: Any) -> BudgetShare:
    value = read_section(doc, path, value, {"above", "scope"})
    if "above" not in value:
        raise doc.error(path, "needs above: the share of the budget spent, e.g. {above: 0.8}")
    above = read_share(doc, (*path, "above"), value["above"], "a share between 0 and 1 (0.8 for 80%)")
    scope = value.get("scope", "*")
    if scope != "*" and scope not in _BUDGET_SCOPES:
        raise doc.error((*path, "scope"), f"must be one of {', '.join(_BUDGET_SCOPES)} (leave it out: the tightest)")
    return BudgetShare("budget", f"budget {scope} >= {above}", above, str(scope))


def _health(doc: Document, path: Path, value: Any, resolver: Resolver) -> Health:
    value = read_section(doc, path, value, {"down", "up"})
    if not value:
        raise doc.error(path, "needs down, up or both: models or aliases whose backends must be down (or up)")
    down = resolver.expand(strings(doc, (*path, "down"), value["down"]), (*path, "down")) if "down" in value else ()
    up = resolver.expand(strings(doc, (*path, "up"), value["up"]), (*path, "up")) if "up" in value else ()
    return Health("health", f"health down {sorted(down)} up {sorted(up)}", down, up)


def _difficulty(doc: Document, path: Path, value: Any) -> Difficulty:
    value = read_section(doc, path, value, {"above", "below"})
    if not value:
        raise doc.error(path, "needs above, below or both: a difficulty score between 0 and 1, e.g. {above: 0.6}")
    why = "a difficulty score between 0 and 1"
    above = read_share(doc, (*path, "above"), value["above"], why) if "above" in value else None
    below = read_share(doc, (*path, "below"), value["below"], why) if "below" in value else None
    if above is not None and below is not None and above >= below:
        raise doc.error((*path, "above"), "must be below the below bound")
    return Difficulty("difficulty", f"difficulty in ({above}, {below})", above, below)
