"""The ``thrifty`` command run as a real process: keys create / list / revoke against the
gateway, and every bad argument or bad file is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.settings import AuthConfig
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import THRIFTY, free_port

# Variables that would change what a command reads; each test sets what it needs.
_SCRUBBED = ("THRIFTY_CONFIG", "THRIFTY_MASTER_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL")


def thrifty(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in _SCRUBBED} | (env or {})
    return subprocess.run([THRIFTY, *args], capture_output=True, text=True, cwd=cwd, env=environ, timeout=60)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (and nothing else anywhere)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("thrifty: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "thrifty.yaml"
    path.write_text(f"ledger:\n  url: sqlite:///{tmp_path / 'thrifty.db'}\n", encoding="utf-8")
    return path


def create_key(config: Path, team: str, app: str | None = None) -> tuple[str, str]:
    args = ["keys", "create", "--team", team, "--config", str(config)] + (["--app", app] if app else [])
    result = thrifty(*args, cwd=config.parent)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1].split()[-1]
    assert key.startswith("sk-thr-")
    key_id = result.stdout.split()[2]  # "created key key_… for team …"
    assert key_id.startswith("key_")
    return key, key_id


def list_keys(config: Path, *extra: str) -> list[dict[str, object]]:
    result = thrifty("keys", "list", "--format", "json", "--config", str(config), *extra, cwd=config.parent)
    assert result.returncode == 0, result.stderr
    keys: list[dict[str, object]] = json.loads(result.stdout)
    return keys


def test_a_created_key_works_until_it_is_revoked(
    config: Path,
    upstream: tuple[FakeUpstream, ThreadServer],
    start_gateway: Callable[..., ThreadServer],
) -> None:
    key, key_id = create_key(config, "research", "notebook")
    other, _ = create_key(config, "research")
    settings = settings_for(upstream[1].url, config.parent)
    assert settings.ledger.url == f"sqlite:///{config.parent / 'thrifty.db'}"  # the database the CLI wrote
    gateway = start_gateway(replace(settings, auth=AuthConfig(master_key=MASTER_KEY, key_cache_seconds=0.2)))

    def ask(api_key: str) -> str | None:
        with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30) as client:
            reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            return reply.choices[0].message.content

    assert ask(key) == "echo: hi"
    with pytest.raises(openai.AuthenticationError):
        ask(key[:-2] + "xx")

    revoked = thrifty("keys", "revoke", key_id, "--config", str(config), cwd=config.parent)
    assert (revoked.returncode, revoked.stdout.strip()) == (0, f"revoked {key_id}")
    deadline = time.monotonic() + 30  # the gateway trusts its cache for 0.2 s
    while True:
        try:
            ask(key)
        except openai.AuthenticationError as exc:
            assert exc.status_code == 401
            assert exc.code == "invalid_api_key"
            break
        assert time.monotonic() < deadline, "a revoked key kept working"
        time.sleep(0.05)
    assert ask(other) == "echo: hi"


def test_keys_list_shows_keys_but_never_the_keys_themselves(config: Path) -> None:
    kept, kept_id = create_key(config, "finance", "ledger-ui")
    gone, gone_id = create_key(config, "ops")
    assert thrifty("keys", "revoke", gone_id, "--config", str(config), cwd=config.parent).returncode == 0

    table = thrifty("keys", "list", "--config", str(config), cwd=config.parent)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["id", "prefix", "team", "app", "role", "created", "revoked"]
    assert len(rows) == 1 and rows[0].split()[:5] == [kept_id, kept[:11] + "…", "finance", "ledger-ui", "user"]
    every = thrifty("keys", "list", "--all", "--config", str(config), cwd=config.parent).stdout
    assert gone_id in every and kept_id in every
    assert kept not in table.stdout + every and gone not in every

    [active] = list_keys(config)
    assert {k: active[k] for k in ("id", "prefix", "team", "app", "role", "revoked_at")} == {
        "id": kept_id,
        "prefix": kept[:11],
        "team": "finance",
        "app": "ledger-ui",
        "role": "user",
        "revoked_at": None,
    }
    assert isinstance(active["created_at"], float)
    both = list_keys(config, "--all")
    assert [k["id"] for k in both] == [kept_id, gone_id]
    assert isinstance(both[1]["revoked_at"], float)
    assert kept not in json.dumps(both)


def test_revoking_an_unknown_key_fails_with_one_line(config: Path) -> None:
    result = thrifty("keys", "revoke", "key_nosuchkey", "--config", str(config), cwd=config.parent)
    assert result.returncode == 1
    assert one_error_line(result) == "thrifty: error: no active key with id 'key_nosuchkey'"


def test_keys_create_takes_a_role(config: Path) -> None:
    result = thrifty("keys", "create", "--team", "t", "--role", "finance", "--config", str(config), cwd=config.parent)
    assert result.returncode == 0
    assert [k["role"] for k in list_keys(config)] == ["finance"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--port", "abc"], "argument --port: port must be an integer, not 'abc'"),
        (["serve", "--port", "70000"], "port must be between 0 and 65535"),
        (["serve", "--workers", "0"], "argument --workers: workers must be between 1 and 256, not 0"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
        (["keys"], "the following arguments are required: keys_command"),
        (["keys", "create"], "the following arguments are required: --team"),
        (["keys", "create", "--team", " "], "argument --team: must be 1 to 128 characters"),
        (["keys", "create", "--team", "t", "--role", "root"], "argument --role: invalid choice: 'root'"),
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = thrifty(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in one_error_line(result)
    assert list(tmp_path.iterdir()) == []  # nothing was started or written


BAD_CONFIG = "server:\n  port: 4000\nmodels:\n  - name: a\n    provider: closedai\n"


@pytest.mark.parametrize("command", [["serve"], ["keys", "list"], ["keys", "create", "--team", "t"]])
@pytest.mark.parametrize("via", ["option", "env"])
def test_a_bad_config_file_is_one_line_naming_file_and_line(tmp_path: Path, command: list[str], via: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG, encoding="utf-8")
    if via == "option":
        result = thrifty(*command, "--config", str(bad), cwd=tmp_path)
    else:
        result = thrifty(*command, cwd=tmp_path, env={"THRIFTY_CONFIG": str(bad)})
    assert result.returncode == 2
    assert f"{bad}:5: models[0].provider: unknown provider 'closedai'" in one_error_line(result)


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = thrifty("serve", "--config", "nowhere.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "nowhere.yaml: cannot read config file" in one_error_line(result)


def test_an_unreachable_ledger_stops_serve_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pg.yaml"
    config.write_text(f"ledger:\n  url: postgresql://postgres@127.0.0.1:{free_port()}/thrifty\n", encoding="utf-8")
    result = thrifty("serve", "--config", str(config), "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "ledger.url: cannot connect to PostgreSQL" in one_error_line(result)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_line(config: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = thrifty("serve", "--config", str(config), "--port", str(port), "--workers", workers, cwd=config.parent)
    assert result.returncode == 2
    assert f"server.port: cannot listen on 127.0.0.1:{port}: Address already in use" in one_error_line(result)


def test_an_address_not_on_this_machine_is_one_line(config: Path) -> None:
    result = thrifty("serve", "--config", str(config), "--host", "192.0.2.1", "--port", "0", cwd=config.parent)
    assert result.returncode == 2
    assert "server.host: cannot listen on 192.0.2.1:0" in one_error_line(result)


def test_help_names_every_command(tmp_path: Path) -> None:
    result = thrifty("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert all(word in result.stdout for word in ("serve", "keys"))
