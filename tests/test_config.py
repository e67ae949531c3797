"""Settings from YAML: every mistake is a ConfigError naming the key and file:line;
zero-config from the environment; THRIFTY_CONFIG."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.settings import DEFAULT_BASE_URLS, Settings

GOOD = """\
models:
  - name: gpt-4o
    provider: openai
    base_url: http://127.0.0.1:9999/v1/
    api_key: ${UPSTREAM_KEY}
    timeouts: {connect: 1, first_byte: 2.5, total: 30}
  - name: local
    provider: llamacpp
    upstream_model: gemma-3-270m
auth:
  master_key: ${MASTER:-sk-default-master-key-123}
  key_cache_seconds: 0.5
ledger:
  url: sqlite:///data/thrifty.db
server:
  host: 0.0.0.0
  port: 8080
  workers: 4
  drain_timeout: 12
  access_log: false
"""


def write(tmp_path: Path, text: str, name: str = "thrifty.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(str(write(tmp_path, text)), env=env or {})


def test_a_full_config_is_read(tmp_path: Path) -> None:
    settings = load(tmp_path, GOOD, {"UPSTREAM_KEY": "sk-up-1"})
    first, local = settings.models
    assert (first.name, first.provider, first.base_url, first.api_key) == (
        "gpt-4o",
        "openai",
        "http://127.0.0.1:9999/v1",
        "sk-up-1",
    )
    assert (first.timeouts.connect, first.timeouts.first_byte, first.timeouts.total) == (1.0, 2.5, 30.0)
    assert (local.base_url, local.target_model, local.is_local) == (DEFAULT_BASE_URLS["llamacpp"], "gemma-3-270m", True)
    assert settings.auth.master_key == "sk-default-master-key-123"
    assert settings.auth.key_cache_seconds == 0.5
    assert settings.ledger.url == "sqlite:///data/thrifty.db"
    server = settings.server
    assert (server.host, server.port, server.workers, server.drain_timeout, server.access_log) == (
        "0.0.0.0",
        8080,
        4,
        12.0,
        False,
    )
    assert settings.source == str(tmp_path / "thrifty.yaml")
    assert not settings.discover_local
    assert settings.secrets() == ("sk-up-1",)


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, "# nothing yet\n")
    assert settings.models == ()
    assert settings.server.port == 4000 and settings.server.workers == 1
    assert settings.ledger.url.startswith("sqlite://")


def test_the_master_key_can_come_from_the_environment(tmp_path: Path) -> None:
    settings = load(tmp_path, "models: []\n", {"THRIFTY_MASTER_KEY": "sk-env-master-key-4567"})
    assert settings.auth.master_key == "sk-env-master-key-4567"


BAD = [
    pytest.param("modles: []\n", 1, "modles: unknown key", id="unknown-top-key"),
    pytest.param("models:\n  - name: a\n    bse_url: http://x\n", 3, "models[0].bse_url: unknown key", id="unknown-model-key"),
    pytest.param("server:\n  port: abc\n", 2, "server.port: must be an integer", id="wrong-type-port"),
    pytest.param("server:\n  workers: 0\n", 2, "server.workers: must be between 1 and 256", id="workers-zero"),
    pytest.param("server:\n  access_log: maybe\n", 2, "server.access_log: must be true or false", id="wrong-type-bool"),
    pytest.param("auth:\n  key_cache_seconds: -1\n", 2, "auth.key_cache_seconds: must be a positive", id="negative"),
    pytest.param("auth:\n  master_key: short\n", 2, "auth.master_key: must be at least 16", id="short-master"),
    pytest.param("server: 4000\n", 1, "server: must be a mapping", id="section-not-mapping"),
    pytest.param("models:\n  name: a\n", 1, "models: must be a list", id="models-not-list"),
    pytest.param(
        "models:\n  - name: a\n    provider: closedai\n", 3, "models[0].provider: unknown provider 'closedai'", id="provider"
    ),
    pytest.param("models:\n  - name: a\n    base_url: ftp://x\n", 3, "models[0].base_url: must be an http", id="base-url"),
    pytest.param("models:\n  - provider: openai\n", 2, "models[0].name: is required", id="name-missing"),
    pytest.param(
        "models:\n  - name: a\n  - name: b\n  - name: a\n", 4, "models[2].name: model 'a' is defined twice", id="duplicate"
    ),
    pytest.param(
        "models:\n  - name: a\n    timeouts:\n      total: soon\n", 4, "models[0].timeouts.total: must be", id="timeout"
    ),
    pytest.param(
        "\nmodels:\n  - name: a\n    api_key: ${NOT_SET_ANYWHERE}\n",
        4,
        "models[0].api_key: environment variable NOT_SET_ANYWHERE is not set",
        id="missing-env",
    ),
    pytest.param("ledger:\n  url: mysql://x\n", 2, "ledger.url: must start with sqlite://", id="ledger-url"),
    pytest.param("server:\n  port: 1\n  port: 2\n", 3, "server.port: duplicate key", id="duplicate-key"),
    pytest.param("models:\n  - name: a\n   provider: openai\n", 3, "YAML syntax error", id="yaml-indent"),
    pytest.param("server: {port: 1\n", 2, "YAML syntax error", id="yaml-unclosed"),
    pytest.param("- a\n- b\n", 1, "(top level): the config file must be a mapping", id="not-a-mapping"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD)
def test_a_mistake_names_the_key_and_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), env={})
    error = caught.value
    assert str(error).startswith(f"{path}:{line}: "), str(error)
    assert message in str(error)
    assert (error.source, error.line) == (str(path), line)
    assert "\n" not in str(error)


def test_env_references_take_defaults_and_values(tmp_path: Path) -> None:
    text = "models:\n  - name: a\n    base_url: http://${HOST:-127.0.0.1}:${PORT}/v1\n"
    assert load(tmp_path, text, {"PORT": "81"}).models[0].base_url == "http://127.0.0.1:81/v1"
    assert load(tmp_path, text, {"PORT": "81", "HOST": "up"}).models[0].base_url == "http://up:81/v1"


def test_env_values_are_not_parsed_as_yaml(tmp_path: Path) -> None:
    settings = load(tmp_path, "models:\n  - name: a\n    api_key: ${KEY}\n", {"KEY": "x: [y"})
    assert settings.models[0].api_key == "x: [y"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/absent.yaml: cannot read config file"):
        load_settings(str(tmp_path / "absent.yaml"), env={})


def test_thrifty_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 4123\n")
    settings = load_settings(None, env={"THRIFTY_CONFIG": str(path)})
    assert (settings.source, settings.server.port) == (str(path), 4123)
    other = write(tmp_path, "server:\n  port: 4124\n", "other.yaml")
    assert load_settings(str(other), env={"THRIFTY_CONFIG": str(path)}).server.port == 4124  # --config wins


def test_zero_config_with_an_openai_key(tmp_path: Path) -> None:
    settings = load_settings(None, env={"OPENAI_API_KEY": "sk-openai-abc"})
    names = [m.name for m in settings.models]
    assert names == ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small"]
    assert {(m.provider, m.base_url, m.api_key) for m in settings.models} == {
        ("openai", DEFAULT_BASE_URLS["openai"], "sk-openai-abc")
    }
    assert settings.discover_local and settings.source is None
    assert settings.auth.master_key is None
    assert settings.ledger.url == "sqlite:///thrifty.db"


def test_zero_config_follows_the_environment() -> None:
    env = {
        "OPENAI_API_KEY": "sk-openai-abc",
        "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
        "ANTHROPIC_API_KEY": "sk-ant-xyz",
        "THRIFTY_MASTER_KEY": "sk-master-from-env-1",
    }
    settings = load_settings(None, env=env)
    assert {m.base_url for m in settings.models if m.provider == "openai"} == {"http://127.0.0.1:1/v1"}
    assert [m.name for m in settings.models if m.provider == "anthropic"] == ["claude-sonnet-4-5", "claude-haiku-4-5"]
    assert settings.auth.master_key == "sk-master-from-env-1"
    assert load_settings(None, env={}).models == ()
    assert load_settings(None, env={"THRIFTY_CONFIG": ""}).discover_local  # empty means unset


def test_zero_config_probes_where_the_environment_says_local_servers_are() -> None:
    assert load_settings(None, env={}).local_servers == (
        ("ollama", "http://127.0.0.1:11434/v1"),
        ("llamacpp", "http://127.0.0.1:8080/v1"),
    )
    for host, url in (("10.0.0.5:11434", "http://10.0.0.5:11434/v1"), ("https://ollama.lan/", "https://ollama.lan/v1")):
        assert load_settings(None, env={"OLLAMA_HOST": host}).local_servers[0] == ("ollama", url)
    moved = load_settings(None, env={"LLAMACPP_BASE_URL": "http://127.0.0.1:9123/v1/"})
    assert moved.local_servers[1] == ("llamacpp", "http://127.0.0.1:9123/v1")


def test_secrets_are_kept_out_of_reprs(tmp_path: Path) -> None:
    settings = load(tmp_path, GOOD, {"UPSTREAM_KEY": "sk-up-secret-1"})
    assert "sk-up-secret-1" not in repr(settings)
    assert "sk-default-master-key-123" not in repr(settings)


def test_numbers_may_come_from_the_environment(tmp_path: Path) -> None:
    settings = load(tmp_path, "server:\n  port: ${PORT}\n  drain_timeout: ${DRAIN}\n", {"PORT": "8080", "DRAIN": "2.5"})
    assert (settings.server.port, settings.server.drain_timeout) == (8080, 2.5)
    with pytest.raises(ConfigError, match=r"thrifty.yaml:2: server.port: must be an integer"):
        load(tmp_path, "server:\n  port: ${PORT}\n", {"PORT": "eighty"})


def test_a_short_master_key_in_the_environment_is_refused_in_zero_config() -> None:
    with pytest.raises(ConfigError, match="THRIFTY_MASTER_KEY: must be at least 16 characters"):
        load_settings(None, {"THRIFTY_MASTER_KEY": "short"})
