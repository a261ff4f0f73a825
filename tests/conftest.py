from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"  # third-party packages with their dist-info (installable)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def run_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = str(tmp_path / "calls.log")
    monkeypatch.setenv("SLUICE_TEST_LOG", path)
    yield path


@pytest.fixture(autouse=True)
def _close_databases() -> Iterator[None]:
    yield
    from sluice.datadir import Database

    for db in list(Database._instances.values()):
        db.close()


def sluice_cmd() -> list[str]:
    """The sluice CLI of this interpreter's environment."""
    return [sys.executable, "-m", "sluice.cli"]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env
