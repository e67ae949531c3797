"""The peers measured beside thrifty: installing them once into a cache folder, and their configs.

- LiteLLM proxy, pinned to ``litellm[proxy]==1.106.2`` (1.107.* were pulled from the index
  after a supply-chain compromise), in its own virtualenv under
  ``~/.cache/thrifty-bench/litellm-venv``; started as ``litellm --config FILE --port PORT
  --num_workers 1`` with ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no network here).
- Portkey's open-source gateway (``@portkey-ai/gateway``, Node), installed with npm into
  ``~/.cache/thrifty-bench/portkey``; it takes no config file and routes by request headers.
  It listens on all interfaces (it has no host option); the benchmark only talks to it on
  127.0.0.1.

An install that fails is returned as a message, so the benchmark reports the peer as failed
instead of dropping it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

LITELLM_VERSION = "1.106.2"
PORTKEY_VERSION = "1.15.2"
INSTALL_TIMEOUT = 1500.0
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "thrifty-bench"


@dataclass
class Launch:
    """How to start one peer and talk to it; ``problem`` is set when it cannot be run."""

    name: str
    version: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 60.0
    problem: str | None = None


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> str | None:
    """Run an install step; None when it worked, else the tail of its log."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"{cmd[0]} timed out after {INSTALL_TIMEOUT:.0f}s (log: {log})"
        except OSError as exc:
            return f"cannot run {cmd[0]}: {exc}"
    if proc.returncode == 0:
        return None
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
    return f"{' '.join(cmd[:3])} … exited {proc.returncode}: {' | '.join(tail)} (log: {log})"


def ensure_litellm(cache: Path) -> tuple[Path | None, str]:
    """The ``litellm`` executable in its own virtualenv, installing it if missing; else a reason."""
    venv = cache / "litellm-venv"
    exe = venv / "bin" / "litellm"
    python = venv / "bin" / "python"
    version = _litellm_version(python) if exe.exists() else None
    if version == LITELLM_VERSION:
        return exe, version
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "litellm-install.log"
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (a few minutes; log: {log})", flush=True)
    if not python.exists():
        problem = _run_logged([sys.executable, "-m", "venv", str(venv)], log)
        if problem:
            return None, problem
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    problem = _run_logged([*pip, f"litellm[proxy]=={LITELLM_VERSION}"], log)
    if problem:
        return None, problem
    version = _litellm_version(python)
    if not exe.exists() or version is None:
        return None, f"litellm installed but {exe} is missing or broken (log: {log})"
    return exe, version


def _litellm_version(python: Path) -> str | None:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_portkey(cache: Path) -> tuple[Path | None, str]:
    """The gateway's ``start-server.js``, installing the npm package if missing; else a reason."""
    folder = cache / "portkey"
    package = folder / "node_modules" / "@portkey-ai" / "gateway"
    script = package / "build" / "start-server.js"
    if not script.exists():
        folder.mkdir(parents=True, exist_ok=True)
        log = cache / "portkey-install.log"
        print(f"installing @portkey-ai/gateway@{PORTKEY_VERSION} into {folder} (log: {log})", flush=True)
        if not (folder / "package.json").exists():
            (folder / "package.json").write_text('{"name": "thrifty-bench-portkey", "private": true}\n')
        problem = _run_logged(
            ["npm", "install", "--no-audit", "--no-fund", f"@portkey-ai/gateway@{PORTKEY_VERSION}"], log, folder
        )
        if problem:
            return None, problem
        if not script.exists():
            return None, f"npm install worked but {script} is missing (log: {log})"
    try:
        version = str(json.loads((package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        version = "?"
    return script, version


def litellm_launch(cache: Path, workdir: Path, port: int, upstream: str, model: str, master_key: str) -> Launch:
    exe, version = ensure_litellm(cache)
    if exe is None:
        return Launch("litellm", problem=f"install failed: {version}")
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: openai/{model}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: sk-bench-upstream\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n",
        encoding="utf-8",
    )
    return Launch(
        name="litellm",
        version=version,
        command=[str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        cwd=workdir,
        headers={"Authorization": f"Bearer {master_key}"},
        startup_timeout=240.0,
    )


def portkey_launch(cache: Path, workdir: Path, port: int, upstream: str) -> Launch:
    script, version = ensure_portkey(cache)
    if script is None:
        return Launch("portkey", problem=f"install failed: {version}")
    return Launch(
        name="portkey",
        version=version,
        command=["node", str(script), f"--port={port}", "--headless"],
        cwd=script.parents[4],
        headers={
            "Authorization": "Bearer sk-bench-upstream",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"{upstream}/v1",
        },
        startup_timeout=60.0,
    )
