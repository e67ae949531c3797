"""The embedders: the real in-process MiniLM (int8 ONNX) and a remote OpenAI-compatible endpoint.

The local model is the one the semantic cache ships with: paraphrases must score above
unrelated sentences, vectors must be unit length, and a text must get the same vector
whether it is embedded alone, in a batch, or in a micro-batch made of concurrent requests
(padding to the longest text must not leak into the mean). The remote embedder is driven
against the fake upstream's ``/v1/embeddings`` over real HTTP.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import aiohttp
import numpy as np
import pytest

from proxy.cache.embedder import DIMENSIONS, LocalEmbedder, Overloaded, RemoteEmbedder, parse_embeddings
from proxy.errors import UpstreamUnavailable
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer

PAIRS = [
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("What is the capital of France?", "Which city is France's capital?"),
    ("How many calories are in a banana?", "What is the calorie count of one banana?"),
    ("Translate 'good morning' into Spanish.", "How do you say good morning in Spanish?"),
]


@pytest.fixture(scope="module")
def local() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder()
    yield embedder
    asyncio.run(embedder.close())


def test_paraphrases_score_higher_than_unrelated_sentences(local: LocalEmbedder) -> None:
    texts = [t for pair in PAIRS for t in pair]
    vectors = local.embed_sync(texts)
    assert vectors.shape == (len(texts), DIMENSIONS) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    for i in range(len(PAIRS)):
        paraphrase = similarity[2 * i, 2 * i + 1]
        unrelated = [similarity[2 * i, 2 * j + 1] for j in range(len(PAIRS)) if j != i]
        assert paraphrase > 0.7, PAIRS[i]
        assert paraphrase > max(unrelated) + 0.3, PAIRS[i]


def test_a_batch_gives_each_text_the_vector_it_gets_alone(local: LocalEmbedder) -> None:
    texts = ["yes", "A much longer sentence, so that the short one is padded a good deal in the batch.", "ok then"]
    batch = local.embed_sync(texts)
    single = np.concatenate([local.embed_sync([t]) for t in texts])
    assert np.abs(batch - single).max() < 1e-4


def test_long_texts_are_truncated_not_refused(local: LocalEmbedder) -> None:
    long = "word " * 2000
    vectors = local.embed_sync([long, long + "and more at the end"])
    assert vectors.shape == (2, DIMENSIONS)
    assert float(vectors[0] @ vectors[1]) > 0.999  # both cut at 256 tokens, the tail never seen


async def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(local: LocalEmbedder) -> None:
    texts = [t for pair in PAIRS for t in pair] + ["yes", "no"]
    expected = local.embed_sync(texts)
    embedder = LocalEmbedder()
    try:
        results = await asyncio.gather(*(embedder.embed([t]) for t in texts), embedder.embed(texts[:3]))
    finally:
        await embedder.close()
    assert np.abs(np.concatenate(results[:-1]) - expected).max() < 1e-4
    assert np.abs(results[-1] - expected[:3]).max() < 1e-4
    counted = await local.embed_counted([])
    assert counted.vectors.shape == (0, DIMENSIONS) and counted.tokens == 0


async def test_a_burst_beyond_the_queue_bound_is_refused_not_queued(local: LocalEmbedder) -> None:
    embedder = LocalEmbedder(max_waiting=4)
    try:
        waiting = [asyncio.ensure_future(embedder.embed(["one", "two"])) for _ in range(2)]
        await asyncio.sleep(0)  # both queued; the worker has not picked them up yet
        with pytest.raises(Overloaded):
            await embedder.embed(["three"])
        done = await asyncio.gather(*waiting)
        assert all(v.shape == (2, DIMENSIONS) for v in done)
        assert (await embedder.embed(["three"])).shape == (1, DIMENSIONS)  # room again once worked off
    finally:
        await embedder.close()


def test_the_gateway_modules_do_not_import_numpy_or_onnxruntime() -> None:
    """A gateway without a semantic cache never pays for the embedder's imports."""
    code = (
        "import sys; import proxy.app, proxy.pipeline.cache, proxy.api.routes; "
        "print(sorted(m for m in ('numpy', 'onnxruntime', 'tokenizers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_remote_endpoint_embeds_and_reports_its_tokens(
    upstream: tuple[FakeUpstream, ThreadServer], session: aiohttp.ClientSession
) -> None:
    fake, server = upstream
    remote = RemoteEmbedder(session, f"{server.url}/v1", "text-embedding-3-small", api_key="sk-up")
    embedded = await remote.embed_counted(["one two three", "four"])
    assert embedded.vectors.shape == (2, 8)
    assert np.allclose(np.linalg.norm(embedded.vectors, axis=1), 1.0, atol=1e-5)
    assert embedded.tokens == 4  # the fake bills one token a word
    sent = fake.requests[-1]
    assert sent.path == "/v1/embeddings" and sent.payload["model"] == "text-embedding-3-small"
    assert sent.headers["Authorization"] == "Bearer sk-up"
    assert remote.name == "remote:text-embedding-3-small"
    again = await remote.embed(["four"])
    assert np.allclose(again[0], embedded.vectors[1])


async def test_a_remote_endpoint_that_fails_raises_upstream_unavailable(session: aiohttp.ClientSession) -> None:
    with pytest.raises(UpstreamUnavailable):
        parse_embeddings(500, {"error": {"message": "down"}}, 1)
    with pytest.raises(UpstreamUnavailable):
        parse_embeddings(200, {"data": [{"index": 0, "embedding": [0.1, 0.2]}]}, 2)
    remote = RemoteEmbedder(session, "http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(UpstreamUnavailable):
        await remote.embed(["x"])


async def test_a_text_embedded_lately_comes_from_the_memo_with_the_same_vector() -> None:
    embedder = LocalEmbedder(memo_texts=2)
    try:
        first = await embedder.embed_one("How do I reset my password?")
        assert first.shape == (DIMENSIONS,)
        calls = 0
        run = embedder.embed_sync

        def counted(texts: list[str]) -> np.ndarray:
            nonlocal calls
            calls += 1
            return run(texts)

        embedder.embed_sync = counted  # type: ignore[method-assign]
        again = await embedder.embed_one("How do I reset my password?")
        both = await embedder.embed(["How do I reset my password?", "yes"])
        assert calls == 1  # only "yes" reached the model
        assert np.abs(again - first).max() == 0 and np.abs(both[0] - first).max() == 0
        both[0, 0] = 9.0  # a caller's writes never reach the memo
        await embedder.embed(["no"])  # the memo holds 2 texts: the password question is the least recent
        assert len(embedder.memo) == 2 and embedder.memo.get("How do I reset my password?") is None
        assert calls == 2 and float((await embedder.embed_one("yes"))[0]) != 9.0
    finally:
        await embedder.close()
