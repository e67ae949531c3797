"""Background tasks a component starts on behalf of requests and must finish before it closes.

The ledger counts tokens, the budget guard settles holds and the cache writes entries after
the response has gone; each keeps its tasks in a :class:`TaskSet` so a reference is held
(asyncio keeps only weak ones) and shutdown waits for them before the stores close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    def __init__(self, name: str):
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work, name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every task, including ones started while waiting."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
