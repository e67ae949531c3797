"""Where semantic cache entries live, and how replicas keep their vector indexes in step.

I/O behind the semantic cache (``proxy.cache.semantic``). :class:`MemoryVectors` keeps
entries in this process (no ``cache.redis_url``: each replica has its own cache).
:class:`RedisVectors` keeps each entry as a Redis hash with an expiry,
``thrifty:cache:{<tenant>}:sem2:<id>`` (the tenant is a Cluster hash tag), holding what the
index needs packed in one field (``idx``: int8 vector, scale, expiry, partition), the float32
vector a hit is re-checked with, the question, and the answer (``proxy.cache.entry``
encoding). Every add and every eviction is also appended to one Redis Stream; each process
warm-starts by SCAN-ning the entries (a progress line in the log), then follows the stream
(XREAD BLOCK on its own connection, in a background task) and applies what other replicas
added or evicted, within about a second. Expiry needs no message: an entry carries its
absolute expiry time and every replica drops it at that moment. When Redis goes away the
follower backs off, and when it answers again re-scans, so nothing stays missing; an index
entry whose hash is gone (Redis restarted empty) is a miss and is dropped. The key names and
the stream carry the entry format (``sem2``, ``events:2``): entries and events of the first format
(``sem``, whose partitions hashed every earlier message exactly) are never read, so a gateway of
this version ignores them and Redis expires them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from proxy.cache.embedder import Vectors
from proxy.cache.index import VectorIndex
from proxy.cache.store import connect, retry_delay

log = logging.getLogger("thrifty.cache")

STREAM = "thrifty:cache:semantic:events:2"
STREAM_MAX = 200_000  # events kept (approximately): a replica away longer re-scans anyway
PATTERN = "thrifty:cache:*:sem2:*"
SCAN_BATCH = 500
_HEAD = struct.Struct("<fdH")  # scale, expiry (epoch seconds), dims; then the int8 vector, then the partition


def pack_index(q8: npt.NDArray[np.int8], scale: float, expires: float, partition: str) -> bytes:
    """What the index needs of an entry, in one field: one value to read per entry at warm start."""
    return _HEAD.pack(scale, expires, len(q8)) + q8.tobytes() + partition.encode()


def unpack_index(packed: bytes) -> tuple[npt.NDArray[np.int8], float, float, str]:
    scale, expires, dims = _HEAD.unpack_from(packed)
    body = _HEAD.size + dims
    return np.frombuffer(packed[_HEAD.size : body], dtype=np.int8), scale, expires, packed[body:].decode()


def tenant_of(key: str) -> str:
    """The tenant of an entry key (its Cluster hash tag)."""
    return key[key.index("{") + 1 : key.index("}")]


@dataclass(frozen=True, slots=True)
class Stored:
    """A candidate as the store holds it: what a hit is checked against and served from."""

    vector: Vectors
    text: str
    raw: bytes


def new_id() -> str:
    """An entry's id: the index's key (short, it is held per entry), the tail of its Redis key."""
    return secrets.token_hex(8)


def entry_key(tenant: str, entry_id: str) -> str:
    return f"thrifty:cache:{{{tenant}}}:sem2:{entry_id}"


class MemoryVectors:
    """Entries in this process, removed when the index evicts or expires them."""

    def __init__(self) -> None:
        self._entries: dict[str, Stored] = {}

    async def get(self, tenant: str, entry_id: str) -> Stored | None:
        return self._entries.get(entry_id)

    async def put(self, tenant: str, entry_id: str, packed: bytes, stored: Stored, ttl: float, evicted: list[str]) -> None:
        self._entries[entry_id] = stored
        for old in evicted:
            self._entries.pop(old, None)

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    async def start(self, index: VectorIndex) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisVectors:
    """Entries as Redis hashes, every change on a Stream that other replicas follow."""

    def __init__(self, url: str, timeout: float, *, cluster: bool = False, block_ms: int = 1000):
        # Typed loosely: redis-py's stubs do not know hashes and streams hand back bytes here.
        self.client: Any = connect(url, timeout, cluster=cluster)  # the hot path: short timeouts
        self._follow: Any = connect(url, max(5.0, block_ms / 1000 * 3), cluster=cluster)  # blocking reads, scans
        self._timeout = timeout
        self._block_ms = block_ms
        self.origin = uuid.uuid4().hex[:12]  # this process: its own events are not applied twice
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.synced = asyncio.Event()

    async def get(self, tenant: str, entry_id: str) -> Stored | None:
        async with asyncio.timeout(self._timeout):
            vec, text, raw = await self.client.hmget(entry_key(tenant, entry_id), ["vec", "text", "raw"])
        if vec is None or raw is None:
            return None
        return Stored(np.frombuffer(vec, dtype=np.float32), _text(text or b""), raw)

    async def put(self, tenant: str, entry_id: str, packed: bytes, stored: Stored, ttl: float, evicted: list[str]) -> None:
        mapping = {"idx": packed, "vec": stored.vector.astype(np.float32).tobytes(), "text": stored.text, "raw": stored.raw}
        event = {"op": "add", "key": entry_id, "tenant": tenant, "idx": packed, "origin": self.origin}
        key = entry_key(tenant, entry_id)
        async with asyncio.timeout(self._timeout * 3):
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, max(int(ttl * 1000), 1))
            pipe.xadd(STREAM, event, maxlen=STREAM_MAX, approximate=True)
            for old in evicted:
                pipe.delete(entry_key(tenant, old))
                pipe.xadd(STREAM, {"op": "evict", "key": old, "tenant": tenant, "origin": self.origin})
            await pipe.execute()

    def forget(self, keys: list[str]) -> None:
        return None  # Redis expires the hashes itself

    async def start(self, index: VectorIndex) -> None:
        """Warm-start the index from Redis, then follow the stream in the background (never fails the start)."""
        self._task = asyncio.create_task(self._run(index), name="thrifty-semantic-follow")
        try:  # a start-up waits for the first sync a little, so a restarted replica answers from the cache at once
            await asyncio.wait_for(self.synced.wait(), 30)
        except TimeoutError:
            log.warning("semantic cache: warm start still running after 30 s; continuing in the background")

    async def _run(self, index: VectorIndex) -> None:
        last = "$"
        while True:
            try:
                last = await self._last_id()
                await self.warm_start(index)
                self.synced.set()
                if self.failures:
                    log.info("semantic cache: Redis reachable again after %d failed attempts; re-synced", self.failures)
                    self.failures = 0
                while True:
                    last = await self._read(index, last)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, slow, or restarted: back off, then re-sync
                self.failures += 1
                self.synced.set()  # the start does not wait on an unreachable Redis
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("semantic cache: Redis stream unreachable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(retry_delay(self.failures))

    async def _last_id(self) -> str:
        newest = await self._follow.xrevrange(STREAM, count=1)
        return _text(newest[0][0]) if newest else "0-0"

    async def warm_start(self, index: VectorIndex) -> int:
        started, loaded = time.perf_counter(), 0
        batch: list[Any] = []
        async for key in self._follow.scan_iter(match=PATTERN, count=1000):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                loaded += await self._load(index, batch)
                batch = []
                if loaded % 20_000 < SCAN_BATCH:
                    log.info("semantic cache: warm start, %d entries loaded", loaded)
        if batch:
            loaded += await self._load(index, batch)
        log.info("semantic cache: warm start loaded %d entries from Redis in %.2f s", loaded, time.perf_counter() - started)
        return loaded

    async def _load(self, index: VectorIndex, keys: list[Any]) -> int:
        pipe = self._follow.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "idx")
        loaded = 0
        for key, packed in zip(keys, await pipe.execute(), strict=True):
            name = _text(key)
            loaded += self._apply(index, {"op": "add", "key": name.rsplit(":", 1)[-1], "tenant": tenant_of(name), "idx": packed})
        return loaded

    async def _read(self, index: VectorIndex, last: str) -> str:
        answer = await self._follow.xread({STREAM: last}, count=1000, block=self._block_ms)
        for _, events in answer or ():
            for event_id, fields in events:
                last = _text(event_id)
                try:
                    event = {_text(k): v for k, v in fields.items()}
                    if _text(event.get("origin", b"")) != self.origin:
                        self._apply(index, event)
                except (UnicodeDecodeError, ValueError) as exc:  # skipped: a bad event must not stall the follower
                    log.warning("semantic cache: stream event %s skipped (%s)", last, exc)
        return last

    @staticmethod
    def _apply(index: VectorIndex, event: dict[str, Any]) -> int:
        """One add or evict event (or a scanned entry) applied to the index; 1 when an entry was added."""
        op, key, tenant = _text(event.get("op", b"")), _text(event.get("key", b"")), _text(event.get("tenant") or b"")
        if op == "evict":
            index.remove(tenant, key)
            return 0
        packed = event.get("idx")
        if op != "add" or not tenant or not isinstance(packed, bytes):
            return 0
        try:
            vector, scale, expires, partition = unpack_index(packed)
        except (struct.error, UnicodeDecodeError, ValueError):
            return 0  # written by another version: skipped, never guessed at
        if len(vector) != index.dims or expires <= time.time() or not partition.startswith(tenant + "/"):
            return 0
        index.add_quantized(tenant, partition, key, vector, scale, expires)
        return 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # shutting down
                log.debug("semantic cache follower stopped")
        for client in (self.client, self._follow):
            try:
                await client.aclose()
            except Exception as exc:  # closing a dead connection: nothing to do
                log.debug("semantic cache close: %s", exc)


Clock = Callable[[], float]
