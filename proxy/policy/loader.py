"""Policy YAML to a validated :class:`Policy`, or a :class:`ConfigError` naming ``file:line``.

Everything is checked before anything is used, so an invalid file is never half-applied:
unknown keys, wrong types, bad regexes, unknown time zones, targets that are neither a
configured model nor an alias, and rules that can never match because an earlier rule
(a catch-all, or one whose conditions are a subset of theirs) takes every request first.
Aliases resolve against the configured models here: a candidate that is not configured is
skipped (so one shipped policy fits many deployments), ``@local`` stands for every local
model, and a rule whose targets all resolve to nothing is kept but inactive. Matchers and
actions that later slices add (cascade, cheapest, budget state, ...) are refused as "not
supported yet" rather than half-supported.
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
from proxy.config import ModelConfig
from proxy.errors import ConfigError
from proxy.policy.model import Action, Arm, Condition, Flag, Keywords, OneOf, Pairs, Pattern, Policy, Rule, TimeWindow, TokenRange
from proxy.yamlread import read_int, read_section, reject_unknown
from proxy.yamlsource import Document, Path

LOCAL = "@local"
_TOP = {"version", "description", "aliases", "rules"}
_RULE = {"name", "description", "match", "action"}
_MATCH = {"model", "key", "team", "app", "tags", "headers", "prompt_tokens", "tools", "images", "json", "keywords", "regex"}
_MATCH.add("time")
_ACTION = {"target", "split", "max_tokens"}
_LATER = {"task_class", "budget", "budget_state", "health", "backend_health", "cascade", "cheapest", "lowest_latency"}
_LATER |= {"cache", "prune", "pruning"}
_COST = {"TokenRange": 1, "Keywords": 2, "Pattern": 3, "TimeWindow": 4}
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
    _refuse_later(doc, (), data)
    reject_unknown(doc, (), data, _TOP)
    resolver = _Resolver(doc, models, data.get("aliases"))
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
    label = data.get("version")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    version = f"{label}-{digest}" if isinstance(label, str | int) and not isinstance(label, bool) else digest
    headers = frozenset(name for r in rules for c in r.conditions if c.key == "headers" for name, _ in _pairs_of(c))
    return Policy(tuple(rules), version, source, resolver.resolved, headers)


def _pairs_of(condition: Condition) -> tuple[tuple[str, frozenset[str]], ...]:
    return condition.pairs if isinstance(condition, Pairs) else ()


def _refuse_later(doc: Document, path: Path, data: dict[str, Any]) -> None:
    for key in data:
        if key in _LATER:
            raise doc.error((*path, key), "not supported yet (this version routes by match conditions to target/split)")


def _check_reachable(doc: Document, path: Path, rule: Rule, earlier: list[Rule]) -> None:
    mine = {c.text for c in rule.conditions}
    for before in earlier:
        if before.action.arms and {c.text for c in before.conditions} <= mine:
            what = "the earlier catch-all rule" if not before.conditions else "the earlier rule"
            tail = "matches every request" if not before.conditions else "matches every request this one matches"
            hint = "; to fall back when its targets cannot serve a request, list them in its target instead"
            raise doc.error(path, f"rule {rule.name!r} is shadowed: {what} {before.name!r} (line {before.line}) {tail}{hint}")


def _rule(doc: Document, path: Path, item: Any, resolver: _Resolver) -> Rule:
    if not isinstance(item, dict):
        raise doc.error(path, "a rule is a mapping with name, match and action")
    _refuse_later(doc, path, item)
    reject_unknown(doc, path, item, _RULE)
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise doc.error((*path, "name"), "every rule needs a name (a non-empty string)")
    match = item.get("match")
    if match is not None and not isinstance(match, dict):
        raise doc.error((*path, "match"), "must be a mapping of conditions (leave it out to match every request)")
    conditions = _conditions(doc, (*path, "match"), match or {})
    if "action" not in item:
        raise doc.error(path, "every rule needs an action (target or split)")
    action = _action(doc, (*path, "action"), item["action"], resolver)
    return Rule(name, doc.line(path), conditions, action)


def _conditions(doc: Document, path: Path, match: dict[str, Any]) -> tuple[Condition, ...]:
    _refuse_later(doc, path, match)
    reject_unknown(doc, path, match, _MATCH)
    out: list[Condition] = []
    for key, value in match.items():
        at = (*path, key)
        if key in _IDENTITY:
            values = _strings(doc, at, value)
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
            words = sorted({w.lower() for w in _strings(doc, at, value)})
            out.append(Keywords(key, f"keywords {words}", tuple(words)))
        elif key == "regex":
            sources = _strings(doc, at, value)
            out.append(Pattern(key, f"regex {sorted(sources)}", tuple(_compile(doc, at, s) for s in sources)))
        else:
            out.append(_time_window(doc, at, value))
    return tuple(sorted(out, key=lambda c: _COST.get(type(c).__name__, 0)))  # cheap tests first: a miss stops early


def _strings(doc: Document, path: Path, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str | int) and not isinstance(v, bool) and str(v) != "" for v in items):
        raise doc.error(path, "must be a non-empty string or a list of them")
    return [str(v) for v in items]


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
        values = frozenset() if wanted is True else frozenset(_strings(doc, (*path, name), wanted))
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
        names = [d.lower()[:3] for d in _strings(doc, (*path, "days"), value["days"])]
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


def _action(doc: Document, path: Path, value: Any, resolver: _Resolver) -> Action:
    if not isinstance(value, dict):
        raise doc.error(path, "must be a mapping with target or split")
    _refuse_later(doc, path, value)
    reject_unknown(doc, path, value, _ACTION)
    if ("target" in value) == ("split" in value):
        raise doc.error(path, "needs exactly one of target (a model, an alias or a fallback list) or split")
    cap = None if value.get("max_tokens") is None else read_int(doc, (*path, "max_tokens"), value["max_tokens"], 1)
    if "target" in value:
        names = _strings(doc, (*path, "target"), value["target"])
        models = resolver.expand(names, (*path, "target"))
        arms: tuple[Arm, ...] = (Arm(1, models, ", ".join(names)),) if models else ()
    else:
        split = value["split"]
        if not isinstance(split, dict) or not split:
            raise doc.error((*path, "split"), "must map models or aliases to weights, e.g. {gpt-4o-mini: 90, gpt-4o: 10}")
        arms_list = []
        for name, weight in split.items():
            weight = read_int(doc, (*path, "split", name), weight, 1)
            models = resolver.expand([name], (*path, "split", name))
            if models:
                arms_list.append(Arm(weight, models, name))
        arms = tuple(arms_list)
    inactive = None if arms else "its targets name no configured model (aliases resolve to nothing here)"
    return Action(arms, cap, inactive)


class _Resolver:
    """Targets to configured model names: a model, an alias (configured candidates only) or @local."""

    def __init__(self, doc: Document, models: Sequence[ModelConfig], aliases: Any):
        self.doc = doc
        self.names = {m.name for m in models}
        self.local = tuple(m.name for m in models if m.is_local)
        self.resolved: dict[str, tuple[str, ...]] = {}
        if aliases is None:
            return
        if not isinstance(aliases, dict):
            raise doc.error(("aliases",), "must map alias names to a model or an ordered list of candidate models")
        for alias, candidates in aliases.items():
            at: Path = ("aliases", alias)
            if alias in self.names:
                raise doc.error(at, f"alias {alias!r} has the name of a configured model; choose another name")
            found: list[str] = []
            for name in _strings(doc, at, candidates):
                for model in self.local if name == LOCAL else ((name,) if name in self.names else ()):
                    if model not in found:
                        found.append(model)
            self.resolved[alias] = tuple(found)

    def expand(self, names: list[str], path: Path) -> tuple[str, ...]:
        out: list[str] = []
        for name in names:
            if name in self.resolved:
                models = self.resolved[name]
            elif name == LOCAL:
                models = self.local
            elif name in self.names:
                models = (name,)
            else:
                known = ", ".join(sorted(self.names)) or "none"
                raise self.doc.error(path, f"unknown model {name!r}: not a configured model nor an alias (configured: {known})")
            out += [m for m in models if m not in out]
        return tuple(out)
