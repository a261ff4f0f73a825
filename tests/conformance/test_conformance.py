"""One suite, every connector, each on its real broker (see conftest.CONNECTORS); what a
connector can do is read from its declared capabilities, never from its name.

What a source must do inside the consumer layer:

- deliver every message, each task run once;
- redeliver a message whose attempt failed (nack), until it succeeds;
- send a task that fails for good to the dead letter, with the reason;
- keep a key's messages in order under ``ordering: key`` (a retry included), and a
  partition's under ``ordering: partition``, however many wait behind a retry;
- hold back while the pipeline is paused (the layer does not fetch), then deliver all of it;
- lose nothing when a worker process is SIGKILLed mid-task (at-least-once);
- lose nothing when a second worker joins and then leaves (rebalance).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from sluice.config.load import parse_pipeline
from sluice.consumer.loop import ConsumerLoop
from sluice.runtime import build, run_pipelines
from sluice.tasks.state import TaskState
from tests.conformance.conftest import Connector, Item
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.handlers import read_log
from tests.helpers.waiting import wait_until

PIPELINE = """
name: jobs
source: {source}
handler: {{python: "tests.helpers.handlers:{handler}"}}
consumer:
  concurrency: {concurrency}
  ordering: {ordering}
  timeout_s: 30
  retry: {{max_attempts: {max_attempts}, initial_backoff_s: 0.05, max_backoff_s: 0.2}}
dead_letter: {dead_letter}
"""

RUN_TIMEOUT_S = 60.0


def pipeline_text(connector: Connector, *, concurrency: int = 8, max_attempts: int = 5,
                  ordering: str = "unordered", max_buffered: int | None = None) -> str:
    return PIPELINE.format(source=connector.source_yaml(max_buffered=max_buffered),
                           handler="behave",
                           concurrency=concurrency, max_attempts=max_attempts,
                           ordering=ordering, dead_letter=connector.dead_letter_yaml())


def make_loop(connector: Connector, data_dir: Path, *, concurrency: int = 8,
              max_attempts: int = 5, ordering: str = "unordered",
              max_buffered: int | None = None) -> ConsumerLoop:
    text = pipeline_text(connector, concurrency=concurrency, max_attempts=max_attempts,
                         ordering=ordering, max_buffered=max_buffered)
    return build(parse_pipeline(text), data_dir, store_url=connector.store_url)


async def drain(loop: ConsumerLoop) -> None:
    await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), RUN_TIMEOUT_S)


async def state_counts(connector: Connector, data_dir: Path) -> Counter[str]:
    return Counter(str(r.state) for r in await connector.task_store(data_dir).stats())


def done_runs(run_log: str) -> Counter[str]:
    return Counter(e[1] for e in read_log(run_log) if e[0] == "done")


def items(n: int, prefix: str = "t", **payload: object) -> list[Item]:
    return [Item(f"{prefix}{i:05d}", dict(payload), key=f"k{i % 5}") for i in range(n)]


async def test_delivers_every_message_once(connector: Connector, data_dir: Path,
                                           run_log: str) -> None:
    sent = items(300)
    connector.publish(sent)
    await drain(make_loop(connector, data_dir))
    runs = done_runs(run_log)
    assert set(runs) == {i.task_id for i in sent}
    assert max(runs.values()) == 1
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 300}


async def test_failed_attempt_is_redelivered_until_it_succeeds(connector: Connector,
                                                               data_dir: Path,
                                                               run_log: str) -> None:
    connector.publish([Item("flaky", {"fail_until": 3}), *items(20)])
    await drain(make_loop(connector, data_dir))
    rec = await connector.task_store(data_dir).get("flaky", "jobs")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 3)
    assert [e[2] for e in read_log(run_log) if e[1] == "flaky" and e[0] == "start"] == [1, 2, 3]
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 21}


async def test_failed_for_good_goes_to_the_dead_letter(connector: Connector, data_dir: Path,
                                                       run_log: str) -> None:
    connector.publish([Item("bad", {"reject": "no thumbnail for you"}),
                       Item("worse", {"fail_until": 99}), *items(10)])
    await drain(make_loop(connector, data_dir, max_attempts=2))
    letters = {d.task_id: d for d in connector.dead_letters(expected=2)}
    assert set(letters) == {"bad", "worse"}
    assert letters["bad"].headers["sluice-reason"] == "rejected by the handler"
    assert letters["bad"].headers["sluice-error-message"] == "no thumbnail for you"
    assert letters["worse"].headers["sluice-attempts"] == "2"
    assert b"fail_until" in letters["worse"].body  # the failed message itself
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 10, "FAILED": 2}


async def test_order_per_key(connector: Connector, data_dir: Path, run_log: str) -> None:
    # ordering: key, with concurrency beyond the number of keys and a retry in the middle of
    # one key's messages: each key's messages still run one at a time, in the order sent.
    sent = [Item(f"o{i:04d}", {"fail_until": 2} if i == 41 else {"sleep_s": 0.002},
                 key=f"k{i % 4}") for i in range(200)]
    connector.publish(sent)
    await drain(make_loop(connector, data_dir, concurrency=16, ordering="key"))
    log = read_log(run_log)
    for key in ("k0", "k1", "k2", "k3"):
        wanted = [i.task_id for i in sent if i.key == key]
        assert [e[1] for e in log if e[0] == "done" and e[1] in set(wanted)] == wanted
        starts = [e[1] for e in log if e[0] == "start" and e[1] in set(wanted)]
        assert starts == sorted(starts)  # the retry ran again before anything behind it
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 200}


async def test_a_retry_holding_its_lane_comes_back_when_waiters_fill_the_budget(
        connector: Connector, data_dir: Path, run_log: str) -> None:
    # ordering: partition, concurrency 1 (fetch budget 2), one key (one partition): the first
    # message fails once; while its retry is delayed, the messages behind it fill the budget.
    # The retry must still be fetched when due (the lane waits for it), and order must hold.
    sent = [Item(f"r{i:03d}", {"fail_until": 2, "retry_delay_s": 0.5} if i == 0 else {},
                 key="one") for i in range(6)]
    connector.publish(sent)
    await drain(make_loop(connector, data_dir, concurrency=1, ordering="partition"))
    assert [e[1] for e in read_log(run_log) if e[0] == "done"] == [i.task_id for i in sent]
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 6}


async def test_paused_pipeline_holds_back_then_delivers_all(connector: Connector,
                                                            data_dir: Path,
                                                            run_log: str) -> None:
    store = connector.task_store(data_dir)
    await store.set_paused("jobs", True, time.time())
    sent = items(100)
    connector.publish(sent)
    loop = make_loop(connector, data_dir, max_buffered=10)
    stop = asyncio.Event()
    running = asyncio.create_task(run_pipelines([loop], stop))
    try:
        if connector.observable_backpressure:
            # The layer fetches nothing, the source's buffer fills, and it stops reading.
            await wait_until(lambda: connector.holding_back(loop.source))
        else:
            await asyncio.sleep(1.0)
        assert read_log(run_log) == []
        await store.set_paused("jobs", False, time.time())
        await wait_until(lambda: len(done_runs(run_log)) == len(sent))
    finally:
        stop.set()
        await asyncio.wait_for(running, RUN_TIMEOUT_S)
    runs = done_runs(run_log)
    assert set(runs) == {i.task_id for i in sent} and max(runs.values()) == 1


# -- across worker processes ------------------------------------------------------------------

def start_worker(connector: Connector, pipeline: Path, data_dir: Path, run_log: str,
                 *extra: str) -> subprocess.Popen[bytes]:
    store = ["--store", connector.store_url] if connector.store_url else []
    return subprocess.Popen(
        [*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data_dir), *store, *extra],
        cwd=ROOT, env=subprocess_env(SLUICE_TEST_LOG=run_log),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def stop_worker(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        _, errs = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        proc.kill()
    return errs.decode(errors="replace")


async def test_at_least_once_across_a_worker_crash(connector: Connector, data_dir: Path,
                                                   run_log: str, tmp_path: Path) -> None:
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(pipeline_text(connector, concurrency=4))
    sent = [Item("victim", {"sleep_first_s": 120}), *items(50, sleep_s=0.01)]
    connector.publish(sent)
    first = start_worker(connector, pipeline, data_dir, run_log)
    try:
        await wait_until(lambda: any(e[1] == "victim" for e in read_log(run_log)))
    finally:
        stop_worker(first, signal.SIGKILL)
    second = start_worker(connector, pipeline, data_dir, run_log)
    try:
        await wait_until(lambda: set(done_runs(run_log)) == {i.task_id for i in sent})
    finally:
        errs = stop_worker(second)
    assert second.returncode == 0, errs
    rec = await connector.task_store(data_dir).get("victim", "jobs")
    assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 2)
    starts = [e for e in read_log(run_log) if e[1] == "victim" and e[0] == "start"]
    assert [e[3] for e in starts] == [first.pid, second.pid]
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": len(sent)}


async def test_nothing_lost_when_a_worker_joins_then_leaves(connector: Connector,
                                                            data_dir: Path, run_log: str,
                                                            tmp_path: Path) -> None:
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(pipeline_text(connector, concurrency=4))
    sent = items(200, "a", sleep_s=0.01)
    connector.publish(sent)
    first = start_worker(connector, pipeline, data_dir, run_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_until(lambda: len(done_runs(run_log)) >= 50)
        second = start_worker(connector, pipeline, data_dir, run_log)
        # Keep work coming until the newcomer has taken some of it (it joined the group).
        batch = 0
        while not any(e[3] == second.pid for e in read_log(run_log)):
            more = items(20, f"b{batch:03d}-", sleep_s=0.01)
            connector.publish(more)
            sent.extend(more)
            batch += 1
            assert batch < 300, "the second worker never got work"
            await asyncio.sleep(0.2)
        errs = stop_worker(second)  # leaves while it has work in flight
        assert second.returncode == 0, errs
        more = items(100, "c", sleep_s=0.01)
        connector.publish(more)
        sent.extend(more)
        await wait_until(lambda: set(done_runs(run_log)) == {i.task_id for i in sent})
    finally:
        errs = stop_worker(first)
        if second is not None:
            stop_worker(second, signal.SIGKILL)
    assert first.returncode == 0, errs
    runs = done_runs(run_log)
    assert max(runs.values()) == 1, [t for t, n in runs.items() if n > 1]
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": len(sent)}
