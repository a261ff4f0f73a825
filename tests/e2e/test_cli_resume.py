"""``sluice tasks resume`` of a task whose message a worker holds back while it is paused: with
``-f`` the message is woken at once through the submit service (as the server's resume does);
without ``-f`` the task is resumed, the message waits for the worker's next check, and stderr
says how to wake it at once."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from sluice.consumer.loop import HOLD_RECHECK_S
from sluice.datadir import DB_FILE
from tests.conftest import ROOT, sluice_cmd, subprocess_env

PIPELINE = """
name: thumbs
tenant: demo
source: {embedded: {queue: thumbs, lease_s: 30, poll_interval_s: 0.01}}
handler: {python: "tests.helpers.handlers:behave"}
consumer: {concurrency: 4, timeout_s: 10, retry: {max_attempts: 3}}
dead_letter: {embedded: {queue: thumbs.dlq}}
"""


def sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


def messages(data: Path) -> dict[str, tuple[float, str | None, int]]:
    """task id -> (visible_at, lease_token, deliveries) of the pipeline's queued messages."""
    conn = sqlite3.connect(f"file:{data / DB_FILE}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT task_id, visible_at, lease_token, deliveries FROM messages"
                            " WHERE queue = 'thumbs'").fetchall()
    finally:
        conn.close()
    return {task_id: (visible_at, lease, deliveries)
            for task_id, visible_at, lease, deliveries in rows}


def held(message: tuple[float, str | None, int] | None) -> bool:
    """Handed out, put back unleased, and not visible yet: held while paused."""
    if message is None:
        return False
    visible_at, lease, deliveries = message
    return lease is None and deliveries > 0 and visible_at > time.time()


def test_resume_with_the_file_wakes_a_held_message_and_without_says_how(
        tmp_path: Path) -> None:
    file, data = tmp_path / "thumbs.yaml", tmp_path / "data"
    file.write_text(PIPELINE)
    submitted = sluice("submit", "thumbs", "-f", str(file), "--data-dir", str(data),
                       "--data", json.dumps({"i": 1}), "--data", json.dumps({"i": 2}))
    assert submitted.returncode == 0, submitted.stderr
    woken, waiting = submitted.stdout.split()
    for task_id in (woken, waiting):
        assert sluice("tasks", "pause", task_id, "--data-dir", str(data)).returncode == 0

    # A worker fetches both paused tasks and holds their messages back; then it stops.
    worker = subprocess.Popen([*sluice_cmd(), "run", str(file), "--data-dir", str(data),
                               "--log-level", "warning"], cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all(held(messages(data).get(t)) for t in (woken, waiting)):
            assert worker.poll() is None, worker.communicate()[1]
            assert time.monotonic() < deadline, messages(data)
            time.sleep(0.02)
    finally:
        worker.send_signal(signal.SIGINT)
        _, errors = worker.communicate(timeout=30)
    assert worker.returncode == 0, errors
    before = messages(data)
    assert all(held(before[t]) for t in (woken, waiting))

    # With -f: resumed, and its message is visible now (not at the worker's next check).
    resumed = sluice("tasks", "resume", woken, "-f", str(file), "--data-dir", str(data))
    assert (resumed.returncode, resumed.stdout, resumed.stderr) == (0, f"{woken}: QUEUED\n", "")
    visible_at, lease, _ = messages(data)[woken]
    assert lease is None and visible_at <= time.time() and visible_at < before[woken][0]

    # Without -f: resumed, its message left as held; one line says when it runs and how to
    # wake it at once.
    resumed = sluice("tasks", "resume", waiting, "--data-dir", str(data))
    assert (resumed.returncode, resumed.stdout) == (0, f"{waiting}: QUEUED\n")
    assert messages(data)[waiting] == before[waiting]
    hint = resumed.stderr.splitlines()
    assert len(hint) == 1, resumed.stderr
    assert f"within {HOLD_RECHECK_S:g} s" in hint[0]
    assert f"sluice tasks resume {waiting} -f FILE" in hint[0]

    # A file without the task's pipeline is refused before anything changes.
    assert sluice("tasks", "pause", waiting, "--data-dir", str(data)).returncode == 0
    other = tmp_path / "other.yaml"
    other.write_text(PIPELINE.replace("name: thumbs", "name: other"))
    refused = sluice("tasks", "resume", waiting, "-f", str(other), "--data-dir", str(data))
    assert refused.returncode == 2
    assert "pipeline 'thumbs', which is not in" in refused.stderr
    state = sluice("tasks", "get", waiting, "--data-dir", str(data), "--json")
    assert json.loads(state.stdout)["state"] == "PAUSED"
