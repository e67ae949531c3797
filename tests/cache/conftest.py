"""Fixtures for the cache tests: gateways with the in-process store or real Redis, SDK clients."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.app_state import GATEWAY
from proxy.pipeline.auth import Principal
from proxy.settings import CacheConfig, Settings
from proxy.storage.keys import KeyRecord
from tests.conftest import MASTER_KEY, settings_for
from tests.fake_upstream import FakeUpstream
from tests.servers import ThreadServer
from tests.services import redis_url  # noqa: F401


@dataclass
class Cached:
    """A running gateway with a cache, its SDK client (master key) and its ledger file."""

    server: ThreadServer
    client: openai.OpenAI
    db_path: Path

    def drain(self) -> None:
        """Wait until the answers already given are in the store (they are written in the background)."""

        async def drain() -> None:
            cache = self.server.app[GATEWAY].cache  # type: ignore[index]
            assert cache is not None
            await cache.drain()

        self.server.call(drain)

    def client_for(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=key, max_retries=0, timeout=30)

    def create_key(self, team: str) -> tuple[str, Principal]:
        """A new virtual key of ``team`` (made in the gateway's key store), and who it is."""

        async def create() -> tuple[str, KeyRecord]:
            return await self.server.app[GATEWAY].keys.create(team)  # type: ignore[index, no-any-return]

        key, record = self.server.call(create)
        return key, Principal(record.id, record.team, record.app, record.role)


StartCached = Callable[..., Cached]


@pytest.fixture
def start_cached(
    start_gateway: Callable[[Settings], ThreadServer], upstream: tuple[FakeUpstream, ThreadServer], tmp_path: Path
) -> Iterator[StartCached]:
    clients: list[openai.OpenAI] = []

    def start(**cache: Any) -> Cached:
        base = settings_for(upstream[1].url, tmp_path)
        server = start_gateway(replace(base, cache=CacheConfig(ttl_seconds=120, **cache)))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=30)
        clients.append(client)
        return Cached(server, client, Path(base.ledger.url.removeprefix("sqlite:///")))

    yield start
    for client in clients:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def cached(request: pytest.FixtureRequest, start_cached: StartCached) -> Cached:
    """A gateway with each store in turn: in-process, and the real Redis server."""
    if request.param == "memory":
        return start_cached()
    return start_cached(redis_url=request.getfixturevalue("redis_url"))


@pytest.fixture
def prompt() -> str:
    """A question no other test (or earlier run, on the shared Redis) has asked."""
    return f"what is {uuid.uuid4().hex}?"
