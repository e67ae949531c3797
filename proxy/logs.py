"""Logging set-up for the CLI and the server: one line per record, secrets scrubbed.

Prompt and answer text are never logged by thrifty; upstream keys are scrubbed from every
record by :class:`proxy.redact.RedactingFilter`, attached to the root handler so that
library loggers (aiohttp, asyncpg, litellm) are covered too.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from proxy.redact import RedactingFilter, Redactor


def setup_logging(secrets: Iterable[str] = (), level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor(secrets)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
