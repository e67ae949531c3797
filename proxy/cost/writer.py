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
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import orjson

from proxy.cost.record import COLUMNS, LedgerRecord, from_json
from proxy.storage.database import Database

log = logging.getLogger("thrifty.ledger")

BATCH = 1000
_INSERT = f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (id) DO NOTHING"


class LedgerWriter:
    def __init__(self, db: Database, spill_dir: Path, *, max_buffer: int = 20_000, interval: float = 0.25):
        self._db = db
        self._spill_dir = spill_dir
        self._spill_file = spill_dir / f"ledger-{os.getpid()}-{int(time.time())}.jsonl"
        self._max_buffer = max_buffer
        self._interval = interval
        self._buffer: deque[LedgerRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self._spills_waiting = False
        self.written = 0
        self.spilled = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def pending_for(self, request_id: str) -> list[LedgerRecord]:
        """The records of ``request_id`` still waiting in this process's buffer (not yet in the
        store): a feedback can name a request answered a moment ago. A scan, for a rare call,
        so that ``submit`` keeps its one append."""
        return [r for r in self._buffer if r.request_id == request_id]

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
            log.warning("ledger store unavailable at shutdown (%s); spilling %d records", type(exc).__name__, len(self._buffer))
            self._release_claims()
        if self._buffer:
            self._spill(len(self._buffer))

    async def _run(self) -> None:
        await self._attempt(self._recover)
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if self._failures:
                # capped low: the buffer grows for as long as the writer sleeps
                await asyncio.sleep(min(0.25 * 2 ** min(self._failures, 7), 2.0))
            step = self._recover if self._failures or self._spills_waiting else self._drain
            if not await self._attempt(step):
                self._spill_overflow()

    async def _recover(self) -> None:
        """Spill files first, then the buffer, as one attempt: a store still down is one failure
        (a replay with nothing to replay must not count as the store being back)."""
        await self._replay_spills()
        await self._drain()

    async def _attempt(self, step: Callable[[], Awaitable[None]]) -> bool:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any driver or OS error: the store is unreachable for now
            self._failures += 1
            if self._failures == 1 or self._failures % 50 == 0:
                log.warning("ledger store unavailable (%s: %s); %d records buffered", type(exc).__name__, exc, len(self._buffer))
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

    def _release_claims(self) -> None:
        """Hand the files this process claimed back under a plain spill name, for the next start."""
        pid = os.getpid()
        for path in self._spill_dir.glob(f"ledger-*{_CLAIM}*") if self._spill_dir.is_dir() else ():
            if _owner(path.name) == pid:
                base = path.name.split(_CLAIM)[0].removesuffix(".jsonl")
                path.rename(path.with_name(f"{base}.{secrets.token_hex(4)}.jsonl"))

    def _claim_spills(self) -> list[Path]:
        """Rename spill files to ``<name>.replaying-<pid>-<random>``: ours until replayed.

        Every claim gets a new name (a file claimed earlier and not yet replayed is never
        overwritten), and a claim left by a process that has died (a crash, or a shutdown
        with the store down) is taken over rather than left behind.
        """
        self._spills_waiting = False
        if not self._spill_dir.is_dir():
            return []
        pid = os.getpid()
        claimed = []
        for path in sorted(self._spill_dir.glob("ledger-*")):
            name = path.name
            if _CLAIM in name:
                owner = _owner(name)
                if owner == pid:
                    claimed.append(path)  # ours, from a failed replay
                    continue
                if owner is None or _alive(owner):
                    continue  # another live process is replaying it
            elif not name.endswith(".jsonl"):
                continue
            elif path != self._spill_file:
                try:
                    quiet = time.time() - path.stat().st_mtime > 2.0
                except FileNotFoundError:
                    continue
                if not quiet:
                    self._spills_waiting = True  # another live process may still be appending to it
                    continue
            target = path.with_name(f"{name.split(_CLAIM)[0]}{_CLAIM}{pid}-{secrets.token_hex(4)}")
            try:
                path.rename(target)  # atomic: only one process claims a file
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed


_CLAIM = ".replaying-"


def _owner(name: str) -> int | None:
    pid = name.rsplit(_CLAIM, 1)[1].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _read_spill(path: Path) -> Iterator[LedgerRecord]:
    with open(path, "rb") as src:
        for line in src:
            if line.strip():
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError:
                    data = None
                if isinstance(data, dict) and data.keys() >= _FIELDS:
                    yield from_json(data)
                else:  # one bad line must not hold back the others (nor every later replay)
                    log.error("skipping a torn line in %s (a crash mid-write)", path.name)


# The fields every record has had (those added by later migrations have defaults): a spill
# file written by an older thrifty replays with the new ones empty.
_FIELDS = frozenset(f.name for f in fields(LedgerRecord) if f.default is MISSING)
