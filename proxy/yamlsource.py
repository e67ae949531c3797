"""YAML read with line numbers, for every file an admin edits (config, policies).

PyYAML's composer keeps a mark on every node; this module turns the node tree into plain
Python data and keeps, beside it, the line of every key path, so a validator can say
``thrifty.yaml:12: models[1].base_url: ...`` instead of a bare message. Syntax errors become
:class:`ConfigError` with the line PyYAML found. ``${NAME}`` in a string is replaced by
the environment variable NAME (``${NAME:-default}`` gives a default), and a missing
variable is an error naming the key and the line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from proxy.errors import ConfigError

Path = tuple[str | int, ...]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Document:
    """Parsed YAML: the data, the source name and the line of each key path."""

    data: Any
    source: str
    lines: Mapping[Path, int] = field(default_factory=dict)

    def line(self, path: Path) -> int | None:
        """The line of ``path``, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def error(self, path: Path, message: str) -> ConfigError:
        return ConfigError(f"{format_path(path)}: {message}", source=self.source, line=self.line(path))


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def parse(text: str, source: str, env: Mapping[str, str] | None = None) -> Document:
    """Parse ``text``; substitute ``${ENV}`` references when ``env`` is given."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"YAML syntax error: {problem}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", source=source) from None
    lines: dict[Path, int] = {}
    if node is None:
        return Document({}, source, lines)
    lines[()] = node.start_mark.line + 1
    data = _Builder(lines, source, env).build(node, ())
    return Document(data, source, lines)


class _Builder:
    def __init__(self, lines: dict[Path, int], source: str, env: Mapping[str, str] | None):
        self.lines = lines
        self.source = source
        self.env = env
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path) -> Any:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                sub = (*path, index)
                self.lines[sub] = item.start_mark.line + 1
                items.append(self.build(item, sub))
            return items
        value = self.constructor.construct_object(node, deep=True)
        if isinstance(value, str) and self.env is not None and "${" in value:
            value = _substitute(value, path, self.env, self.source, node.start_mark.line + 1)
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain scalars", source=self.source, line=line)
            key = str(self.constructor.construct_object(key_node))
            sub = (*path, key)
            if key in out:
                raise ConfigError(f"{format_path(sub)}: duplicate key", source=self.source, line=line)
            self.lines[sub] = line
            out[key] = self.build(value_node, sub)
        return out


def _substitute(value: str, path: Path, env: Mapping[str, str], source: str, line: int) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{format_path(path)}: environment variable {name} is not set", source=source, line=line)

    return _ENV_REF.sub(replace, value)
