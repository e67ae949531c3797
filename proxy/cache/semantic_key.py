"""Semantic cache keys: what is embedded, which entries it may be compared with, and when a match is served.

Pure functions, no I/O, used by the cache stage (``proxy.pipeline.cache``) when a route's
cache mode is ``semantic``. The embedded text is the conversation's last message, which must
be the user's and plain text (an image or a tool result is not embedded: exact cache only).
Everything else that can change the answer goes into the **partition**, and entries are only
ever compared within one partition: the tenant, the route and model, the embedder, the system
prompt, tools, response_format, max_tokens and the other generation parameters (the
temperature in buckets of 0.1; the seed left out: a paraphrase asked with another seed may
take the same answer), and the earlier turns of the conversation as their **content words**
(case, punctuation, contractions, greetings and function words aside; order, numbers and
negations kept), so "yes" in two different conversations lives in two partitions while a
conversation retyped with another greeting or casing shares one (a conversation with tool calls,
images or named turns goes in exactly). :func:`decide` says whether a candidate found by
cosine similarity is served, in one of two tiers: **words** (the same content words, a fronted
clause moved, or a misspelt word, from a cosine of :data:`WORDS_FLOOR`) or **cosine** (at least
the threshold); both need the guard, :func:`compatible`: the same numbers, negated alike, and
not the same words in another order ("from A to B" vs "from B to A"). Measured in
tests/data/cache_pairs/RESULTS.md.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# Set from the precision study (tests/data/cache_pairs/RESULTS.md): the least cosine similarity served
# on its own (the cosine tier; a route's threshold overrides it), and the least one at which the same
# content words are served (the words tier).
DEFAULT_THRESHOLD = 0.99
WORDS_FLOOR = 0.5
# In every partition digest: entries stored under an earlier scheme are never compared with these.
FORMAT = 2
# Fields that do not change the answer, or that the partition treats on its own.
_LEFT_OUT = frozenset({"messages", "stream", "stream_options", "user", "metadata", "store", "seed", "temperature"})
MAX_TEXT_CHARS = 4000  # longer questions are not embedded (the model reads 256 tokens): exact cache only
CONTEXT_WORDS_CHARS = 16_000  # a longer history goes into the partition exactly (its words would take > 1 ms a request)


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


def _plain(message: Any) -> bool:
    """A user or assistant turn made of its role and a text, nothing else (no tool calls, names, images)."""
    return (
        isinstance(message, dict)
        and message.get("role") in ("user", "assistant")
        and isinstance(message.get("content"), str)
        and all(k in ("role", "content") for k in message)
    )


def context(messages: list[Any]) -> list[Any]:
    """What of the earlier messages goes into the partition: system and developer messages exactly, plain
    user and assistant turns as their content words; all of them exactly when any other turn is not plain
    text (tool calls and results, images, names: structured data is compared as sent) or the history is long."""
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("system", "developer"))]
    if not all(_plain(m) for m in turns) or sum(len(m["content"]) for m in turns) > CONTEXT_WORDS_CHARS:
        return messages
    return [[m["role"], " ".join(content_words(m["content"]))] if _plain(m) else m for m in messages]


def partition(payload: dict[str, Any], tenant: str, route: str | None, embedder: str) -> str:
    """The tenant, then a digest of everything but the last message that can change the answer."""
    messages = payload.get("messages") or []
    canonical = {
        "format": FORMAT,
        "route": route,
        "embedder": embedder,
        "context": context(messages[:-1]),
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


# Words that carry no meaning of their own in a question (greetings, fillers, function words): ignored
# when words are compared. Negations and numbers are never in it.
_FILLER_WORDS = (
    "a an the i me my we our you your it its is are am be do does did can could would should will to of in on at for"
    " with and or so uh um er erm hi hello hiya hey there please thanks thank cheers just what how where when which"
    " who why okay ok yeah like morning afternoon evening quick question one sorry wondering tell many team"
)
_FILLER = frozenset(_FILLER_WORDS.split())
_TOKEN = re.compile(r"[a-z0-9£$€%']+")
# Contractions spelled out: "can't" and "cannot" are one word, "what's" is "what is", "don't" is "do not".
_SPELLED = {"won't": ("will", "not"), "can't": ("cannot",), "shan't": ("shall", "not")}
_SUFFIXES = (("n't", "not"), ("'re", "are"), ("'ve", "have"), ("'ll", "will"), ("'d", "would"), ("'m", "am"))
_IS_WORDS = "what where when who how why there here that it he she"
_IS = frozenset(_IS_WORDS.split())  # "<word>'s" is "<word> is"
_IS_BARE = {w + "s": w for w in _IS - {"here", "he", "she"}}  # "whats", typed without the apostrophe
FRONTED_WORDS = 6  # "At the college, when ...": a leading clause of at most this many content words may move
TYPO_LENGTH = 6  # words this long or longer may differ by one edit when one of them is not a dictionary word
TYPOS = 3  # at most this many misspelt words in one question


def content_words(text: str) -> list[str]:
    """The words that carry meaning, lower-cased, contractions spelled out, apostrophes dropped, in order.

    One pass over the text (a long conversation's earlier turns go through it on every request)."""
    out: list[str] = []
    for token in _TOKEN.findall(text.lower().replace("’", "'")):
        if "'" in token:
            words = _expand(token.strip("'"))
        elif token in _IS_BARE:
            words = (_IS_BARE[token], "is")
        else:
            if token not in _FILLER:
                out.append(token)
            continue
        out.extend(w for w in words if w and w not in _FILLER)
    return out


def _expand(token: str) -> tuple[str, ...]:
    if token in _SPELLED:
        return _SPELLED[token]
    for suffix, spelled in _SUFFIXES:
        if token.endswith(suffix):
            return token[: -len(suffix)].replace("'", ""), spelled
    if token.endswith("'s") and token[:-2] in _IS:
        return token[:-2], "is"
    return (token.replace("'", ""),)  # a possessive ("child's": "childs") or a quote


@functools.cache
def known_words() -> frozenset[str]:
    """The embedder's word-piece vocabulary, whole alphabetic words only: a word outside it is likely a typo."""
    vocab = orjson.loads((Path(__file__).with_name("minilm") / "tokenizer.json").read_bytes())["model"]["vocab"]
    return frozenset(w for w in vocab if w.isalpha())


def _one_edit(x: str, y: str) -> bool:
    """Damerau-Levenshtein distance of at most one (a letter changed, added, dropped, or two swapped)."""
    if abs(len(x) - len(y)) > 1:
        return False
    if len(x) == len(y):
        diff = [i for i in range(len(x)) if x[i] != y[i]]
        return len(diff) <= 1 or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and x[diff[0]] == y[diff[1]] and x[diff[1]] == y[diff[0]]
        )
    short, long = (x, y) if len(x) < len(y) else (y, x)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def _typo(x: str, y: str) -> bool:
    """Two words that are one misspelling apart: long, letters only, one of them unknown (trial/trail are both words)."""
    if min(len(x), len(y)) < TYPO_LENGTH or not (x.isalpha() and y.isalpha()):
        return False
    known = known_words()
    return (x not in known or y not in known) and _one_edit(x, y)


def _fronted(text: str, other: list[str]) -> bool:
    """``text`` is ``other`` with a short leading clause moved to the front ("In the app, how do I ...")."""
    head, comma, tail = text.partition(",")
    lead = content_words(head)
    return bool(comma) and 0 < len(lead) <= FRONTED_WORDS and content_words(tail) + lead == other


def same_words(asked: str, stored: str) -> bool:
    """The same content words in the same order, allowing a fronted clause moved and a few misspelt words."""
    a, b = content_words(asked), content_words(stored)
    if a == b:
        return True
    if _fronted(asked, b) or _fronted(stored, a):
        return True
    if len(a) != len(b):
        return False
    differ = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    return len(differ) <= TYPOS and all(_typo(x, y) for x, y in differ)


def compatible(question: str, stored: str) -> bool:
    """Whether a close match may be served: the same numbers, negated alike (an even or odd count), and
    not the same content words in another order ("from savings to current" vs "from current to savings")."""
    if _signature(question) != _signature(stored):
        return False
    asked, kept = content_words(question), content_words(stored)
    return asked == kept or sorted(asked) != sorted(kept) or _fronted(question, kept) or _fronted(stored, asked)


def decide(question: str, stored: str, similarity: float, threshold: float = DEFAULT_THRESHOLD) -> str | None:
    """The tier a candidate is served in ("cosine" or "words"), or None: not served."""
    if not compatible(question, stored):
        return None
    if similarity >= threshold:
        return "cosine"
    return "words" if similarity >= WORDS_FLOOR and same_words(question, stored) else None
