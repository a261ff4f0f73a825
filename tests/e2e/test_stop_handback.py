"""A clean stop of `sluice run` (SIGINT, Ctrl-C) or `sluice serve` (SIGTERM) hands the tasks it
fetched but never started back unspent: QUEUED, no attempt counted, no start time; the next run
with max_attempts: 1 runs each of them once and dead-letters none."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.handlers import read_log
from tests.helpers.server import free_port

PIPELINE = """
name: slow
source: {embedded: {queue: slow, poll_interval_s: 0.01}}
handler: {python: "tests.helpers.handlers:behave"}
consumer: {concurrency: 2, ordering: unordered, timeout_s: 30, retry: {max_attempts: 1}}
"""


def sluice(*args: str, log: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sluice_cmd(), *args], cwd=ROOT, capture_output=True, text=True,
                          env=subprocess_env(SLUICE_TEST_LOG=log), timeout=120)


@pytest.mark.parametrize("command,stop", [("run", signal.SIGINT), ("serve", signal.SIGTERM)])
def test_a_clean_stop_hands_back_unstarted_tasks_unspent(tmp_path: Path, command: str,
                                                         stop: signal.Signals) -> None:
    file, data, log = tmp_path / "slow.yaml", str(tmp_path / "data"), str(tmp_path / "calls.log")
    file.write_text(PIPELINE)
    datas = [arg for i in range(6) for arg in ("--data", json.dumps({"sleep_s": 1.0, "i": i}))]
    assert sluice("submit", "slow", "-f", str(file), "--data-dir", data, *datas,
                  log=log).returncode == 0
    args = [*sluice_cmd(), command, str(file), "--data-dir", data, "--log-level", "warning"]
    if command == "serve":
        args += ["--port", str(free_port())]
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=log),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len([e for e in read_log(log) if e[0] == "start"]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.02)
    proc.send_signal(stop)
    _, errors = proc.communicate(timeout=60)
    assert proc.returncode == 0, errors
    listed = sluice("tasks", "list", "--data-dir", data, "--json", log=log)
    tasks = [json.loads(line) for line in listed.stdout.splitlines()]
    started = {e[1] for e in read_log(log) if e[0] == "start"}
    assert len(started) == 2 and len(tasks) == 6
    for task in tasks:
        if task["task_id"] in started:
            assert (task["state"], task["attempts"]) == ("SUCCEEDED", 1)
        else:
            assert (task["state"], task["attempts"]) == ("QUEUED", 0)
            assert [s["at"] for s in task["timeline"] if s["stage"] == "started"] == [None]
    again = sluice("run", str(file), "--data-dir", data, "--drain", "--log-level", "warning",
                   log=log)
    assert again.returncode == 0, again.stderr
    tasks = [json.loads(line) for line in
             sluice("tasks", "list", "--data-dir", data, "--json", log=log).stdout.splitlines()]
    assert sorted((t["state"], t["attempts"]) for t in tasks) == [("SUCCEEDED", 1)] * 6
