"""Token counting with tiktoken, offline: used only where the upstream reports no usage.

Encodings are loaded on first use (or at start-up for deployments that will surely count:
local models, whose streams carry no usage, and budgets) and counting on the request path
runs off the event loop, so a first load never stalls other requests.

The upstream's ``usage`` is the truth. thrifty counts tokens itself only when none comes
back (llama.cpp streams, a client that disconnects mid-stream, an upstream that dies) and,
later, for pruning decisions. tiktoken downloads its BPE files on first use, which fails
offline; litellm's package carries cl100k_base and o200k_base, so ``TIKTOKEN_CACHE_DIR`` is
pointed there (unless already set) before the first encoding is loaded. Non-OpenAI models
(Llama, Gemma, Claude) are counted with o200k_base: an estimate, flagged as "counted".
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import tiktoken

# Per-message framing in OpenAI's chat format (role, separators), one more for a `name`, and the
# reply primer: the counts of OpenAI's cookbook (How_to_count_tokens_with_tiktoken), which match the API.
_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMER = 3
_IMAGE_TOKENS = 85
_CL100K_PREFIXES = ("gpt-3.5", "gpt-4-", "gpt-4", "text-embedding")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt")


def litellm_tokenizer_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return path if path.is_dir() else None


class TokenCounter:
    """Loads each encoding once, on first use (call :meth:`warm` at start-up, off the loop)."""

    def __init__(self) -> None:
        if "TIKTOKEN_CACHE_DIR" not in os.environ:
            directory = litellm_tokenizer_dir()
            if directory is not None:
                os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
        self._encodings: dict[str, tiktoken.Encoding] = {}

    def warm(self, models: Iterable[str] = ("gpt-4o",)) -> None:
        """Load the encodings these models use (each holds 30 to 70 MB: only what is needed)."""
        for model in models:
            self._encoding(self.encoding_name(model))

    def ready(self, model: str) -> bool:
        """True when counting for ``model`` needs no encoding to be loaded first (a second or so)."""
        return self.encoding_name(model) in self._encodings

    def _encoding(self, name: str) -> tiktoken.Encoding:
        encoding = self._encodings.get(name)
        if encoding is None:
            encoding = self._encodings[name] = _load(name)
        return encoding

    @staticmethod
    def encoding_name(model: str) -> str:
        name = model.rsplit("/", 1)[-1].lower()
        if name.startswith(_O200K_PREFIXES):
            return "o200k_base"
        if name.startswith(_CL100K_PREFIXES):
            return "cl100k_base"
        return "o200k_base"

    def encoding_for(self, model: str) -> tiktoken.Encoding:
        return self._encoding(self.encoding_name(model))

    def count_text(self, text: str, model: str) -> int:
        if not text:
            return 0
        return len(self.encoding_for(model).encode(text, disallowed_special=()))

    def count_messages(self, messages: Iterable[Any], model: str) -> int:
        encoding = self.encoding_for(model)
        total = _REPLY_PRIMER
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE + (_PER_NAME if isinstance(message.get("name"), str) else 0)
            for text in _texts(message):
                total += len(encoding.encode(text, disallowed_special=()))
            content = message.get("content")
            if isinstance(content, list):
                total += _IMAGE_TOKENS * sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
        return total


def estimate_tokens(content: Any) -> int:
    """About four bytes of text a token: for the rare record not worth loading a tokenizer for."""
    if not content:
        return 0
    text = content if isinstance(content, str) else orjson.dumps(content).decode()
    return max(1, len(text.encode()) // 4)


def _load(name: str) -> tiktoken.Encoding:
    """Load an encoding and give back what counting does not need.

    An Encoding keeps, beside its Rust tokenizer, a Python dict of every token's bytes (200k
    entries, about 27 MB for o200k_base) used only to pickle it; counting (``encode``) runs
    in the Rust core alone, so the dict is dropped and freed memory returned to the system.
    That keeps a worker that must count near 110 MB resident instead of 140 MB.
    """
    encoding = tiktoken.get_encoding(name)
    ranks = getattr(encoding, "_mergeable_ranks", None)
    if isinstance(ranks, dict) and len(ranks) > 1000:
        encoding._mergeable_ranks = {}
        del ranks
        gc.collect()
        _trim_heap()
    return encoding


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: the memory is reused, just not returned
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _texts(message: dict[str, Any]) -> Iterable[str]:
    for key in ("role", "name"):
        value = message.get(key)
        if isinstance(value, str):
            yield value
    content = message.get("content")
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            yield str(function.get("name", ""))
            yield str(function.get("arguments", ""))
