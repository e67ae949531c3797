"""Semantic cache keys: what is embedded, which entries it may be compared with, and the guard.

Pure functions, no I/O, used by the cache stage (``proxy.pipeline.cache``) when a route's
cache mode is ``semantic``. The embedded text is the conversation's last message, which must
be the user's and plain text (an image or a tool result is not embedded: exact cache only).
Everything else that can change the answer goes into the **partition**, and entries are only
ever compared within one partition: the tenant, the route and model, the embedder, every
earlier message (system prompt and the whole conversation so far, so "yes" in two different
conversations lives in two partitions), tools, response_format, max_tokens and the other
generation parameters, with the temperature in buckets of 0.1 (the seed is left out: a
paraphrase asked with another seed may take the same answer). After a cosine match,
:func:`compatible` refuses a hit whose numbers or negations differ from the stored
question's ("is 7 prime" vs "is 8 prime", "can I" vs "can't I") or that has the same words
in another order ("from A to B" vs "from B to A"): the near-misses that embed almost identically.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

# The least cosine similarity served by default; set from the precision study (tests/data/cache_pairs/RESULTS.md).
DEFAULT_THRESHOLD = 0.995
# Fields that do not change the answer, or that the partition treats on its own.
_LEFT_OUT = frozenset({"messages", "stream", "stream_options", "user", "metadata", "store", "seed", "temperature"})
MAX_TEXT_CHARS = 4000  # longer questions are not embedded (the model reads 256 tokens): exact cache only


@dataclass(frozen=True, slots=True)
class SemanticKey:
    tenant: str
    partition: str  # "<tenant>/<sha256>": entries compared only within one
    text: str  # what is embedded


def embedded_text(payload: dict[str, Any]) -> str | None:
    """The last message's text when it is the user's and is text only; None: not semantically cacheable."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    if last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if not parts or any(p.get("type") != "text" for p in content if isinstance(p, dict)):
            return None
        if not all(isinstance(p, str) for p in parts):
            return None
        content = "\n".join(str(p) for p in parts)
    if not isinstance(content, str) or not content.strip() or len(content) > MAX_TEXT_CHARS:
        return None
    return content.strip()


def temperature_bucket(payload: dict[str, Any]) -> float | None:
    value = payload.get("temperature")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return round(float(value), 1)


def partition(payload: dict[str, Any], tenant: str, route: str | None, embedder: str) -> str:
    """The tenant, then a digest of everything but the last message that can change the answer."""
    messages = payload.get("messages") or []
    canonical = {
        "route": route,
        "embedder": embedder,
        "context": messages[:-1],
        "params": {k: v for k, v in payload.items() if k not in _LEFT_OUT and not (k == "n" and v == 1)},
        "temperature": temperature_bucket(payload),
    }
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return f"{tenant}/{digest}"


def semantic_key(payload: dict[str, Any], tenant: str, route: str | None, embedder: str) -> SemanticKey | None:
    text = embedded_text(payload)
    if text is None:
        return None
    return SemanticKey(tenant, partition(payload, tenant, route, embedder), text)


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATION = re.compile(r"\b(?:not|no|never|none|nothing|nobody|neither|nor|without|cannot)\b|n't\b", re.IGNORECASE)


def _signature(text: str) -> tuple[tuple[str, ...], int]:
    numbers = tuple(sorted(n.replace(",", "") for n in _NUMBER.findall(text)))
    return numbers, len(_NEGATION.findall(text.replace("’", "'"))) % 2


# Words that carry no meaning of their own in a question: ignored when word order is compared.
_FILLER_WORDS = (
    "a an the i me my we our you your it its is are am be do does did can could would should will to of in on at for"
    " with and or so uh um hi hello hey there please thanks thank just what whats how where when which who why"
)
_FILLER = frozenset(_FILLER_WORDS.split())
_WORD = re.compile(r"[a-z0-9£$€%']+")


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower().replace("’", "'")) if w not in _FILLER]


def compatible(question: str, stored: str) -> bool:
    """Whether a close match may be served: the same numbers, negated alike (an even or odd count), and
    not the same content words in another order ("from savings to current" vs "from current to savings")."""
    if _signature(question) != _signature(stored):
        return False
    asked, kept = _content_words(question), _content_words(stored)
    return asked == kept or sorted(asked) != sorted(kept)
