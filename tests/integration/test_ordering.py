"""Ordering modes through the real consumer loop on the embedded queue: per-key order under
concurrency, partition mode never overlapping, and the store lease of a task that waits in its
lane kept alive (no other worker takes it over meanwhile)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import Claim, ClaimStatus
from tests.helpers.handlers import read_log

PIPELINE = """
name: jobs
source: {{embedded: {{queue: jobs, lease_s: {lease_s}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer:
  concurrency: {concurrency}
  ordering: {ordering}
  timeout_s: 30
  retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.1}}
"""


def submit(data_dir: Path, items: list[tuple[str, str | None, dict[str, object]]]) -> None:
    msgs = [QueuedMessage(task_id, json.dumps(payload).encode(), key=key)
            for task_id, key, payload in items]
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs", msgs)


def loop_for(data_dir: Path, *, ordering: str, concurrency: int,
             lease_s: float = 30) -> ConsumerLoop:
    text = PIPELINE.format(ordering=ordering, concurrency=concurrency, lease_s=lease_s)
    return build(parse_pipeline(text), data_dir)


def max_overlap(log: list[tuple[str, str, int, int]]) -> int:
    running, most = 0, 0
    for event, *_ in log:
        running += 1 if event == "start" else -1 if event == "done" else 0
        most = max(most, running)
    return most


async def test_each_keys_messages_run_one_at_a_time_in_order(data_dir: Path,
                                                              run_log: str) -> None:
    # 30 keys × 10 messages, interleaved; one message fails once in the middle of its key.
    items: list[tuple[str, str | None, dict[str, object]]] = []
    for n in range(10):
        for k in range(30):
            payload: dict[str, object] = {"sleep_s": 0.01}
            if (k, n) == (7, 4):
                payload["fail_until"] = 2
            items.append((f"k{k:02d}-{n}", f"k{k:02d}", payload))
    submit(data_dir, items)
    loop = loop_for(data_dir, ordering="key", concurrency=16)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 60)
    log = read_log(run_log)
    per_key: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for event, task_id, _attempt, _pid in log:
        per_key[task_id.split("-")[0]].append((event, task_id))
    for key, events in per_key.items():
        wanted = [t for t, k, _ in items if k == key]
        assert [t for e, t in events if e == "done"] == wanted, key
        # one at a time: each start is followed by that task's end before the next start
        opened: str | None = None
        for event, task_id in events:
            if event == "start":
                # (a failed attempt logs no end: its retry may start the same task again)
                assert opened in (None, task_id), f"{key}: {task_id} started while {opened} ran"
                opened = task_id
            elif event == "done":
                assert opened == task_id
                opened = None
    assert max_overlap(log) > 4  # different keys did run in parallel
    records = await SqliteTaskStore(Database.open(data_dir)).stats("jobs")
    assert len(records) == 300 and all(r.state == TaskState.SUCCEEDED for r in records)


async def test_partition_mode_never_overlaps(data_dir: Path, run_log: str) -> None:
    # The embedded queue is one partition: concurrency 8 must still run one task at a time.
    submit(data_dir, [(f"t{i:03d}", f"k{i % 5}", {"sleep_s": 0.005}) for i in range(60)])
    loop = loop_for(data_dir, ordering="partition", concurrency=8)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 60)
    log = read_log(run_log)
    assert max_overlap(log) == 1
    assert [t for e, t, *_ in log if e == "done"] == [f"t{i:03d}" for i in range(60)]


async def test_unordered_runs_up_to_the_limit(data_dir: Path, run_log: str) -> None:
    submit(data_dir, [(f"t{i:03d}", "same", {"sleep_s": 0.05}) for i in range(40)])
    loop = loop_for(data_dir, ordering="unordered", concurrency=8)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 60)
    assert max_overlap(read_log(run_log)) == 8  # one key, yet in parallel


async def test_a_task_waiting_in_its_lane_keeps_its_store_lease(data_dir: Path,
                                                                run_log: str) -> None:
    # Partition mode: "first" runs for 2 s; "second" is claimed with it and waits in the lane,
    # 4x longer than the 0.5 s lease. Meanwhile another worker must not be able to take it.
    submit(data_dir, [("first", None, {"sleep_s": 2.0}), ("second", None, {})])
    loop = loop_for(data_dir, ordering="partition", concurrency=2, lease_s=0.5)
    running = asyncio.create_task(loop.run(asyncio.Event(), drain=True))
    store = SqliteTaskStore(Database.open(data_dir))
    deadline = time.monotonic() + 10
    while not any(e == "start" for e, *_ in read_log(run_log)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await asyncio.sleep(1.2)  # more than two lease lengths
    (other,) = await store.claim("jobs", "default", [Claim("second")], "another-worker", 30,
                                 time.time())
    assert other.status == ClaimStatus.BUSY
    await asyncio.wait_for(running, 20)
    assert [t for e, t, *_ in read_log(run_log) if e == "done"] == ["first", "second"]
    record = await store.get("second", "jobs")
    assert (record.state, record.attempts) == (TaskState.SUCCEEDED, 1)
