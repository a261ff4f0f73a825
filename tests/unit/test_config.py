"""Pipeline files: every kind of bad input is reported with file:line:col, key path and what
was expected, all at once; the committed schema matches the specs."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

import sluice
from sluice.config.load import load_pipeline, parse_pipeline, schema_text
from sluice.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
name: thumbs
source:
  embedded: {queue: images}
handler:
  python: tests.helpers.handlers:echo
consumer:
  concurrency: 4
  retry: {max_attempts: 5}
"""


def issues(text: str, file: str = "p.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(textwrap.dedent(text), file)
    return [str(i) for i in info.value.issues]


def test_valid_pipeline_gets_defaults() -> None:
    config = parse_pipeline(GOOD, "p.yaml")
    assert config.name == "thumbs"
    assert config.tenant == "default"
    assert config.source.type == "embedded"
    assert config.source.config == {"queue": "images", "lease_s": 30.0, "poll_interval_s": 0.01}
    assert config.consumer.concurrency == 4
    assert config.consumer.timeout_s == 30.0
    assert config.consumer.retry.max_attempts == 5
    assert config.consumer.retry.initial_backoff_s == 1.0
    assert config.dead_letter.type == "embedded"
    assert config.dead_letter.config == {"queue": "thumbs.dlq"}


def test_wrong_type_names_file_line_col_path_and_expectation() -> None:
    text = GOOD.replace("{max_attempts: 5}", "{max_attempts: five}")
    assert issues(text, "pipelines/x.yaml") == [
        "pipelines/x.yaml:8:25: consumer.retry.max_attempts: "
        "expected an integer >= 1, got 'five'"
    ]


def test_out_of_range() -> None:
    text = GOOD.replace("concurrency: 4", "concurrency: 0")
    assert issues(text) == ["p.yaml:7:16: consumer.concurrency: "
                            "expected an integer >= 1 and <= 10000, got 0"
                            .replace(" and <=", " <=")]


KNOWN_SOURCES = "embedded, kafka, mqtt, nats, rabbitmq, redis"


def test_yaml_syntax_error() -> None:
    (msg,) = issues("name: x\nsource: {embedded: {queue: a}\nhandler: y\n")
    assert msg.startswith("p.yaml:3:")
    assert "invalid YAML" in msg


def test_duplicate_key() -> None:
    (msg,) = issues(GOOD + "name: again\n")
    assert msg == "p.yaml:9:1: name: duplicate key (first set on line 1)"


def test_unknown_key_with_did_you_mean() -> None:
    (msg,) = issues(GOOD.replace("concurrency: 4", "concurency: 4"))
    assert msg.startswith("p.yaml:7:3: consumer.concurency: unknown key 'concurency' "
                          "(did you mean 'concurrency'?)")


def test_unknown_component_type_lists_known() -> None:
    (msg,) = issues(GOOD.replace("embedded: {queue: images}", "embeded: {queue: images}"))
    assert msg == ("p.yaml:3:3: source.embeded: unknown source type 'embeded' "
                   "(did you mean 'embedded'?); known types: " + KNOWN_SOURCES)


def test_missing_required_key() -> None:
    (msg,) = issues(GOOD.replace("name: thumbs\n", ""))
    assert msg == "p.yaml:1:1: missing required key 'name'"


def test_unset_environment_variable() -> None:
    text = GOOD.replace("{queue: images}", "{queue: '${SLUICE_TEST_UNSET_VAR}'}")
    (msg,) = issues(text)
    assert msg.startswith("p.yaml:3:21: source.embedded.queue: environment variable "
                          "'SLUICE_TEST_UNSET_VAR' is not set")


def test_environment_interpolation_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_QUEUE", "from-env")
    text = GOOD.replace("{queue: images}", "{queue: '${SLUICE_TEST_QUEUE}'}")
    assert parse_pipeline(text).source.config["queue"] == "from-env"
    text = GOOD.replace("{queue: images}", "{queue: '${SLUICE_NOPE:-fallback}'}")
    assert parse_pipeline(text).source.config["queue"] == "fallback"


def test_handler_that_does_not_import() -> None:
    (msg,) = issues(GOOD.replace("tests.helpers.handlers:echo", "nosuch.module:fn"))
    assert msg.startswith("p.yaml:5:11: handler.python: cannot import module 'nosuch.module': "
                          "ModuleNotFoundError")
    (msg,) = issues(GOOD.replace("handlers:echo", "handlers:nosuchfn"))
    assert "has no attribute 'nosuchfn'" in msg


def test_every_error_is_reported_not_only_the_first() -> None:
    text = """\
    name: Bad Name
    source: {embedded: {queue: a, lease_s: -1}}
    handler: {python: 'not a path'}
    consumer: {timeout_s: fast, retries: 3}
    """
    found = issues(text)
    assert len(found) == 5, found
    assert any("name: expected a string matching" in m for m in found)
    assert any("source.embedded.lease_s: expected a number > 0, got -1" in m for m in found)
    assert any("handler.python: expected a string matching" in m for m in found)
    assert any("consumer.timeout_s: expected a number > 0, got 'fast'" in m for m in found)
    assert any("consumer.retries: unknown key 'retries'" in m for m in found)


def test_two_components_in_one_slot() -> None:
    found = issues(GOOD.replace("embedded: {queue: images}",
                                "embedded: {queue: images}\n  kafka2: {}"))
    assert found == [
        "p.yaml:3:3: source: expected exactly one source type, one of: " + KNOWN_SOURCES,
        "p.yaml:4:3: source.kafka2: unknown source type 'kafka2' (did you mean 'kafka'?); "
        "known types: " + KNOWN_SOURCES,
    ]


def test_top_level_not_a_mapping_and_empty_file() -> None:
    expected = ("expected a pipeline file: a YAML mapping of pipeline keys "
                "(name, source, handler, ...)")
    assert issues("- a\n- b\n") == [f"p.yaml:1:1: {expected}, got a list"]
    assert issues("~\n") == [f"p.yaml:1:1: {expected}, got nothing (null)"]
    assert issues("") == [f"p.yaml:1:1: the file is empty; {expected}"]
    assert issues("# nothing yet\n") == [f"p.yaml:1:1: the file holds only comments; {expected}"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(tmp_path / "missing.yaml")
    assert str(info.value) == (f"{tmp_path / 'missing.yaml'}:1:1: no such file; expected a "
                               "pipeline file: a YAML mapping of pipeline keys (name, source, "
                               "handler, ...)")


def test_committed_schema_is_current() -> None:
    committed = (ROOT / "schemas" / "pipeline.schema.json").read_text()
    assert committed == schema_text(), (
        "schemas/pipeline.schema.json is stale: run `sluice schema > schemas/pipeline.schema.json`"
    )
    schema = json.loads(committed)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_example_pipeline_validates() -> None:
    files = sorted(f for f in (ROOT / "pipelines").glob("*.yaml")
                   if not f.name.endswith(".tests.yaml"))  # a pipeline's cases (sluice test)
    assert files
    for file in files:
        load_pipeline(file)


def bound_at_top_level(module_file: Path) -> set[str]:
    """Every name a module's own code binds at its top level (imports and assignments)."""
    names: set[str] = set()
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


def test_public_api_all_lists_what_the_package_exports() -> None:
    # Public: every name sluice/__init__.py binds, but for private ones and __all__ itself
    # (``annotations`` is the ``from __future__`` import, not an export).
    bound = bound_at_top_level(Path(sluice.__file__))
    public = {n for n in bound - {"__all__", "annotations"}
              if not n.startswith("_") or (n.startswith("__") and n.endswith("__"))}
    assert len(sluice.__all__) == len(set(sluice.__all__)), "a name listed twice"
    assert set(sluice.__all__) == public
    assert {"Message", "Outcome", "Reject", "Retry", "__version__"} <= public
    assert all(hasattr(sluice, name) for name in sluice.__all__)


def test_committed_reference_is_current() -> None:
    from sluice.cli import cli
    from sluice.reference import render

    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == render(cli), (
        "docs/reference.md is stale: run `sluice reference > docs/reference.md`"
    )
