"""Scrubbing of secrets from anything a client or a log could see.

Upstream API keys never leave the proxy: every upstream error message and every log
record passes through :class:`Redactor`, which replaces the configured keys and anything
shaped like a provider key (``sk-...``, ``sk-ant-...``) with ``[redacted]``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

_KEY_SHAPES = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-*.]{8,}")


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()):
        literal = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        parts = [re.escape(s) for s in literal]
        self._literal = re.compile("|".join(parts)) if parts else None

    def __call__(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub("[redacted]", text)
        return _KEY_SHAPES.sub("[redacted]", text)


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs the formatted message of every record."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
