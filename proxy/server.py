"""Running the server: one worker in-process, or N worker processes on one port.

Each worker is one process with one event loop (uvloop when installed) and its own
listening socket bound with SO_REUSEPORT, so the kernel spreads connections across them.
SIGTERM (or SIGINT) drains: the listening socket closes at once, idle keep-alive
connections are closed, in-flight requests and streams get up to
``server.drain_timeout`` seconds to finish, then clean-up runs and the process exits 0.
SIGHUP re-reads the routing policy file. With ``--workers N`` the parent supervises: it
forwards SIGTERM and SIGHUP, restarts a worker that
dies unexpectedly, and exits 0 once every worker has drained. The address is bound and
the database opened (and migrated) before anything else starts, so a taken port or an
unreachable store is one ``ConfigError`` line and exit code 2, never a restart loop.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from aiohttp import web

from proxy.errors import ConfigError
from proxy.settings import Settings

log = logging.getLogger("thrifty.server")

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


def serve(settings: Settings) -> int:
    if settings.server.workers == 1:
        return run_worker(settings, reuse_port=False)
    return _supervise(settings)


def run_worker(settings: Settings, reuse_port: bool) -> int:
    from proxy.logs import setup_logging

    setup_logging(settings.secrets())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_run(settings, reuse_port))
    return 0


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """The listening address, bound before any start-up work so a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as exc:  # socket.gaierror included
        raise ConfigError(f"server.host: cannot listen on {host!r}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        key = "server.host" if exc.errno == errno.EADDRNOTAVAIL else "server.port"
        raise ConfigError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def _run(settings: Settings, reuse_port: bool) -> None:
    from proxy.app import create_app

    server = settings.server
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # from the start: a signal during start-up drains too
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # not fatal while starting: start-up reads the file anyway
    _watch_supervisor(loop, stop)
    sock = bind(server.host, server.port, reuse_port=reuse_port)
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log=logging.getLogger("thrifty.access") if server.access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
        handler_cancellation=True,  # a client that disconnects cancels its upstream call
        shutdown_timeout=server.drain_timeout,
    )
    try:
        await runner.setup()
    except BaseException:
        sock.close()
        raise
    await web.SockSite(runner, sock, backlog=2048).start()
    _reload_on_hup(loop, runner.app)
    # Everything built at start-up (modules, price table, config) lives as long as the process:
    # moved out of the collector's reach, full collections stop re-scanning it (tens of ms).
    gc.collect()
    gc.freeze()
    log.info("thrifty listening on http://%s:%s", server.host, sock.getsockname()[1])
    await stop.wait()
    log.info("draining: no new connections; waiting up to %ss for requests in flight", server.drain_timeout)
    started = time.monotonic()
    # aiohttp waits up to shutdown_timeout for a request in flight, then cancels it and waits
    # as long again; a stream blocked on its upstream ignores that cancel. Cut what is left
    # once drain_timeout has passed, so the whole drain stays within it.
    cut = loop.call_later(server.drain_timeout, _close_connections, runner)
    try:
        await runner.cleanup()
    finally:
        cut.cancel()
    log.info("drained in %.2fs; bye", time.monotonic() - started)


def _watch_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a worker: drain when the supervisor dies (SIGKILL, a crash) instead of living on
    as an orphan that holds the port. Its sentinel pipe reads EOF once the parent is gone."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return
    sentinel = parent.sentinel

    def gone() -> None:
        loop.remove_reader(sentinel)
        log.error("supervisor %s is gone; draining", parent.pid)
        stop.set()

    loop.add_reader(sentinel, gone)


def _reload_on_hup(loop: asyncio.AbstractEventLoop, app: web.Application) -> None:
    """SIGHUP re-reads the routing policy file (``proxy.policy.reload``)."""
    from proxy.app_state import GATEWAY

    reloader = app[GATEWAY].reloader if GATEWAY in app else None
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.request_reload)


def _close_connections(runner: web.AppRunner) -> None:
    connections = runner.server.connections if runner.server is not None else []
    if connections:
        log.warning("drain timeout: closing %d connections still in flight", len(connections))
    for connection in connections:
        connection.force_close()


# A worker that cannot start for a reason a restart will not fix (a bad setting, a store
# that refuses it) exits with this code, and the supervisor stops instead of restarting.
EXIT_CONFIG = 2


def _worker_main(settings: Settings) -> None:
    try:
        code = run_worker(settings, reuse_port=True)
    except ConfigError as exc:
        log.error("worker cannot start: %s", exc)
        code = EXIT_CONFIG
    sys.exit(code)


async def _check_database(url: str) -> None:
    from proxy.storage.database import open_database

    db = await open_database(url)  # migrates once here, not N times at once in the workers
    await db.close()


def _supervise(settings: Settings) -> int:
    from proxy.logs import setup_logging

    setup_logging(settings.secrets())
    # Bind once here (not listening) to resolve port 0 and to fail early on a taken port;
    # the workers bind the same port with SO_REUSEPORT.
    holder = bind(settings.server.host, settings.server.port, reuse_port=True)
    # Where each worker leaves its metrics, so a scrape reaching any of them reports the whole
    # server (proxy.telemetry); one per server, removed when the server stops.
    shared = tempfile.mkdtemp(prefix="thrifty-metrics-")
    try:
        asyncio.run(_check_database(settings.ledger.url))
        telemetry = replace(settings.telemetry, shared_dir=shared)
        return _run_workers(replace(settings, server=replace(settings.server, port=holder.getsockname()[1]), telemetry=telemetry))
    finally:
        holder.close()
        shutil.rmtree(shared, ignore_errors=True)


def _run_workers(settings: Settings) -> int:
    ctx = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    stop_signal: int | None = None
    signalled: set[int] = set()

    def forward() -> None:
        for process in workers:
            if process.pid is not None and process.pid not in signalled and process.is_alive():
                signalled.add(process.pid)
                os.kill(process.pid, stop_signal or signal.SIGTERM)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop_signal
        stop_signal = signum
        forward()

    def on_hup(_signum: int, _frame: object) -> None:
        for process in workers:  # each worker re-reads the policy file
            if process.pid is not None and process.is_alive() and stop_signal is None:
                os.kill(process.pid, signal.SIGHUP)

    def start() -> None:
        process = ctx.Process(target=_worker_main, args=(settings,), daemon=False)
        process.start()
        workers.append(process)
        if stop_signal is not None:  # the signal came while this one was starting
            forward()

    # Handlers first: a SIGTERM while workers start must not leave them orphaned.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    for _ in range(settings.server.workers):
        start()
    log.info("supervising %d workers on port %d", len(workers), settings.server.port)
    restarts: list[float] = []
    code = 0
    while workers:
        wait([p.sentinel for p in workers], timeout=1.0)
        for process in [p for p in workers if not p.is_alive()]:
            workers.remove(process)
            if stop_signal is not None:
                continue
            if process.exitcode == EXIT_CONFIG:
                log.error("worker %s could not start; stopping", process.pid)
                code = EXIT_CONFIG
                on_signal(signal.SIGTERM, None)
                continue
            log.error("worker %s exited with code %s; restarting it", process.pid, process.exitcode)
            restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
            if len(restarts) > 5 * settings.server.workers:
                log.error("workers keep dying; giving up")
                code = 1
                on_signal(signal.SIGTERM, None)
                continue
            start()
    return code
