"""Running the server: one worker in-process, or N worker processes on one port.

Each worker is one process with one event loop (uvloop when installed) and its own
listening socket bound with SO_REUSEPORT, so the kernel spreads connections across them.
SIGTERM (or SIGINT) drains: the listening socket closes at once, idle keep-alive
connections are closed, in-flight requests and streams get up to
``server.drain_timeout`` seconds to finish, then clean-up runs and the process exits 0.
With ``--workers N`` the parent supervises: it forwards SIGTERM, restarts a worker that
dies unexpectedly, and exits 0 once every worker has drained.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import socket
import sys
import time
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

from aiohttp import web

from proxy.config import Settings

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


async def _run(settings: Settings, reuse_port: bool) -> None:
    from proxy.app import create_app

    server = settings.server
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log=logging.getLogger("thrifty.access") if server.access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
        handler_cancellation=True,  # a client that disconnects cancels its upstream call
        shutdown_timeout=server.drain_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port, reuse_port=reuse_port or None, backlog=2048)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else server.port
    log.info("thrifty listening on http://%s:%s", server.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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


def _close_connections(runner: web.AppRunner) -> None:
    connections = runner.server.connections if runner.server is not None else []
    if connections:
        log.warning("drain timeout: closing %d connections still in flight", len(connections))
    for connection in connections:
        connection.force_close()


def _worker_main(settings: Settings) -> None:
    sys.exit(run_worker(settings, reuse_port=True))


def _supervise(settings: Settings) -> int:
    from proxy.logs import setup_logging

    setup_logging(settings.secrets())
    # Bind once here (not listening) to resolve port 0 and to fail early on a taken port;
    # the workers bind the same port with SO_REUSEPORT.
    holder = socket.socket(socket.AF_INET6 if ":" in settings.server.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((settings.server.host, settings.server.port))
    settings = replace(settings, server=replace(settings.server, port=holder.getsockname()[1]))
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> BaseProcess:
        process = ctx.Process(target=_worker_main, args=(settings,), daemon=False)
        process.start()
        return process

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.is_alive() and process.pid is not None:
                process.terminate() if signum == signal.SIGTERM else _send(process, signum)

    workers = [start() for _ in range(settings.server.workers)]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("supervising %d workers on port %d", len(workers), settings.server.port)
    restarts: list[float] = []
    while workers:
        wait([p.sentinel for p in workers], timeout=1.0)
        for process in [p for p in workers if not p.is_alive()]:
            workers.remove(process)
            if stopping:
                continue
            log.error("worker %s exited with code %s; restarting it", process.pid, process.exitcode)
            restarts = [t for t in restarts if time.monotonic() - t < 60] + [time.monotonic()]
            if len(restarts) > 5 * settings.server.workers:
                log.error("workers keep dying; giving up")
                on_signal(signal.SIGTERM, None)
                return 1
            workers.append(start())
    holder.close()
    return 0


def _send(process: BaseProcess, signum: int) -> None:
    import os

    assert process.pid is not None
    os.kill(process.pid, signum)
