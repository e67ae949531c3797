"""Typed readers of parsed YAML values: each names the key and the line of a bad value.

Shared by every file an admin edits (the config here, routing policies later), so a wrong
type, an unknown key or a missing field is reported the same way everywhere:
``thrifty.yaml:12: server.port: must be an integer``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.yamlsource import Document, Path


def read_section(doc: Document, path: Path, data: Any, known: set[str]) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise doc.error(path, "must be a mapping")
    reject_unknown(doc, path, data, known)
    return data


def reject_unknown(doc: Document, path: Path, data: dict[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            raise doc.error((*path, key), f"unknown key; expected one of {', '.join(sorted(known))}")


def read_str(doc: Document, path: Path, value: Any, *, required: bool = False) -> str:
    if value is None or value == "":
        if required:
            raise doc.error(path, "is required")
        return ""
    if not isinstance(value, str):
        raise doc.error(path, "must be a string")
    return value


def _numeric(value: Any, kind: type[int] | type[float]) -> Any:
    """A number given as text (``port: ${PORT}`` substitutes a string) read as a number."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


def read_int(doc: Document, path: Path, value: Any, low: int, high: int | None = None) -> int:
    value = _numeric(value, int)
    if isinstance(value, bool) or not isinstance(value, int):
        raise doc.error(path, "must be an integer")
    if value < low or (high is not None and value > high):
        raise doc.error(path, f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
    return value


def read_seconds(doc: Document, path: Path, value: Any) -> float:
    value = _numeric(value, float)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise doc.error(path, "must be a positive number of seconds")
    return float(value)


def read_money(
    doc: Document, path: Path, value: Any, what: str = "a number (USD per 1M tokens)", sign: str = "a non-negative number"
) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise doc.error(path, f"must be {what}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise doc.error(path, f"must be {what}") from None
    if not amount.is_finite() or amount < 0:
        raise doc.error(path, f"must be {sign}")
    return amount
