"""Exact cache decisions: whether a request may be cached, and the key it is cached under.

Pure functions, no I/O, used by the cache stage (``proxy.pipeline.cache``) before any
upstream call. A request is cacheable when its answer is meant to be reproducible: a chat
completion with ``temperature: 0`` or a ``seed``, one choice (``n`` absent or 1), and no
``Cache-Control: no-store`` header (``no-cache`` skips the lookup but still stores the
fresh answer). The key is the SHA-256 of every request field that can change the answer
(everything except ``stream``, ``stream_options``, ``user``, ``metadata`` and ``store``;
a field OpenAI adds later is in the key, so it can only cause a miss, never a wrong hit),
namespaced by tenant with a Redis Cluster hash tag:
``thrifty:cache:{team:search}:exact:<sha256>``. Unknown or unusual values make a request
uncacheable rather than guessed at.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from proxy.pipeline.auth import Principal

KEY_PREFIX = "thrifty:cache:"
SCOPES = ("team", "key")
# Fields that change how the answer is delivered or labelled, never what it says.
_DELIVERY = frozenset({"stream", "stream_options", "user", "metadata", "store"})


@dataclass(frozen=True, slots=True)
class Cacheability:
    read: bool  # look the request up
    write: bool  # store the upstream's answer

    @property
    def bypass(self) -> bool:
        return not (self.read or self.write)


BYPASS = Cacheability(False, False)
CACHEABLE = Cacheability(True, True)
REFRESH = Cacheability(False, True)  # Cache-Control: no-cache


def cacheability(payload: dict[str, Any], cache_control: str | None) -> Cacheability:
    """Whether a chat completion request may be answered from, and stored in, the cache."""
    read = True
    if cache_control:
        directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
        if "no-store" in directives:
            return BYPASS
        read = "no-cache" not in directives
    if not deterministic(payload):
        return BYPASS
    return CACHEABLE if read else REFRESH


def deterministic(payload: dict[str, Any]) -> bool:
    """Temperature 0 or a seed, and a single choice."""
    n = payload.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        return False
    temperature = payload.get("temperature")
    if not isinstance(temperature, bool) and isinstance(temperature, int | float) and temperature == 0:
        return True
    seed = payload.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def tenant(principal: Principal | None, scope: str) -> str:
    """``team:<name>`` or ``key:<id>``: a key without a team (and the master key) is its own tenant."""
    if principal is None:
        return "key:anonymous"
    if scope == "team" and principal.team:
        return "team:" + quote(principal.team, safe="")
    return "key:" + quote(principal.key_id, safe="")


def request_hash(payload: dict[str, Any], route: str | None = None) -> str:
    """SHA-256 over the request's answer-changing fields (sorted keys, so field order is irrelevant)."""
    canonical = {k: v for k, v in payload.items() if k not in _DELIVERY}
    if canonical.get("n") == 1:
        del canonical["n"]  # the default, spelled out or not
    if canonical.get("temperature") == 0:
        canonical["temperature"] = 0  # 0 and 0.0 alike
    if route is not None:
        canonical = {"request": canonical, "route": route}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def cache_key(tenant_id: str, digest: str) -> str:
    return f"{KEY_PREFIX}{{{tenant_id}}}:exact:{digest}"
