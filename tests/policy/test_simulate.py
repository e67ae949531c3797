"""``thrifty policy simulate`` on a ledger filled by real requests through the gateway (SQLite
and PostgreSQL), run as a subprocess: figures checked against values computed by hand from
the fake upstream's token counts and the configured prices; records without stored
features, failed requests and requests whose rule reads unstored message text are counted
apart; ``--since`` parsing and its one-line errors; and the pure replay on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from proxy.config import load_settings
from proxy.cost.prices import Price
from proxy.pipeline.route import blended_prices
from proxy.policy.cli import parse_since
from proxy.policy.loader import parse_policy
from proxy.policy.simulate import Record, Simulation
from proxy.settings import ModelConfig, Settings
from proxy.storage.database import open_database
from proxy.storage.keys import KeyStore
from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import postgres_server, postgres_url  # noqa: F401
from tests.test_cli import one_error_line, thrifty

LIVE = "version: live\nrules:\n  - name: everything\n    match: {model: auto}\n    action: {target: big}\n"
CANDIDATE = """\
version: cand
rules:
  - name: vip-words
    match: {team: research, keywords: [urgent]}
    action: {target: big}
  - name: tools
    match: {model: auto, tools: true}
    action: {target: big}
  - name: cheap
    match: {model: auto}
    action: {target: small}
"""
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


def write_config(tmp_path: Path, upstream_url: str, ledger_url: str) -> Path:
    (tmp_path / "live.yaml").write_text(LIVE, encoding="utf-8")
    (tmp_path / "candidate.yaml").write_text(CANDIDATE, encoding="utf-8")
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        "models:\n"
        f"  - {{name: big, provider: openai, base_url: '{upstream_url}/v1', api_key: sk-up, capabilities: {{tools: true}}}}\n"
        f"  - {{name: small, provider: openai, base_url: '{upstream_url}/v1', api_key: sk-up}}\n"
        "prices:\n  big: {input: 10, output: 30}\n  small: {input: 1, output: 2}\n"
        f"auth: {{master_key: {MASTER_KEY}}}\n"
        f"ledger: {{url: '{ledger_url}', spill_dir: '{tmp_path / 'spill'}'}}\n"
        f"policies: '{tmp_path / 'live.yaml'}'\n",
        encoding="utf-8",
    )
    return config


async def count_records(url: str) -> int:
    db = await open_database(url)
    try:
        return int((await db.fetch("SELECT COUNT(*) FROM ledger"))[0][0])
    finally:
        await db.close()


async def research_key(url: str) -> str:
    db = await open_database(url)
    try:
        return (await KeyStore(db).create("research", None, "user"))[0]
    finally:
        await db.close()


def fill_ledger(settings: Settings, start_gateway: Callable[[Settings], ThreadServer]) -> None:
    """8 chat records: 5 replayable, 1 undecided, 1 failed, 1 without stored features."""
    url = settings.ledger.url
    plain = start_gateway(replace(settings, policies=None))  # its record is made to look older than v3 below
    with openai.OpenAI(base_url=f"{plain.url}/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
        sdk.chat.completions.create(model="big", messages=[{"role": "user", "content": "hello there"}])
    key = asyncio.run(research_key(url))
    gateway = start_gateway(settings)
    hello = [{"role": "user", "content": "hello there"}]
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
        for _ in range(2):
            sdk.chat.completions.create(model="auto", messages=hello)
        for _ in sdk.chat.completions.create(model="auto", messages=hello, stream=True):
            pass
        sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS)
        sdk.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0) as sdk:
        sdk.chat.completions.create(model="auto", messages=[{"role": "user", "content": "urgent: hi"}])
    deadline = 150  # the writer batches every 0.25 s
    while asyncio.run(count_records(url)) < 8 and deadline:
        asyncio.run(asyncio.sleep(0.1))
        deadline -= 1
    assert asyncio.run(count_records(url)) == 8
    assert asyncio.run(forget_features(url, "big")) == 1


async def forget_features(url: str, model: str) -> int:
    """A record as written before ledger v3 (no routing features): simulate must skip it, not guess."""
    db = await open_database(url)
    try:
        await db.execute(
            "UPDATE ledger SET has_tools = NULL, has_images = NULL, json_mode = NULL, task_class = NULL"
            " WHERE requested_model = ?",
            model,
        )
        rows = await db.fetch("SELECT COUNT(*) FROM ledger WHERE requested_model = ? AND has_tools IS NULL", model)
        return int(rows[0][0])
    finally:
        await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thrifty.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_simulate_projects_cost_and_routes_from_the_recorded_ledger(
    upstream: tuple[FakeUpstream, ThreadServer],
    tmp_path: Path,
    start_gateway: Callable[[Settings], ThreadServer],
    ledger_url: str,
) -> None:
    config = write_config(tmp_path, upstream[1].url, ledger_url)
    fill_ledger(load_settings(str(config)), start_gateway)

    result = thrifty("policy", "simulate", "candidate.yaml", "--config", str(config), "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    report = json.loads(result.stdout)
    assert report["requests"] == {
        "seen": 8,
        "replayed": 5,
        "skipped_no_stored_features": 1,
        "skipped_failed": 1,
        "undecided_unstored_data": 1,
        "refused_by_candidate": 0,
    }
    # By hand, from the fake's counts (prompt: words + 3 per message; completion: words of "echo: ...")
    # and the prices (USD per 1M: big 10 in / 30 out, small 1 / 2):
    #   3 x "hello there" (5 in, 3 out) on big: 140 µ$ each; on small: 11 µ$ each
    #   1 x tools "weather?" (4 in, 2 out) on big, both: 100 µ$
    #   1 x "hi" (4 in, 2 out) asked for small, no rule, both: 8 µ$
    assert report["cost_usd"] == {
        "actual": "0.000528000",
        "projected": "0.000141000",
        "difference": "-0.000387000",
        "difference_pct": -73.3,
    }
    assert report["routes_actual"] == [
        {"rule": "everything", "count": 4, "share": 0.8, "models": {"big": 4}},
        {"rule": "(no rule)", "count": 1, "share": 0.2, "models": {"small": 1}},
    ]
    assert report["routes_projected"] == [
        {"rule": "cheap", "count": 3, "share": 0.6, "models": {"small": 3}},
        {"rule": "tools", "count": 1, "share": 0.2, "models": {"big": 1}},
        {"rule": "(no rule)", "count": 1, "share": 0.2, "models": {"small": 1}},
    ]
    assert report["undecided"] == [
        {"rule": "vip-words (line 3)", "needs": "the message text (keywords)", "count": 1, "actual_usd": "0.000140000"}
    ]
    assert any("completion lengths are assumed unchanged" in a for a in report["assumptions"])

    table = thrifty("policy", "simulate", "candidate.yaml", "--config", str(config), "--since", "1h", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "actual $0.000528000, projected $0.000141000, difference $-0.000387000 (-73.30%)" in table.stdout
    assert "1 requests reach rule vip-words (line 3), which reads the message text (keywords)" in table.stdout
    assert "completion lengths are assumed unchanged" in table.stdout

    later = thrifty("policy", "simulate", "candidate.yaml", "--config", str(config), "--since", "2999-01-01", cwd=tmp_path)
    assert later.returncode == 0 and "requests: 0 chat records" in later.stdout


@pytest.mark.parametrize("since", ["yesterday", "30x", "-5d", ""])
def test_an_unparseable_since_is_one_line_and_exit_2(tmp_path: Path, since: str) -> None:
    (tmp_path / "p.yaml").write_text(LIVE, encoding="utf-8")
    result = thrifty("policy", "simulate", "p.yaml", "--since", since, cwd=tmp_path)
    assert result.returncode == 2
    assert "--since" in one_error_line(result)


def test_an_invalid_candidate_is_one_line_with_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"ledger: {{url: 'sqlite:///{tmp_path / 't.db'}'}}\npolicies: false\n", encoding="utf-8")
    (tmp_path / "p.yaml").write_text(LIVE, encoding="utf-8")  # names "big", which c.yaml does not configure
    result = thrifty("policy", "simulate", "p.yaml", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result).startswith("thrifty: error: p.yaml:5: rules[0].action.target: unknown model 'big'")


def test_since_accepts_spans_and_iso_dates() -> None:
    now = 1_800_000_000.0
    assert parse_since("30d", now) == now - 30 * 86400
    assert parse_since("12h", now) == now - 12 * 3600
    assert parse_since("90m", now) == now - 90 * 60
    assert parse_since("2026-01-31", now) == 1769817600.0  # midnight UTC
    assert parse_since("2026-01-31T01:00:00+01:00", now) == 1769817600.0


def test_a_cache_hit_stays_free_and_a_refused_request_is_counted() -> None:
    text = "version: s\nrules:\n  - name: cheap\n    match: {team: a}\n    action: {target: small}\n"
    models = (ModelConfig("small", "openai", "http://x/v1"), ModelConfig("big", "openai", "http://x/v1"))
    prices = {"small": Price(Decimal(1), Decimal(0), Decimal(0), "config"), "big": Price.free("config")}
    sim = Simulation(parse_policy(text, "s.yaml", models), {}, prices)

    def record(team: str | None, model: str, cache: str) -> Record:
        return Record(
            "id", 0.0, "r", model, "big", None, "k", team, None, None, False, False, None, None, 10, 10, 5, 0, cache, 200, 99
        )

    sim.add(record("a", "big", "exact"))  # a hit: 0 projected, as it was
    sim.add(record("a", "big", "miss"))  # 10 tokens in on small at $1 per 1M: 10,000 nano-USD
    sim.add(record(None, "auto", "miss"))  # no rule, and "auto" is not a model here: refused
    report = sim.report()
    assert report["requests"]["replayed"] == 2 and report["requests"]["refused_by_candidate"] == 1
    assert report["cost_usd"]["actual"] == "0.000000198" and report["cost_usd"]["projected"] == "0.000010000"


def test_a_cheapest_rule_replays_with_the_blended_prices() -> None:
    text = "version: c\nrules:\n  - name: thrift\n    match: {model: auto}\n    action: {cheapest: [big, small]}\n"
    models = (ModelConfig("small", "openai", "http://x/v1"), ModelConfig("big", "openai", "http://x/v1"))
    prices = {
        "small": Price(Decimal(1), Decimal(2), Decimal(1), "config"),
        "big": Price(Decimal(10), Decimal(30), Decimal(10), "config"),
    }
    sim = Simulation(parse_policy(text, "c.yaml", models), {}, prices, blended_prices(prices, prices.__getitem__))
    sim.add(
        Record(
            "id",
            0.0,
            "r",
            "auto",
            "big",
            "old",
            None,
            None,
            None,
            None,
            False,
            False,
            None,
            None,
            10,
            10,
            5,
            0,
            "miss",
            200,
            250_000,
        )
    )
    report = sim.report()
    assert report["routes_projected"] == [{"rule": "thrift", "count": 1, "share": 1.0, "models": {"small": 1}}]
    assert report["cost_usd"]["projected"] == "0.000020000"  # 10 in x $1 + 5 out x $2, per 1M
