"""A handler's code is needed only where its workers run: an API-only process (`sluice serve
--no-workers`, `sluice submit -f`) takes tasks for a pipeline whose handler module is not on the
machine; a worker (`sluice run`) refuses it with the file:line:col of `handler.python`."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from sluice.config.load import load_pipeline
from sluice.errors import ConfigError
from sluice.handlers.python import PythonHandler
from sluice.runtime import build, build_handlers
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.server import running_server


def pipeline(folder: Path, module: str) -> Path:
    file = folder / "jobs.yaml"
    file.write_text(f"name: jobs\nsource: {{embedded: {{}}}}\nhandler: {{python: {module}:run}}\n")
    return file


def missing(module: str) -> str:
    return (f"3:19: handler.python: cannot import module {module!r}: ModuleNotFoundError: "
            f"No module named {module!r}")


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


def test_workers_import_the_handler_only_when_they_build_it(tmp_path: Path) -> None:
    module = f"handler_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nasync def run(message):\n    return 1\n")
    config = load_pipeline(pipeline(tmp_path, module), check_code=False)
    loop = build(config, tmp_path / "data")
    assert not marker.exists()
    build_handlers([loop])
    assert marker.exists()
    assert isinstance(loop.handler, PythonHandler)


def test_a_missing_handler_module_is_refused_at_build(tmp_path: Path) -> None:
    module = f"absent_{uuid.uuid4().hex}"
    file = pipeline(tmp_path, module)
    config = load_pipeline(file, check_code=False)  # loads: the module is not imported
    loop = build(config, tmp_path / "data")
    with pytest.raises(ConfigError) as info:
        build_handlers([loop])
    assert str(info.value) == (f"{file}:{missing(module)} (the handler's code must be "
                               "importable where the pipeline's workers run)")
    with pytest.raises(ConfigError) as info:
        load_pipeline(file)  # as `sluice validate` loads it
    assert str(info.value) == f"{file}:{missing(module)}"


def test_run_refuses_a_missing_handler_module(tmp_path: Path) -> None:
    module = f"absent_{uuid.uuid4().hex}"
    file = pipeline(tmp_path, module)
    result = sluice("run", str(file), "--drain", "--data-dir", str(tmp_path / "data"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result
    assert f"{file}:{missing(module)}" in result.stderr.splitlines()[-1]


def test_submit_without_the_handler_code(tmp_path: Path) -> None:
    file = pipeline(tmp_path, f"absent_{uuid.uuid4().hex}")
    result = sluice("submit", "jobs", "-f", str(file), "--data-dir", str(tmp_path / "data"),
                    "--data", '{"n": 1}', "--task-id", "t-1")
    assert (result.returncode, result.stdout) == (0, "t-1\n"), result.stderr


def test_serve_without_workers_without_the_handler_code(tmp_path: Path) -> None:
    file = pipeline(tmp_path, f"absent_{uuid.uuid4().hex}")
    with running_server(tmp_path, "--no-workers", files=(file,), auth=False) as server:
        request = urllib.request.Request(
            f"{server.url}/v1/pipelines/jobs/tasks", data=json.dumps({"n": 1}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            assert json.loads(response.read())["task_id"]
