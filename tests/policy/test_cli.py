"""``thrifty policy check`` and ``thrifty policy explain`` run as real processes: exit codes,
one-line errors with file:line, and the explanation of a routing decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import one_error_line, thrifty

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """\
ledger: {url: "sqlite:///thrifty.db"}
policies: false
models:
  - {name: gpt-4o, provider: openai, api_key: sk-x}
  - {name: gpt-4o-mini, provider: openai, api_key: sk-x}
  - {name: gemma, provider: llamacpp}
"""
POLICY = """\
version: t1
aliases:
  small: ["@local", gpt-4o-mini]
rules:
  - name: finance
    match: {team: finance}
    action: {target: gpt-4o}
  - name: tools
    match: {model: auto, tools: true}
    action: {target: [small, gpt-4o]}
  - name: simple
    match: {model: auto}
    action: {target: small, max_tokens: 300}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "thrifty.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_a_valid_policy_exits_0_and_shows_the_aliases(tmp_path: Path, config: Path) -> None:
    policy = write(tmp_path, "p.yaml", POLICY)
    result = thrifty("policy", "check", str(policy), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {policy}: 3 rules, version t1-")
    assert "alias small -> gemma, gpt-4o-mini" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules:\n  - name: a\n    action: [target\n", ":4: YAML syntax error: expected ',' or ']'"),
        ("rules:\n  - name: a\n    action: {target: gpt-9}\n", ":3: rules[0].action.target: unknown model 'gpt-9'"),
        (
            "rules:\n  - name: all\n    action: {target: gemma}\n"
            "  - name: b\n    match: {team: x}\n    action: {target: gpt-4o}\n",
            ":4: rules[1]: rule 'b' is shadowed: the earlier catch-all rule 'all' (line 2)",
        ),
        (
            "rules:\n  - name: a\n    match: {regex: '(unclosed'}\n    action: {target: gemma}\n",
            ":3: rules[0].match.regex: bad regular",
        ),
        ("rules:\n  - name: a\n    action: {cascade: [gemma, gpt-4o]}\n", ":3: rules[0].action.cascade: must be a mapping"),
    ],
)
def test_check_an_invalid_policy_is_one_line_with_file_and_line(tmp_path: Path, config: Path, text: str, expected: str) -> None:
    policy = write(tmp_path, "bad.yaml", text)
    result = thrifty("policy", "check", str(policy), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert one_error_line(result).startswith(f"thrifty: error: {policy}{expected}")


def test_check_a_missing_file_and_a_missing_argument(tmp_path: Path, config: Path) -> None:
    result = thrifty("policy", "check", "nope.yaml", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "nope.yaml: cannot read policy file" in one_error_line(result)
    result = thrifty("policy", "check", cwd=tmp_path)
    assert result.returncode == 2 and "the following arguments are required: PATH" in one_error_line(result)


def test_the_shipped_default_checks_in_zero_config(tmp_path: Path) -> None:
    result = thrifty("policy", "check", str(ROOT / "policies" / "default.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = thrifty("policy", "check", str(ROOT / "policies" / "default.yaml"), cwd=tmp_path, env={"OPENAI_API_KEY": "sk-x"})
    assert result.returncode == 0 and "alias small -> gpt-4o-mini, gpt-4.1-mini" in result.stdout


def test_explain_names_the_rule_and_why_earlier_rules_did_not_match(tmp_path: Path, config: Path) -> None:
    policy = write(tmp_path, "p.yaml", POLICY)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    body = {"model": "auto", "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": tools}
    request = write(tmp_path, "req.json", json.dumps({"body": body, "team": "eng"}))
    result = thrifty(
        "policy", "explain", "--request", str(request), "--policy", str(policy), "--config", str(config), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"policy: {policy} (version t1-")
    assert lines[1].startswith("request: model=auto key=explain team=eng app=- prompt=at most ")
    assert lines[2] == "  rule 'finance' (line 5): not matched: team in ['finance'] is false (team is eng)"
    assert lines[3] == "  rule 'tools' (line 8): skipped gemma: no tool calling"
    assert lines[4] == "-> rule 'tools' (line 8) matched: routed to gpt-4o-mini; fallbacks: gpt-4o"
    plain = write(tmp_path, "plain.json", json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
    result = thrifty("policy", "explain", "--request", str(plain), "--policy", str(policy), "--config", str(config), cwd=tmp_path)
    assert (
        result.stdout.splitlines()[-1]
        == "-> rule 'simple' (line 11) matched: routed to gemma; fallbacks: gpt-4o-mini; max_tokens capped at 300"
    )


def test_explain_without_a_policy_or_with_a_bad_request_is_one_error(tmp_path: Path, config: Path) -> None:
    request = write(tmp_path, "req.json", "{not json")
    result = thrifty("policy", "explain", "--request", str(request), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "no policy to explain" in one_error_line(result)
    policy = write(tmp_path, "p.yaml", POLICY)
    result = thrifty(
        "policy", "explain", "--request", str(request), "--policy", str(policy), "--config", str(config), cwd=tmp_path
    )
    assert result.returncode == 2 and f"{request}:1: the request is not valid JSON" in one_error_line(result)


def test_explain_says_why_task_class_budget_and_health_rules_did_not_match(tmp_path: Path, config: Path) -> None:
    policy = write(
        tmp_path,
        "p.yaml",
        """\
rules:
  - name: hard
    match: {model: auto, task_class: [code, math]}
    action: {target: gpt-4o}
  - name: broke
    match: {budget: {above: 0.8, scope: team}}
    action: {target: gemma}
  - name: local-down
    match: {health: {down: gemma}}
    action: {target: gpt-4o-mini}
  - name: simple
    match: {model: auto}
    action: {cascade: {try: gemma, then: gpt-4o}}
""",
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "Translate 'good night' into French."}]}
    request = write(tmp_path, "req.json", json.dumps({"body": body, "team": "eng", "budget": {"team": 0.5}}))
    args = ("--policy", str(policy), "--config", str(config))
    result = thrifty("policy", "explain", "--request", str(request), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].endswith(" task_class=translate")
    assert lines[2:] == [
        "  rule 'hard' (line 2): not matched: task_class in ['code', 'math'] is false (task_class is translate)",
        "  rule 'broke' (line 5): not matched: budget team >= 0.8 is false (the team budget is 50% spent)",
        "  rule 'local-down' (line 8): not matched: health down ['gemma'] up [] is false (gemma is up)",
        "-> rule 'simple' (line 11) matched: routed to gemma; fallbacks: gpt-4o; "
        "cascade: escalates to gpt-4o when a check fails (empty, refusal, json, short)",
    ]
    down = write(tmp_path, "down.json", json.dumps({"body": body, "down": ["gemma"]}))
    result = thrifty("policy", "explain", "--request", str(down), *args, cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "-> rule 'local-down' (line 8) matched: routed to gpt-4o-mini"
