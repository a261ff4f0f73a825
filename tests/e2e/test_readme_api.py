"""README's HTTP API tour runs as written against a live `sluice serve`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.helpers.server import running_server


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- api-tour:start")
    end = text.index("<!-- api-tour:end -->")
    block = text[start:end]
    return block[block.index("```bash") + len("```bash"):block.rindex("```")]


def test_readme_api_tour(tmp_path: Path) -> None:
    token = "readme-demo-key-0123456789"
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - {tenant: demo, sha256: "
                    f"{hashlib.sha256(token.encode()).hexdigest()}}}\n")
    quickstart = ROOT / "pipelines" / "quickstart.yaml"
    with running_server(tmp_path, "--auth-file", str(keys), files=(quickstart,),
                        auth=False) as server:
        env = dict(os.environ, SLUICE=server.url, TOKEN=token,
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    first = json.loads(lines[0])
    assert first["task_id"] == "cat-42" and first["state"] == "QUEUED"
    assert lines[1] == "409"
    task = json.loads(lines[2])
    assert task["state"] == "SUCCEEDED" and task["result"]["thumbnail"] == "cat-128w.png"
    listed = json.loads(lines[3])
    assert [t["task_id"] for t in listed["tasks"]] == ["cat-42"]
    assert json.loads(lines[5])["state"] == "CANCELLED"
    assert json.loads(lines[6]) == {"name": "thumbnails", "paused": True}
    assert json.loads(lines[7]) == {"name": "thumbnails", "paused": False}
    assert len(lines[8]) == 32  # the CLI's submit printed a generated task id
    shown = "\n".join(lines[9:])  # the CLI's `tasks get cat-42`
    assert "cat-42" in shown and "state SUCCEEDED" in shown
