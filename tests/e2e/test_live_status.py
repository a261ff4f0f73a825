"""``sluice run``'s live status: drawn when stderr is a terminal (a pseudo-terminal here), not
drawn when it is a pipe (sluice.live_status rule 1)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT, sluice_cmd, subprocess_env


def submit(data_dir: Path, n: int) -> None:
    args = [*sluice_cmd(), "submit", "thumbnails", "-f", "pipelines/quickstart.yaml",
            "--data-dir", str(data_dir)]
    for i in range(n):
        args += ["--data", f'{{"image": "img{i}.png"}}']
    done = subprocess.run(args, cwd=ROOT, env=subprocess_env(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


def run_in_a_terminal(data_dir: Path) -> str:
    """``sluice run --drain`` with stderr on a pseudo-terminal: what it drew."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*sluice_cmd(), "run", "pipelines/quickstart.yaml", "--drain", "--data-dir",
         str(data_dir)], cwd=ROOT, env=subprocess_env(TERM="xterm"), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    assert proc.returncode == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_a_terminal_gets_the_live_status_and_a_pipe_does_not(tmp_path: Path) -> None:
    submit(tmp_path / "tty", 150)  # 150 tasks of 20 ms at concurrency 8: about 0.4 s and more
    drawn = run_in_a_terminal(tmp_path / "tty")
    assert "done/s" in drawn and "thumbnails" in drawn, drawn[-2000:]
    assert "backlog" in drawn
    submit(tmp_path / "pipe", 150)
    piped = subprocess.run(
        [*sluice_cmd(), "run", "pipelines/quickstart.yaml", "--drain", "--data-dir",
         str(tmp_path / "pipe")], cwd=ROOT, env=subprocess_env(TERM="xterm"),
        capture_output=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert b"done/s" not in piped.stderr
