"""The Python interpreter bench/kafka.py runs its Quix Streams app with.

Quix Streams pins confluent-kafka below the version sluice runs on (quixstreams 3.28 wants
``confluent-kafka<2.13``), so it is not installed into ./.venv: that would downgrade the Kafka
client of every sluice row and of the test suite. It gets a venv of its own instead, made on
first use from ``bench/peers/quix-requirements.txt`` with the interpreter ./.venv was made
with, under ``$SLUICE_BENCH_PEERS_DIR`` (default ``~/.cache/sluice-bench``); re-made when the
requirements file changes. ``SLUICE_BENCH_QUIX_PYTHON`` names an interpreter to use instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("quix-requirements.txt")


def venv_dir() -> Path:
    base = os.environ.get("SLUICE_BENCH_PEERS_DIR") or Path.home() / ".cache" / "sluice-bench"
    return Path(base) / "quix-venv"


def python() -> Path:
    """The interpreter with quixstreams installed; makes its venv first when needed."""
    given = os.environ.get("SLUICE_BENCH_QUIX_PYTHON")
    if given:
        return Path(given)
    home = venv_dir()
    exe = home / "bin" / "python"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    stamp = home / f".installed-{digest}"
    if exe.exists() and stamp.exists():
        return exe
    print(f"quix: installing {REQUIREMENTS.name} into {home} (once)", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(home)], check=True)
    subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-r", str(REQUIREMENTS)], check=True)
    stamp.touch()
    return exe


def version(exe: Path) -> str:
    """The quixstreams and confluent-kafka versions installed for ``exe``."""
    out = subprocess.run(
        [str(exe), "-c", "import importlib.metadata as m; print(m.version('quixstreams'), "
                         "m.version('confluent-kafka'))"],
        check=True, capture_output=True, text=True).stdout.split()
    return f"quixstreams {out[0]} (confluent-kafka {out[1]})"
