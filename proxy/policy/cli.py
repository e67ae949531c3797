"""``thrifty policy check PATH``, ``explain --request FILE [--policy PATH]``, ``simulate PATH [--since 30d]`` and ``calibrate``.

Wired into ``proxy.cli`` by :func:`add_policy_parser` and :func:`run_policy`. ``check``
validates a policy against the models of the configuration (``--config``) and exits 0, or
prints one line, ``thrifty: error: FILE:LINE: key: what is wrong``, and exits 2.
``explain`` says which rule a request would take and why each earlier rule did not. The
request file is a chat completion body as JSON, or ``{"body": {...}, "key": ..., "team":
..., "app": ..., "tags": {...}, "headers": {...}, "request_id": ...}`` to stand in for who
sends it, and ``"budget": {"team": 0.85}`` (spend shares by scope), ``"down": [models]`` and
``"latency_ms": {model: ms}`` to stand in for the live state routing reads.
``simulate`` reads the ledger (the configuration's ``ledger.url``) in pages,
ordered by time, replays it through the candidate (``proxy.policy.simulate``) and prints
the projection as a table or JSON, with a progress bar on stderr when that is a terminal.
``calibrate`` reads the chat records carrying a difficulty score, with their cascade verdict
and latest feedback, and proposes a difficulty threshold (``proxy.policy.calibrate``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.cost.prices import Price, PriceTable, load_litellm_prices, overrides_from_config
from proxy.cost.tokens import TokenCounter
from proxy.errors import ConfigError
from proxy.pipeline.auth import Principal
from proxy.pipeline.route import COUNTING_MODEL, blended_prices
from proxy.policy.calibrate import SELECT, Outcome, Projection, build_report, difficulty_rule, outcome_of
from proxy.policy.calibrate import render_table as render_calibration
from proxy.policy.capabilities import capabilities_for
from proxy.policy.engine import evaluate
from proxy.policy.features import StaticBackends, extract, with_tokens
from proxy.policy.loader import load_policy
from proxy.policy.model import Decision, Features, Policy
from proxy.policy.simulate import COLUMNS, Record, Simulation, render_table
from proxy.settings import Settings

_EPILOG = """examples:
  thrifty policy check policies/default.yaml --config thrifty.yaml
  thrifty policy explain --request req.json --policy policies/default.yaml
  thrifty policy simulate policies/candidate.yaml --since 30d --config thrifty.yaml
  thrifty policy calibrate --since 30d --target-hard-small 0.05 --config thrifty.yaml
"""


def add_policy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``policy check|explain`` to the ``thrifty`` sub-commands."""
    policy: argparse.ArgumentParser = subparsers.add_parser(
        "policy", help="check routing policies and explain routing decisions", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    commands = policy.add_subparsers(dest="policy_command", required=True, parser_class=type(policy))
    check = commands.add_parser("check", help="validate a policy file: exit 0, or one line with file:line and the problem")
    check.add_argument("path", metavar="PATH", help="the policy YAML file")
    explain = commands.add_parser("explain", help="which rule a request takes, and why earlier rules do not")
    explain.add_argument("--request", required=True, metavar="FILE", help="a chat completion request body (JSON)")
    explain.add_argument("--policy", metavar="PATH", help="the policy file (default: the configuration's policies:)")
    simulate = commands.add_parser("simulate", help="replay the recorded ledger through a candidate policy: projected cost")
    simulate.add_argument("path", metavar="PATH", help="the candidate policy YAML file")
    simulate.add_argument(
        "--since", type=parse_since, default="30d", help="how far back: 30d, 12h, 90m or an ISO date (default 30d)"
    )
    simulate.add_argument("--format", choices=("table", "json"), default="table")
    calibrate = commands.add_parser("calibrate", help="propose a difficulty threshold from cascade verdicts and feedback")
    calibrate.add_argument("--since", type=parse_since, default="30d", help="how far back (default 30d)")
    calibrate.add_argument("--policy", metavar="PATH", help="the policy file (default: the configuration's policies:)")
    calibrate.add_argument(
        "--target-hard-small", type=parse_share, default=0.05, metavar="SHARE",
        help="the most bad outcomes allowed among requests sent small, 0 to 1 (default 0.05)",
    )  # fmt: skip
    calibrate.add_argument("--format", choices=("table", "json"), default="table")
    for sub in (check, explain, simulate, calibrate):
        sub.add_argument("--config", metavar="FILE", help="YAML configuration naming the models (default: $THRIFTY_CONFIG)")
    return policy


def run_policy(settings: Settings, args: argparse.Namespace) -> int:
    """Raises ConfigError for the caller to print as one line (exit 2)."""
    if args.policy_command == "check":
        policy = load_policy(args.path, settings.models)
        print(_summary(policy))
        return 0
    if args.policy_command == "simulate":
        return asyncio.run(_simulate(settings, args))
    if args.policy_command == "calibrate":
        return asyncio.run(_calibrate(settings, args))
    path = args.policy or settings.policies
    if path is None:
        raise ConfigError("no policy to explain: pass --policy PATH or set policies: in the configuration")
    policy = load_policy(path, settings.models)
    features = _request_features(Path(args.request), policy)
    capabilities = capabilities_for(settings.models)
    table = PriceTable(load_litellm_prices(), overrides_from_config(settings.prices))
    models = {m.name: m for m in settings.models}
    prices = blended_prices(models, lambda name: table.for_model(models[name]))
    decision = evaluate(policy, features, capabilities, prices=prices, explain=True)
    if decision.needs_tokens:
        tokens = TokenCounter().count_messages(_body(Path(args.request)).get("messages") or (), COUNTING_MODEL)
        features = with_tokens(features, tokens)
        decision = evaluate(policy, features, capabilities, prices=prices, explain=True)
    print(_explanation(policy, features, decision))
    return 0


def _summary(policy: Policy) -> str:
    lines = [f"ok: {policy.source}: {len(policy.rules)} rules, version {policy.version}"]
    for alias, models in policy.aliases.items():
        shown = ", ".join(models) if models else "(no configured model: rules using only it are inactive)"
        lines.append(f"  alias {alias} -> {shown}")
    lines += [f"  rule {r.name!r} (line {r.line}) is inactive: {r.action.inactive}" for r in policy.rules if r.action.inactive]
    return "\n".join(lines)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read request file: {exc.strerror}", source=str(path)) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the request is not valid JSON: {exc.msg}", source=str(path), line=exc.lineno) from None


def _body(path: Path) -> dict[str, Any]:
    data = _load_json(path)
    body = data.get("body", data) if isinstance(data, dict) and "messages" not in data else data
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise ConfigError('the request must be a chat completion body with a model (or {"body": {...}})', source=str(path))
    return body


def _request_features(path: Path, policy: Policy) -> Features:
    data = _load_json(path)
    envelope = data if isinstance(data, dict) and "messages" not in data else {}
    principal = None
    if any(envelope.get(k) for k in ("key", "team", "app")):
        principal = Principal(str(envelope.get("key") or "explain"), envelope.get("team"), envelope.get("app"), "user")
    headers = {str(k).lower(): str(v) for k, v in (envelope.get("headers") or {}).items()}
    tags = {str(k): str(v) for k, v in (envelope.get("tags") or {}).items()}
    return extract(
        _body(path),
        request_id=str(envelope.get("request_id") or "explain"),
        principal=principal,
        headers=headers,
        header_names=policy.header_names,
        tags=tags,
        now=float(envelope.get("now") or time.time()),
        classify=policy.classify,
        budget={str(k): float(v) for k, v in (envelope.get("budget") or {}).items()},
        backends=StaticBackends(envelope.get("down") or (), envelope.get("latency_ms")),
    )


def _explanation(policy: Policy, f: Features, decision: Decision) -> str:
    tokens = f"{f.prompt_tokens} tokens" if f.prompt_tokens is not None else f"at most {f.prompt_bound} tokens"
    uses = [name for name, on in (("tools", f.tools), ("images", f.images), (f.json_mode or "", bool(f.json_mode))) if on]
    lines = [
        f"policy: {policy.source} (version {policy.version})",
        f"request: model={f.model} key={f.key_id or '-'} team={f.team or '-'} app={f.app or '-'} "
        f"prompt={tokens} uses={','.join(uses) or 'no tools, images or JSON mode'}"
        + (f" task_class={f.task_class}" if f.task_class else ""),
    ]
    lines += [f"  {note}" for note in decision.notes]
    if decision.rule is None:
        lines.append(f"-> no rule applies: the request goes to the model it names ({f.model})")
    else:
        rule = policy.rule_named(decision.rule)
        line = f" (line {rule.line})" if rule and rule.line else ""
        tail = f"; fallbacks: {', '.join(decision.fallbacks)}" if decision.fallbacks else ""
        cap = f"; max_tokens capped at {decision.max_tokens}" if decision.max_tokens else ""
        if decision.cascade is not None:
            tail += f"; cascade: escalates to {decision.fallbacks[0]} when a check fails ({', '.join(decision.cascade.checks)})"
        lines.append(f"-> rule {decision.rule!r}{line} matched: routed to {decision.model}{tail}{cap}")
    return "\n".join(lines)


_SPAN = re.compile(r"(\d+)([dhm])")
_SECONDS = {"d": 86400, "h": 3600, "m": 60}


def parse_since(text: str, now: float | None = None) -> float:
    """``30d``, ``12h``, ``90m`` (back from now) or an ISO date or time (UTC unless it says) to epoch seconds."""
    now = time.time() if now is None else now
    span = _SPAN.fullmatch(text.strip())
    if span:
        return now - int(span[1]) * _SECONDS[span[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since takes 30d, 12h, 90m or an ISO date like 2026-01-31, not {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def parse_share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise argparse.ArgumentTypeError(f"--target-hard-small takes a share from 0 to 1, like 0.05, not {text!r}")
    return share


def _prices(settings: Settings) -> tuple[dict[str, Price], dict[str, float]]:
    """Today's unit prices by configured model, and the blended ones "cheapest" rules compare."""
    table = PriceTable(load_litellm_prices(), overrides_from_config(settings.prices))
    prices = {m.name: table.for_model(m) for m in settings.models}
    return prices, blended_prices(prices, prices.__getitem__)


def _window(since: float) -> str:
    return f"since {datetime.fromtimestamp(since, UTC).strftime('%Y-%m-%d %H:%M')} UTC"


async def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from proxy.storage.database import open_database

    policy = load_policy(args.path, settings.models)
    prices, blended = _prices(settings)
    sim = Simulation(policy, capabilities_for(settings.models), prices, blended)
    since: float = args.since  # argparse ran parse_since, on the default too
    db = await open_database(settings.ledger.url)
    try:
        counted = await db.fetch("SELECT COUNT(*) FROM ledger WHERE endpoint = 'chat/completions' AND ts >= ?", since)
        bar = tqdm(total=int(counted[0][0]), unit="req", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
        with bar:
            async for page in _pages(db, since):
                for row in page:
                    sim.add(Record.of(row))
                bar.update(len(page))
    finally:
        await db.close()
    report = sim.report()
    window = _window(since)
    if args.format == "json":
        print(json.dumps({"window": {"since": datetime.fromtimestamp(since, UTC).isoformat()}, **report}, indent=2))
    else:
        print(render_table(report, window))
    return 0


async def _pages(
    db: Any, since: float, size: int = 2000, *, select: str = COLUMNS, source: str = "ledger", p: str = "", also: str = ""
) -> AsyncIterator[list[Any]]:
    """Chat records since ``since`` in (ts, id) order, a page at a time (keyset: no OFFSET scans).
    ``select`` starts with ``id, ts``; ``p`` is the ledger's alias in ``source`` (``"l."``); ``also``, more conditions."""
    after: tuple[Any, Any] | None = None
    while True:
        where, args = f"{p}ts >= ?", [since]
        if after is not None:
            where, args = f"({p}ts > ? OR ({p}ts = ? AND {p}id > ?))", [after[0], after[0], after[1]]
        rows = await db.fetch(
            f"SELECT {select} FROM {source} WHERE {p}endpoint = 'chat/completions'{also} AND {where}"
            f" ORDER BY {p}ts, {p}id LIMIT ?",
            *args,
            size,
        )
        if not rows:
            return
        yield rows
        if len(rows) < size:
            return
        after = (rows[-1][1], rows[-1][0])


async def _calibrate(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from proxy.storage.database import open_database

    path = args.policy or settings.policies
    policy = load_policy(path, settings.models) if path else None
    rule = difficulty_rule(policy) if policy is not None else None
    prices, blended = _prices(settings)
    since: float = args.since
    scored: list[tuple[Record, float]] = []
    outcomes: list[Outcome] = []
    db = await open_database(settings.ledger.url)
    try:
        counted = await db.fetch(
            f"SELECT COUNT(*) FROM ledger WHERE endpoint = 'chat/completions'{_SCORED.format(p='')} AND ts >= ?", since
        )
        bar = tqdm(total=int(counted[0][0]), unit="req", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
        with bar:
            scored_only = _SCORED.format(p="l.")
            async for page in _pages(db, since, select=SELECT, source=_CALIBRATE_SOURCE, p="l.", also=scored_only):
                for row in page:
                    outcome = outcome_of(tuple(row), rule)
                    scored.append((Record.of(row[:-3]), float(row[-3])))
                    if outcome is not None:
                        outcomes.append(outcome)
                bar.update(len(page))
    finally:
        await db.close()
    projection = Projection(capabilities_for(settings.models), prices, blended)
    report = build_report(policy, _window(since), scored, outcomes, args.target_hard_small, projection)
    if args.format == "json":
        print(json.dumps({**report, "window": {"since": datetime.fromtimestamp(since, UTC).isoformat()}}, indent=2))
    else:
        print(render_calibration(report))
    return 0


_SCORED = " AND {p}difficulty IS NOT NULL AND {p}status < 400"  # failed requests have no answer to judge
# The latest feedback per request and key is the only one kept (the feedback table's key).
_CALIBRATE_SOURCE = "ledger l LEFT JOIN feedback f ON f.request_id = l.request_id AND f.key_id = l.key_id"
