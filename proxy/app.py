"""create_app(settings, overrides): wiring, app state, start-up and clean-up.

Start-up (in ``cleanup_ctx``, so tear-down runs only after a successful start) opens the
ledger database and applies migrations, opens the pooled upstream HTTP client, discovers
local models in zero-config mode, and builds one provider per model: OpenAI-compatible
ones on the shared aiohttp session, others through litellm (imported only then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from proxy.api import middleware, routes
from proxy.app_state import GATEWAY, Gateway
from proxy.cost.prices import PriceTable, load_litellm_prices, overrides_from_config
from proxy.cost.tokens import TokenCounter
from proxy.cost.writer import LedgerWriter
from proxy.discovery import discover_local
from proxy.pipeline.auth import Authenticator
from proxy.pipeline.cache import open_cache, open_semantic, semantic_wanted
from proxy.pipeline.guard import open_guard
from proxy.pipeline.ledger import Ledger, set_baseline
from proxy.pipeline.prune import open_pruner
from proxy.pipeline.ratelimit import open_limiter
from proxy.pipeline.route import SharedEmbed, blended_prices, load_router
from proxy.pipeline.upstream import Upstream
from proxy.policy.reload import PolicyReloader
from proxy.policy.store import PolicyStore
from proxy.providers.base import Provider
from proxy.providers.health import Health
from proxy.providers.openai_compat import OpenAICompatible
from proxy.redact import Redactor
from proxy.settings import LITELLM_PROVIDERS, ModelConfig, Settings
from proxy.storage.database import Database, open_database
from proxy.storage.keys import KeyStore
from proxy.telemetry import Telemetry, open_tracing

log = logging.getLogger("thrifty.app")


@dataclass(frozen=True)
class Overrides:
    """What a test (or an embedding program) hands in instead of what settings name."""

    database: Database | None = None


def create_app(settings: Settings, overrides: Overrides | None = None) -> web.Application:
    overrides = overrides or Overrides()
    app = web.Application(middlewares=[middleware.errors], client_max_size=settings.server.max_body_bytes)
    routes.add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        db = overrides.database or await open_database(settings.ledger.url)
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",))
        providers: dict[str, Provider] = {}
        stack = contextlib.AsyncExitStack()
        try:
            models = list(settings.models)
            if settings.discover_local:
                known = {m.name for m in models}
                models += [m for m in await discover_local(session, settings.local_servers) if m.name not in known]
            redact = Redactor(m.api_key for m in models if m.api_key)
            tracing = open_tracing(settings.telemetry)  # the OpenTelemetry SDK is imported only with an OTLP endpoint
            for model in models:
                provider = _provider(model, session, redact)
                providers[model.name] = tracing.wrap(provider) if tracing is not None else provider
            health = Health(models, settings.upstream)
            health.start(session)  # probes local backends in the background
            stack.push_async_callback(health.close)
            telemetry = None
            if settings.telemetry.metrics or tracing is not None:
                telemetry = Telemetry(settings.telemetry, health, None, [m.name for m in models], tracing)
                telemetry.start()
                stack.push_async_callback(telemetry.close)  # after the ledger's last counts (callbacks run last-in first)
            router = await load_router(settings.policies, models, backends=health)  # invalid: the start fails
            reloader = None
            if router is not None and settings.policies is not None:
                reloader = PolicyReloader(settings.policies, models, router, PolicyStore(db))
                await reloader.start()
                stack.push_async_callback(reloader.close)
            keys = KeyStore(db)
            counter = TokenCounter()  # one per process: each loaded encoding holds 30 to 70 MB
            ledger = await _ledger(settings, db, {m.name: m for m in models}, counter)
            stack.push_async_callback(ledger.close)
            set_baseline(
                ledger, settings.ledger.baseline_model, router.policy.aliases if router else {}, {m.name: m for m in models}
            )
            if telemetry is not None:
                ledger.observe = telemetry.record
            guard = await open_guard(settings.budgets, models)
            if router is not None:  # prices for "cheapest", spend shares for "budget" (built after the router)
                router.attach(prices=blended_prices([m.name for m in models], ledger.price_of), spend=guard)
            if guard is not None:
                stack.push_async_callback(guard.close)  # settles still running, then Redis closes
            limiter = await open_limiter(settings.rate_limits, settings.budgets, guard, models, counter)
            if limiter is not None:
                stack.push_async_callback(limiter.close)  # before the guard's: they may share a Redis client
            cache = open_cache(settings.cache)
            if telemetry is not None:
                telemetry.cache = cache
            if cache is not None:
                stack.push_async_callback(cache.close)  # stores still running, then Redis closes
                if semantic_wanted(settings.cache, router.policy if router is not None else None):
                    await open_semantic(cache, {m.name: m for m in models}, session, ledger.price_of)  # embedder, warm start
            if router is not None and isinstance(router.embed, SharedEmbed):
                shared = cache.semantic.embedder if cache is not None and cache.semantic is not None else None
                if shared is not None and getattr(shared, "memo", None) is not None:  # in process: one MiniLM for both
                    router.embed.use(shared)
                elif router.policy.difficulty:
                    await router.embed.load()  # off the loop, before the first request waits on it
                stack.push_async_callback(router.embed.close)
            pruner = await open_pruner(settings.prune, models, providers, counter, ledger.price_of, cache, settings.cache)
            stack.push_async_callback(pruner.close)  # before the cache's store closes
            gateway = Gateway(
                settings=settings,
                db=db,
                keys=keys,
                auth=Authenticator(settings.auth.master_key, keys.find, settings.auth.key_cache_seconds),
                redact=redact,
                ledger=ledger,
                models={m.name: m for m in models},
                providers=providers,
                models_body=_models_body(models),
                guard=guard,
                limiter=limiter,
                router=router,
                cache=cache,
                health=health,
                reloader=reloader,
                pruner=pruner,
                telemetry=telemetry,
            )
            gateway.upstream = Upstream(providers, gateway.models, health, settings.upstream, ledger.price_of)
            app[GATEWAY] = gateway
            if not models:
                log.warning("no models configured or found; see README 'Configuration'")
            if not settings.auth.master_key:
                log.warning("no master key set (auth.master_key / THRIFTY_MASTER_KEY): only keys from `thrifty keys create` work")
            yield
        finally:
            await stack.aclose()  # the ledger writer flushes before the database closes
            for provider in providers.values():
                await provider.close()
            await session.close()
            if overrides.database is None:
                await db.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _ledger(settings: Settings, db: Database, models: dict[str, ModelConfig], counter: TokenCounter) -> Ledger:
    litellm_prices = await asyncio.to_thread(load_litellm_prices)
    prices = PriceTable(litellm_prices, overrides_from_config(settings.prices))
    # Local servers stream without usage and budgets estimate every request: those count
    # for sure, so their encodings load now; otherwise only if a count is ever needed.
    counted = [m.target_model for m in models.values() if m.is_local]
    if settings.budgets.limits:
        counted += [m.target_model for m in models.values()]
    if counted:
        await asyncio.to_thread(counter.warm, set(counted))
    writer = LedgerWriter(db, Path(settings.ledger.spill_dir), max_buffer=settings.ledger.buffer_records)
    writer.start()
    return Ledger(prices, counter, writer, models)


def _provider(model: ModelConfig, session: aiohttp.ClientSession, redact: Redactor) -> Provider:
    if model.provider in LITELLM_PROVIDERS:
        from proxy.providers.litellm_adapter import LiteLLMProvider  # imports litellm: seconds

        return LiteLLMProvider(model, redact)
    return OpenAICompatible(session, model, redact)


def _models_body(models: list[ModelConfig]) -> bytes:
    data = [{"id": m.name, "object": "model", "created": 0, "owned_by": m.provider} for m in models]
    return orjson.dumps({"object": "list", "data": data})
