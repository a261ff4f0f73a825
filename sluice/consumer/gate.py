"""The gate before the handler: a pipeline's payload ``schema`` and its ``filter``.

The consumer loop asks :meth:`Gate.check` about each claimed message before it runs the
handler; :func:`gate_for` gives ``None`` for a pipeline with neither key, and the loop then
asks nothing (no cost). The rules, in the order they apply to a message:

1. The payload is decoded once, and only when the schema or the filter reads it (a filter on
   ``headers`` and ``key`` alone never decodes the body). JSON content types decode to their
   value, ``text/*`` to a string, anything else stays binary. A JSON body that does not parse
   is invalid: ``Verdict(run=False, invalid="the body is not valid JSON (<type>): <why>")``.
2. Schema first: a payload that fails the schema (Draft 2020-12) is invalid,
   ``invalid="schema: <json path>: <message>"`` (up to 3 errors, ``; `` between them, ``; ...``
   when there are more), even if the filter would have dropped it: a malformed message is
   dead-lettered, never silently dropped. A binary payload fails any schema (a schema
   describes JSON). ``format`` is an annotation, not checked (the Draft 2020-12 default).
3. Then the filter, a JMESPath expression evaluated on
   ``{"payload": <decoded payload>, "headers": {...}, "key": <str or null>}`` (a binary payload
   is ``null`` there). A truthy result, in JMESPath's sense, runs the message; a falsy one
   (``false``, ``null``, ``""``, ``[]``, ``{}``; ``0`` is truthy) drops it:
   ``Verdict(run=False)``, which the loop records FILTERED.
4. An ordering comparison (``<``, ``<=``, ``>``, ``>=``) of values that are not both numbers or
   both strings is ``null``, as the JMESPath specification says (the library raises there), so
   ``payload.amount > `100``` on a string amount drops the message.
5. An expression that fails on a message (a function given the wrong type, e.g.
   ``length(payload.n)`` on a number) makes it invalid: ``invalid="filter: ..."``; it is
   dead-lettered rather than dropped, since the filter could not say.
6. Everything is compiled once, in :func:`gate_for`; a check never raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from numbers import Number
from typing import Any

from jmespath.visitor import TreeInterpreter

from sluice.config.model import PipelineConfig
from sluice.config.payload_rules import compile_filter, make_validator, reads_payload
from sluice.message import decode_payload

MAX_SCHEMA_ERRORS = 3
MAX_MESSAGE_CHARS = 200  # of one schema error (a message may quote the whole instance)


@dataclass(frozen=True, slots=True)
class Verdict:
    run: bool  # True: hand to the handler
    invalid: str | None = None  # set (and run False): the payload fails the schema / cannot be
    # decoded; the reason for the dead letter


RUN = Verdict(True)
DROP = Verdict(False)


def truthy(value: Any) -> bool:
    """JMESPath's truth: false, null, and an empty string, list or object are false; anything
    else (0 included) is true."""
    if value is None or value is False:
        return False
    if isinstance(value, str | list | dict):
        return len(value) > 0
    return True


def _number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


class _Interpreter(TreeInterpreter):
    """The library's interpreter, with ordering comparisons as the specification has them
    (rule 4)."""

    def visit_comparator(self, node: Any, value: Any) -> Any:
        op = node["value"]
        if op in ("eq", "ne"):
            return super().visit_comparator(node, value)
        left = self.visit(node["children"][0], value)
        right = self.visit(node["children"][1], value)
        if (_number(left) and _number(right)) or (isinstance(left, str)
                                                  and isinstance(right, str)):
            return self.COMPARATOR_FUNC[op](left, right)
        return None


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Gate:
    """A pipeline's schema and filter, compiled (see the rules)."""

    __slots__ = ("_filter", "_interpreter", "_needs_payload", "_validator")

    def __init__(self, filter_expression: str | None,
                 schema: Mapping[str, Any] | None) -> None:
        parsed = compile_filter(filter_expression) if filter_expression is not None else None
        self._filter = parsed.parsed if parsed is not None else None
        self._interpreter = _Interpreter()
        self._validator = make_validator(schema) if schema is not None else None
        self._needs_payload = self._validator is not None or (
            self._filter is not None and reads_payload(self._filter))

    def check(self, body: bytes, content_type: str, key: str | None,
              headers: Mapping[str, str]) -> Verdict:
        payload: Any = None
        if self._needs_payload:
            try:
                payload = decode_payload(body, content_type)
            except ValueError as exc:  # only a JSON type raises (rule 1)
                return Verdict(False, f"the body is not valid JSON ({content_type}): {exc}")
            if self._validator is not None:
                problem = _schema_problem(self._validator, payload, content_type)
                if problem is not None:
                    return Verdict(False, f"schema: {problem}")
        if self._filter is None:
            return RUN
        document = {"payload": None if isinstance(payload, bytes) else payload,
                    "headers": headers if type(headers) is dict else dict(headers), "key": key}
        try:
            result = self._interpreter.visit(self._filter, document)
        except Exception as exc:  # rule 5: never raised to the loop
            return Verdict(False, _short(f"filter: cannot be evaluated on this message: "
                                         f"{exc}", 2 * MAX_MESSAGE_CHARS))
        return RUN if truthy(result) else DROP


def _schema_problem(validator: Any, payload: Any, content_type: str) -> str | None:
    """Up to MAX_SCHEMA_ERRORS of the payload's errors, ``<json path>: <message>`` each, or
    None when it satisfies the schema (rule 2)."""
    if isinstance(payload, bytes):
        return (f"$: the body is binary ({content_type}), not JSON; a schema checks JSON "
                "payloads (send them as application/json)")
    try:
        errors = list(islice(validator.iter_errors(payload), MAX_SCHEMA_ERRORS + 1))
    except Exception as exc:  # an unresolvable $ref is refused at load; never raised here
        return _short(f"$: the schema cannot be applied: {exc}", 2 * MAX_MESSAGE_CHARS)
    if not errors:
        return None
    shown = "; ".join(f"{e.json_path}: {_short(str(e.message), MAX_MESSAGE_CHARS)}"
                      for e in errors[:MAX_SCHEMA_ERRORS])
    return shown + ("; ..." if len(errors) > MAX_SCHEMA_ERRORS else "")


def gate_for(config: PipelineConfig) -> Gate | None:
    """The gate of ``config``; None when it has neither ``filter`` nor ``schema``."""
    if config.filter is None and config.schema is None:
        return None
    return Gate(config.filter, config.schema)
