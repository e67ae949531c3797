"""A whole gateway for one savings replay, in process: stand-in models, thrifty, keys per tenant.

Started on loopback ports: the large stand-in (``gpt-4o``, ``gpt-4o-mini``), the local one
(``local-small``) unless ``--local-url`` names a real llama.cpp server, and thrifty from
``create_app`` with a temporary SQLite ledger, the cache in Redis when it answers (else in
memory), pruning, and the given policy. Each tenant gets a virtual key whose team carries a
run id, so two runs (or two passes) never share cache entries in a shared Redis.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from proxy.app import create_app
from proxy.app_state import GATEWAY
from proxy.bench.standin import LARGE_SPEED, LOCAL_SPEED, Plan, Speed, StandIn
from proxy.config import load_settings
from proxy.cost.tokens import TokenCounter


@dataclass(frozen=True)
class Running:
    url: str
    keys: dict[str, str]
    ledger: Path
    local_stand_in: bool


async def _serve(app: web.Application, stack: list[web.AppRunner]) -> int:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stack.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(runner.addresses[0][1])


async def redis_reachable(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def config_doc(base: dict[str, Any], large: str, local: str, ledger: Path, policy: str, redis: bool) -> dict[str, Any]:
    doc = dict(base)
    doc["models"] = [
        {"name": "gpt-4o", "provider": "openai", "base_url": large, "api_key": "sk-bench"},
        {"name": "gpt-4o-mini", "provider": "openai", "base_url": large, "api_key": "sk-bench"},
        {"name": "local-small", "provider": "llamacpp", "base_url": local, "upstream_model": "gemma-3-270m"},
    ]
    doc["ledger"] = {"url": f"sqlite:///{ledger}"}
    doc["auth"] = {"master_key": "sk-bench-master-" + secrets.token_hex(8)}
    doc["policies"] = policy
    cache = dict(doc.get("cache") or {"mode": "semantic", "ttl_seconds": 900})
    if redis:
        cache.setdefault("redis_url", "redis://127.0.0.1:6379/0")
    doc["cache"] = cache
    doc.setdefault("prune", {"max_input_tokens": 1500, "keep_last": 6, "summarize": True, "summarizer": "extractive"})
    return doc


@asynccontextmanager
async def gateway(
    tenants: list[str], plans: dict[str, Plan], policy: str, config: str | None, local_url: str | None, scale: float
) -> AsyncIterator[Running]:
    counter = TokenCounter()
    await asyncio.to_thread(counter.warm, ["gpt-4o"])
    runners: list[web.AppRunner] = []
    folder = Path(tempfile.mkdtemp(prefix="thrifty-bench-"))
    try:
        large = StandIn("gpt-4o", plans, Speed(LARGE_SPEED.first_token, LARGE_SPEED.tokens_per_second, scale), True, counter)
        large_url = f"http://127.0.0.1:{await _serve(large.app(), runners)}/v1"
        if local_url is None:
            speed = Speed(LOCAL_SPEED.first_token, LOCAL_SPEED.tokens_per_second, scale)
            local = StandIn("gemma-3-270m", plans, speed, False, counter)
            local_url = f"http://127.0.0.1:{await _serve(local.app(), runners)}/v1"
        base = yaml.safe_load(await asyncio.to_thread(Path(config).read_text)) if config else {}
        ledger = folder / "ledger.db"
        doc = config_doc(base or {}, large_url, local_url, ledger, policy, await redis_reachable())
        path = folder / "thrifty.yaml"
        await asyncio.to_thread(path.write_text, yaml.safe_dump(doc))
        app = create_app(load_settings(str(path)))
        port = await _serve(app, runners)
        run = secrets.token_hex(4)
        keys = {t: (await app[GATEWAY].keys.create(team=f"{t}-{run}", app="bench"))[0] for t in tenants}
        yield Running(f"http://127.0.0.1:{port}", keys, ledger, "127.0.0.1" in local_url and len(runners) == 3)
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
