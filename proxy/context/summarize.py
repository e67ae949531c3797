"""Summaries of the turns the pruner dropped: extractive (pure) or by a local model, cached.

Used by the prune stage (``proxy.pipeline.prune``) when ``proxy.context.prune`` dropped turns
and left room for a summary. Two summarizers:

- **extractive** (pure, microseconds): the dropped turns' sentences that carry facts (names,
  numbers, dates, decisions: proper nouns, digits, month names, "decided / agreed / will /
  must ..."), the densest first, printed in their original order within the room given;
- **a model** (a chat call through the gateway's own provider for that model, typically a
  local SLM behind llama.cpp or Ollama), with a timeout; any failure, timeout, empty answer
  or an answer that repeats the instructions falls back to the extractive summary. The call's cost is returned for the ledger.

Summaries are cached (the response cache's store: Redis when configured, else an in-process
LRU) under a hash of the tenant, the summarizer, the room and the summarized messages: a
growing conversation whose dropped run has not moved (see ``Budget.summary_step``) pays
for its summary once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.cache.store import CacheStore
from proxy.cost.prices import Price
from proxy.cost.pricing import cost_nusd, usage_from_openai
from proxy.errors import ThriftyError
from proxy.providers.base import Call, Provider
from proxy.settings import ModelConfig
from proxy.tasks import TaskSet

log = logging.getLogger("thrifty.prune")

EXTRACTIVE = "extractive"
KEY_PREFIX = "thrifty:summary:"
CHARS_PER_TOKEN = 4  # English prose with o200k_base runs 4 to 4.5: the stage re-counts and trims anyway
MAX_SENTENCE_CHARS = 400
SLM_PROMPT = (
    "Summarize the conversation below in a few short sentences for the assistant that continues it. "
    "Keep every name, number, date, amount and decision exactly as written.\n\n{transcript}\n\nSummary:"
)

_ECHO = SLM_PROMPT[:48]  # an answer that contains the instructions repeated them rather than summarizing
# A sentence ends at . ! or ? and a space, except after a title or a common abbreviation ("Dr. Helen Achterberg").
_SENTENCE = re.compile(r"(?<!\b(?:Dr|Mr|Ms|St|Jr|Sr|vs)\.)(?<!\bMrs\.)(?<!\bProf\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+|\n+")
_IDENTIFIER = re.compile(r"\b\w+[-_/]\w[\w/-]*|\b[a-z]+[A-Z]\w*")  # payments-gateway, snake_case, camelCase, a/b
_WORD = re.compile(r"[A-Za-z][\w'-]*")
_DIGIT = re.compile(r"\d")
_DECISION = re.compile(
    r"\b(decid\w*|agree\w*|will|must|shall|need(?:s|ed)? to|plan(?:s|ned)?|chose|choose|approv\w*|confirm\w*|"
    r"deadline|due|budget|remember|named?|called|prefer\w*|settled|final|require\w*|never|always)\b",
    re.IGNORECASE,
)
_DATE = re.compile(
    r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\b|\b(mon|tues|wednes|thurs|fri|satur|sun)day\b",
    re.IGNORECASE,
)
_FILLER = frozenset({"i", "i'm", "i'll", "i've", "ok", "okay", "thanks", "thank", "sure", "great", "hi", "hello", "yes", "no"})


def header(count: int) -> str:
    return f"[Summary of {count} earlier messages]"


def message_text(message: Mapping[str, Any]) -> str:
    """The text a message carries: its content (text parts of a list) and its tool calls' arguments."""
    content = message.get("content")
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts.append(f"{function.get('name', '')}({function.get('arguments', '')})")
    return "\n".join(parts)


def score(sentence: str) -> int:
    """How many facts a sentence seems to carry: digits, proper nouns, dates and decision words."""
    words = _WORD.findall(sentence)
    if len(words) < 3 and not _DIGIT.search(sentence):
        return 0
    points = 2 * min(len(_DIGIT.findall(sentence)), 2)
    proper = sum(1 for w in words[1:] if w[0].isupper() and w.lower() not in _FILLER)
    points += min(proper, 3)
    points += 2 * min(len(_DECISION.findall(sentence)), 2)
    points += 2 if _DATE.search(sentence) else 0
    points += 1 if _IDENTIFIER.search(sentence) else 0
    return points


def sentences(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(role, sentence) for every sentence of the messages, in order."""
    out = []
    for message in messages:
        role = str(message.get("role", "user"))
        for piece in _SENTENCE.split(message_text(message)):
            piece = piece.strip()
            if piece:
                out.append((role, piece[:MAX_SENTENCE_CHARS]))
    return out


def extractive(messages: Sequence[Mapping[str, Any]], max_chars: int) -> str:
    """The fact-carrying sentences of ``messages`` within ``max_chars``, densest first, shown in order."""
    found = sentences(messages)
    seen = Counter(text for _, text in found)
    # A sentence said again and again (boilerplate advice, a repeated greeting) carries less than one said once.
    ranked = sorted(((score(text) - (2 if seen[text] > 1 else 0), -i) for i, (_, text) in enumerate(found)), reverse=True)
    chosen: list[int] = []
    said: set[str] = set()  # a sentence repeated across turns is worth one line
    used = 0
    for points, negative in ranked:
        if points <= 0:
            break
        role, text = found[-negative]
        cost = len(role) + len(text) + 4
        if used + cost > max_chars or text in said:
            continue
        said.add(text)
        chosen.append(-negative)
        used += cost
    return "\n".join(f"- {found[i][0]}: {found[i][1]}" for i in sorted(chosen))


def transcript(messages: Sequence[Mapping[str, Any]], max_chars: int) -> str:
    """The messages as "role: text" lines for a model to summarize; the fact-carrying sentences when too long."""
    full = "\n".join(f"{m.get('role', 'user')}: {message_text(m)}" for m in messages)
    if len(full) <= max_chars:
        return full
    return extractive(messages, max_chars)


def summary_key(tenant: str, summarizer: str, room: int, messages: Sequence[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    digest.update(f"{summarizer}\0{room}\0".encode())
    for message in messages:
        digest.update(orjson.dumps(message, option=orjson.OPT_SORT_KEYS))
        digest.update(b"\0")
    return f"{KEY_PREFIX}{{{tenant}}}:{digest.hexdigest()}"


@dataclass(frozen=True, slots=True)
class Summary:
    text: str  # the body, without the header
    source: str  # "extractive" | "model" | "cached" | "extractive (model timeout|error|empty|echo)"
    cost_nusd: int = 0


class Summarizer:
    """Writes (or finds) the summary of dropped turns; the I/O side of this module."""

    def __init__(
        self,
        store: CacheStore,
        providers: Mapping[str, Provider],
        models: Mapping[str, ModelConfig],
        price_of: Callable[[str], Price],
        *,
        timeout: float = 10.0,
        ttl: float = 86_400.0,
        input_tokens: int = 1200,
    ):
        self._store = store
        self._providers = providers
        self._models = models
        self._price_of = price_of
        self._timeout = timeout
        self._ttl = ttl
        self._input_chars = input_tokens * CHARS_PER_TOKEN
        self._writing = TaskSet("summary-store")

    async def summarize(self, messages: Sequence[Mapping[str, Any]], room: int, summarizer: str, tenant: str) -> Summary:
        """A summary of ``messages`` in about ``room`` tokens by ``summarizer`` (a model name or "extractive")."""
        if summarizer == EXTRACTIVE or summarizer not in self._providers:
            return Summary(extractive(messages, room * CHARS_PER_TOKEN), EXTRACTIVE)
        key = summary_key(tenant, summarizer, room, messages)
        cached = await self._cached(key)
        if cached is not None:
            return Summary(cached, "cached")
        made = await self._by_model(messages, room, summarizer)
        if made.source == "model":
            self._writing.spawn(self._store_summary(key, made.text))
        return made

    async def _by_model(self, messages: Sequence[Mapping[str, Any]], room: int, name: str) -> Summary:
        target = self._models[name]
        prompt = SLM_PROMPT.format(transcript=transcript(messages, self._input_chars))
        payload = {
            "model": target.target_model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": room,
            "temperature": 0,
            "stream": False,
        }
        call = Call("chat/completions", orjson.dumps(payload), payload, False, target)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._providers[name].send(call)
            data = orjson.loads(reply.body)
        except (ThriftyError, TimeoutError, orjson.JSONDecodeError) as exc:
            why = "timeout" if isinstance(exc, TimeoutError) else "error"
            log.warning("summarizer %s failed (%s); using the extractive summary", name, type(exc).__name__)
            return Summary(extractive(messages, room * CHARS_PER_TOKEN), f"extractive (model {why})")
        usage = usage_from_openai(data.get("usage")) if isinstance(data, dict) else None
        cost = cost_nusd(self._price_of(name), usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) if usage else 0
        text = _reply_text(data).strip()
        if not text or _ECHO in text:  # a base model (Gemma 3 270M here) tends to repeat the prompt instead
            why = "echo" if text else "empty"
            return Summary(extractive(messages, room * CHARS_PER_TOKEN), f"extractive (model {why})", cost)
        return Summary(text, "model", cost)

    async def _cached(self, key: str) -> str | None:
        try:
            raw = await self._store.get(key)
        except Exception:  # a defect in a store is never a reason to fail the request
            log.exception("summary cache lookup failed")
            return None
        return raw.decode("utf-8", "replace") if raw else None

    async def _store_summary(self, key: str, text: str) -> None:
        try:
            await self._store.set(key, text.encode(), self._ttl)
        except Exception:
            log.exception("summary cache store failed")

    async def close(self) -> None:
        await self._writing.drain()


def _reply_text(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""
