"""The exchange: what one request has become so far, as it moves through the stages.

Created when a proxied request arrives and filled in stage by stage (who called, which
model was asked for and which served, usage, timings, status); the ledger stage turns it
into one priced record at the end, whatever happened. Plain mutable state with slots: it
lives for one request and is owned by that request's task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.cost.pricing import Charge, Usage
from proxy.pipeline.auth import Principal
from proxy.policy.model import Decision, Features
from proxy.settings import ModelConfig


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str
    ts: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    principal: Principal | None = None
    requested_model: str = ""
    target: ModelConfig | None = None
    payload: dict[str, Any] | None = None
    stream: bool = False
    tags: dict[str, str] | None = None
    cache: str = "miss"
    route: str | None = None
    policy_version: str | None = None
    usage: Usage | None = None
    prompt_tokens_before: int | None = None  # thrifty's count of the prompt before pruning
    pruned_tokens: int | None = None  # thrifty's count of what pruning removed (the summary added back)
    streamed_text: list[str] | None = None  # content relayed, kept only while no usage is known
    upstream_started: float | None = None
    first_byte: float | None = None
    upstream_done: float | None = None
    finished: float | None = None
    status: int = 200
    error_code: str | None = None
    charge: Charge | None = None
    recorded: bool = False
    features: Features | None = None  # what routing saw; recorded (no text) for `policy simulate`
    decision: Decision | None = None  # the routing decision: fallbacks, cascade, cache and prune settings
    attempts: int = 0  # upstream calls made (retries, fallbacks and cascade steps included)
    cascade: str | None = None  # "accepted" | "escalated: <check>" when a cascade ran
    similarity: float | None = None  # a semantic cache hit's cosine similarity
    prune: str | None = None  # the pruning strategies applied, comma-separated
    overhead_nusd: int = 0  # what thrifty itself spent on this request (embedding, summarizing)

    def ms_since_start(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.started) * 1000, 3)
