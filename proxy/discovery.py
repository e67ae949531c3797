"""Zero-config discovery: local model servers that answer on their default ports.

With no configuration file, ``thrifty serve`` asks an Ollama on 127.0.0.1:11434 and a
llama.cpp server on 127.0.0.1:8080 (or where ``OLLAMA_HOST`` / ``LLAMACPP_BASE_URL`` say:
``Settings.local_servers``) for their ``/v1/models`` (half a second each, in parallel) and
serves whatever models they list. Nothing answering is not an error.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson

from proxy.settings import ModelConfig

log = logging.getLogger("thrifty.discovery")


async def discover_local(
    session: aiohttp.ClientSession, servers: tuple[tuple[str, str], ...], probe_seconds: float = 0.5
) -> list[ModelConfig]:
    results = await asyncio.gather(*(_probe(session, p, url, probe_seconds) for p, url in servers))
    return [model for found in results for model in found]


async def _probe(session: aiohttp.ClientSession, provider: str, base_url: str, probe_seconds: float) -> list[ModelConfig]:
    try:
        async with session.get(f"{base_url}/models", timeout=aiohttp.ClientTimeout(total=probe_seconds)) as resp:
            if resp.status != 200:
                return []
            data = orjson.loads(await resp.read())
    except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
        return []
    models = []
    for entry in data.get("data", []) if isinstance(data, dict) else []:
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model_id, str) or not model_id:
            continue
        # llama.cpp without --model_alias names the model by its file path.
        name = model_id.rsplit("/", 1)[-1].removesuffix(".gguf")
        models.append(ModelConfig(name, provider, base_url, None, upstream_model=model_id))
        log.info("found local model %s (%s at %s)", name, provider, base_url)
    return models
