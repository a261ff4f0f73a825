"""schemathesis against the live server: no 5xx, and no response that breaks the OpenAPI
document (status codes, content types, headers, bodies)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from openapi_spec_validator import validate

from tests.conftest import ROOT
from tests.helpers.server import KEYS, running_server

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")


def test_openapi_document_is_valid_3_1() -> None:
    spec = yaml.safe_load((ROOT / "schemas" / "openapi.yaml").read_text())
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text('[parameters]\n"path.pipeline" = "gw-a"\n')
    st = Path(sys.executable).parent / "st"
    with running_server(tmp_path) as server:
        result = subprocess.run(
            [str(st), "--config-file", str(config), "run", server.url + "/openapi.json",
             "-H", f"Authorization: Bearer {KEYS['alpha']}", "--checks", CHECKS,
             "--max-examples", "40", "--seed", "7", "--no-color",
             "--report", "json", "--report-json-path", str(tmp_path / "report.json")],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text()) if (
        tmp_path / "report.json").exists() else {}
    assert report is not None
