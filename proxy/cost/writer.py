"""The ledger writer: batches records into the store in the background, loses none.

``submit`` never blocks and never raises: a request only appends its record to an
in-memory buffer. A background task writes batches (``INSERT ... ON CONFLICT DO
NOTHING`` by record id, so a batch written twice is written once). While the store is
unreachable the buffer holds up to ``ledger.buffer_records`` records; past that the oldest
go to an append-only spill file (JSON lines, ``fsync``ed), one per process. When the store
answers again the spill files are replayed first, then the buffer. On shutdown everything
left is written, or spilled if the store is still down; a spill file left by a crash is
replayed at the next start (by whichever process claims it first, by renaming it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson

from proxy.cost.record import COLUMNS, LedgerRecord, from_json
from proxy.storage.database import Database

log = logging.getLogger("thrifty.ledger")

BATCH = 1000
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (id) DO NOTHING"
)


class LedgerWriter:
    def __init__(self, db: Database, spill_dir: Path, *, max_buffer: int = 20_000, interval: float = 0.05):
        self._db = db
        self._spill_dir = spill_dir
        self._spill_file = spill_dir / f"ledger-{os.getpid()}-{int(time.time())}.jsonl"
        self._max_buffer = max_buffer
        self._interval = interval
        self._buffer: deque[LedgerRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self.written = 0
        self.spilled = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    def submit(self, record: LedgerRecord) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= BATCH:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Write what is left (or spill it when the store is down); called at shutdown."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self._replay_spills()
            await self._drain()
        except Exception as exc:  # the store is down at shutdown: keep everything on disk
            log.warning(
                "ledger store unavailable at shutdown (%s); spilling %d records", type(exc).__name__, len(self._buffer)
            )
        if self._buffer:
            self._spill(len(self._buffer))

    async def _run(self) -> None:
        await self._attempt(self._replay_spills)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._failures:
                await asyncio.sleep(min(0.25 * 2 ** min(self._failures, 7), 10.0))
                if not await self._attempt(self._replay_spills):
                    self._spill_overflow()
                    continue
            if not await self._attempt(self._drain):
                self._spill_overflow()

    async def _attempt(self, step: Callable[[], Awaitable[None]]) -> bool:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any driver or OS error: the store is unreachable for now
            self._failures += 1
            if self._failures == 1 or self._failures % 50 == 0:
                log.warning(
                    "ledger store unavailable (%s: %s); %d records buffered", type(exc).__name__, exc, len(self._buffer)
                )
            return False
        if self._failures:
            log.info("ledger store reachable again after %d failed attempts", self._failures)
            self._failures = 0
        return True

    async def _drain(self) -> None:
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(BATCH, len(self._buffer)))]
            await self._db.executemany(_INSERT, [r.row() for r in batch])
            for _ in batch:
                self._buffer.popleft()
            self.written += len(batch)

    def _spill_overflow(self) -> None:
        excess = len(self._buffer) - self._max_buffer
        if excess > 0:
            self._spill(excess)

    def _spill(self, count: int) -> None:
        """Move the oldest ``count`` records from memory to the append-only spill file."""
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        with open(self._spill_file, "ab") as out:
            for _ in range(count):
                out.write(orjson.dumps(self._buffer.popleft().to_json()) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        self.spilled += count
        log.warning("ledger store down: %d records spilled to %s", count, self._spill_file)

    async def _replay_spills(self) -> None:
        for path in self._claim_spills():
            rows = [r.row() for r in _read_spill(path)]
            for start in range(0, len(rows), BATCH):
                await self._db.executemany(_INSERT, rows[start : start + BATCH])
            path.unlink()
            self.written += len(rows)
            log.info("replayed %d ledger records from %s", len(rows), path.name)

    def _claim_spills(self) -> list[Path]:
        if not self._spill_dir.is_dir():
            return []
        claimed = list(self._spill_dir.glob(f"*.replaying-{os.getpid()}"))  # ours, from a failed replay
        for path in sorted(self._spill_dir.glob("ledger-*.jsonl")):
            try:
                quiet = time.time() - path.stat().st_mtime > 2.0
            except FileNotFoundError:
                continue
            if path != self._spill_file and not quiet:
                continue  # another live process may still be appending to it
            target = path.with_name(f"{path.name}.replaying-{os.getpid()}")
            try:
                path.rename(target)  # atomic: only one process claims a file
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed


def _read_spill(path: Path) -> Iterator[LedgerRecord]:
    with open(path, "rb") as src:
        for line in src:
            if line.strip():
                try:
                    yield from_json(orjson.loads(line))
                except orjson.JSONDecodeError:
                    log.error("skipping a torn line in %s (a crash mid-write)", path.name)
