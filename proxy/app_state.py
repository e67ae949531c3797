"""The application's state, held in one typed aiohttp AppKey (no module globals)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.pipeline.auth import Authenticator
from proxy.pipeline.cache import ResponseCache
from proxy.pipeline.guard import Guard
from proxy.pipeline.ledger import Ledger
from proxy.pipeline.prune import Pruner
from proxy.pipeline.ratelimit import RateLimiter
from proxy.pipeline.route import Router
from proxy.pipeline.upstream import Upstream
from proxy.policy.reload import PolicyReloader
from proxy.providers.base import Provider
from proxy.providers.health import Health
from proxy.redact import Redactor
from proxy.settings import ModelConfig, Settings
from proxy.storage.database import Database
from proxy.storage.keys import KeyStore
from proxy.telemetry import Telemetry

if TYPE_CHECKING:  # numpy and onnxruntime load only when an embedder is configured
    from proxy.cache.embedder import Embedder

log = logging.getLogger("thrifty.app")


@dataclass
class Gateway:
    settings: Settings
    db: Database
    keys: KeyStore
    auth: Authenticator
    redact: Redactor
    ledger: Ledger
    models: dict[str, ModelConfig] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)
    models_body: bytes = b'{"object":"list","data":[]}'
    guard: Guard | None = None  # None when no budgets are configured
    limiter: RateLimiter | None = None  # None when no rate limits are configured
    router: Router | None = None  # None when no routing policy is configured
    cache: ResponseCache | None = None  # None when the cache is turned off
    pruner: Pruner | None = None  # context pruning (a budget from policy, config or x-thrifty-max-input-tokens)
    reloader: PolicyReloader | None = None  # with router: hot reload, versions and the admin API
    health: Health = field(default_factory=lambda: Health(()))  # breakers and latency per model (BackendState)
    upstream: Upstream | None = None  # the upstream stage (retries, fallbacks, cascade); built at start-up
    telemetry: Telemetry | None = None  # /metrics and traces; None when telemetry.metrics is off and no OTLP endpoint

    async def check_stores(self) -> list[str]:
        """What keeps the proxy from being ready; empty when every store answers."""
        problems = []
        try:
            await self.db.fetch("SELECT 1")
        except Exception as exc:  # any driver error means "not reachable"
            problems.append(f"ledger database unreachable ({type(exc).__name__})")
        return problems


GATEWAY = web.AppKey("gateway", Gateway)
# The one embedder the process runs (the semantic cache's; the router's difficulty score takes it too).
# Set at start-up when something needs one; absent otherwise (``app.get(EMBEDDER)`` is None).
EMBEDDER: web.AppKey[Embedder] = web.AppKey("embedder")
