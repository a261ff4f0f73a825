"""The tests file of ``sluice test`` (:mod:`sluice.pipeline_tests`): its keys, and its loading.

A tests file sits beside its pipeline: ``pipelines/shop.tests.yaml`` for
``pipelines/shop.yaml`` (:func:`default_tests_file`). Its keys are declared once,
:data:`TESTS_SPEC` (``sluice.spec``, as a pipeline's are); it is read with marks
(:mod:`sluice.config.yamlmarks`), validated against the spec's JSON Schema and worded as the
pipeline loader words its errors, then checked for what a schema cannot say (payload or body,
keys that go with one expectation only, a hosting pipeline's keys, unique names). Every problem
is reported at once, each at ``file:line:col`` with its key path (:class:`ConfigError`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator

from sluice.config.load import describe_error, leaf_errors, show_value  # the loader's wording
from sluice.config.model import PipelineConfig
from sluice.config.readfile import read_yaml_file
from sluice.config.yamlmarks import Marks, PathKey, load_marked
from sluice.errors import ConfigError, ConfigIssue
from sluice.message import is_json
from sluice.spec import REQUIRED, Field, Kind, ObjectSpec

Expect = Literal["result", "retry", "reject", "filtered", "dead_lettered"]
EXPECTATIONS: tuple[Expect, ...] = ("result", "retry", "reject", "filtered", "dead_lettered")
WITH_ERROR: tuple[Expect, ...] = ("retry", "reject", "dead_lettered")
JSON_KINDS: tuple[Kind, ...] = ("object", "array", "string", "number", "integer", "boolean",
                                "null")
DEFAULT_CONTENT_TYPE = "application/json"
TESTS_SUFFIX = ".tests.yaml"
TESTS_FILE = "a tests file: a YAML mapping with `cases`, a list of cases (name, payload, expect)"

CASE_SPEC = ObjectSpec(
    Field("name", "string", "The case's name: unique in the file; --case runs it alone.",
          default=REQUIRED),
    Field("payload", JSON_KINDS, "The message's payload: any JSON value, JSON-encoded under a "
          "JSON content_type; under another content type a string, sent as its text. Give "
          "payload or body."),
    Field("body", "string", "The message's body as raw text, sent as it is (e.g. a JSON body "
          "that does not parse). Give payload or body."),
    Field("content_type", "string", "The message's content type.",
          default=DEFAULT_CONTENT_TYPE),
    Field("headers", "object", "The message's headers: a mapping of names to strings."),
    Field("key", "string", "The message's key."),
    Field("tenant", "string", "A hosting pipeline's task: its tenant (default: the "
          "pipeline's tenant)."),
    Field("function", "string", "A hosting pipeline's task: the function it runs (default: "
          "default)."),
    Field("expect", "string", "The outcome expected: result (the handler succeeded), retry "
          "(its first attempt raised a retryable error), reject (its first attempt failed for "
          "good), filtered (the pipeline's filter drops it), dead_lettered (it ends in the "
          "dead letter: refused by the schema, rejected, or still failing after "
          "consumer.retry.max_attempts attempts).", default=REQUIRED, enum=EXPECTATIONS),
    Field("result", JSON_KINDS, "With expect: result, the result's value, compared as JSON."),
    Field("result_contains", ("object", "array"), "With expect: result, a part of the result: "
          "each key given must be there with a matching value (recursively)."),
    Field("error_type", "string", "With retry, reject or dead_lettered: the error's type "
          "(the exception's class name, Reject, InvalidPayload, UnknownFunction, ...)."),
    Field("error_contains", "string", "With retry, reject or dead_lettered: a part of the "
          "error's message."),
)

TESTS_SPEC = ObjectSpec(
    Field("cases", "array", "The cases, run in order.", default=REQUIRED,
          items=Field("case", "object", "One input message and its expected outcome.",
                      fields=CASE_SPEC)),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One case of a tests file, validated (see :data:`CASE_SPEC`)."""

    name: str
    body: bytes
    content_type: str
    key: str | None
    headers: Mapping[str, str]
    tenant: str | None
    function: str | None
    expect: Expect
    result_given: bool  # ``result:`` given (its value may be null)
    result: Any
    result_contains: Any  # None: not given
    error_type: str | None
    error_contains: str | None

    def described(self) -> str:
        """What it expects, in a few words: ``retry ConnectionError``, ``result``."""
        return f"{self.expect} {self.error_type}" if self.error_type else self.expect


def default_tests_file(pipeline_file: Path) -> Path:
    """Where a pipeline's tests file is: beside it, ``<name>.tests.yaml``."""
    return pipeline_file.with_name(pipeline_file.stem + TESTS_SUFFIX)


def load_cases(path: Path, config: PipelineConfig) -> list[Case]:
    """The cases of the tests file at ``path`` for the pipeline ``config``; raise
    :class:`ConfigError` with every problem, each at its ``file:line:col`` and key."""
    doc, marks, issues = load_marked(read_yaml_file(path, expected=TESTS_FILE), str(path),
                                     expected=TESTS_FILE)
    if issues:
        raise ConfigError(issues)
    if not isinstance(doc, dict):
        raise ConfigError([marks.issue((), f"expected {TESTS_FILE}, got {show_value(doc)}")])
    issues = _schema_issues(doc, marks)
    if not issues and not doc["cases"]:
        issues.append(marks.issue(("cases",), "expected at least one case, got none"))
    if issues:
        raise ConfigError(issues)
    first: dict[str, tuple[int, int]] = {}  # a case's name → (index, line) of its first case
    cases: list[Case] = []
    for index, raw in enumerate(doc["cases"]):
        at: PathKey = ("cases", index)
        found = list(_case_issues(raw, at, marks, config))
        earlier, line = first.setdefault(raw["name"], (index, marks.value_at((*at, "name"))[0]))
        if earlier != index:
            found.append(marks.issue((*at, "name"), f"case {raw['name']!r} is also named on "
                                     f"line {line}; give each case its own name"))
        issues.extend(found)
        if not found:
            cases.append(_case_of(raw))
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.col)))
    return cases


def _schema_issues(doc: dict[str, Any], marks: Marks) -> list[ConfigIssue]:
    validator = Draft202012Validator(TESTS_SPEC.json_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.path])
    described = (describe_error(e, marks) for e in leaf_errors(errors))
    issues = {str(issue): issue for issue in described}
    return sorted(issues.values(), key=lambda i: (i.line, i.col))


def _case_issues(raw: Mapping[str, Any], at: PathKey, marks: Marks,
                 config: PipelineConfig) -> Iterable[ConfigIssue]:
    """What the schema cannot say about one case."""
    given = {k for k in raw if k != "name"}
    if {"payload", "body"} <= given:
        yield marks.issue((*at, "body"), "give payload (a JSON value) or body (raw text), "
                          "not both", at_key=True)
    elif not {"payload", "body"} & given:
        yield marks.issue(at, "missing required key 'payload' (or 'body'): the message's "
                          "content")
    for key in sorted(given & {"result", "result_contains"}):
        if raw["expect"] != "result":
            yield marks.issue((*at, key), f"{key} goes with expect: result; this case expects "
                              f"{raw['expect']}", at_key=True)
    if {"result", "result_contains"} <= given:
        yield marks.issue((*at, "result_contains"), "give result or result_contains, not "
                          "both", at_key=True)
    for key in sorted(given & {"error_type", "error_contains"}):
        if raw["expect"] not in WITH_ERROR:
            yield marks.issue((*at, key), f"{key} goes with expect: {', '.join(WITH_ERROR)}; "
                              f"this case expects {raw['expect']}", at_key=True)
    for key in sorted(given & {"tenant", "function"}):
        if config.tenancy is None:
            yield marks.issue((*at, key), f"{key} is for a hosting pipeline (one with a "
                              f"tenancy: key); pipeline {config.name!r} has none", at_key=True)
    content_type = raw.get("content_type", DEFAULT_CONTENT_TYPE)
    if "payload" in raw and not is_json(content_type) and not isinstance(raw["payload"], str):
        yield marks.issue((*at, "payload"), f"under content_type {content_type!r} (not JSON) "
                          f"the payload is sent as text: expected a string, got "
                          f"{show_value(raw['payload'])}")
    for name, value in (raw.get("headers") or {}).items():
        if not isinstance(value, str):
            yield marks.issue((*at, "headers", name), f"expected a string, got {show_value(value)} "
                              "(header values are text: quote it)")
    for key in sorted(given & {"payload", "result", "result_contains"}):
        try:
            _encoded(raw[key])
        except (TypeError, ValueError) as exc:
            yield marks.issue((*at, key), f"expected a JSON value: {exc} (quote a date or "
                              "time meant as text)")


def _encoded(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _case_of(raw: Mapping[str, Any]) -> Case:
    content_type = str(raw.get("content_type", DEFAULT_CONTENT_TYPE))
    if "body" in raw:
        body = str(raw["body"]).encode()
    elif is_json(content_type):
        body = _encoded(raw["payload"])
    else:
        body = str(raw["payload"]).encode()
    return Case(
        name=raw["name"], body=body, content_type=content_type, key=raw.get("key"),
        headers=dict(raw.get("headers") or {}), tenant=raw.get("tenant"),
        function=raw.get("function"), expect=raw["expect"], result_given="result" in raw,
        result=raw.get("result"), result_contains=raw.get("result_contains"),
        error_type=raw.get("error_type"), error_contains=raw.get("error_contains"))


def select(cases: Sequence[Case], names: Sequence[str]) -> tuple[list[Case], list[str]]:
    """The cases named in ``names`` (all of them when none is), and the names no case has."""
    if not names:
        return list(cases), []
    known = {c.name for c in cases}
    return [c for c in cases if c.name in names], [n for n in names if n not in known]
