"""``POST /v1/thrifty/feedback``: a caller's verdict on one of its own chat answers.

Beside the pipeline, not in it: ``{"request_id": "...", "score": 0.0-1.0, "comment": "..."}``
(1 is a good answer; the comment, at most 1,000 characters, is the user's own words, never
the prompt) is stored in the ``feedback`` table, one row per request and key, the latest
winning. ``thrifty policy calibrate`` reads it beside the ledger's difficulty scores and
cascade escalations. Any key may score the chat requests it made (the master key any
request); an id that is unknown, or that another key made, is the same 404, so a key learns
nothing of others' traffic. The ledger is written by a background batch writer, so the
record of an answer given a moment ago may not be in the store yet: the handler also looks
in this process's pending buffer, and failing both, asks the store again for up to a
second (another replica's writer flushes every 0.25 s) before answering 404.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.api.middleware import REQUEST_ID
from proxy.api.wire import parse_body
from proxy.app_state import GATEWAY, Gateway
from proxy.errors import BadRequest, NotFound
from proxy.pipeline.auth import Principal, bearer_token

PATH = "/v1/thrifty/feedback"
MAX_COMMENT = 1000
MAX_REQUEST_ID = 128  # the longest x-request-id the gateway takes from a client
# How long a lookup waits for a record still on its way to the store (several replicas:
# another process's writer), in steps of the writer's flush interval.
FIND_TRIES = 4
FIND_STEP = 0.25
_FIELDS = ("request_id", "score", "comment")
_OWNERS = "SELECT DISTINCT key_id FROM ledger WHERE request_id = ? AND endpoint = 'chat/completions'"
_UPSERT = (
    "INSERT INTO feedback (request_id, key_id, score, comment, ts) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (request_id, key_id) DO UPDATE SET score = excluded.score, comment = excluded.comment, ts = excluded.ts"
)


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    score: float
    comment: str | None


def parse_feedback(raw: bytes) -> Feedback:
    """The body, validated; a 400 naming the field otherwise (pure)."""
    data: dict[str, Any] = parse_body(raw)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise BadRequest(f"Unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(_FIELDS)}.", param=unknown[0])
    request_id = data.get("request_id")
    if request_id is None:
        raise BadRequest("Missing required parameter: 'request_id'.", param="request_id", code="missing_required_parameter")
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID:
        raise BadRequest(
            f"'request_id' must be a non-empty string of at most {MAX_REQUEST_ID} characters (the response's x-request-id).",
            param="request_id",
            code="invalid_type",
        )
    score = data.get("score")
    if score is None:
        raise BadRequest("Missing required parameter: 'score'.", param="score", code="missing_required_parameter")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise BadRequest("'score' must be a number from 0 to 1 (1 = a good answer).", param="score", code="invalid_type")
    if not 0 <= score <= 1:
        raise BadRequest(f"'score' must be from 0 to 1 (1 = a good answer), not {score}.", param="score", code="invalid_value")
    comment = data.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise BadRequest("'comment' must be a string.", param="comment", code="invalid_type")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise BadRequest(f"'comment' is longer than {MAX_COMMENT:,} characters.", param="comment", code="invalid_value")
    return Feedback(request_id, float(score), comment or None)


def scored_key(principal: Principal, owners: set[str | None]) -> str | None:
    """The key whose request the principal may score: its own; the master key any (pure)."""
    if principal.key_id in owners:
        return principal.key_id
    if principal.is_master:
        known = sorted(k for k in owners if k is not None)
        return known[0] if known else None
    return None


async def _owners(gateway: Gateway, request_id: str) -> set[str | None]:
    """The keys that made chat requests with this id: in the store, or still in the writer's buffer."""
    for attempt in range(FIND_TRIES + 1):
        rows = await gateway.db.fetch(_OWNERS, request_id)
        owners: set[str | None] = {r[0] for r in rows}
        owners |= {r.key_id for r in gateway.ledger.writer.pending_for(request_id) if r.endpoint == "chat/completions"}
        if owners or attempt == FIND_TRIES:
            return owners
        await asyncio.sleep(FIND_STEP)
    return set()


async def post_feedback(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    token = bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    principal = await gateway.auth.authenticate(token)
    feedback = parse_feedback(await request.read())
    key = scored_key(principal, await _owners(gateway, feedback.request_id))
    if key is None:
        raise NotFound(
            f"No chat request {feedback.request_id!r} made with this key.", param="request_id", code="request_not_found"
        )
    now = time.time()
    await gateway.db.execute(_UPSERT, feedback.request_id, key, feedback.score, feedback.comment, now)
    body = {
        "object": "thrifty.feedback",
        "request_id": feedback.request_id,
        "score": feedback.score,
        "comment": feedback.comment,
        "created": now,
    }
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", "x-request-id": request[REQUEST_ID]}
    return web.Response(body=orjson.dumps(body), headers=headers)


def add_feedback_routes(app: web.Application) -> None:
    app.router.add_post(PATH, post_feedback)
