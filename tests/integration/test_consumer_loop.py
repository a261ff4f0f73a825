"""The consumer loop end to end on the embedded queue: results, retries with backoff, Reject,
timeouts, max_age_s, dead letters with the reason, skip of finished tasks, graceful stop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage, put_in
from sluice.consumer.loop import ConsumerLoop
from sluice.datadir import Database
from sluice.runtime import build
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from tests.helpers.handlers import read_log

PIPELINE = """
name: jobs
source: {{embedded: {{queue: jobs, lease_s: {lease_s}}}}}
handler: {{python: {handler}}}
consumer:
  concurrency: 4
  timeout_s: {timeout_s}
  retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.2, max_age_s: {max_age_s}}}
"""


def make_loop(data_dir: Path, handler: str = "tests.helpers.handlers:behave",
              timeout_s: float = 5, max_age_s: float = 3600, lease_s: float = 30) -> ConsumerLoop:
    config = parse_pipeline(PIPELINE.format(handler=handler, timeout_s=timeout_s,
                                            max_age_s=max_age_s, lease_s=lease_s))
    return build(config, data_dir)


def submit(data_dir: Path, *payloads: dict[str, Any], ids: list[str] | None = None) -> list[str]:
    ids = ids or [f"t{i}" for i in range(len(payloads))]
    msgs = [QueuedMessage(i, json.dumps(p).encode()) for i, p in zip(ids, payloads, strict=True)]
    embedded.submit(Database.open(data_dir), "jobs", "default", "jobs", msgs)
    return ids


async def drain(loop: ConsumerLoop, timeout_s: float = 20) -> None:
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), timeout_s)


async def task(data_dir: Path, task_id: str) -> Any:
    return await SqliteTaskStore(Database.open(data_dir)).get(task_id, "jobs")


def dead_letters(data_dir: Path) -> list[Any]:
    db = Database.open(data_dir)
    q = EmbeddedQueue(db, "jobs.dlq")
    return db.run_sync(lambda c: q.lease_in(c, 100, time.time()))


async def test_success_stores_result_and_timeline(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"x": 1})
    loop = make_loop(data_dir)
    await drain(loop)
    rec = await task(data_dir, "t0")
    assert rec.state == TaskState.SUCCEEDED
    assert json.loads(rec.result) == {"attempt": 1}
    assert rec.received_at <= rec.queued_at <= rec.started_at <= rec.finished_at
    assert loop.stats.succeeded == 1
    assert await loop.source.pending() == 0  # the message was deleted


async def test_retries_with_backoff_then_succeeds(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"fail_until": 3})
    await drain(make_loop(data_dir))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 3)
    assert [e[2] for e in read_log(run_log) if e[0] == "start"] == [1, 2, 3]


async def test_retry_delay_from_handler_is_honoured(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"fail_until": 2, "retry_delay_s": 0.6})
    start = time.monotonic()
    await drain(make_loop(data_dir))
    assert time.monotonic() - start >= 0.6
    assert (await task(data_dir, "t0")).state == TaskState.SUCCEEDED


async def test_last_attempt_fails_to_dead_letter_with_reason(data_dir: Path,
                                                             run_log: str) -> None:
    submit(data_dir, {"fail_until": 99, "n": 7})
    await drain(make_loop(data_dir))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts, rec.error_type) == (TaskState.FAILED, 3, "RuntimeError")
    assert "gave up after 3 attempts" in rec.error_message
    (dl,) = dead_letters(data_dir)
    assert json.loads(dl.body) == {"fail_until": 99, "n": 7}  # the failed message itself
    assert dl.headers["sluice-error-type"] == "RuntimeError"
    assert dl.headers["sluice-error-message"] == "failing attempt 3"
    assert dl.headers["sluice-attempts"] == "3"
    assert "max_attempts=3" in dl.headers["sluice-reason"]
    assert dl.headers["sluice-task-id"] == "t0"


async def test_reject_fails_at_once(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"reject": "no such image"})
    await drain(make_loop(data_dir))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts, rec.error_type) == (TaskState.FAILED, 1, "Reject")
    (dl,) = dead_letters(data_dir)
    assert dl.headers["sluice-reason"] == "rejected by the handler"


async def test_timeout_counts_as_failed_attempt_and_retries(data_dir: Path,
                                                            run_log: str) -> None:
    submit(data_dir, {"sleep_first_s": 5})
    await drain(make_loop(data_dir, timeout_s=0.3))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)


async def test_sync_handler_timeout_retries(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"sleep_s": 0.5, "fail_until": 0})
    await drain(make_loop(data_dir, handler="tests.helpers.handlers:behave_sync", timeout_s=0.2))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts, rec.error_type) == (TaskState.FAILED, 3, "Timeout")


async def test_max_age_stops_retries(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"fail_until": 99, "sleep_s": 0.05})  # older than max_age_s when it fails
    await drain(make_loop(data_dir, max_age_s=0.01))
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts) == (TaskState.FAILED, 1)
    assert "max_age_s" in rec.error_message


async def test_invalid_json_body_fails_without_stopping_others(data_dir: Path,
                                                               run_log: str) -> None:
    db = Database.open(data_dir)
    embedded.submit(db, "jobs", "default", "jobs",
                    [QueuedMessage("bad", b"{not json"), QueuedMessage("good", b"{}")])
    await drain(make_loop(data_dir))
    bad, good = await task(data_dir, "bad"), await task(data_dir, "good")
    assert (bad.state, bad.error_type) == (TaskState.FAILED, "InvalidPayload")
    assert good.state == TaskState.SUCCEEDED


async def test_result_that_cannot_be_stored_fails(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {})
    await drain(make_loop(data_dir, handler="tests.helpers.handlers:not_json"))
    assert (await task(data_dir, "t0")).error_type == "InvalidResult"


async def test_message_of_finished_task_is_deleted_and_skipped(data_dir: Path,
                                                               run_log: str) -> None:
    submit(data_dir, {})
    await drain(make_loop(data_dir))
    # The crash between "recorded SUCCEEDED" and "deleted the message": the message reappears.
    db = Database.open(data_dir)
    db.run_sync(lambda c: put_in(c, "jobs", [QueuedMessage("t0", b"{}")], time.time()))
    loop = make_loop(data_dir)
    await drain(loop)
    assert loop.stats.skipped == 1
    assert [e for e in read_log(run_log) if e[0] == "done"].__len__() == 1
    assert await loop.source.pending() == 0


async def test_graceful_stop_finishes_in_flight(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"sleep_s": 0.5}, {"sleep_s": 0.5})
    loop = make_loop(data_dir)
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    while len([e for e in read_log(run_log) if e[0] == "start"]) < 2:
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(runner, 5)
    for tid in ("t0", "t1"):
        assert (await task(data_dir, tid)).state == TaskState.SUCCEEDED


async def test_stop_hands_back_what_outlives_the_timeout(data_dir: Path, run_log: str) -> None:
    submit(data_dir, {"sleep_first_s": 30})
    loop = make_loop(data_dir, timeout_s=60)
    stop = asyncio.Event()
    runner = asyncio.create_task(loop.run(stop))
    while not read_log(run_log):
        await asyncio.sleep(0.02)
    # A short grace so the test does not wait a minute: patch the configured timeout.
    loop.config = parse_pipeline(PIPELINE.format(handler="tests.helpers.handlers:behave",
                                                 timeout_s=0.2, max_age_s=3600, lease_s=30))
    stop.set()
    await asyncio.wait_for(runner, 5)
    # Handed back at once: the next worker takes it without waiting for the 30 s lease.
    rec = await task(data_dir, "t0")
    assert rec.state == TaskState.RUNNING
    await drain(make_loop(data_dir), timeout_s=10)
    rec = await task(data_dir, "t0")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)


async def test_concurrency_bounds_tasks_in_flight(data_dir: Path, run_log: str) -> None:
    submit(data_dir, *[{"sleep_s": 0.1} for _ in range(20)])
    loop = make_loop(data_dir)  # concurrency: 4
    seen: list[int] = []
    runner = asyncio.create_task(drain(loop))
    while not runner.done():
        seen.append(loop.stats.in_flight)
        await asyncio.sleep(0.01)
    await runner
    assert max(seen) == 4
    assert loop.stats.succeeded == 20
    narrow = make_loop(data_dir)
    wide = build(narrow.config.with_concurrency(16), data_dir)  # `sluice run --concurrency 16`
    submit(data_dir, *[{"sleep_s": 0.2} for _ in range(32)], ids=[f"w{i}" for i in range(32)])
    seen.clear()
    runner = asyncio.create_task(drain(wide))
    while not runner.done():
        seen.append(wide.stats.in_flight)
        await asyncio.sleep(0.01)
    await runner
    assert max(seen) == 16


async def test_lease_is_extended_while_the_handler_runs(data_dir: Path, run_log: str) -> None:
    # The handler runs 4x longer than the lease; a second worker polls the same queue all along.
    submit(data_dir, {"sleep_s": 2.0})
    first, second = make_loop(data_dir, lease_s=0.5), make_loop(data_dir, lease_s=0.5)
    await asyncio.wait_for(asyncio.gather(first.run(asyncio.Event(), drain=True),
                                          second.run(asyncio.Event(), drain=True)), 20)
    assert [e[0] for e in read_log(run_log)] == ["start", "done"]  # never taken over
    assert (await task(data_dir, "t0")).attempts == 1
