"""The OpenAPI document against the live server: schemathesis runs every check it has (no 5xx,
status codes, content types, headers and bodies as documented, invalid input refused, valid
input accepted, ``Allow`` on 405 listing exactly the documented methods, ...) through all its
phases, the stateful one included (it follows the submit's links to the task operations), with
a tenant's API key. Any failure fails the test."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml
from openapi_spec_validator import validate

from tests.conftest import ROOT
from tests.helpers.server import KEYS, running_server

SPEC_FILE = ROOT / "schemas" / "openapi.yaml"
PHASES = "examples,coverage,fuzzing,stateful"
MAX_EXAMPLES = 40  # per operation and phase: enough to find what it found, in seconds


def spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text(encoding="utf-8"))
    return doc


def test_openapi_document_is_valid_3_1() -> None:
    doc = spec()
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_the_shipped_document_is_the_repository_one() -> None:
    shipped = ROOT / "sluice" / "gateway" / "openapi.yaml"
    assert SPEC_FILE.read_bytes() == shipped.read_bytes()


def test_submit_links_to_every_task_operation() -> None:
    doc = spec()
    links = doc["paths"]["/v1/pipelines/{pipeline}/tasks"]["post"]["responses"]["202"]["links"]
    targets = {link["operationId"] for link in links.values()}
    assert targets == {"getTask", "cancelTask", "pauseTask", "resumeTask"}
    for link in links.values():
        assert link["parameters"] == {"path.task_id": "$response.body#/task_id",
                                      "query.pipeline": "$response.body#/pipeline"}


def run_schemathesis(url: str, workdir: Path) -> tuple[subprocess.CompletedProcess[str],
                                                        ET.Element]:
    """``st run`` with every check and phase; the JUnit report it wrote."""
    config = workdir / "schemathesis.toml"
    config.write_text('[parameters]\n"path.pipeline" = "gw-a"\n')
    reports = workdir / "reports"
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [str(st), "--config-file", str(config), "run", url + "/openapi.json",
         "-H", f"Authorization: Bearer {KEYS['alpha']}", "--checks", "all",
         "--phases", PHASES, "--max-examples", str(MAX_EXAMPLES), "--seed", "7",
         "--no-color", "--report", "junit", "--report-dir", str(reports)],
        cwd=workdir, capture_output=True, text=True, timeout=600)
    (junit,) = reports.glob("junit*.xml")
    return result, ET.parse(junit).getroot()


def test_schemathesis_all_checks_and_phases_find_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        result, junit = run_schemathesis(server.url, tmp_path)
    output = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert (junit.get("failures"), junit.get("errors")) == ("0", "0"), output
    tested = {case.get("name") for case in junit.iter("testcase")}
    operations = {f"{method.upper()} {path}" for path, item in spec()["paths"].items()
                  for method in item} - {"GET /openapi.json"}  # the document: not tested
    assert tested == operations | {"Stateful tests"}, output
    for case in junit.iter("testcase"):
        assert not list(case), (case.get("name"), output)  # no failure, error or skip inside
