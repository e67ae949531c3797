"""``thrifty policy calibrate`` on a real ledger (SQLite and PostgreSQL) seeded with scored chat
records, their cascade verdicts and feedback, run as a subprocess: the proposed threshold is the
one computed by hand from the seeded outcomes, records without an outcome, failed ones and ones
without a score are set apart; "not enough data" is said plainly; bad arguments are one line and
exit 2. The cost projection of a difficulty rule moved to the proposal, on its own (pure)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.cost.prices import Price
from proxy.cost.record import COLUMNS, LedgerRecord
from proxy.policy.calibrate import Projection, Threshold, build_report, difficulty_rule, outcome_of
from proxy.policy.loader import parse_policy
from proxy.policy.simulate import COLUMNS as REPLAYED
from proxy.policy.simulate import Record
from proxy.settings import ModelConfig
from proxy.storage.database import open_database
from tests.services import postgres_server, postgres_url  # noqa: F401
from tests.test_cli import one_error_line, thrifty

INSERT = f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
NOW = 1_800_000_000.0  # inside --since 2020-01-01


def ledger_record(i: int, difficulty: float | None, *, cascade: str | None = None, status: int = 200) -> LedgerRecord:
    return LedgerRecord(
        id=f"id{i:03}", request_id=f"req{i:03}", ts=NOW + i, endpoint="chat/completions", key_id="k1", team=None,
        app=None, user_id=None, tags=None, requested_model="auto", served_model="small", provider="openai",
        route="cheap", policy_version="v", cache="miss", stream=False, prompt_tokens_before=10, prompt_tokens=10,
        completion_tokens=5, cached_tokens=0, reasoning_tokens=0, usage_source="upstream", price_input=None,
        price_output=None, price_cached_input=None, price_source=None, cost_nusd=20_000, baseline_nusd=0,
        savings_cache_nusd=0, savings_routing_nusd=0, savings_pruning_nusd=0, overhead_nusd=0, latency_ms=1.0,
        upstream_ms=None, ttft_ms=None, status=status, error_code=None, has_tools=False, has_images=False,
        cascade=cascade, difficulty=difficulty,
    )  # fmt: skip


async def seed(url: str, records: list[LedgerRecord], feedback: dict[str, float]) -> None:
    db = await open_database(url)
    try:
        await db.executemany(INSERT, [r.row() for r in records])
        for request_id, score in feedback.items():
            await db.execute(
                "INSERT INTO feedback (request_id, key_id, score, comment, ts) VALUES (?, ?, ?, ?, ?)",
                request_id, "k1", score, None, NOW,
            )  # fmt: skip
    finally:
        await db.close()


def hundred_outcomes() -> tuple[list[LedgerRecord], dict[str, float]]:
    """Difficulty 0.005 ... 0.995; above 0.6 every outcome is bad (half escalated by a cascade,
    half scored 0.2 by the user), at or below it good (half accepted, half scored 0.9); plus
    records that must not count: no outcome, failed, no score."""
    records, feedback = [], {}
    for i in range(100):
        difficulty, bad = (i + 0.5) / 100, i >= 60
        if i % 2:
            records.append(ledger_record(i, difficulty, cascade="escalated: refusal" if bad else "accepted"))
        else:
            records.append(ledger_record(i, difficulty))
            feedback[f"req{i:03}"] = 0.2 if bad else 0.9
    records += [ledger_record(100 + i, 0.01) for i in range(20)]  # no cascade, no feedback: no outcome
    records.append(ledger_record(200, 0.01, cascade="escalated: refusal", status=502))  # failed: not counted
    records.append(ledger_record(201, None, cascade="escalated: refusal"))  # no score: not counted
    return records, feedback


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thrifty.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def write_config(tmp_path: Path, ledger_url: str) -> Path:
    config = tmp_path / "thrifty.yaml"
    config.write_text(
        "models:\n  - {name: big, provider: openai, base_url: 'http://127.0.0.1:9/v1', api_key: sk-up}\n"
        "  - {name: small, provider: openai, base_url: 'http://127.0.0.1:9/v1', api_key: sk-up}\n"
        "prices:\n  big: {input: 10, output: 30}\n  small: {input: 1, output: 2}\n"
        f"ledger: {{url: '{ledger_url}'}}\n",
        encoding="utf-8",
    )
    return config


def calibrate(tmp_path: Path, config: Path, *args: str) -> dict[str, object]:
    result = thrifty(
        "policy", "calibrate", "--config", str(config), "--since", "2020-01-01", "--format", "json", *args, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_calibrate_proposes_the_threshold_that_keeps_bad_small_under_the_target(tmp_path: Path, ledger_url: str) -> None:
    records, feedback = hundred_outcomes()
    asyncio.run(seed(ledger_url, records, feedback))
    config = write_config(tmp_path, ledger_url)

    report = calibrate(tmp_path, config)
    assert (report["records"], report["with_outcome"], report["without_outcome"]) == (120, 100, 20)
    # 0.60: 60 requests small, none bad; 0.65: 5 of 65 bad (7.7%), over 5%
    assert report["proposed"] == {
        "threshold": 0.6, "small_share": 0.6, "bad_small_share": 0.0, "small": 60, "bad": 0, "seen_on_small": 60,
    }  # fmt: skip
    assert report["cost"] is None  # no policy: no difficulty rule to move

    looser = calibrate(tmp_path, config, "--target-hard-small", "0.1")
    assert isinstance(looser["proposed"], dict) and looser["proposed"]["threshold"] == 0.65

    table = thrifty("policy", "calibrate", "--config", str(config), "--since", "2020-01-01", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "proposed threshold: 0.60" in table.stdout
    assert "100 with an outcome (cascade verdict or feedback), 20 without" in table.stdout


def test_too_few_outcomes_is_said_plainly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'thrifty.db'}"
    asyncio.run(seed(url, [ledger_record(i, 0.5, cascade="accepted") for i in range(10)], {}))
    result = thrifty("policy", "calibrate", "--config", str(write_config(tmp_path, url)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not enough data: calibrate needs at least 30" in result.stdout and "it found 10" in result.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--target-hard-small", "1.5"], "--target-hard-small"),
        (["--target-hard-small", "x"], "--target-hard-small"),
        (["--since", "yesterday"], "--since"),
        (["--format", "csv"], "--format"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str], names: str) -> None:
    result = thrifty("policy", "calibrate", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert names in one_error_line(result)


POLICY = """\
version: d
rules:
  - name: hard
    match: {team: stand-in}
    action: {target: big}
  - name: easy
    match: {model: auto}
    action: {target: small}
"""


def test_the_cost_projection_moves_the_policys_difficulty_rule() -> None:
    models = (ModelConfig("small", "openai", "http://x/v1"), ModelConfig("big", "openai", "http://x/v1"))
    policy = parse_policy(POLICY, "d.yaml", models)
    hard = replace(policy.rules[0], conditions=(Threshold("difficulty", "difficulty above 0.8", True, 0.8),))
    policy = replace(policy, rules=(hard, *policy.rules[1:]))  # as `match: {difficulty: {above: 0.8}}` will load
    rule = difficulty_rule(policy)
    assert rule is not None and rule.above and rule.threshold == 0.8 and rule.targets == {"big"}

    rows = []
    for i in range(40):  # 0.0125 ... 0.9875; bad (escalated) above 0.5
        served = "big" if (i + 0.5) / 40 > 0.8 else "small"
        r = replace(ledger_record(i, (i + 0.5) / 40, cascade="escalated: x" if i >= 20 else "accepted"), served_model=served)
        rows.append((*[getattr(r, c) for c in REPLAYED.replace(" ", "").split(",")], r.difficulty, r.cascade, None))
    outcomes = [o for o in (outcome_of(row, rule) for row in rows) if o is not None]
    scored = [(Record.of(row[:-3]), float(row[-3])) for row in rows]
    prices = {
        "small": Price(Decimal(1), Decimal(2), Decimal(1), "config"),
        "big": Price(Decimal(10), Decimal(30), Decimal(10), "config"),
    }
    report = build_report(policy, "w", scored, outcomes, 0.05, Projection({}, prices))
    assert report["current_threshold"] == 0.8
    assert report["proposed"] is not None and report["proposed"]["threshold"] == 0.5  # 20 of 40 small, none bad
    cost = report["cost"]
    # per request (prices per 1M tokens): big 10 in x $10 + 5 out x $30 = $0.00025, small 10 x $1 + 5 x $2 = $0.00002
    assert cost["replayed"] == 40 and cost["undecided"] == 0
    assert cost["current_usd"] == "0.002640000"  # above 0.8: 8 big, 32 small
    assert cost["proposed_usd"] == "0.005400000"  # above 0.5: 20 big, 20 small
    assert (cost["small_share_current"], cost["small_share_proposed"]) == (0.8, 0.5)
