"""Failover dedup across real worker processes on one data directory.

- A worker SIGKILLed mid-task loses nothing: after its lease lapses another worker runs the
  task again and it completes, exactly once.
- Two workers over 5,000 tasks: every task runs exactly once, none is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage, put_in
from sluice.datadir import Database
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.handlers import read_log

PIPELINE = """
name: jobs
source: {{embedded: {{queue: jobs, lease_s: {lease_s}}}}}
handler: {{python: tests.helpers.handlers:{handler}}}
consumer: {{concurrency: {concurrency}, prefetch: {prefetch}, timeout_s: 30,
           retry: {{max_attempts: 5}}}}
"""


def pipeline_file(tmp_path: Path, handler: str, lease_s: float = 1.0,
                  concurrency: int = 8, prefetch: int = 1000) -> Path:
    path = tmp_path / "jobs.yaml"
    path.write_text(PIPELINE.format(handler=handler, lease_s=lease_s, concurrency=concurrency,
                                    prefetch=prefetch))
    return path


def start_worker(pipeline: Path, data_dir: Path, run_log: str,
                 *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data_dir), *extra],
        cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=run_log),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def wait_for(predicate: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


async def test_sigkill_mid_task_then_completes_exactly_once(tmp_path: Path, data_dir: Path,
                                                            run_log: str) -> None:
    pipeline = pipeline_file(tmp_path, "behave", lease_s=1.0)
    db = Database.open(data_dir)
    embedded.submit(db, "jobs", "default", "jobs",
                    [QueuedMessage("victim", json.dumps({"sleep_first_s": 60}).encode())])
    first = start_worker(pipeline, data_dir, run_log)
    try:
        wait_for(lambda: any(e[0] == "start" for e in read_log(run_log)), 20)
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    finally:
        first.kill()
    store = SqliteTaskStore(db)
    assert (await store.get("victim", "jobs")).state == TaskState.RUNNING

    second = start_worker(pipeline, data_dir, run_log, "--drain")
    _, errs = second.communicate(timeout=30)
    assert second.returncode == 0, errs.decode()
    rec = await store.get("victim", "jobs")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)
    log = read_log(run_log)
    assert [e[0] for e in log] == ["start", "start", "done"]
    assert log[0][3] == first.pid and log[2][3] == second.pid

    # The crash between "recorded" and "deleted": the message reappears. It is not run again.
    db.run_sync(lambda c: put_in(c, "jobs", [QueuedMessage("victim", b"{}")], time.time()))
    third = start_worker(pipeline, data_dir, run_log, "--drain")
    _, errs = third.communicate(timeout=30)
    assert third.returncode == 0, errs.decode()
    assert [e[0] for e in read_log(run_log)].count("done") == 1
    assert db.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone()[0]) == 0


async def test_two_workers_5000_tasks_none_twice_none_lost(tmp_path: Path, data_dir: Path,
                                                           run_log: str) -> None:
    total = 5000
    # Each task takes 5 ms and a worker holds at most 48 (a small prefetch: 3 x the limit), so
    # the worker started first cannot drain the queue (5,000 x 5 ms / 16 = 1.6 s at least)
    # before the other has started.
    pipeline = pipeline_file(tmp_path, "behave", lease_s=30, concurrency=16, prefetch=1)
    db = Database.open(data_dir)
    ids = [f"task-{i:05d}" for i in range(total)]
    for start in range(0, total, 500):
        embedded.submit(db, "jobs", "default", "jobs",
                        [QueuedMessage(t, b'{"sleep_s": 0.005}') for t in ids[start:start + 500]])
    workers = [start_worker(pipeline, data_dir, run_log, "--drain") for _ in range(2)]
    for w in workers:
        _, errs = w.communicate(timeout=120)
        assert w.returncode == 0, errs.decode()
    runs = Counter(e[1] for e in read_log(run_log) if e[0] == "done")
    assert set(runs) == set(ids), f"lost: {len(set(ids) - set(runs))}"
    assert max(runs.values()) == 1, [t for t, n in runs.items() if n > 1][:10]
    pids = Counter(e[3] for e in read_log(run_log) if e[0] == "done")
    assert set(pids) == {w.pid for w in workers}  # both did work
    states = dict(db.run_sync(lambda c: c.execute(
        "SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()))
    assert states == {"SUCCEEDED": total}
    assert os.path.exists(data_dir / "sluice.db")
