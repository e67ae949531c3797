"""Starting, probing and stopping the servers under test: one process group each, loopback only.

Each server runs in its own session (process group), with its output in a log file, so a
stop reaches its children too (SIGTERM, then SIGKILL after 15 s). A server is ready when a
real chat completion through it answers 200 with ``choices``, so a peer that starts but is
misconfigured fails here, loudly, instead of being measured answering errors.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.benchmarks.measure import BODY


class StartError(Exception):
    pass


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(name: str, cmd: list[str], logs: Path, cwd: Path, env: dict[str, str] | None = None) -> Server:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: stopping it reaches its children too
        )
    return Server(name, proc, log)


def stop(server: Server) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not gone within 15 s."""
    pgid = server.proc.pid
    if server.proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            server.proc.wait(5)
    _signal_group(pgid, signal.SIGKILL)  # leftovers of that group, if any


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def post_once(port: int, headers: dict[str, str], body: str = BODY, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server, port: int, headers: dict[str, str], timeout: float) -> float:
    """Seconds until a real chat completion answers 200 through the server; StartError if never."""
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        code = server.proc.poll()
        if code is not None:
            raise StartError(f"exited with code {code} while starting: {server.log_tail()}")
        try:
            status, body = post_once(port, headers)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200 and b'"choices"' in body:
                return time.monotonic() - started
            last = f"HTTP {status}: {body[:200]!r}"
        time.sleep(0.25)
    raise StartError(f"not ready after {timeout:.0f}s (last: {last}); log: {server.log_tail()}")


@contextmanager
def running(name: str, cmd: list[str], args: Any, servers: list[Server], **kw: Any) -> Iterator[Server]:
    server = start(name, cmd, Path(args.workdir), **kw)
    servers.append(server)
    try:
        yield server
    finally:
        stop(server)
