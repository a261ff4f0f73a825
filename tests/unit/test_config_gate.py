"""A pipeline's `filter` and `schema` keys at load time: an expression that does not compile, a
schema that is not a valid schema, a schema file that is missing or does not parse: each one
line with file:line:col from `sluice validate` (exit 2, never a traceback); good ones load,
a schema file relative to the pipeline file's folder."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from sluice.config.load import load_pipeline, parse_pipeline
from sluice.errors import ConfigError
from tests.conftest import ROOT, sluice_cmd, subprocess_env

BASE = "name: p\nsource: {embedded: {}}\nhandler: {python: tests.helpers.handlers:echo}\n"
SCHEMA_FILE = "expected a JSON Schema file (.json, .yaml or .yml)"
SCHEMA = "not a valid JSON Schema (Draft 2020-12)"

# (the pipeline's keys after BASE, the one line expected after "<file>:")
BAD: dict[str, tuple[str, str]] = {
    "filter-unclosed-quote": (
        "filter: payload.kind == 'order\n",
        "4:9: filter: not a valid JMESPath expression: unclosed ' delimiter at character 17 "
        "(after 'payload.kind == ')"),
    "filter-single-equals": (
        "filter: payload.kind = 'order'\n",
        "4:9: filter: not a valid JMESPath expression: unknown token '=' (== compares) at "
        "character 14 (after 'payload.kind ')"),
    "filter-ends-too-soon": (
        "filter: \"payload.amount > \"\n",
        "4:9: filter: not a valid JMESPath expression: it ends too soon (after "
        "'payload.amount > ')"),
    "filter-unexpected-token": (
        "filter: payload.kind payload.amount\n",
        "4:9: filter: not a valid JMESPath expression: unexpected token: payload at character "
        "14 (after 'payload.kind ')"),
    "filter-unknown-function": (
        "filter: size(payload.lines) > `1`\n",
        "4:9: filter: unknown function size(); JMESPath has: abs, avg, ceil, contains, "
        "ends_with, floor, join, keys, length, map, max, max_by, merge, min, min_by, not_null, "
        "reverse, sort, sort_by, starts_with, sum, to_array, to_number, to_string, type, "
        "values"),
    "filter-arity": (
        "filter: contains(payload.tags)\n",
        "4:9: filter: contains() takes 2 argument(s), got 1"),
    "filter-empty": (
        "filter: ''\n",
        "4:9: filter: the expression is empty; expected a JMESPath expression such as "
        "payload.kind == 'order'"),
    "filter-not-a-string": (
        "filter: [payload.kind]\n",
        "4:9: filter: expected a string, got a list"),
    "schema-unknown-type": (
        "schema:\n  type: object\n  properties:\n    amount: {type: numbr}\n",
        f"7:20: schema.properties.amount.type: {SCHEMA}: 'numbr' is not a JSON Schema type; "
        "expected one of array, boolean, integer, null, number, object, string, or a list of "
        "them"),
    "schema-bad-regex": (
        "schema: {properties: {sku: {pattern: '[A-Z'}}}\n",
        f"4:38: schema.properties.sku.pattern: {SCHEMA}: '[A-Z' is not a valid regular "
        "expression (unterminated character set at position 0)"),
    "schema-required-not-a-list": (
        "schema: {required: kind}\n",
        f"4:20: schema.required: {SCHEMA}: 'kind' is not of type 'array'"),
    "schema-ref-nowhere": (
        "schema:\n  properties:\n    sku: {$ref: '#/$defs/sku'}\n",
        "6:17: schema.properties.sku.$ref: $ref '#/$defs/sku' does not resolve: only "
        "references inside this schema (or to a JSON Schema meta-schema) are followed; nothing "
        "is fetched"),
    "schema-remote-ref": (
        "schema: {$ref: 'https://example.com/order.json'}\n",
        "4:16: schema.$ref: $ref 'https://example.com/order.json' does not resolve: only "
        "references inside this schema (or to a JSON Schema meta-schema) are followed; nothing "
        "is fetched"),
    "schema-not-a-mapping": (
        "schema: 3\n",
        "4:9: schema: expected a mapping or a string, got 3"),
    "schema-file-missing": (
        "schema: schemas/nope.json\n",
        "4:9: schema: schema file '{dir}/schemas/nope.json' (relative to the pipeline file's "
        f"folder): no such file; {SCHEMA_FILE}"),
    "schema-file-suffix": (
        "schema: order.schema.txt\n",
        "4:9: schema: expected a mapping (the schema) or the path of a JSON Schema file (.json, "
        ".yaml or .yml), got 'order.schema.txt'"),
    "schema-file-a-directory": (
        "schema: folder.json\n",
        "4:9: schema: schema file '{dir}/folder.json' (relative to the pipeline file's folder):"
        f" this is a directory; {SCHEMA_FILE}"),
    "schema-file-invalid-schema": (
        "schema: invalid.json\n",
        f"4:9: schema: schema file '{{dir}}/invalid.json': properties.n.minimum: {SCHEMA}: "
        "'0' is not of type 'number'"),
    "schema-file-a-list": (
        "schema: list.yaml\n",
        "4:9: schema: schema file '{dir}/list.yaml' holds a list; expected a JSON Schema (a "
        "mapping)"),
}
# Problems inside a schema file are reported at their own file:line:col.
BAD_IN_SCHEMA_FILE: dict[str, tuple[str, str]] = {
    "schema-file-bad-json": (
        "schema: broken.json\n",
        "{dir}/broken.json:3:1: not valid JSON: Expecting property name enclosed in double "
        f"quotes; {SCHEMA_FILE}"),
    "schema-file-bad-yaml-schema": (
        "schema: invalid.yaml\n",
        f"{{dir}}/invalid.yaml:3:13: properties.n.type: {SCHEMA}: 'integr' is not a JSON "
        "Schema type; expected one of array, boolean, integer, null, number, object, string, "
        "or a list of them"),
    "schema-file-bad-yaml": (
        "schema: broken.yaml\n",
        "{dir}/broken.yaml:2:1: invalid YAML: while parsing a flow mapping (line 1, column 1): "
        "expected ',' or '}', but got '<stream end>'"),
}

SCHEMA_FILES = {
    "invalid.json": '{"properties": {"n": {"minimum": "0"}}}\n',
    "broken.json": '{"type": "object",\n "properties": {},\n}\n',
    "invalid.yaml": "type: object\nproperties:\n  n: {type: integr}\n",
    "broken.yaml": "{type: object\n",
    "list.yaml": "- type: object\n",
}


def validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), "validate", *map(str, files)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every bad pipeline through one `sluice validate` (each file is checked on its own)."""
    folder = tmp_path_factory.mktemp("bad")
    for name, text in SCHEMA_FILES.items():
        (folder / name).write_text(text)
    (folder / "folder.json").mkdir()
    cases = {**BAD, **BAD_IN_SCHEMA_FILE}
    for case, (keys, _) in cases.items():
        (folder / f"{case}.yaml").write_text(BASE + keys)
    result = validate(*(folder / f"{case}.yaml" for case in sorted(cases)))
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (2, ""), result
    return folder, result.stderr


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_refuses_with_file_line_col(case: str, validated: tuple[Path, str]) -> None:
    folder, stderr = validated
    file = folder / f"{case}.yaml"
    expected = BAD[case][1].replace("{dir}", str(folder))
    assert [line for line in stderr.splitlines() if line.startswith(f"{file}:")] == [
        f"{file}:{expected}"]


@pytest.mark.parametrize("case", sorted(BAD_IN_SCHEMA_FILE))
def test_a_schema_file_that_does_not_parse_is_reported_in_that_file(
        case: str, validated: tuple[Path, str]) -> None:
    folder, stderr = validated
    expected = BAD_IN_SCHEMA_FILE[case][1].replace("{dir}", str(folder))
    assert expected in stderr.splitlines()


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(BASE + "filter: payload.kind = 'x'\nschema: {type: numbr}\n", "p.yaml")
    assert [i.path for i in info.value.issues] == ["filter", "schema.type"]


def test_good_filter_and_inline_schema_load() -> None:
    config = parse_pipeline(BASE + textwrap.dedent("""\
        filter: headers."x-region" == 'eu' && payload.amount > `100`
        schema:
          type: object
          required: [amount]
          properties:
            amount: {type: number}
            sku: {$ref: '#/$defs/sku'}
          $defs:
            sku: {type: string, pattern: '^[A-Z]{3}$'}
        """), "p.yaml")
    assert config.filter == "headers.\"x-region\" == 'eu' && payload.amount > `100`"
    assert config.schema is not None
    assert config.schema["required"] == ["amount"]


def test_a_filter_takes_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGION", "eu")
    config = parse_pipeline(BASE + "filter: headers.region == '${REGION}'\n")
    assert config.filter == "headers.region == 'eu'"


@pytest.mark.parametrize("name", ["order.schema.json", "order.schema.yaml", "order.schema.yml"])
def test_a_schema_file_is_read_relative_to_the_pipeline_file(tmp_path: Path,
                                                             name: str) -> None:
    schema = {"type": "object", "required": ["kind"]}
    folder = tmp_path / "pipelines"
    (folder / "schemas").mkdir(parents=True)
    (folder / "schemas" / name).write_text(json.dumps(schema))  # JSON is YAML too
    file = folder / "p.yaml"
    file.write_text(BASE + f"schema: schemas/{name}\n")
    assert load_pipeline(file).schema == schema
    absolute = tmp_path / "abs.yaml"
    absolute.write_text(BASE + f"schema: {folder / 'schemas' / name}\n")
    assert load_pipeline(absolute).schema == schema
    result = validate(file)
    assert (result.returncode, result.stdout) == (0, f"{file}: ok\n"), result.stderr


def test_the_pipeline_schema_lists_filter_and_schema() -> None:
    from sluice.config.load import pipeline_schema

    props = pipeline_schema()["properties"]
    assert props["filter"]["type"] == "string"
    assert [o["type"] for o in props["schema"]["anyOf"]] == ["object", "string"]
