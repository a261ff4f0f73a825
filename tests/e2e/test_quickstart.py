"""scripts/quickstart, the README's first command, runs to its summary."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import ROOT


def test_quickstart_runs_to_its_summary(tmp_path: Path) -> None:
    env = dict(os.environ, SLUICE_DATA_DIR=str(tmp_path / "qs"))
    result = subprocess.run([str(ROOT / "scripts" / "quickstart")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "pipelines/quickstart.yaml: ok" in out
    assert "time per stage" in out and "p99" in out
    # 39 succeeded (flaky ones after retries), the invalid one failed and was dead-lettered.
    assert any(line.split("│")[1:3] == [" SUCCEEDED ", " 39    "] for line in out.splitlines())
    assert any(line.split("│")[1:3] == [" FAILED    ", " 1     "] for line in out.splitlines())
    assert "Traceback" not in result.stderr
