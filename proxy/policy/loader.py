"""Policy YAML to a validated :class:`Policy`, or a :class:`ConfigError` naming ``file:line``.

Everything is checked before anything is used, so an invalid file is never half-applied:
unknown keys, wrong types, bad regexes, unknown time zones, targets that are neither a
configured model nor an alias, and rules that can never match because an earlier rule
(a catch-all, or one whose conditions are a subset of theirs) takes every request first.
Aliases resolve against the configured models here: a candidate that is not configured is
skipped (so one shipped policy fits many deployments), ``@local`` stands for every local
model, and a rule whose targets all resolve to nothing is kept but inactive. Actions pick
targets in order, by price (``cheapest``) or by observed latency (``fastest``), or run a
``cascade``; they may carry per-route ``cache`` and ``prune`` settings, each checked here
(ranges, known names, durations) so the stages that read them trust them.
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
from proxy.policy.classify import CLASSES
from proxy.policy.model import (
    Action,
    Arm,
    BudgetShare,
    Cascade,
    Condition,
    Flag,
    Health,
    Keywords,
    OneOf,
    Pairs,
    Pattern,
    Policy,
    RouteCache,
    RoutePrune,
    Rule,
    TimeWindow,
    TokenRange,
)
from proxy.yamlread import read_int, read_section, reject_unknown
from proxy.yamlsource import Document, Path

LOCAL = "@local"
_TOP = {"version", "description", "aliases", "rules"}
_RULE = {"name", "description", "match", "action"}
_MATCH = {"model", "key", "team", "app", "tags", "headers", "prompt_tokens", "tools", "images", "json", "keywords", "regex"}
_MATCH |= {"time", "task_class", "budget", "health"}
_CHOICE = ("target", "split", "cheapest", "fastest", "cascade")  # exactly one: where the request may go
_ACTION = {*_CHOICE, "strategy", "max_tokens", "cache", "prune"}
_STRATEGIES = ("ordered", "cheapest", "fastest")
_CHECKS = ("empty", "refusal", "json", "short", "confidence")
_BUDGET_SCOPES = ("team", "key", "app")
_CACHE_MODES = ("off", "exact", "semantic")
_CACHE_SCOPES = ("team", "key")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DEFAULT_CASCADE = Cascade()
_DEFAULT_PRUNE = RoutePrune()
_COST = {"BudgetShare": 1, "TokenRange": 1, "Health": 2, "Keywords": 2, "Pattern": 3, "TimeWindow": 4}
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
    conditions = [c for r in rules for c in r.conditions]
    headers = frozenset(name for c in conditions if c.key == "headers" for name, _ in _pairs_of(c))
    scopes = frozenset(c.scope for c in conditions if isinstance(c, BudgetShare))
    classify, classify_for = _classify_for(rules)
    return Policy(tuple(rules), version, source, resolver.resolved, headers, classify, classify_for, scopes)


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


def _rule(doc: Document, path: Path, item: Any, resolver: _Resolver) -> Rule:
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
    action = _action(doc, (*path, "action"), item["action"], resolver)
    return Rule(name, doc.line(path), conditions, action)


def _conditions(doc: Document, path: Path, match: dict[str, Any], resolver: _Resolver) -> tuple[Condition, ...]:
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
        elif key == "task_class":
            out.append(_task_class(doc, at, value))
        elif key == "budget":
            out.append(_budget(doc, at, value))
        elif key == "health":
            out.append(_health(doc, at, value, resolver))
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


def _task_class(doc: Document, path: Path, value: Any) -> OneOf:
    classes = _strings(doc, path, value)
    bad = [c for c in classes if c not in CLASSES]
    if bad:
        raise doc.error(path, f"unknown task class {bad[0]!r}; the classifier knows {', '.join(CLASSES)}")
    return OneOf("task_class", f"task_class in {sorted(set(classes))}", frozenset(classes), operator.attrgetter("task_class"))


def _budget(doc: Document, path: Path, value: Any) -> BudgetShare:
    value = read_section(doc, path, value, {"above", "scope"})
    if "above" not in value:
        raise doc.error(path, "needs above: the share of the budget spent, e.g. {above: 0.8}")
    above = _share(doc, (*path, "above"), value["above"], "a share between 0 and 1 (0.8 for 80%)")
    scope = value.get("scope", "*")
    if scope != "*" and scope not in _BUDGET_SCOPES:
        raise doc.error((*path, "scope"), f"must be one of {', '.join(_BUDGET_SCOPES)} (leave it out: the tightest)")
    return BudgetShare("budget", f"budget {scope} >= {above}", above, str(scope))


def _health(doc: Document, path: Path, value: Any, resolver: _Resolver) -> Health:
    value = read_section(doc, path, value, {"down", "up"})
    if not value:
        raise doc.error(path, "needs down, up or both: models or aliases whose backends must be down (or up)")
    down = resolver.expand(_strings(doc, (*path, "down"), value["down"]), (*path, "down")) if "down" in value else ()
    up = resolver.expand(_strings(doc, (*path, "up"), value["up"]), (*path, "up")) if "up" in value else ()
    return Health("health", f"health down {sorted(down)} up {sorted(up)}", down, up)


def _share(doc: Document, path: Path, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise doc.error(path, f"must be {what}")
    return float(value)


def _action(doc: Document, path: Path, value: Any, resolver: _Resolver) -> Action:
    if not isinstance(value, dict):
        raise doc.error(path, "must be a mapping with target, split, cheapest, fastest or cascade")
    reject_unknown(doc, path, value, _ACTION)
    chosen = [key for key in _CHOICE if key in value]
    if len(chosen) != 1:
        raise doc.error(path, "needs exactly one of target (a model, an alias or a list), split, cheapest, fastest or cascade")
    kind = chosen[0]
    cap = None if value.get("max_tokens") is None else read_int(doc, (*path, "max_tokens"), value["max_tokens"], 1)
    strategy = kind if kind in _STRATEGIES else "ordered"
    if "strategy" in value:
        if kind != "target":
            raise doc.error((*path, "strategy"), "goes with target only (cheapest: and fastest: already say it)")
        strategy = str(value["strategy"])
        if strategy not in _STRATEGIES:
            raise doc.error((*path, "strategy"), f"must be one of {', '.join(_STRATEGIES)}")
    cascade = None
    if kind == "split":
        arms = _split(doc, (*path, "split"), value["split"], resolver)
    elif kind == "cascade":
        cascade, models = _cascade(doc, (*path, "cascade"), value["cascade"], resolver)
        arms = (Arm(1, models, f"{value['cascade'].get('try')} -> {value['cascade'].get('then')}"),) if models else ()
    else:
        names = _strings(doc, (*path, kind), value[kind])
        models = resolver.expand(names, (*path, kind))
        arms = (Arm(1, models, ", ".join(names)),) if models else ()
    inactive = None if arms else "its targets name no configured model (aliases resolve to nothing here)"
    cache = _route_cache(doc, (*path, "cache"), value["cache"]) if "cache" in value else None
    prune = _route_prune(doc, (*path, "prune"), value["prune"], resolver) if "prune" in value else None
    return Action(arms, cap, inactive, strategy, cascade, cache, prune)


def _split(doc: Document, path: Path, split: Any, resolver: _Resolver) -> tuple[Arm, ...]:
    if not isinstance(split, dict) or not split:
        raise doc.error(path, "must map models or aliases to weights, e.g. {gpt-4o-mini: 90, gpt-4o: 10}")
    arms = []
    for name, weight in split.items():
        weight = read_int(doc, (*path, name), weight, 1)
        models = resolver.expand([name], (*path, name))
        if models:
            arms.append(Arm(weight, models, name))
    return tuple(arms)


def _cascade(doc: Document, path: Path, value: Any, resolver: _Resolver) -> tuple[Cascade, tuple[str, ...]]:
    """The cascade's settings and its models: the ``try`` ones (not escalated to), then the ``then`` ones."""
    value = read_section(doc, path, value, {"try", "then", "checks", "min_chars", "min_logprob"})
    for key in ("try", "then"):
        if key not in value:
            raise doc.error(path, f"a cascade needs {key}: (try: the model answering first, then: the one escalated to)")
    then = resolver.expand(_strings(doc, (*path, "then"), value["then"]), (*path, "then"))
    first = tuple(m for m in resolver.expand(_strings(doc, (*path, "try"), value["try"]), (*path, "try")) if m not in then)
    min_logprob = None
    if value.get("min_logprob") is not None:
        raw = value["min_logprob"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not -100 <= raw < 0:
            raise doc.error((*path, "min_logprob"), "must be a negative number (a mean token log-probability, e.g. -1.5)")
        min_logprob = float(raw)
    default = _DEFAULT_CASCADE.checks + (("confidence",) if min_logprob is not None else ())
    checks = tuple(_strings(doc, (*path, "checks"), value["checks"])) if "checks" in value else default
    bad = [c for c in checks if c not in _CHECKS]
    if bad:
        raise doc.error((*path, "checks"), f"unknown check {bad[0]!r}; use {', '.join(_CHECKS)}")
    if "confidence" in checks and min_logprob is None:
        raise doc.error((*path, "checks"), "the confidence check needs min_logprob (e.g. -1.5)")
    min_chars = read_int(doc, (*path, "min_chars"), value["min_chars"], 1) if "min_chars" in value else _DEFAULT_CASCADE.min_chars
    return Cascade(tuple(dict.fromkeys(checks)), min_chars, min_logprob, then), first + then


def _route_cache(doc: Document, path: Path, value: Any) -> RouteCache:
    if value is False or value == "off":
        return RouteCache(mode="off")  # YAML reads a bare off as false
    value = read_section(doc, path, value, {"mode", "ttl", "threshold", "scope"})
    if not value:
        raise doc.error(path, "needs mode, ttl, threshold or scope (or cache: off)")
    mode = value.get("mode")
    mode = "off" if mode is False else mode
    if mode is not None and mode not in _CACHE_MODES:
        raise doc.error((*path, "mode"), f"must be one of {', '.join(_CACHE_MODES)}")
    ttl = _duration(doc, (*path, "ttl"), value["ttl"]) if value.get("ttl") is not None else None
    threshold = None
    if value.get("threshold") is not None:
        threshold = _share(doc, (*path, "threshold"), value["threshold"], "a cosine similarity between 0 and 1, e.g. 0.95")
        if mode in ("off", "exact"):
            raise doc.error((*path, "threshold"), f"applies to the semantic cache only (mode is {mode})")
    scope = value.get("scope")
    if scope is not None and scope not in _CACHE_SCOPES:
        raise doc.error((*path, "scope"), f"must be one of {', '.join(_CACHE_SCOPES)}: whose requests may share answers")
    return RouteCache(mode, ttl, threshold, scope)


def _duration(doc: Document, path: Path, value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)  # seconds
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", str(value).strip())
    if match is None or float(match[1]) <= 0:
        raise doc.error(path, "must be a duration: seconds, or a number with s, m, h or d (10m, 1h, 7d)")
    return float(match[1]) * _UNITS[match[2]]


def _route_prune(doc: Document, path: Path, value: Any, resolver: _Resolver) -> RoutePrune:
    keys = {"max_input_tokens", "context_share", "keep_last", "summarize", "summarizer", "allow_opt_out"}
    value = read_section(doc, path, value, keys)
    if not value:
        raise doc.error(path, "needs max_input_tokens or context_share (the input token budget)")
    if "max_input_tokens" in value and "context_share" in value:
        raise doc.error((*path, "context_share"), "give max_input_tokens or context_share, not both")
    raw_budget = value.get("max_input_tokens")
    budget = None if raw_budget is None else read_int(doc, (*path, "max_input_tokens"), raw_budget, 1)
    share = None
    if value.get("context_share") is not None:
        share = _share(doc, (*path, "context_share"), value["context_share"], "a share of the context window in (0, 1], e.g. 0.5")
    keep = read_int(doc, (*path, "keep_last"), value["keep_last"], 1) if "keep_last" in value else _DEFAULT_PRUNE.keep_last
    flags = {}
    for key in ("summarize", "allow_opt_out"):
        if key in value:
            if not isinstance(value[key], bool):
                raise doc.error((*path, key), "must be true or false")
            flags[key] = value[key]
    summarizer = None
    if value.get("summarizer") is not None:
        models = resolver.expand(_strings(doc, (*path, "summarizer"), value["summarizer"]), (*path, "summarizer"))
        summarizer = models[0] if models else None  # an alias naming no configured model: the default summarizer
    return RoutePrune(budget, share, keep, flags.get("summarize", True), summarizer, flags.get("allow_opt_out", True))


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
