"""A pipeline's payload rules as the loader checks them: its ``filter`` (a JMESPath expression)
and its ``schema`` (a JSON Schema). The consumer applies them before the handler:
:mod:`sluice.consumer.gate`.

Load-time rules, each problem one :class:`~sluice.errors.ConfigIssue` at ``file:line:col``:

1. ``filter`` compiles as JMESPath, and every function it calls exists and is given its number
   of arguments (the library itself finds those only when it evaluates). The message says
   where in the expression the problem is (``at character N``, 1-based).
2. ``schema`` is a mapping (the schema inline) or a string: the path of a ``.json``, ``.yaml``
   or ``.yml`` file, relative to the pipeline file's folder (absolute as given). The file is
   read at load and its schema kept in the config; a missing or unreadable file is an issue at
   the pipeline's ``schema`` value, one that does not parse is an issue at its own
   ``line:col``. A ``.json`` file is parsed as JSON, a ``.yaml``/``.yml`` one as YAML (with the
   pipeline file's limits).
3. The schema is a valid Draft 2020-12 schema (checked against the meta-schema, ``pattern``
   regexes included): the first problem is reported, at its place in the inline schema or the
   YAML file (a JSON file's problem is reported at the pipeline's ``schema`` value, with the
   path inside the file).
4. Every ``$ref`` resolves inside the schema (or names a JSON Schema meta-schema): references
   are never fetched, at load or later.

``${VAR}`` interpolation applies to both (the loader interpolates every string of the file
first); a schema file's contents are read as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jmespath
import jsonschema_specifications  # type: ignore[import-untyped]  # (jsonschema needs it)
from jmespath import exceptions as jp_errors
from jmespath.functions import Functions
from jmespath.parser import ParsedResult
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from sluice.config.readfile import read_yaml_file
from sluice.config.yamlmarks import Marks, PathKey, dotted, load_marked
from sluice.errors import ConfigError, ConfigIssue

SCHEMA_FILE = "a JSON Schema file (.json, .yaml or .yml)"
SCHEMA_SUFFIXES = (".json", ".yaml", ".yml")
_TYPES = "array, boolean, integer, null, number, object, string"
_FUNCTIONS: Mapping[str, Any] = Functions.FUNCTION_TABLE
# Keys whose values are data, not subschemas: a "$ref" inside them is not a reference.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


class FilterError(ValueError):
    """A filter expression that does not compile; the message says why and where."""


def compile_filter(expression: str) -> ParsedResult:
    """The compiled expression; :class:`FilterError` if it does not compile (rule 1)."""
    try:
        parsed = jmespath.compile(expression)
    except jp_errors.EmptyExpressionError:
        raise FilterError("the expression is empty; expected a JMESPath expression such as "
                          "payload.kind == 'order'") from None
    except jp_errors.ParseError as exc:
        raise FilterError(_parse_error(expression, exc)) from None
    except jp_errors.JMESPathError as exc:  # not raised by compile today; never a traceback
        raise FilterError(f"not a valid JMESPath expression: {exc}") from None
    problem = _function_problem(parsed.parsed)
    if problem:
        raise FilterError(problem)
    return parsed


def _parse_error(expression: str, exc: jp_errors.ParseError) -> str:
    where = max(0, min(int(exc.lex_position or 0), len(expression)))
    shown = f"after {expression[:where]!r}" if where else "at its start"
    if isinstance(exc, jp_errors.IncompleteExpressionError):
        return f"not a valid JMESPath expression: it ends too soon ({shown})"
    if isinstance(exc, jp_errors.LexerError):
        reason = exc.message[:1].lower() + exc.message[1:]
        if exc.lexer_value == "=":
            reason += " (== compares)"
    else:
        reason = exc.msg[:1].lower() + exc.msg[1:]
    return f"not a valid JMESPath expression: {reason} at character {where + 1} ({shown})"


def _function_problem(node: Mapping[str, Any]) -> str | None:
    """An unknown function or a wrong number of arguments anywhere in the tree, else None."""
    if node.get("type") == "function_expression":
        name, args = str(node.get("value")), len(node.get("children", ()))
        spec = _FUNCTIONS.get(name)
        if spec is None:
            return (f"unknown function {name}(); JMESPath has: "
                    f"{', '.join(sorted(_FUNCTIONS))}")
        signature = spec["signature"]
        variadic = bool(signature) and bool(signature[-1].get("variadic"))
        if (args < len(signature)) if variadic else (args != len(signature)):
            wanted = f"at least {len(signature)}" if variadic else str(len(signature))
            return f"{name}() takes {wanted} argument(s), got {args}"
    for child in node.get("children", ()):
        if isinstance(child, Mapping):
            problem = _function_problem(child)
            if problem:
                return problem
    return None


# Nodes whose first child is evaluated on the current value and the rest on its result.
_CHAINS = frozenset({"subexpression", "index_expression", "projection", "value_projection",
                     "filter_projection", "flatten", "pipe", "key_val_pair", "expref"})
# Nodes whose every child is evaluated on the current value.
_ALL = frozenset({"comparator", "and_expression", "or_expression", "not_expression",
                  "function_expression", "multi_select_list", "multi_select_dict"})
_NONE = frozenset({"literal", "index", "slice"})


def reads_payload(node: Mapping[str, Any]) -> bool:
    """Whether the expression, evaluated on ``{"payload", "headers", "key"}``, may read the
    payload (so it has to be decoded). Conservative: an unknown node reads it."""
    kind = node.get("type")
    children = [c for c in node.get("children", ()) if isinstance(c, Mapping)]
    if kind == "field":
        return node.get("value") == "payload"
    if kind in _NONE:
        return False
    if kind in _CHAINS:
        return bool(children) and reads_payload(children[0])
    if kind in _ALL:
        return any(reads_payload(c) for c in children)
    return True  # current (@), identity (*), and whatever a later JMESPath adds


def make_validator(schema: Mapping[str, Any]) -> Any:
    """A Draft 2020-12 validator of a checked schema that never fetches a reference (an
    explicit registry: the meta-schemas and the schema itself)."""
    return Draft202012Validator(schema, registry=Registry())


def schema_problems(schema: Mapping[str, Any]) -> list[tuple[PathKey, str]]:
    """(path inside the schema, message) of what makes ``schema`` unusable (rules 3, 4)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path: PathKey = tuple(exc.path)
        if path and path[-1] == "type" and exc.validator == "anyOf":
            reason = (f"{exc.instance!r} is not a JSON Schema type; expected one of {_TYPES}, "
                      "or a list of them")
        elif exc.validator == "format" and exc.validator_value == "regex":
            reason = f"{exc.instance!r} is not a valid regular expression ({_regex_error(exc)})"
        else:
            reason = str(exc.message)
        return [(path, f"not a valid JSON Schema (Draft 2020-12): {reason}")]
    return list(_unresolved_refs(schema))


def _regex_error(exc: SchemaError) -> str:
    try:
        re.compile(str(exc.instance))
    except re.error as err:
        return str(err)
    return "refused"


def _unresolved_refs(schema: Mapping[str, Any]) -> Iterable[tuple[PathKey, str]]:
    specs: Registry[Any] = jsonschema_specifications.REGISTRY
    root = DRAFT202012.create_resource(schema)
    stack: list[tuple[Any, PathKey, Any]] = [(schema, (), specs.resolver_with_root(root))]
    while stack:
        node, path, resolver = stack.pop()
        if isinstance(node, list):
            stack.extend((v, (*path, i), resolver) for i, v in enumerate(node))
            continue
        if not isinstance(node, Mapping):
            continue
        if path and isinstance(node.get("$id"), str):
            resolver = resolver.in_subresource(DRAFT202012.create_resource(node))
        for key in ("$ref", "$dynamicRef"):
            ref = node.get(key)
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    yield (*path, key), (f"{key} {ref!r} does not resolve: only references "
                                         "inside this schema (or to a JSON Schema meta-schema) "
                                         "are followed; nothing is fetched")
        stack.extend((v, (*path, k), resolver) for k, v in node.items()
                     if k not in _DATA_KEYWORDS)


def filter_issues(doc: Mapping[str, Any], marks: Marks) -> list[ConfigIssue]:
    expression = doc.get("filter")
    if not isinstance(expression, str):
        return []
    try:
        compile_filter(expression)
    except FilterError as exc:
        return [marks.issue(("filter",), str(exc))]
    return []


def load_schema(doc: Mapping[str, Any], marks: Marks,
                file: Path | None) -> tuple[dict[str, Any] | None, list[ConfigIssue]]:
    """The pipeline's payload schema (inline, or read from its file), and its issues."""
    value = doc.get("schema")
    if value is None:
        return None, []
    if isinstance(value, Mapping):
        schema = dict(value)
        return schema, [marks.issue(("schema", *path), message)
                        for path, message in schema_problems(schema)]
    if not isinstance(value, str):  # the pipeline's own schema has refused it already
        return None, []
    return _schema_file(value, marks, file)


def _schema_file(value: str, marks: Marks,
                 file: Path | None) -> tuple[dict[str, Any] | None, list[ConfigIssue]]:
    where = ("schema",)
    path = Path(value)
    if not path.is_absolute() and file is not None:
        path = file.parent / path
    if path.suffix.lower() not in SCHEMA_SUFFIXES:
        return None, [marks.issue(where, f"expected a mapping (the schema) or the path of "
                                  f"{SCHEMA_FILE}, got {value!r}")]
    try:
        text = read_yaml_file(path, expected=SCHEMA_FILE)
    except ConfigError as exc:
        found = exc.issues[0]
        if (found.line, found.col) != (1, 1):  # inside the file (an encoding error): there
            return None, list(exc.issues)
        relative = "" if Path(value).is_absolute() or file is None else (
            " (relative to the pipeline file's folder)")
        return None, [marks.issue(where, f"schema file {str(path)!r}{relative}: "
                                  f"{found.message}")]
    schema_marks: Marks | None = None
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            return None, [ConfigIssue(str(path), err.lineno, err.colno, "",
                                      f"not valid JSON: {err.msg}; expected {SCHEMA_FILE}")]
    else:
        loaded, schema_marks, issues = load_marked(text, str(path), expected=SCHEMA_FILE)
        if issues:
            return None, issues
    if not isinstance(loaded, dict):
        return None, [marks.issue(where, f"schema file {str(path)!r} holds {_kind(loaded)}; "
                                  "expected a JSON Schema (a mapping)")]
    problems = schema_problems(loaded)
    if schema_marks is not None:
        return loaded, [schema_marks.issue(p, m) for p, m in problems]
    return loaded, [marks.issue(where, f"schema file {str(path)!r}"
                                f"{': ' + dotted(p) if p else ''}: {m}") for p, m in problems]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value!r}"
