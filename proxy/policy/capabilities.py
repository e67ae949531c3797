"""What each configured model can do, for capability safety in routing.

A rule never sends a request that uses tools, images or a JSON schema to a model that lacks
them, nor a prompt larger than the model's context window. The facts come from litellm's
price map (``supports_function_calling``, ``supports_vision``, ``supports_response_schema``,
``max_input_tokens``), read from disk like the prices, and the config can override each per
model (``models[].capabilities``). A model the map does not know (most local ones) is
assumed to have none of the three features until the config says so (the safe side), and
no known context window (the prompt is not checked against one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.cost.prices import entry_for, litellm_models
from proxy.policy.model import Features
from proxy.settings import ModelConfig


@dataclass(frozen=True, slots=True)
class Capabilities:
    tools: bool = False
    vision: bool = False
    json_schema: bool = False
    context_window: int | None = None


UNKNOWN = Capabilities()
NEEDS_TOKENS = "needs the prompt's token count"


def unfit(cap: Capabilities, f: Features) -> str | None:
    """Why ``cap``'s model cannot serve the request, ``NEEDS_TOKENS`` if that depends on an exact count, else None."""
    if f.tools and not cap.tools:
        return "no tool calling"
    if f.images and not cap.vision:
        return "no image input"
    if f.json_mode == "json_schema" and not cap.json_schema:
        return "no JSON-schema output"
    window = cap.context_window
    if window is not None and f.prompt_bound > window:
        if f.prompt_tokens is None:
            return NEEDS_TOKENS
        if f.prompt_tokens > window:
            return f"prompt of {f.prompt_tokens} tokens exceeds its context window of {window}"
    return None


def capabilities_for(models: Iterable[ModelConfig], price_map: Mapping[str, Any] | None = None) -> dict[str, Capabilities]:
    """Capabilities of each model by its client-facing name (litellm's map, then config overrides)."""
    raw = price_map if price_map is not None else litellm_models()
    out = {}
    for model in models:
        found = entry_for(raw, model)
        entry: Mapping[str, Any] = found if isinstance(found, dict) else {}
        window = entry.get("max_input_tokens")
        base = Capabilities(
            tools=entry.get("supports_function_calling") is True,
            vision=entry.get("supports_vision") is True,
            json_schema=entry.get("supports_response_schema") is True,
            context_window=window if isinstance(window, int) and window > 0 else None,
        )
        out[model.name] = _override(base, model)
    return out


def _override(base: Capabilities, model: ModelConfig) -> Capabilities:
    given = model.capabilities
    return Capabilities(
        tools=base.tools if given.tools is None else given.tools,
        vision=base.vision if given.vision is None else given.vision,
        json_schema=base.json_schema if given.json_schema is None else given.json_schema,
        context_window=base.context_window if given.context_window is None else given.context_window,
    )
