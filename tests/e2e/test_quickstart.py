"""scripts/quickstart, the README's first command, runs to its summary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_docs import fresh_copy


def run_quickstart(tree: Path, data: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env["SLUICE_DATA_DIR"] = str(data)
    return subprocess.run([str(tree / "scripts" / "quickstart")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_tour_ran(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "pipelines/quickstart.yaml: ok" in out
    assert "time per stage" in out and "p99" in out
    # 39 succeeded (flaky ones after retries), the invalid one failed and was dead-lettered.
    assert any(line.split("│")[1:3] == [" SUCCEEDED ", " 39    "] for line in out.splitlines())
    assert any(line.split("│")[1:3] == [" FAILED    ", " 1     "] for line in out.splitlines())
    assert "Traceback" not in result.stderr


def test_quickstart_runs_to_its_summary(tmp_path: Path) -> None:
    assert_tour_ran(run_quickstart(ROOT, tmp_path / "qs"))


@pytest.mark.slow
def test_quickstart_on_a_fresh_clone_installs_the_base_package_with_progress(
        tmp_path: Path) -> None:
    """A clone without .venv: the quickstart makes one and installs sluice without extras
    (no test tools), says what it is doing, and shows no setuptools banner."""
    tree = fresh_copy(tmp_path / "clone", venv=False)
    result = run_quickstart(tree, tmp_path / "qs")
    assert_tour_ran(result)
    steps = [line for line in result.stderr.splitlines() if line.startswith("--> ")]
    assert [s.split()[1] for s in steps] == ["creating", "upgrading", "installing"], steps
    assert "Successfully installed" in result.stderr  # pip's own progress is shown
    assert "careful" not in result.stderr and "BuildBackendWarning" not in result.stderr
    python = tree / ".venv" / "bin" / "python"
    for absent in ("pytest", "confluent_kafka", "mypy"):
        found = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True)
        assert found.returncode != 0, f"{absent} is installed: the quickstart needs only the base"
    assert (tree / ".venv" / ".sluice-installed-base").is_file()
