"""Batch handlers (``handler.batch``) through the consumer loop on the embedded queue: the
function gets lists of up to ``max_size`` messages and returns one outcome per message; an item
that is an exception fails (or retries) its task alone, an exception raised by the call (or a
list of the wrong length) retries the whole batch; under ``ordering: key`` a batch never holds
two messages of one key, and each key's messages still run in order; a plain ``def`` runs in
the thread pool; a batch that is not full is called after ``max_wait_ms``."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.helpers.batch_handlers import CALLS, batch_of, keys_per_call_unique, seen

DEADLINE_S = 60.0
HANDLERS = "tests.helpers.batch_handlers"
PIPELINE = """
name: jobs
source: {{embedded: {{queue: jobs}}}}
handler: {{python: "{handler}", batch: {{max_size: {max_size}, max_wait_ms: {max_wait_ms}}}}}
consumer:
  concurrency: {concurrency}
  ordering: {ordering}
  timeout_s: 30
  retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.1}}
"""


@pytest.fixture(autouse=True)
def _no_calls_yet() -> None:
    CALLS.clear()


def loop_for(data_dir: Path, *, handler: str = "handle", max_size: int = 50,
             max_wait_ms: float = 20, concurrency: int = 4,
             ordering: str = "key") -> ConsumerLoop:
    return build(parse_pipeline(PIPELINE.format(
        handler=f"{HANDLERS}:{handler}", max_size=max_size, max_wait_ms=max_wait_ms,
        concurrency=concurrency, ordering=ordering)), data_dir)


def submit(data_dir: Path, items: Sequence[tuple[str, str | None, dict[str, Any]]]) -> None:
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs", [
        QueuedMessage(task_id, json.dumps(payload).encode(), key=key)
        for task_id, key, payload in items])


async def drain(loop: ConsumerLoop) -> None:
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), DEADLINE_S)


async def test_tasks_run_in_batches_each_with_its_own_result(data_dir: Path) -> None:
    ids = [f"t{i:03d}" for i in range(200)]
    submit(data_dir, [(t, None, {"n": i}) for i, t in enumerate(ids)])
    loop = loop_for(data_dir, max_size=50)
    await drain(loop)

    sizes = [len(c.items) for c in CALLS]
    assert all(1 <= n <= 50 for n in sizes), sizes
    assert sum(n > 1 for n in sizes) > len(sizes) / 2, sizes  # most calls hold several
    assert len(sizes) < 200 / 2, sizes  # far fewer calls than tasks
    assert sorted(s.task_id for c in CALLS for s in c.items) == ids  # each once
    store = SqliteTaskStore(Database.open(data_dir))
    for task_id in ids:
        rec = await store.get(task_id, "jobs")
        assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), task_id
        result = json.loads(rec.result or b"")
        assert (result["task"], result["attempt"]) == (task_id, 1)  # its own, not a neighbour's
        assert result["batch"] == len(batch_of(task_id, 1))
    assert loop.stats.succeeded == 200
    assert await loop.source.pending() == 0


async def test_a_rejected_item_fails_alone_and_is_dead_lettered(data_dir: Path) -> None:
    ids = [f"t{i:02d}" for i in range(30)]
    submit(data_dir, [(t, None, {"reject": "bad"} if t == "t07" else {}) for t in ids])
    loop = loop_for(data_dir, max_size=50)
    await drain(loop)

    assert len(batch_of("t07", 1)) > 1  # it was one item of a batch
    store = SqliteTaskStore(Database.open(data_dir))
    bad = await store.get("t07", "jobs")
    assert (bad.state, bad.attempts, bad.error_type, bad.error_message) == (
        TaskState.FAILED, 1, "Reject", "bad")
    assert seen("t07") == [1]  # never retried
    for task_id in ids:
        if task_id != "t07":
            rec = await store.get(task_id, "jobs")
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), task_id
            assert json.loads(rec.result or b"")["task"] == task_id
    (kept,) = await store.dead_letters("jobs")
    assert kept.task_id == "t07"
    db = Database.open(data_dir)
    letters = db.run_sync(lambda c: EmbeddedQueue(db, "jobs.dlq").lease_in(c, 100, time.time()))
    assert [m.task_id for m in letters] == ["t07"]
    (letter,) = letters
    assert json.loads(letter.body) == {"reject": "bad"}  # the failed message itself
    assert letter.headers["sluice-error-type"] == "Reject"
    assert letter.headers["sluice-error-message"] == "bad"
    assert letter.headers["sluice-reason"] == "rejected by the handler"
    assert (loop.stats.succeeded, loop.stats.failed) == (29, 1)


async def test_a_retry_item_retries_that_task_alone(data_dir: Path) -> None:
    ids = [f"t{i:02d}" for i in range(30)]
    submit(data_dir, [(t, None, {"retry_once": True} if t == "t11" else {}) for t in ids])
    loop = loop_for(data_dir, max_size=50)
    await drain(loop)

    assert len(batch_of("t11", 1)) > 1
    assert seen("t11") == [1, 2]
    store = SqliteTaskStore(Database.open(data_dir))
    rec = await store.get("t11", "jobs")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)
    assert json.loads(rec.result or b"")["attempt"] == 2
    for task_id in ids:
        if task_id != "t11":
            assert seen(task_id) == [1], task_id
            other = await store.get(task_id, "jobs")
            assert (other.state, other.attempts) == (TaskState.SUCCEEDED, 1), task_id
    assert await store.dead_letters("jobs") == []
    assert (loop.stats.succeeded, loop.stats.retried) == (30, 1)


@pytest.mark.parametrize("fault", ["explode_once", "short_once"])
async def test_a_failed_call_retries_its_whole_batch(data_dir: Path, fault: str) -> None:
    # explode_once: the call raises; short_once: it returns one outcome too few. Either way
    # every task of that call is retried (and succeeds), the other batches' tasks run once.
    ids = [f"t{i:02d}" for i in range(20)]
    submit(data_dir, [(t, None, {fault: True} if t == "t12" else {}) for t in ids])
    loop = loop_for(data_dir, max_size=5)
    await drain(loop)

    failed = batch_of("t12", 1)
    assert len(failed) > 1
    assert len(failed) < len(ids)  # there were other batches
    store = SqliteTaskStore(Database.open(data_dir))
    for task_id in ids:
        rec = await store.get(task_id, "jobs")
        want = 2 if task_id in failed else 1
        assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, want), task_id
        assert seen(task_id) == list(range(1, want + 1)), task_id
        assert json.loads(rec.result or b"")["attempt"] == want
    assert loop.stats.retried == len(failed)
    assert await store.dead_letters("jobs") == []


async def test_a_batch_never_holds_two_messages_of_one_key(data_dir: Path) -> None:
    # 20 keys x 10 messages, interleaved; one message in the middle of its key retries once.
    items: list[tuple[str, str | None, dict[str, Any]]] = []
    for n in range(10):
        for k in range(20):
            payload: dict[str, Any] = {"seq": n}
            if (k, n) == (3, 4):
                payload["retry_once"] = True
            items.append((f"k{k:02d}-{n}", f"k{k:02d}", payload))
    submit(data_dir, items)
    loop = loop_for(data_dir, max_size=50, concurrency=4, ordering="key")
    await drain(loop)

    keys_per_call_unique()
    assert any(len(c.items) > 1 for c in CALLS)  # keys did run together
    handled: dict[str, list[int]] = defaultdict(list)  # key -> seq of each attempt, in order
    for call in CALLS:
        for s in call.items:
            assert s.key is not None
            handled[s.key].append(s.payload["seq"])
    for k in range(20):
        key = f"k{k:02d}"
        want = list(range(10)) if k != 3 else [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]
        assert handled[key] == want, key  # in order, the retry before anything behind it
    records = await SqliteTaskStore(Database.open(data_dir)).stats("jobs")
    assert len(records) == 200
    assert all(r.state == TaskState.SUCCEEDED for r in records)


async def test_a_plain_function_takes_batches_in_the_thread_pool(data_dir: Path) -> None:
    ids = [f"t{i:02d}" for i in range(40)]
    submit(data_dir, [(t, None, {"reject": "nope"} if t == "t05" else
                       {"retry_once": True} if t == "t06" else {}) for t in ids])
    loop = loop_for(data_dir, handler="handle_sync", max_size=10)
    await drain(loop)

    assert CALLS and all(c.thread.startswith("sluice-handler") for c in CALLS)
    assert all(len(c.items) <= 10 for c in CALLS)
    assert sum(len(c.items) > 1 for c in CALLS) > len(CALLS) / 2
    store = SqliteTaskStore(Database.open(data_dir))
    for task_id in ids:
        rec = await store.get(task_id, "jobs")
        if task_id == "t05":
            assert (rec.state, rec.attempts, rec.error_type) == (TaskState.FAILED, 1, "Reject")
        elif task_id == "t06":
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)
        else:
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), task_id
            assert json.loads(rec.result or b"")["task"] == task_id
    assert [d.task_id for d in await store.dead_letters("jobs")] == ["t05"]


async def test_a_batch_that_is_not_full_is_called_after_max_wait_ms(data_dir: Path) -> None:
    submit(data_dir, [(f"t{i}", None, {}) for i in range(3)])
    loop = loop_for(data_dir, max_size=100, max_wait_ms=300)
    began = time.monotonic()
    running = asyncio.create_task(loop.run(asyncio.Event(), drain=True))
    try:
        deadline = began + 5
        while not CALLS:
            assert time.monotonic() < deadline, "no call within 5 s (max_wait_ms is 300)"
            await asyncio.sleep(0.005)
        (call,) = CALLS
        waited = call.at - began
        # It waited for more (up to max_wait_ms), then called with what it had.
        assert 0.28 <= waited <= 0.3 + 1.0, waited
        assert sorted(s.task_id for s in call.items) == ["t0", "t1", "t2"]
        await asyncio.wait_for(running, DEADLINE_S)
    finally:
        running.cancel()
    assert len(CALLS) == 1
    records = await SqliteTaskStore(Database.open(data_dir)).stats("jobs")
    assert [r.state for r in records] == [TaskState.SUCCEEDED] * 3


async def test_a_message_that_does_not_decode_fails_alone(data_dir: Path) -> None:
    # The handler reads every message's payload (as most do); one body is not JSON. That
    # message fails (InvalidPayload, dead-lettered, never retried), as it would without a batch
    # and as it does with an http batch handler; its batch's other tasks succeed.
    submit(data_dir, [(f"t{i}", None, {"n": i}) for i in range(4)])
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs",
                    [QueuedMessage("bad", b"{not json")])
    loop = loop_for(data_dir, max_size=50)
    await drain(loop)

    store = SqliteTaskStore(Database.open(data_dir))
    bad = await store.get("bad", "jobs")
    assert (bad.state, bad.attempts, bad.error_type) == (TaskState.FAILED, 1, "InvalidPayload")
    for task_id in ("t0", "t1", "t2", "t3"):
        rec = await store.get(task_id, "jobs")
        assert (rec.state, rec.error_type) == (TaskState.SUCCEEDED, None), (
            task_id, rec.state, rec.error_type, rec.error_message)
    assert [d.task_id for d in await store.dead_letters("jobs")] == ["bad"]
