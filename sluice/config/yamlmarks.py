"""YAML loading that keeps where every key and value came from.

:func:`load_marked` returns the plain Python document plus a :class:`Marks` table mapping each
key path (a tuple of keys and list indexes) to the 1-based line and column of its value and of its
key. Duplicate keys are refused (PyYAML silently keeps the last one). Errors are
:class:`~sluice.errors.ConfigIssue` lists, never exceptions with tracebacks: every error of the
YAML library (reader, scanner, parser, composer, constructor) becomes one issue at its
``line:col``, and so do what the library would not catch: a value its constructor cannot build
(``2024-13-45`` read as a date), nesting deeper than :data:`MAX_DEPTH` (a ``RecursionError``
otherwise), an alias that contains itself, and aliases that expand past :data:`MAX_VALUES`.
Merge keys (``<<``) and tags on mappings or lists are refused rather than silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from sluice.errors import ConfigIssue

PathKey = tuple[str | int, ...]

MAX_DEPTH = 64  # nesting of mappings and lists; a pipeline file needs about 6
MAX_VALUES = 100_000  # values in the document once aliases are expanded

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "backspace", 0x0B: "vertical tab",
                  0x0C: "form feed", 0x1B: "ESC", 0x7F: "DEL", 0xFEFF: "byte-order mark",
                  0xFFFE: "noncharacter", 0xFFFF: "noncharacter"}


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


class _TooLarge(Exception):
    """Aliases expand the document past MAX_VALUES."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than :data:`MAX_DEPTH` with a mark (its
    recursive composer would otherwise end in a ``RecursionError``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels; expected at most "
                    f"{MAX_DEPTH} (a pipeline file needs about 6)", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_marked(text: str, file: str, *,
                expected: str = "a YAML mapping") -> tuple[Any, Marks, list[ConfigIssue]]:
    """The document, its marks, and its issues; ``expected`` names what an empty file lacks."""
    marks = Marks(file)
    issues: list[ConfigIssue] = []
    try:
        loader = _Loader(text)  # the reader checks every character here
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        return None, marks, [_yaml_issue(exc, text, file)]
    except RecursionError:  # not expected past the depth limit; never a traceback
        return None, marks, [ConfigIssue(file, 1, 1, "", f"invalid YAML: nested too deeply; "
                                         f"expected at most {MAX_DEPTH} levels")]
    if root is None:
        what = "is empty" if not text.strip() else "holds only comments"
        return None, marks, [ConfigIssue(file, 1, 1, "", f"the file {what}; expected "
                                         f"{expected}")]
    count = 0
    open_nodes: set[int] = set()  # collections on the path being built (an alias cycle)

    def add(path: PathKey, node: Node, message: str) -> None:
        line, col = _pos(node)
        issues.append(ConfigIssue(file, line, col, dotted(path), message))

    def build(node: Node, path: PathKey) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _TooLarge(path[:1])
        marks.values[path] = _pos(node)
        if isinstance(node, ScalarNode):
            return scalar(node, path)
        if id(node) in open_nodes:
            add(path, node, "an alias refers to a mapping or list that contains it; "
                "expected a value without cycles")
            return None
        kind = "mapping" if isinstance(node, MappingNode) else "list"
        if node.tag not in (_MAP_TAG, _SEQ_TAG):
            add(path, node, f"unsupported tag {node.tag!r} on a {kind}; expected a plain "
                f"{kind} (remove the tag)")
        open_nodes.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return mapping(node, path)
            return [build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            open_nodes.discard(id(node))

    def mapping(node: MappingNode, path: PathKey) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                add(path, key_node, "merge keys (<<) are not supported; write the keys out")
                continue
            if not isinstance(key_node, ScalarNode):
                add(path, key_node, "keys must be plain strings")
                continue
            key = str(key_node.value)
            child = (*path, key)
            if key in out:
                first = marks.keys[child][0]
                add(child, key_node, f"duplicate key (first set on line {first})")
                continue
            marks.keys[child] = _pos(key_node)
            out[key] = build(value_node, child)
        return out

    def scalar(node: ScalarNode, path: PathKey) -> Any:
        try:
            return loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            add(path, node, f"invalid value: {exc.problem or exc}")
        except yaml.YAMLError as exc:
            add(path, node, f"invalid value: {exc}")
        except (ValueError, OverflowError, TypeError) as exc:
            read_as = node.tag.rsplit(":", 1)[-1]
            add(path, node, f"invalid value {node.value!r} (read as a YAML {read_as}): {exc}; "
                "quote it if it is meant as text")
        return None

    try:
        document = build(root, ())
    except _TooLarge as exc:
        (top,) = exc.args  # the top-level key whose value is too large
        return None, marks, [marks.issue(top, f"the value expands to more than {MAX_VALUES:,} "
                                         "values (through aliases); expected a few", at_key=True)]
    return document, marks, issues


def _yaml_issue(exc: yaml.YAMLError, text: str, file: str) -> ConfigIssue:
    """One issue for any error the YAML library raises, at its line:col where it has one."""
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _line_col(text, exc.position)
        if isinstance(exc.character, int):
            return ConfigIssue(file, line, col, "", _bad_character(exc.character))
        return ConfigIssue(file, line, col, "", f"invalid YAML: {exc.reason}")
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid document"
        if "'\\t'" in problem:
            problem += "; indent with spaces (YAML does not allow tabs there)"
        elif "cannot start any token" in problem:
            problem += "; quote the value if it starts with this character"
        elif "mapping values are not allowed here" in problem:
            problem += " (quote a value that contains ': ')"
        elif "found another document" in problem:
            problem += " (a file holds one document)"
        where = ""
        if exc.context and exc.context_mark:
            cm = exc.context_mark
            where = f"{exc.context} (line {cm.line + 1}, column {cm.column + 1}): "
        return ConfigIssue(file, line, col, "", f"invalid YAML: {where}{problem}")
    return ConfigIssue(file, 1, 1, "", f"invalid YAML: {exc}")


def _bad_character(code: int) -> str:
    name = _CONTROL_NAMES.get(code)
    shown = f"U+{code:04X}" + (f" ({name})" if name else "")
    escape = f"\\x{code:02X}" if code <= 0xFF else f"\\u{code:04X}"
    return (f"character {shown} is not allowed in YAML (control characters other than tab "
            f"and line breaks are not); remove it, or write it as \"{escape}\" inside a "
            "double-quoted string")


def _line_col(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of the character at ``index`` (YAML's line breaks)."""
    line, start = 1, 0
    for match in _BREAK.finditer(text, 0, index):
        line, start = line + 1, match.end()
    return line, index - start + 1
