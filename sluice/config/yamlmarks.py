"""YAML loading that keeps where every key and value came from.

:func:`load_marked` returns the plain Python document plus a :class:`Marks` table mapping each
key path (a tuple of keys and list indexes) to the 1-based line and column of its value and of its
key. Duplicate keys are refused (PyYAML silently keeps the last one). Errors are
:class:`~sluice.errors.ConfigIssue` lists, never exceptions with tracebacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sluice.errors import ConfigIssue

PathKey = tuple[str | int, ...]


@dataclass
class Marks:
    file: str
    values: dict[PathKey, tuple[int, int]] = field(default_factory=dict)
    keys: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def value_at(self, path: PathKey) -> tuple[int, int]:
        """Position of the value at ``path``, or of its nearest ancestor that exists."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.values:
                return self.values[path[:end]]
        return (1, 1)

    def key_at(self, path: PathKey) -> tuple[int, int]:
        return self.keys.get(path) or self.value_at(path)

    def issue(self, path: PathKey, message: str, *, at_key: bool = False) -> ConfigIssue:
        line, col = self.key_at(path) if at_key else self.value_at(path)
        return ConfigIssue(self.file, line, col, dotted(path), message)


def dotted(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pos(node: Node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def load_marked(text: str, file: str) -> tuple[Any, Marks, list[ConfigIssue]]:
    marks = Marks(file)
    issues: list[ConfigIssue] = []
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        return None, marks, [ConfigIssue(file, line, col, "", f"invalid YAML: {what}")]
    except yaml.YAMLError as exc:
        return None, marks, [ConfigIssue(file, 1, 1, "", f"invalid YAML: {exc}")]
    if root is None:
        return None, marks, [ConfigIssue(file, 1, 1, "", "the file is empty")]

    def build(node: Node, path: PathKey) -> Any:
        marks.values[path] = _pos(node)
        if isinstance(node, MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, ScalarNode):
                    line, col = _pos(key_node)
                    issues.append(ConfigIssue(file, line, col, dotted(path),
                                              "keys must be plain strings"))
                    continue
                key = str(key_node.value)
                child = (*path, key)
                if key in out:
                    line, col = _pos(key_node)
                    first = marks.keys[child][0]
                    issues.append(ConfigIssue(file, line, col, dotted(child),
                                              f"duplicate key (first set on line {first})"))
                    continue
                marks.keys[child] = _pos(key_node)
                out[key] = build(value_node, child)
            return out
        if isinstance(node, SequenceNode):
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        try:
            return loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            line, col = _pos(node)
            issues.append(ConfigIssue(file, line, col, dotted(path), f"invalid value: {exc}"))
            return None

    document = build(root, ())
    loader.dispose()
    return document, marks, issues
