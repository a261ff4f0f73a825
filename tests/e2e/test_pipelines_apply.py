"""``sluice pipelines apply|get|delete`` on the local store, as a user runs them; the same
against a server is in tests/integration/test_runtime_pipelines.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import ROOT, sluice_cmd, subprocess_env

QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_apply_get_replace_and_delete_in_the_data_directory(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    first = sluice("pipelines", "apply", "-f", str(QUICKSTART), *data)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "thumbnails: created (version 1)"
    changed = tmp_path / "thumbnails.yaml"
    changed.write_text(QUICKSTART.read_text().replace("concurrency: 8", "concurrency: 2"))
    again = sluice("pipelines", "apply", "-f", str(changed), *data)
    assert again.stdout.strip() == "thumbnails: replaced (version 2)", again.stderr
    shown = sluice("pipelines", "get", "thumbnails", *data)
    assert shown.returncode == 0 and "concurrency: 2" in shown.stdout
    record = json.loads(sluice("pipelines", "get", "thumbnails", "--json", *data).stdout)
    assert (record["version"], record["put_by"], record["restricted"]) == (2, "admin", False)
    assert record["body"] == changed.read_text()
    gone = sluice("pipelines", "delete", "thumbnails", *data)
    assert gone.stdout.strip() == "thumbnails: deleted (its tasks are kept)", gone.stderr
    missing = sluice("pipelines", "get", "thumbnails", *data)
    assert missing.returncode == 2
    assert "no pipeline definition named 'thumbnails'" in missing.stderr


def test_a_bad_file_is_refused_at_its_place_and_nothing_is_stored(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("concurrency: 8", "concurrency: lots"))
    data = ["--data-dir", str(tmp_path / "data")]
    result = sluice("pipelines", "apply", "-f", str(bad), *data)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:11:16: consumer.concurrency: expected" in result.stderr, result.stderr
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("source: {embedded: {queue: q}}\n")
    result = sluice("pipelines", "apply", "-f", str(nameless), *data)
    assert result.returncode == 2 and "names no pipeline" in result.stderr
    assert sluice("pipelines", "get", "thumbnails", *data).returncode == 2
