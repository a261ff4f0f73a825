"""Pipeline files: YAML with marks → ``${VAR}`` interpolation → JSON Schema → typed model.

Every problem found is reported, each as ``file:line:col: key.path: what was expected``; the
steps after a failed one still run where they can (schema errors and import errors are reported
together), so a user fixes a file in one round.

``check_code``: whether to run the checks that load a component's own code on this machine
(a Python handler's module is imported). ``sluice validate`` and a worker run them; an API-only
load (``sluice serve --no-workers``, ``sluice submit -f``) does not, so a machine that only
submits needs the pipeline files but not the handlers' code. A worker imports the code when it
builds the handler (:func:`sluice.runtime.build_handlers`), with the same ``file:line:col``.

Pipeline names are global in a task store (task ids, queues and dead letters are kept per
name): :func:`load_pipelines` refuses two files that give one name.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from sluice import registry
from sluice.config import payload_rules
from sluice.config.destinations import duplicate_labels
from sluice.config.model import HANDLER_EXTRAS, PIPELINE_SPEC, PipelineConfig, build_model
from sluice.config.readfile import PIPELINE_FILE, read_yaml_file
from sluice.config.yamlmarks import Marks, PathKey, load_marked
from sluice.errors import ConfigError, ConfigIssue
from sluice.spec import describe_expected

SCHEMA_ID = "https://sluice.dev/schemas/pipeline.schema.json"
_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def pipeline_schema(reg: registry.Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of a pipeline file, generated from the specs in the registry (the
    default one unless given)."""
    schema = PIPELINE_SPEC.json_schema((reg or registry.default()).family_schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "sluice pipeline",
        **schema,
    }


def schema_text() -> str:
    return json.dumps(pipeline_schema(), indent=2, sort_keys=True) + "\n"


def _validator() -> Draft202012Validator:
    reg = registry.default()
    reg.load()
    return _validator_of(reg, reg.generation)


@lru_cache(maxsize=4)
def _validator_of(reg: registry.Registry, generation: int) -> Draft202012Validator:
    """The validator of ``reg``'s schema as of ``generation`` (a registration makes a new one)."""
    schema = pipeline_schema(reg)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def load_pipeline(path: str | Path, *, check_code: bool = True) -> PipelineConfig:
    """Load and validate one pipeline file; raise :class:`ConfigError` with every issue."""
    return parse_pipeline(read_yaml_file(path), str(path), check_code=check_code)


def load_pipelines(paths: Sequence[str | Path], *,
                   check_code: bool = True) -> list[PipelineConfig]:
    """Load several pipeline files to serve or run together: the issues of every file, then
    one issue per pipeline name given by more than one file (names are global in a store)."""
    configs: list[PipelineConfig] = []
    issues: list[ConfigIssue] = []
    for path in paths:
        try:
            configs.append(load_pipeline(path, check_code=check_code))
        except ConfigError as exc:
            issues.extend(exc.issues)
    issues.extend(duplicate_names(configs))
    if issues:
        raise ConfigError(issues)
    return configs


def duplicate_names(configs: Sequence[PipelineConfig]) -> list[ConfigIssue]:
    """One issue for each pipeline whose name an earlier one already has."""
    issues: list[ConfigIssue] = []
    first: dict[str, PipelineConfig] = {}
    for config in configs:
        other = first.setdefault(config.name, config)
        if other is config:
            continue
        if other.path is not None and config.path is not None and \
                other.path.resolve() == config.path.resolve():
            issues.append(config.issue((), "this file is given twice; give each file once"))
            continue
        line, col = other.marks.value_at(("name",)) if other.marks else (1, 1)
        where = f"{other.path or '<string>'}:{line}:{col}"
        tenants = (f" (there for tenant {other.tenant!r}, here for tenant {config.tenant!r}: "
                   "their tasks would be mixed)" if other.tenant != config.tenant else "")
        issues.append(config.issue(("name",), f"pipeline name {config.name!r} is also given "
                                   f"by {where}{tenants}; pipeline names are global in a task "
                                   "store: give each pipeline its own name"))
    return issues


def parse_pipeline(text: str, file: str = "<string>", *, check_code: bool = True,
                   trusted: bool = True) -> PipelineConfig:
    """``trusted=False``, for a definition put with a tenant's key (``sluice.definitions``
    invariant 3), reads nothing of the server's: ``${NAME}`` is refused (a
    ``${NAME:-default}`` gives its default), so the environment's secrets cannot be written
    into a pipeline the tenant controls, and ``schema`` must be inline, not a file's path."""
    doc, marks, issues = load_marked(text, file, expected=PIPELINE_FILE)
    if issues:
        raise ConfigError(issues)
    if not isinstance(doc, dict):
        raise ConfigError([marks.issue((), f"expected {PIPELINE_FILE}, got {show_value(doc)}")])
    doc = _interpolate(doc, (), marks, issues, trusted)
    env_paths = {i.path for i in issues}  # a value left empty by an unset variable: said once
    issues.extend(i for i in _schema_issues(doc, marks) if i.path not in env_paths)
    issues.extend(_handler_types(doc, marks))
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.col)))
    doc = _apply_defaults(doc)
    path = Path(file) if file != "<string>" else None
    issues.extend(_component_checks(doc, marks, path, check_code=check_code))
    issues.extend(_pipeline_checks(doc, marks))
    issues.extend(duplicate_labels(doc, marks))
    issues.extend(payload_rules.filter_issues(doc, marks))
    if not trusted and isinstance(doc.get("schema"), str):
        issues.append(marks.issue(("schema",), "a pipeline put with a tenant's key cannot "
                                  "read the server's files: give the schema inline"))
        doc.pop("schema")
    doc["schema"], schema_issues = payload_rules.load_schema(doc, marks, path)  # a file: read
    issues.extend(schema_issues)
    if issues:
        raise ConfigError(issues)
    return build_model(doc, path, marks)


def _interpolate(value: Any, path: PathKey, marks: Marks, issues: list[ConfigIssue],
                 environment: bool = True) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, k), marks, issues, environment)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, i), marks, issues, environment)
                for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if not environment:
            if default is not None:
                return default
            issues.append(marks.issue(
                path, f"${{{name}}}: a pipeline put with a tenant's key cannot read the "
                "server's environment; write the value itself"))
            return ""
        found = os.environ.get(name)
        if found is None:
            if default is not None:
                return default
            issues.append(marks.issue(
                path, f"environment variable {name!r} is not set (referenced as ${{{name}}}); "
                f"set it, or give a default as ${{{name}:-value}}"))
            return ""
        return found

    return _ENV.sub(substitute, value)


def _schema_issues(doc: dict[str, Any], marks: Marks) -> Iterable[ConfigIssue]:
    errors = sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.path])
    seen: set[str] = set()
    for error in leaf_errors(errors):
        issue = describe_error(error, marks)
        if str(issue) not in seen:
            seen.add(str(issue))
            yield issue


def leaf_errors(errors: Iterable[ValidationError]) -> Iterable[ValidationError]:
    """The schema errors worth saying (an ``anyOf``'s: the alternative of the value's kind)."""
    for error in errors:
        if error.validator == "anyOf":
            # Follow the alternative of the value's own kind, if one; else say what fits.
            kind = "object" if isinstance(error.instance, dict) else (
                "integer" if isinstance(error.instance, int)
                and not isinstance(error.instance, bool) else None)
            options = error.validator_value if isinstance(error.validator_value, list) else []
            index = next((i for i, o in enumerate(options) if o.get("type") == kind), None)
            sub = [e for e in error.context or () if e.schema_path
                   and e.schema_path[0] == index] if index is not None else []
            if sub:
                yield from leaf_errors(sub)
            else:
                yield error
        elif error.context:
            yield from leaf_errors(error.context)
        else:
            yield error


def describe_error(error: ValidationError, marks: Marks) -> ConfigIssue:
    """A schema error in the loader's words, at its ``file:line:col``."""
    path: PathKey = tuple(error.absolute_path)
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    kind = error.validator
    if kind == "anyOf":
        return marks.issue(path, "expected " + " or ".join(
            describe_expected(o) for o in error.validator_value) +
            f", got {show_value(error.instance)}")
    if kind == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        unknown = extra[0] if extra else "?"
        family = schema.get("x-sluice-family")
        hint = _did_you_mean(unknown, known)
        if family:
            msg = f"unknown {family} type {unknown!r}{hint}; known types: {', '.join(known)}"
        else:
            msg = f"unknown key {unknown!r}{hint}; expected one of: {', '.join(known)}"
        return marks.issue((*path, unknown), msg, at_key=True)
    if kind == "required":
        missing = str(error.message).split("'")[1] if "'" in str(error.message) else "?"
        return marks.issue(path, f"missing required key {missing!r}", at_key=bool(path))
    if kind in ("minProperties", "maxProperties") and schema.get("x-sluice-family"):
        family = schema["x-sluice-family"]
        types = ", ".join(sorted(schema.get("properties", {})))
        return marks.issue(path, f"expected exactly one {family} type, one of: {types}")
    if kind == "not" and schema.get("x-sluice-family"):
        types = ", ".join(sorted(set(schema.get("properties", {})) - set(HANDLER_EXTRAS)))
        return marks.issue(path, f"{', '.join(sorted(error.instance))} needs one "
                                 f"{schema['x-sluice-family']} type beside it ({types})")
    if kind == "type" and schema.get("x-sluice-family"):
        types = ", ".join(sorted(schema.get("properties", {})))
        return marks.issue(path, f"expected a mapping naming one {schema['x-sluice-family']} "
                                 f"type ({types}), got {show_value(error.instance)}")
    if kind == "anyOf":
        words = " or ".join(describe_expected(o) for o in schema.get("anyOf", []))
        return marks.issue(path, f"expected {words}, got {show_value(error.instance)}")
    return marks.issue(path, f"expected {describe_expected(schema)}, "
                             f"got {show_value(error.instance)}")


def _handler_types(doc: dict[str, Any], marks: Marks) -> Iterable[ConfigIssue]:
    """The handler slot names exactly one type (the schema allows its extra keys beside it, so
    it cannot count the types alone)."""
    handler = doc.get("handler")
    if isinstance(handler, dict):
        types = sorted(k for k in handler if k not in HANDLER_EXTRAS)
        if len(types) > 1:
            yield marks.issue(("handler",), f"expected exactly one handler type, got "
                                            f"{' and '.join(types)}")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def show_value(value: Any) -> str:
    """A value as an error message shows it (a mapping, a list, or its repr, shortened)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


SLOTS = (("source", "source"), ("handler", "handler"), ("dead_letter", "sink"),
         ("on_success", "sink"), ("on_failure", "sink"))


def _slot_items(doc: dict[str, Any]) -> Iterable[tuple[PathKey, str, str, Any]]:
    """(path, family, type name, config) of every component in the document."""
    for slot, family in SLOTS:
        value = doc.get(slot)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        extras = HANDLER_EXTRAS if slot == "handler" else ()
        for index, item in items:
            types = ([(k, v) for k, v in item.items() if k not in extras]
                     if isinstance(item, dict) else [])
            if len(types) == 1:
                ((name, config),) = types
                path: PathKey = (slot,) if index is None else (slot, index)
                yield path, family, name, config


def _apply_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    hosting = doc.get("tenancy") is not None
    doc = PIPELINE_SPEC.apply_defaults(doc)
    if not hosting:  # an absent tenancy stays absent: a one-function pipeline
        doc["tenancy"] = None
    for path, family, name, config in list(_slot_items(doc)):
        filled = {name: registry.get(family, name).apply_defaults(config)}
        if len(path) == 1:
            slot = doc[str(path[0])]
            doc[str(path[0])] = {**filled, **{k: v for k, v in slot.items() if k != name}}
        else:
            doc[str(path[0])][int(path[1])] = filled
    if not doc.get("dead_letter"):  # the registry says which component takes dead letters
        doc["dead_letter"] = registry.default_dead_letter(next(iter(doc["source"])),
                                                          doc["name"])
    return doc


def _component_checks(doc: dict[str, Any], marks: Marks, file: Path | None, *,
                      check_code: bool) -> Iterable[ConfigIssue]:
    """Checks a schema cannot express (an address not allowed, a handler that does not
    import, ...)."""
    for path, family, name, config in _slot_items(doc):
        spec = registry.get(family, name)
        checks = [spec.check, spec.check_code if check_code else None]
        for check in filter(None, checks):
            for sub_path, message in check(config, file):
                yield marks.issue((*path, name, *sub_path), message)


def _pipeline_checks(doc: dict[str, Any], marks: Marks) -> Iterable[ConfigIssue]:
    """What the consumer policy asks of the source, from its declared capabilities; then the
    source's own checks across the pipeline (its ``pipeline_check``)."""
    ((source_type, _),) = doc["source"].items()
    spec = registry.get("source", source_type)
    consumer = doc["consumer"]
    yield from _tenancy_checks(doc, marks, spec)
    if consumer.get("exactly_once") and not spec.can(registry.Capability.EXACTLY_ONCE):
        yield marks.issue(("consumer", "exactly_once"), f"exactly_once needs a "
                          f"{_sources_with(registry.Capability.EXACTLY_ONCE)} source (its "
                          "offsets are committed in the results' transaction); this source is "
                          f"{source_type}")
    elif spec.pipeline_check is not None:
        for path, message in spec.pipeline_check(doc):
            yield marks.issue(path, message)
    if consumer.get("track_tasks", True):
        return
    if not spec.can(registry.Capability.UNTRACKED):
        yield marks.issue(("consumer", "track_tasks"), f"track_tasks: false needs a "
                          f"{_sources_with(registry.Capability.UNTRACKED)} source (its "
                          "committed offsets record what is finished); this source is "
                          f"{source_type}")
    if (doc.get("trigger") or {}).get("http"):
        yield marks.issue(("trigger", "http"), "a pipeline with track_tasks: false has no task to "
                          "submit to: remove trigger, or track tasks")


def _tenancy_checks(doc: dict[str, Any], marks: Marks,
                    spec: registry.ComponentSpec[Any, Any]) -> Iterable[ConfigIssue]:
    """What a hosting pipeline (``tenancy``) asks of the rest of the file."""
    tenancy = doc.get("tenancy")
    if tenancy is None:
        return
    if doc["handler"].get("batch") is not None:
        yield marks.issue(("handler", "batch"), "a hosting pipeline (tenancy) calls its "
                          "handler with one task at a time: remove handler.batch")
    if not doc["consumer"].get("track_tasks", True):
        yield marks.issue(("consumer", "track_tasks"), "a hosting pipeline (tenancy) keeps "
                          "each task's tenant in the task store: remove track_tasks: false")
    if doc["consumer"].get("exactly_once"):
        yield marks.issue(("consumer", "exactly_once"), "a hosting pipeline (tenancy) writes "
                          "results through the outbox: remove exactly_once")
    if tenancy["isolation"]["enabled"] and spec.hosting is None:
        hosts = ", ".join(n for n in registry.names("source")
                            if registry.get("source", n).hosting is not None)
        yield marks.issue(("tenancy", "isolation", "enabled"), f"dedicated queues need one "
                          f"of these sources: {hosts}; this source is {spec.name}: set "
                          "tenancy.isolation.enabled: false to host every function on the "
                          "shared queue")
    seen: set[str] = set()
    for i, tenant in enumerate(tenancy.get("tenants") or ()):
        if tenant["name"] in seen:
            yield marks.issue(("tenancy", "tenants", i, "name"), f"tenant {tenant['name']!r} "
                              "is listed twice")
        seen.add(tenant["name"])


def _sources_with(capability: registry.Capability) -> str:
    return " or ".join(registry.with_capability("source", capability)) or "different"
