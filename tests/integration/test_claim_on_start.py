"""An attempt counts when it starts, not when its task is fetched (rule 12 of the loop).

A worker SIGKILLed while tasks wait in its ordering lane behind a running one has counted
nothing for them: after its leases lapse, the next worker runs each of them once (with
``max_attempts: 1`` none is dead-lettered), and their start times are their real starts. The
attempt that was running when the worker died counts: with ``max_attempts: 1`` it is not run
again but ends FAILED as ``WorkerLost``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.consumer.dispatcher import Dispatcher
from sluice.datadir import Database
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.helpers.handlers import read_log
from tests.integration.test_failover import start_worker, wait_for

# One lane (partition order on the embedded queue: one partition), so every task after the
# first waits in it while the first runs.
PIPELINE = """
name: jobs
source: {embedded: {queue: jobs, lease_s: 1}}
handler: {python: tests.helpers.handlers:behave}
consumer:
  ordering: partition
  concurrency: 4
  timeout_s: 30
  retry: {max_attempts: 1}
"""


async def test_a_crash_counts_no_attempt_for_tasks_waiting_in_their_lane(
        tmp_path: Path, data_dir: Path, run_log: str) -> None:
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(PIPELINE)
    db = Database.open(data_dir)
    ids = [f"t{i}" for i in range(5)]
    embedded.submit(db, "jobs", "default", "jobs", [
        QueuedMessage(t, json.dumps({"sleep_first_s": 60} if t == "t0" else {}).encode())
        for t in ids])
    store = SqliteTaskStore(db)

    first = start_worker(pipeline, data_dir, run_log)
    try:
        wait_for(lambda: any(e[0] == "start" for e in read_log(run_log)), 20)
        # Every task is fetched and claimed: the first one runs, the others wait behind it.
        wait_for(lambda: db.run_sync(lambda c: c.execute(
            "SELECT COUNT(*) FROM tasks WHERE state = 'RUNNING'").fetchone()[0]) == 5, 10)
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    finally:
        first.kill()
    killed_at = time.time()
    assert [(e[0], e[1]) for e in read_log(run_log)] == [("start", "t0")]

    second = start_worker(pipeline, data_dir, run_log, "--drain")
    _, errs = second.communicate(timeout=60)
    assert second.returncode == 0, errs.decode()

    log = read_log(run_log)
    starts = [(e[1], e[2], e[3]) for e in log if e[0] == "start"]
    # Each task ran exactly once: the first in the worker that died (attempt 1, lost), each
    # waiting one in the second worker as its attempt 1, in lane order.
    assert starts == [("t0", 1, first.pid)] + [(t, 1, second.pid) for t in ids[1:]]
    records = {t: await store.get(t, "jobs") for t in ids}
    lost = records["t0"]
    assert (lost.state, lost.attempts, lost.error_type) == (TaskState.FAILED, 2, "WorkerLost")
    for t in ids[1:]:
        rec = records[t]
        assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), t
        # Started by the second worker, after the crash: not at the first worker's fetch.
        assert rec.started_at is not None and rec.started_at >= killed_at, t
    assert lost.started_at is not None and lost.started_at < killed_at
    # Only the task whose attempt was lost is dead-lettered.
    assert [d.task_id for d in await store.dead_letters("jobs")] == ["t0"]


def test_would_run_answers_as_offers_would_and_changes_nothing() -> None:
    d: Dispatcher[str] = Dispatcher("key")
    assert d.offer(("k", "a"), "a1", "a1")  # lane a held by a1
    lanes = [(("k", "a"), "a2"), (("k", "b"), "b1"), (("k", "b"), "b2"), (None, "n"),
             (("k", "a"), "a1")]
    assert d.would_run(lanes) == [False, True, False, True, True]
    assert d.offer(("k", "b"), "b1", "b1")  # b was left free by the peek
    assert not d.offer(("k", "a"), "a2", "a2")
