"""Cascade checks: is the cheap model's answer good enough to serve? Pure.

Part of the upstream stage (``proxy.pipeline.upstream`` runs the loop): when a routing rule
sets ``cascade``, the decision's model answers first, without streaming, and these checks
read that answer. The first check that fails names the reason to escalate to the next model
(recorded as ``escalated: <check>`` in the ledger); none failing serves the answer as it is.
Every choice of the answer is checked (``n`` > 1: one bad choice escalates the request).

    empty       no content and no tool calls
    refusal     an apology or refusal at the start of the content, or a ``refusal`` field
    json        the request asked for JSON (``response_format``) and the content does not parse
    short       fewer than ``min_chars`` characters of content (tool calls are never short)
    confidence  mean token log-probability below ``min_logprob``, when log-probabilities came back
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.policy.model import Cascade

CHECKS = ("empty", "refusal", "json", "short", "confidence")

# A refusal states itself in its first sentence; looking further flags answers that merely
# discuss what one "cannot" do. Apostrophes: straight or typographic.
_REFUSAL_HEAD = 160
_REFUSAL = re.compile(
    r"^\W*(?:"
    r"(?:i'm|i am) sorry\b|(?:my )?apologies\b|i apologi[sz]e\b|sorry, (?:but )?i\b"
    r"|i (?:can't|cannot|can not|won't|will not|am not able to|'m not able to|am unable to|'m unable to)\b"
    r"|(?:i'm|i am) (?:not able|unable) to\b"
    r"|as an ai\b|as a language model\b|as an ai language model\b"
    r"|unfortunately,? i (?:can't|cannot|am unable|'m unable)\b"
    r")",
    re.IGNORECASE,
)
_JSON_FORMATS = frozenset({"json_object", "json_schema"})


def failed_check(response: Mapping[str, Any], payload: Mapping[str, Any], cascade: Cascade) -> str | None:
    """The first check (in the cascade's order) the answer fails, or None when it passes them all."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return "empty" if "empty" in cascade.checks else None
    for check in cascade.checks:
        for choice in choices:
            if isinstance(choice, dict) and _fails(check, choice, payload, cascade):
                return check
    return None


def _fails(check: str, choice: Mapping[str, Any], payload: Mapping[str, Any], cascade: Cascade) -> bool:
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    tool_calls = bool(message.get("tool_calls") or message.get("function_call"))
    if check == "empty":
        return not text.strip() and not tool_calls
    if check == "refusal":
        return bool(message.get("refusal")) or is_refusal(text)
    if check == "json":
        return wants_json(payload) and not tool_calls and not is_json(text)
    if check == "short":
        return not tool_calls and len(text.strip()) < cascade.min_chars
    if check == "confidence":
        mean = mean_logprob(choice)
        return cascade.min_logprob is not None and mean is not None and mean < cascade.min_logprob
    raise ValueError(f"unknown cascade check {check!r}")  # the loader allows only CHECKS


def is_refusal(text: str) -> bool:
    return _REFUSAL.search(text[:_REFUSAL_HEAD].replace("\u2019", "'")) is not None


def wants_json(payload: Mapping[str, Any]) -> bool:
    fmt = payload.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in _JSON_FORMATS


def is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return bool(text.strip())


def mean_logprob(choice: Mapping[str, Any]) -> float | None:
    """The mean log-probability of the content's tokens, None when none came back."""
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(tokens, list):
        return None
    values = [t["logprob"] for t in tokens if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)]
    return sum(values) / len(values) if values else None
