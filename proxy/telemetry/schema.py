"""Telemetry's names: the metrics, their labels and buckets, and the columns of a request row.

Shared by the recording side (``proxy.telemetry.metrics``) and the exposition
(``proxy.telemetry.exposition``). Names follow the OpenTelemetry GenAI conventions mapped to
Prometheus: dots become underscores, so the attribute ``gen_ai.request.model`` is the label
``gen_ai_request_model``; thrifty's own (``thrifty.cost.usd``) become ``thrifty_cost_usd_total``.
dashboards/README.md lists them all.
"""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How stale another worker's figures can be in a scrape (plus one file write); idle, the check
# costs ~20 wake-ups a second, under load at most 20 writes a second per worker.
FLUSH_SECONDS = 0.05
MAX_REQUESTED_MODELS = 200  # distinct client-named models kept as labels; beyond: "other"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)  # GenAI semconv's advice, shortened
SIMILARITY = (0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99, 1.0)

# Per-request counters, one row per label set; the label set is ROW_LABELS.
ROW_LABELS = (
    "gen_ai_operation_name",
    "thrifty_team",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "thrifty_route",
    "thrifty_cache_result",
    "status_class",
)
(COUNT, INPUT, OUTPUT, COST, BASELINE, SAVED_CACHE, SAVED_ROUTING, SAVED_PRUNING, OVERHEAD, ATTEMPTS, FALLBACKS, ESCALATED,
 REFUSED) = range(13)  # fmt: skip
ROW_WIDTH = 13
OP, TEAM, REQ, RESP, ROUTE, CACHE, STATUS = range(7)

# Histograms: name -> (label names, bucket bounds, help).
HISTOGRAMS: dict[str, tuple[tuple[str, ...], tuple[float, ...], str]] = {
    "thrifty_request_duration_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model", "thrifty_cache_result"),
        SECONDS,
        "Time from request arrival to the end of the response, in seconds.",
    ),
    "gen_ai_client_operation_duration_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model"),
        SECONDS,
        "Time thrifty waited on the upstream model (all attempts, to the end of the response), in seconds.",
    ),
    "gen_ai_server_time_to_first_token_seconds": (
        ("gen_ai_operation_name", "gen_ai_response_model"),
        SECONDS,
        "Time from the first upstream call to the upstream's first byte, in seconds.",
    ),
    "gen_ai_client_token_usage": (
        ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_response_model", "gen_ai_token_type"),
        TOKENS,
        "Tokens per request, by type (input, output), as the ledger counts them.",
    ),
    "thrifty_cache_similarity": (
        ("gen_ai_response_model",),
        SIMILARITY,
        "Cosine similarity of the semantic cache hits served.",
    ),
}

# Counters projected from the rows: name -> (labels kept (row indexes), value column(s), help, extra label).
Projection = tuple[tuple[int, ...], tuple[tuple[str | None, int], ...], str, str | None]
COUNTERS: dict[str, Projection] = {
    "thrifty_requests": (
        (0, 1, 2, 3, 4, 5, 6),
        ((None, COUNT),),
        "Requests, by endpoint, model, route, cache result and status.",
        None,
    ),
    "thrifty_tokens": (
        (OP, TEAM, RESP),
        (("input", INPUT), ("output", OUTPUT)),
        "Tokens billed (input, output), as in the ledger.",
        "gen_ai_token_type",
    ),
    "thrifty_cost_usd": ((OP, TEAM, REQ, RESP, ROUTE), ((None, COST),), "What the requests cost, USD.", None),
    "thrifty_baseline_usd": (
        (OP, TEAM, REQ, RESP, ROUTE),
        ((None, BASELINE),),
        "What the requests would have cost without thrifty (requested model, uncached, unpruned), USD.",
        None,
    ),
    "thrifty_savings_usd": (
        (TEAM, RESP, ROUTE),
        (("cache", SAVED_CACHE), ("routing", SAVED_ROUTING), ("pruning", SAVED_PRUNING)),
        "Savings by lever (cache, routing, pruning), USD, before overhead.",
        "lever",
    ),
    "thrifty_overhead_usd": (
        (TEAM, RESP),
        ((None, OVERHEAD),),
        "What thrifty spent itself (embeddings, summaries, cascade trials), USD.",
        None,
    ),
    "thrifty_upstream_attempts": (
        (RESP,),
        ((None, ATTEMPTS),),
        "Upstream calls made (retries, fallbacks, cascade steps).",
        None,
    ),
    "thrifty_upstream_fallbacks": ((REQ, RESP), ((None, FALLBACKS),), "Requests served by a fallback model.", None),
    "thrifty_cascade_escalations": ((REQ, RESP), ((None, ESCALATED),), "Cascades whose first answer failed a check.", None),
    "thrifty_budget_refusals": ((TEAM,), ((None, REFUSED),), "Requests refused by a hard budget (429).", None),
}
USD_COLUMNS = frozenset({COST, BASELINE, SAVED_CACHE, SAVED_ROUTING, SAVED_PRUNING, OVERHEAD})

Snapshot = dict[str, Any]
