"""Consumer loop rule 16: attempts run back to back in one asyncio task while tasks are ready
(no asyncio task per message), and cancelling one running attempt ends that attempt only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.helpers import task_reuse

PIPELINE = """
name: reuse
source: {embedded: {queue: reuse}}
handler: {python: "tests.helpers.task_reuse:note_task"}
consumer: {concurrency: 2, ordering: unordered}
"""


def submit(data_dir: Path, payloads: Sequence[Mapping[str, object]]) -> list[str]:
    ids = [f"r{i:03d}" for i in range(len(payloads))]
    embedded.submit(Database.open(data_dir), "reuse", "default", "reuse",
                    [QueuedMessage(i, json.dumps(p).encode()) for i, p in zip(ids, payloads,
                                                                             strict=True)])
    return ids


async def test_ready_tasks_run_back_to_back_in_few_asyncio_tasks(data_dir: Path) -> None:
    task_reuse.TASKS.clear()
    ids = submit(data_dir, [{} for _ in range(300)])
    loop = build(parse_pipeline(PIPELINE), data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), 30)
    assert set(task_reuse.TASKS) == set(ids)
    # One asyncio task per message would make 300; a task goes on while tasks are ready.
    assert len({id(t) for t in task_reuse.TASKS.values()}) < 60
    store = SqliteTaskStore(Database.open(data_dir))
    assert [(await store.get(i, "reuse")).state for i in ids] == [TaskState.SUCCEEDED] * 300


async def test_a_cancelled_attempt_ends_alone_and_its_asyncio_task_goes_on(
        data_dir: Path) -> None:
    task_reuse.TASKS.clear()
    ids = submit(data_dir, [{"sleep_s": 30}] + [{} for _ in range(20)])
    loop = build(parse_pipeline(PIPELINE), data_dir)
    stop = asyncio.Event()
    run = asyncio.create_task(loop.run(stop))
    store = SqliteTaskStore(Database.open(data_dir))
    for _ in range(200):
        if ids[0] in task_reuse.TASKS:
            break
        await asyncio.sleep(0.02)
    await store.transition("reuse", ids[0], TaskState.CANCELLED, 0.0)
    assert loop.cancel_attempt(ids[0])
    for _ in range(300):
        states = [(await store.get(i, "reuse")).state for i in ids]
        if all(s.final for s in states):
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(run, 30)
    assert states[0] == TaskState.CANCELLED
    assert all(s == TaskState.SUCCEEDED for s in states[1:])
    assert loop.stats.succeeded == 20
