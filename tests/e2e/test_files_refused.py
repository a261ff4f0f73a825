"""Files the CLI refuses with one clear line and exit 2: a keys file that is not UTF-8 (or not
a file), and one pipeline name given by two files to `sluice validate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT, sluice_cmd, subprocess_env


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)


def test_serve_refuses_a_keys_file_it_cannot_read(tmp_path: Path) -> None:
    latin1 = tmp_path / "keys.yaml"
    latin1.write_bytes(b"keys:\n  - {tenant: caf\xe9, sha256: x}\n")
    pipeline = str(ROOT / "pipelines" / "quickstart.yaml")
    for auth_file, expected in ((latin1, "not valid UTF-8"), (tmp_path, "is a directory"),
                                (tmp_path / "none.yaml", "no such file")):
        done = sluice("serve", pipeline, "--auth-file", str(auth_file), "--port", "1",
                      "--data-dir", str(tmp_path / "data"))
        assert done.returncode == 2, done.stderr
        assert str(auth_file) in done.stderr and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_validate_refuses_one_pipeline_name_in_two_files(tmp_path: Path) -> None:
    text = (ROOT / "pipelines" / "quickstart.yaml").read_text()
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(text)
    second.write_text(text.replace("tenant: demo", "tenant: other"))
    done = sluice("validate", str(first), str(second))
    assert done.returncode == 2
    assert f"{second}:" in done.stderr and "pipeline name 'thumbnails' is also given by" in (
        done.stderr)
    assert "tenant 'other'" in done.stderr and "Traceback" not in done.stderr
    alone = sluice("validate", str(first))
    assert alone.returncode == 0, alone.stderr
