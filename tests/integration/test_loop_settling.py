"""The consumer loop around its group commit: a full layer wakes when a commit frees room, a
lane moves on only once its predecessor's end is recorded, and a stop hands back unstarted
tasks un-claimed (QUEUED, attempts as before)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import QueuedMessage
from sluice.consumer import loop as loop_module
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import Completion, TaskStore
from tests.helpers.handlers import read_log

PIPELINE = """
name: jobs
source: {{embedded: {{queue: jobs, lease_s: 30}}}}
handler: {{python: {handler}}}
consumer:
  ordering: {ordering}
  concurrency: {concurrency}
  timeout_s: 5
  retry: {{max_attempts: {max_attempts}, initial_backoff_s: 0.05, max_backoff_s: 0.2}}
"""


def make_loop(data_dir: Path, *, handler: str = "tests.helpers.handlers:behave",
              ordering: str = "key", concurrency: int = 4, max_attempts: int = 3,
              ) -> ConsumerLoop:
    return build(parse_pipeline(PIPELINE.format(
        handler=handler, ordering=ordering, concurrency=concurrency,
        max_attempts=max_attempts)), data_dir)


def submit(data_dir: Path, payloads: Sequence[dict[str, Any]], *, key: str | None = None,
           prefix: str = "t") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(len(payloads))]
    msgs = [QueuedMessage(i, json.dumps(p).encode(), key=key)
            for i, p in zip(ids, payloads, strict=True)]
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs", msgs)
    return ids


async def drain(loop: ConsumerLoop, timeout_s: float = 30) -> None:
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), timeout_s)


async def test_a_full_layer_wakes_when_a_group_commit_frees_room(
        data_dir: Path, run_log: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fetch loop's own timer made an hour long: the drain can only finish if the loop is
    # woken by the room each group commit makes (the deliveries it releases), never by time.
    monkeypatch.setattr(loop_module, "ROOM_WAIT_S", 3600.0)
    submit(data_dir, [{} for _ in range(300)])
    loop = make_loop(data_dir, handler="tests.helpers.handlers:echo", ordering="unordered",
                     concurrency=2)
    await drain(loop)
    assert loop.stats.succeeded == 300


class RecordingStore:
    """A task store whose group commits take a while and are logged when written."""

    def __init__(self, inner: TaskStore, log_path: str, delay_s: float) -> None:
        self.inner, self.log_path, self.delay_s = inner, log_path, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def complete(self, pipeline: str, completions: Sequence[Completion], owner: str,
                       now: float) -> list[TaskState | None]:
        await asyncio.sleep(self.delay_s)
        states = await self.inner.complete(pipeline, completions, owner, now)
        with open(self.log_path, "a") as f:
            for done in completions:
                f.write(f"recorded {done.task_id} 0 {os.getpid()}\n")
        return states


async def test_a_lane_moves_on_once_its_predecessor_end_is_recorded(
        data_dir: Path, run_log: str) -> None:
    # Three messages of one lane (one partition; the embedded queue orders keys itself, so
    # its key mode never fills a lane, but a Kafka source's keys take this path). Were the
    # next started as soon as the previous one returned, a crash before the slow group commit
    # would run the finished one again on the next owner although a later message of its lane
    # had already run after it.
    ids = submit(data_dir, [{}, {}, {}], key="k")
    loop = make_loop(data_dir, ordering="partition")
    loop.store = RecordingStore(loop.store, run_log, delay_s=0.2)
    await drain(loop)
    events = [(e[0], e[1]) for e in read_log(run_log) if e[0] in ("start", "recorded")]
    assert events == [(event, tid) for tid in ids for event in ("start", "recorded")]


async def test_a_stop_hands_back_unstarted_tasks_unclaimed(data_dir: Path,
                                                           run_log: str) -> None:
    # Concurrency 2, six slow tasks: the layer claims up to 3 x 2 ahead; at the stop the
    # running two finish and the claimed-ahead ones go back QUEUED, attempts unchanged.
    ids = submit(data_dir, [{"sleep_s": 0.3} for _ in range(6)])
    loop = make_loop(data_dir, ordering="unordered", concurrency=2, max_attempts=1)
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    while len([e for e in read_log(run_log) if e[0] == "start"]) < 2:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(runner, 10)
    store = SqliteTaskStore(Database.open(data_dir))
    records = [await store.get(tid, "jobs") for tid in ids]
    started = {e[1] for e in read_log(run_log) if e[0] == "start"}
    assert len(started) == 2
    for rec in records:
        if rec.task_id in started:
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1)
        else:
            assert (rec.state, rec.attempts, rec.started_at) == (TaskState.QUEUED, 0, None)
    # The next run, with max_attempts: 1, runs each of them once; none is dead-lettered.
    await drain(make_loop(data_dir, ordering="unordered", concurrency=2, max_attempts=1))
    records = [await store.get(tid, "jobs") for tid in ids]
    assert [(r.state, r.attempts) for r in records] == [(TaskState.SUCCEEDED, 1)] * 6
    starts = sorted(e[1] for e in read_log(run_log) if e[0] == "start")
    assert starts == sorted(ids)


async def test_a_stop_hands_back_lane_waiting_tasks_unclaimed(data_dir: Path,
                                                              run_log: str) -> None:
    # Partition order: the tasks behind the running one wait in its lane, claimed.
    ids = submit(data_dir, [{"sleep_s": 0.3} for _ in range(4)])
    loop = make_loop(data_dir, ordering="partition", concurrency=4, max_attempts=1)
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    while not read_log(run_log):
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(runner, 10)
    store = SqliteTaskStore(Database.open(data_dir))
    states = [(await store.get(tid, "jobs")).state for tid in ids]
    assert states == [TaskState.SUCCEEDED] + [TaskState.QUEUED] * 3
    await drain(make_loop(data_dir, ordering="partition", concurrency=4, max_attempts=1))
    records = [await store.get(tid, "jobs") for tid in ids]
    assert [(r.state, r.attempts) for r in records] == [(TaskState.SUCCEEDED, 1)] * 4


async def test_a_task_taken_over_while_admitted_lets_its_lane_move_on(data_dir: Path,
                                                                      run_log: str) -> None:
    # Two tasks of one lane: the first admitted (holding the lane, waiting for a slot), the
    # second waiting behind it. Another worker takes the first over: it is dropped here, and
    # its lane must not stay held by it (the second would then wait forever).
    from sluice.tasks.store import ClaimResult, ClaimStatus

    submit(data_dir, [{}, {}])
    loop = make_loop(data_dir, ordering="partition", concurrency=1)
    await loop.source.start()
    first, second = await loop.source.fetch(2, 1.0)
    for delivery in (first, second):
        loop._offer(delivery, ClaimResult(ClaimStatus.RUN, 1))
    assert [d.task_id for d, _ in loop._ready] == [first.task_id]
    await loop._drop_lost({first.task_id})
    assert [d.task_id for d, _ in loop._ready] == [second.task_id]
    await loop.source.close()
