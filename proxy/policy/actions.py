"""The action half of the policy loader: where a matched request may go, and with what settings.

``action`` turns a rule's ``action:`` mapping into an :class:`Action`: a target or fallback
list, a weighted split, ``cheapest`` / ``fastest`` candidates, or a ``cascade``, each resolved
through :class:`Resolver` (aliases to configured models, ``@local`` to every local model),
plus the per-route ``cache`` and ``prune`` settings and a ``max_tokens`` cap. Every value is
checked here with ``file:line`` (ranges, known names, durations) so the stages that read
them trust them. ``strings`` and ``share`` are the small readers both halves use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from proxy.policy.model import Action, Arm, Cascade, OneOf, RouteCache, RoutePrune, Rule
from proxy.settings import ModelConfig
from proxy.yamlread import read_int, read_section, reject_unknown
from proxy.yamlsource import Document, Path

LOCAL = "@local"
_CHOICE = ("target", "split", "cheapest", "fastest", "cascade", "route_as")  # exactly one: where the request may go
_ACTION = {*_CHOICE, "strategy", "max_tokens", "cache", "prune"}
_STRATEGIES = ("ordered", "cheapest", "fastest")
_CHECKS = ("empty", "refusal", "json", "short", "confidence")
_CACHE_MODES = ("off", "exact", "semantic")
_CACHE_SCOPES = ("team", "key")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DEFAULT_CASCADE = Cascade()
_DEFAULT_PRUNE = RoutePrune()


def strings(doc: Document, path: Path, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str | int) and not isinstance(v, bool) and str(v) != "" for v in items):
        raise doc.error(path, "must be a non-empty string or a list of them")
    return [str(v) for v in items]


def read_share(doc: Document, path: Path, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise doc.error(path, f"must be {what}")
    return float(value)


def read_action(doc: Document, path: Path, value: Any, resolver: Resolver) -> Action:
    if not isinstance(value, dict):
        raise doc.error(path, "must be a mapping with target, split, cheapest, fastest or cascade")
    reject_unknown(doc, path, value, _ACTION)
    chosen = [key for key in _CHOICE if key in value]
    if len(chosen) != 1:
        raise doc.error(path, "needs exactly one of target (a model, an alias or a list), split, cheapest, fastest or cascade")
    kind = chosen[0]
    if kind == "route_as":
        return _route_as(doc, path, value)
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
        names = strings(doc, (*path, kind), value[kind])
        models = resolver.expand(names, (*path, kind))
        arms = (Arm(1, models, ", ".join(names)),) if models else ()
    inactive = None if arms else "its targets name no configured model (aliases resolve to nothing here)"
    cache = _route_cache(doc, (*path, "cache"), value["cache"]) if "cache" in value else None
    prune = _route_prune(doc, (*path, "prune"), value["prune"], resolver) if "prune" in value else None
    return Action(arms, cap, inactive, strategy, cascade, cache, prune)


def _route_as(doc: Document, path: Path, value: dict[str, Any]) -> Action:
    """``route_as: auto``: routed by the rules as if the request asked for that model; the rules
    it lands on set the rest, so it goes alone. ``check_route_as`` checks the name once all rules are read."""
    extra = sorted(set(value) - {"route_as"})
    if extra:
        raise doc.error((*path, extra[0]), "route_as goes alone: the rule the request is routed to sets the rest")
    name = value["route_as"]
    if not isinstance(name, str) or not name:
        raise doc.error((*path, "route_as"), "must name the model a rule routes, e.g. route_as: auto")
    return Action((), route_as=name)


def check_route_as(doc: Document, rules: Sequence[Rule]) -> None:
    """Every ``route_as`` names a model some other rule routes (a ``model:`` it matches), and its
    own rule cannot match that model (else a loop: route_as applies once anyway)."""
    routed = {
        v
        for r in rules
        if r.action.route_as is None
        for c in r.conditions
        if c.key == "model" and isinstance(c, OneOf)
        for v in c.values
    }
    for index, rule in enumerate(rules):
        name = rule.action.route_as
        if name is None:
            continue
        at: Path = ("rules", index, "action", "route_as")
        own = next((c for c in rule.conditions if c.key == "model" and isinstance(c, OneOf)), None)
        if own is None or name in own.values:
            raise doc.error(
                at,
                f"rule {rule.name!r} could match its own result: give it match: {{model: ...}} naming other models than {name!r}",
            )
        if name not in routed:
            known = ", ".join(sorted(routed)) or "none"
            raise doc.error(at, f"route_as {name!r}: no rule routes requests for that model (rules match model: {known})")


def _split(doc: Document, path: Path, split: Any, resolver: Resolver) -> tuple[Arm, ...]:
    if not isinstance(split, dict) or not split:
        raise doc.error(path, "must map models or aliases to weights, e.g. {gpt-4o-mini: 90, gpt-4o: 10}")
    arms = []
    for name, weight in split.items():
        weight = read_int(doc, (*path, name), weight, 1)
        models = resolver.expand([name], (*path, name))
        if models:
            arms.append(Arm(weight, models, name))
    return tuple(arms)


def _cascade(doc: Document, path: Path, value: Any, resolver: Resolver) -> tuple[Cascade, tuple[str, ...]]:
    """The cascade's settings and its models: the ``try`` ones (not escalated to), then the ``then`` ones."""
    value = read_section(doc, path, value, {"try", "then", "checks", "min_chars", "min_logprob"})
    for key in ("try", "then"):
        if key not in value:
            raise doc.error(path, f"a cascade needs {key}: (try: the model answering first, then: the one escalated to)")
    then = resolver.expand(strings(doc, (*path, "then"), value["then"]), (*path, "then"))
    first = tuple(m for m in resolver.expand(strings(doc, (*path, "try"), value["try"]), (*path, "try")) if m not in then)
    min_logprob = None
    if value.get("min_logprob") is not None:
        raw = value["min_logprob"]
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not -100 <= raw < 0:
            raise doc.error((*path, "min_logprob"), "must be a negative number (a mean token log-probability, e.g. -1.5)")
        min_logprob = float(raw)
    default = _DEFAULT_CASCADE.checks + (("confidence",) if min_logprob is not None else ())
    checks = tuple(strings(doc, (*path, "checks"), value["checks"])) if "checks" in value else default
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
        threshold = read_share(doc, (*path, "threshold"), value["threshold"], "a cosine similarity between 0 and 1, e.g. 0.95")
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


def _route_prune(doc: Document, path: Path, value: Any, resolver: Resolver) -> RoutePrune:
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
        what = "a share of the context window in (0, 1], e.g. 0.5"
        share = read_share(doc, (*path, "context_share"), value["context_share"], what)
    keep = read_int(doc, (*path, "keep_last"), value["keep_last"], 1) if "keep_last" in value else _DEFAULT_PRUNE.keep_last
    flags = {}
    for key in ("summarize", "allow_opt_out"):
        if key in value:
            if not isinstance(value[key], bool):
                raise doc.error((*path, key), "must be true or false")
            flags[key] = value[key]
    summarizer = None
    if value.get("summarizer") is not None:
        models = resolver.expand(strings(doc, (*path, "summarizer"), value["summarizer"]), (*path, "summarizer"))
        summarizer = models[0] if models else None  # an alias naming no configured model: the default summarizer
    return RoutePrune(budget, share, keep, flags.get("summarize", True), summarizer, flags.get("allow_opt_out", True))


class Resolver:
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
            for name in strings(doc, at, candidates):
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
