"""The savings workload format: JSON Lines, one request a line, read before a replay starts.

Each line is ``{"id", "tenant", "request": {OpenAI chat body}, "labels": {"duplicate_of",
"difficulty", "reference"}}``; unknown fields are ignored and every label may be null or
absent. A file ending in ``.gz`` is read through gzip. A malformed line stops the read with
``FILE:LINE: what`` (a :class:`ConfigError`, so the CLI prints it and exits 2) before any
request is sent: a replay of half a workload would report figures nobody asked for.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.errors import ConfigError

DIFFICULTIES = ("simple", "hard")


@dataclass(frozen=True, slots=True)
class Item:
    """One workload request and what is known about it."""

    id: str
    tenant: str
    request: dict[str, Any]
    duplicate_of: str | None = None
    difficulty: str | None = None
    reference: str | None = None
    kind: str | None = None  # the shipped workload's own tag (one-off, paraphrase, ...); informative only

    @property
    def model(self) -> str:
        return str(self.request.get("model", ""))


def _lines(path: Path) -> Iterator[bytes]:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                yield from handle
        else:
            with path.open("rb") as handle:
                yield from handle
    except (OSError, EOFError) as exc:
        raise ConfigError(f"cannot read workload: {exc}", source=str(path)) from None


def read_workload(path: str | Path, limit: int | None = None) -> list[Item]:
    """Every request of the file (the first ``limit`` ones), checked line by line."""
    path = Path(path)
    items: list[Item] = []
    seen: set[str] = set()
    for number, raw in enumerate(_lines(path), start=1):
        if not raw.strip():
            continue
        if limit is not None and len(items) >= limit:
            break
        try:
            item = parse_line(raw)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
        if item.id in seen:
            raise ConfigError(f"{path}:{number}: id {item.id!r} appears twice")
        if item.duplicate_of is not None and item.duplicate_of not in seen:
            raise ConfigError(f"{path}:{number}: duplicate_of {item.duplicate_of!r} names no earlier request")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"{path}: the workload holds no request")
    return items


def parse_line(raw: bytes | str) -> Item:
    """One line as an :class:`Item`; ``ValueError`` says what is wrong with it."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("a line must be a JSON object")
    rid, tenant, request = data.get("id"), data.get("tenant"), data.get("request")
    if not isinstance(rid, str | int) or isinstance(rid, bool) or str(rid) == "":
        raise ValueError("id: a non-empty string is required")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError("tenant: a non-empty string is required")
    request = _check_request(request)
    labels = data.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("labels: must be an object")
    duplicate_of, difficulty, reference = labels.get("duplicate_of"), labels.get("difficulty"), labels.get("reference")
    if duplicate_of is not None and not isinstance(duplicate_of, str | int):
        raise ValueError("labels.duplicate_of: must be an id or null")
    if difficulty is not None and difficulty not in DIFFICULTIES:
        raise ValueError(f"labels.difficulty: must be 'simple', 'hard' or null, not {difficulty!r}")
    if reference is not None and not isinstance(reference, str):
        raise ValueError("labels.reference: must be a string or null")
    kind = data.get("kind")
    return Item(
        id=str(rid),
        tenant=tenant,
        request=request,
        duplicate_of=None if duplicate_of is None else str(duplicate_of),
        difficulty=difficulty,
        reference=reference,
        kind=kind if isinstance(kind, str) else None,
    )


def _check_request(request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ValueError("request: an OpenAI chat completion body (an object) is required")
    if not isinstance(request.get("model"), str) or not request["model"]:
        raise ValueError("request.model: a model name is required")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("request.messages: a non-empty list is required")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"request.messages[{i}]: an object with a role is required")
    return request


def root_of(item: Item, by_id: dict[str, Item]) -> str:
    """The original a request duplicates (following duplicate_of to its end), else itself."""
    current = item
    for _ in range(len(by_id)):
        if current.duplicate_of is None or current.duplicate_of not in by_id:
            return current.id
        current = by_id[current.duplicate_of]
    return current.id


def last_user_text(messages: list[Any]) -> str:
    """The text of the last user message: what the stand-ins answer and tag."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
