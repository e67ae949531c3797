"""``thrifty serve`` as a real process: graceful drain on SIGTERM, a drain that times out,
and ``--workers 2`` sharing one port.

The upstream is the fake OpenAI server on a thread of the test process; the gateway is
``thrifty serve`` in a subprocess, whose port comes from its "listening on" log line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from tests.conftest import MASTER_KEY
from tests.fake_upstream import FakeUpstream, reply_text, stream_chunks
from tests.servers import ThreadServer
from tests.services import LISTENING, Served

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals, SO_REUSEPORT and /proc")

PROMPT = "one two three four five six seven eight"


Serve = Callable[..., Served]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    started: list[Served] = []

    def start(upstream_url: str, drain_timeout: float = 30, *args: str) -> Served:
        config = tmp_path / "thrifty.yaml"
        config.write_text(
            "models:\n"
            f"  - {{name: gpt-4o, provider: openai, base_url: '{upstream_url}/v1', api_key: sk-upstream-1}}\n"
            f"auth: {{master_key: {MASTER_KEY}}}\n"
            f"ledger: {{url: 'sqlite:///{tmp_path / 'thrifty.db'}', spill_dir: '{tmp_path / 'spill'}'}}\n"
            f"server: {{drain_timeout: {drain_timeout}, access_log: false}}\n",
            encoding="utf-8",
        )
        served = Served(config, *args)
        started.append(served)
        return served

    yield start
    for served in started:
        served.kill()


class PausedStream:
    """An upstream handler that streams a few chunks, then waits for ``release`` (or forever)."""

    def __init__(self, fake: FakeUpstream, head: int = 2) -> None:
        self.head = head
        self.release = threading.Event()
        self.cancelled = threading.Event()
        fake.handler = self.handle

    async def handle(self, payload: dict[str, Any], request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [b"data: " + orjson.dumps(c) + b"\n\n" for c in stream_chunks(payload, reply_text(payload).split(" "))]
        try:
            for chunk in chunks[: self.head]:
                await response.write(chunk)
            while not self.release.is_set():  # noqa: ASYNC110 (set from the test's thread)
                await asyncio.sleep(0.02)
            for chunk in chunks[self.head :]:
                await response.write(chunk)
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.set()
            raise
        return response


class StreamingClient:
    """One streamed chat completion read on a thread: its SSE data lines, as they come."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.data: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        try:
            with httpx.stream("POST", self.url, json=body, headers=headers, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line.removeprefix("data: "))
                        self.started.set()
        except BaseException as exc:  # examined by the test
            self.error = exc
        finally:
            self.started.set()

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream never ended"

    def text(self) -> str:
        chunks = [json.loads(d) for d in self.data if d != "[DONE]"]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def wait_until_refused(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    pytest.fail(f"port {port} still accepts connections")


def test_sigterm_lets_a_stream_in_flight_finish(serve: Serve, upstream: tuple[FakeUpstream, ThreadServer]) -> None:
    fake, server = upstream
    paused = PausedStream(fake)
    served = serve(server.url, 30)
    client = StreamingClient(served.port)
    assert client.started.wait(60) and client.error is None, client.error

    served.terminate()
    served.wait_for("draining")
    wait_until_refused(served.port)
    assert served.process.poll() is None  # still draining: the stream is in flight
    assert "[DONE]" not in client.data

    paused.release.set()
    client.join()
    assert client.error is None, client.error
    assert client.data[-1] == "[DONE]"
    assert client.text() == f"echo: {PROMPT}"
    assert served.exit_code() == 0
    served.wait_for(r"drained in [\d.]+s")
    assert not paused.cancelled.is_set()


def test_a_stream_longer_than_the_drain_timeout_is_cut(serve: Serve, upstream: tuple[FakeUpstream, ThreadServer]) -> None:
    fake, server = upstream
    paused = PausedStream(fake)  # never released
    served = serve(server.url, 1.0)
    client = StreamingClient(served.port)
    assert client.started.wait(60) and client.error is None, client.error

    served.terminate()
    assert served.exit_code() == 0
    client.join()
    assert "[DONE]" not in client.data
    assert paused.cancelled.wait(30), "the upstream call was left running"
    # Cut by the drain deadline (aiohttp alone waits twice the timeout: once for the
    # handler, once more after cancelling it, which a stream waiting on its upstream ignores).
    served.wait_for("drain timeout: closing 1 connections still in flight")


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.update(int(c) for c in (task / "children").read_text().split())
    return children


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _server_sockets(port: int, state: str = "01") -> dict[str, int]:
    """Inode -> remote port of each socket on local ``port`` in ``state`` (01 established, 0A listening)."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == port and fields[3] == state:
            found[inode] = int(remote.split(":")[1], 16)
    return found


def _spawned(parent: int) -> set[int]:
    """The worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    return {pid for pid in _children(parent) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}


def _workers(parent: int, port: int) -> set[int]:
    """The children of ``parent`` that listen on ``port``."""
    listening = _server_sockets(port, "0A").keys()
    return {pid for pid in _children(parent) if _socket_inodes(pid) & listening}


def _request(port: int) -> socket.socket:
    """A keep-alive connection that has been served one request."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    reply = b""
    while b'{"status":"ok"}' not in reply:
        chunk = conn.recv(4096)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    return conn


def test_two_workers_share_one_port(serve: Serve, upstream: tuple[FakeUpstream, ThreadServer]) -> None:
    served = serve(upstream[1].url, 30, "--workers", "2")
    ports = {int(m.group(2)) for m in served.wait_for(LISTENING, count=2)}
    assert len(ports) == 1
    port = ports.pop()
    served.wait_for(rf"supervising 2 workers on port {port}")

    owners: dict[int, int] = {}  # client port -> pid of the worker holding the connection
    connections: list[socket.socket] = []
    try:
        while len(set(owners.values())) < 2 and len(connections) < 400:
            connections += [_request(port) for _ in range(10)]
            mine = {c.getsockname()[1] for c in connections}
            sockets = {inode: client for inode, client in _server_sockets(port).items() if client in mine}
            for pid in _children(served.process.pid):
                for inode in _socket_inodes(pid) & sockets.keys():
                    owners[sockets[inode]] = pid
        assert len(set(owners.values())) == 2, owners
        assert set(owners.values()) == _workers(served.process.pid, port)
        assert served.process.pid not in owners.values()  # the parent only supervises
    finally:
        for conn in connections:
            conn.close()

    victim = next(iter(owners.values()))
    os.kill(victim, signal.SIGKILL)  # a worker that dies is replaced
    served.wait_for(rf"worker {victim} exited with code -9; restarting it")
    served.wait_for(LISTENING, count=3)
    _request(port).close()
    workers = _workers(served.process.pid, port)
    assert len(workers) == 2 and victim not in workers

    served.terminate()
    assert served.exit_code() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_sigterm_while_workers_start_leaves_none_behind(serve: Serve, upstream: tuple[FakeUpstream, ThreadServer]) -> None:
    served = serve(upstream[1].url, 30, "--workers", "2")
    served.wait_for("supervising 2 workers")
    deadline = time.monotonic() + 30
    while len(workers := _spawned(served.process.pid)) < 2:  # each one execs its interpreter
        assert time.monotonic() < deadline, workers
        time.sleep(0.01)
    served.terminate()  # most likely before they listen: they stop wherever they are
    assert served.exit_code() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_stop_when_the_supervisor_is_killed(serve: Serve, upstream: tuple[FakeUpstream, ThreadServer]) -> None:
    served = serve(upstream[1].url, 30, "--workers", "2")
    port = int(served.wait_for(LISTENING, count=2)[0].group(2))
    workers = _workers(served.process.pid, port)
    assert len(workers) == 2
    served.process.kill()  # no SIGTERM to forward: the workers must notice on their own
    served.wait_for(r"supervisor \d+ is gone; draining", count=2)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.05)
    wait_until_refused(port)


def _alive(pid: int) -> bool:
    """Running, not exited (an orphan that exited stays a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
