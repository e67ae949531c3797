"""Real servers on loopback for the tests: an aiohttp app run on its own thread and loop.

Tests drive thrifty the way applications do, over real HTTP with the official ``openai``
SDK (sync clients included), so the servers must not share the test's event loop:
:class:`ThreadServer` runs an app on a background thread, on a free port of 127.0.0.1,
and stops it (draining like ``thrifty serve``) when the test ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web


class ThreadServer:
    def __init__(self, make_app: Callable[[], web.Application], **runner_options: Any):
        self._make_app = make_app
        self._options = {"handle_signals": False, "access_log": None, "handler_cancellation": True, **runner_options}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.port = 0
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadServer:
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if not self.port:
            raise RuntimeError("server did not start in 30 s")
        return self

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the test thread by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.app = self._make_app()
        runner = web.AppRunner(self.app, **self._options)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (a coroutine factory) on the server's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
