"""What every connector does when its input or its broker misbehaves, each on its real broker:

- a poison message (not JSON, not UTF-8) is dead-lettered, and the messages around it run;
- a handler running past the source's lease keeps its message: it runs once;
- a broker unreachable at start is one ``error:`` line and exit 1, no traceback, no warnings;
- a broker restarted mid-run (stopped, 5 s, started): the worker recovers by itself, nothing
  is lost, no finished task runs again, and the outage is a few lines, not one per retry;
- workers SIGKILLed again and again during a run of many messages, a new one after each: none
  lost, and a task runs again only if a killed worker had it in flight.

The broker tests stop and start the connector's service with ``scripts/services``; a
connector without a broker of its own (``service = None``) skips them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sluice.runtime import run_pipelines
from tests.conformance.conftest import Connector, Item
from tests.conformance.test_conformance import (
    RUN_TIMEOUT_S,
    done_runs,
    drain,
    items,
    make_loop,
    pipeline_text,
    start_worker,
    state_counts,
    stop_worker,
)
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers.crash import LogTail, unexplained_repeats
from tests.helpers.handlers import read_log
from tests.helpers.waiting import wait_until

SERVICES = str(ROOT / "scripts" / "services")
OUTAGE_S = 5.0
OUTAGE_LINES_MAX = 12  # warnings and errors a worker may write for one outage (all parts)
CRASH_MESSAGES = 3000
CRASH_KILLS = 4
CRASH_DEADLINE_S = 75.0
CRASH_MIN_GAP_S = 1.5


async def test_poison_messages_are_dead_lettered_without_blocking_the_rest(
        connector: Connector, data_dir: Path, run_log: str) -> None:
    good = items(30)
    connector.publish(good[:15])
    connector.publish_raw([("poison-bytes", b"\xff\xfe\x00\x81 not utf-8"),
                           ("poison-text", b"{not json")])
    connector.publish(good[15:])
    await drain(make_loop(connector, data_dir, max_attempts=3))
    runs = done_runs(run_log)
    assert set(runs) == {i.task_id for i in good} and max(runs.values()) == 1
    letters = {d.task_id: d for d in connector.dead_letters(expected=2)}
    assert set(letters) == {"poison-bytes", "poison-text"}
    assert letters["poison-bytes"].body == b"\xff\xfe\x00\x81 not utf-8"  # kept as it came
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 30, "FAILED": 2}


async def test_a_handler_running_past_the_lease_keeps_its_message(
        connector: Connector, data_dir: Path, run_log: str) -> None:
    # Two consumers of the queue; the handler runs 2.5 leases: its message stays its own.
    sent = [Item("long", {"sleep_s": 2.5 * 2.0}), *items(10)]
    connector.publish(sent)
    loops = [make_loop(connector, data_dir, concurrency=2) for _ in range(2)]
    await asyncio.wait_for(run_pipelines(loops, asyncio.Event(), drain=True), RUN_TIMEOUT_S)
    starts = [e for e in read_log(run_log) if e[1] == "long" and e[0] == "start"]
    assert len(starts) == 1, starts
    rec = await connector.task_store(data_dir).get("long", "jobs")
    assert (str(rec.state), rec.attempts) == ("SUCCEEDED", 1)
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 11}


async def test_a_task_delivered_twice_while_it_runs_runs_once(
        connector: Connector, data_dir: Path, run_log: str) -> None:
    # Two messages with one task id (a producer's retry; a broker handing a message out again
    # to the worker running it): the second is not run beside the first, nor after it.
    twin = Item("twin", {"sleep_s": 1.0})
    connector.publish([twin, twin, *items(5)])
    await drain(make_loop(connector, data_dir, concurrency=4))
    starts = [e for e in read_log(run_log) if e[1] == "twin" and e[0] == "start"]
    assert len(starts) == 1, starts
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": 6}


def test_an_unreachable_broker_at_start_is_one_error_line(connector: Connector,
                                                          tmp_path: Path,
                                                          data_dir: Path) -> None:
    source = connector.unreachable_source_yaml()
    if source is None:
        pytest.skip("the connector has no broker to miss")
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(pipeline_text(connector).replace(connector.source_yaml(), source))
    done = subprocess.run([*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data_dir)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "127.0.0.1" in errors[0], errors[0]  # it names where it looked
    noise = [line for line in lines
             if "Traceback" in line or " WARNING " in line or " ERROR " in line]
    assert noise == [], done.stderr


def services(action: str, name: str) -> None:
    subprocess.run([SERVICES, action, name], check=True, timeout=240,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
async def test_a_broker_restart_mid_run_is_survived(connector: Connector, data_dir: Path,
                                                    run_log: str, tmp_path: Path) -> None:
    if connector.service is None:
        pytest.skip("the connector has no broker of its own")
    pipeline = tmp_path / "jobs.yaml"
    pipeline.write_text(pipeline_text(connector, concurrency=4, max_attempts=50))
    sent = items(300, sleep_s=0.05)
    connector.publish(sent)
    worker = start_worker(connector, pipeline, data_dir, run_log)
    try:
        await wait_until(lambda: len(done_runs(run_log)) >= 30, timeout_s=RUN_TIMEOUT_S)
        services("stop", connector.service)
        try:
            time.sleep(OUTAGE_S)
        finally:
            services("start", connector.service)
        more = items(50, "after")
        connector.publish(more)  # the broker takes new work again
        sent.extend(more)
        await wait_until(lambda: set(done_runs(run_log)) == {i.task_id for i in sent},
                         timeout_s=180.0)
    finally:
        errs = stop_worker(worker)
    assert worker.returncode == 0, errs
    runs = done_runs(run_log)
    assert max(runs.values()) == 1, [t for t, n in runs.items() if n > 1]
    assert await state_counts(connector, data_dir) == {"SUCCEEDED": len(sent)}
    noise = [line for line in errs.splitlines()
             if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    assert len(noise) <= OUTAGE_LINES_MAX, "\n".join(noise)


@pytest.mark.slow
def test_repeated_worker_kills_lose_nothing(connector: Connector, data_dir: Path,
                                            run_log: str, tmp_path: Path) -> None:
    if connector.service == "kafka":
        pytest.skip("Kafka's own crash test kills 20 times in 100,000 messages "
                    "(tests/integration/test_kafka_crash.py)")
    pipeline = tmp_path / "jobs.yaml"
    # 2 workers of 4 slots on 50 ms tasks: at most 160 a second, so the run lasts through
    # the kills on any machine (each replacement takes a second or two to start).
    pipeline.write_text(pipeline_text(connector, concurrency=4, max_attempts=50))
    sent = items(CRASH_MESSAGES, sleep_s=0.05)
    connector.publish(sent)
    began = time.monotonic()
    tail = LogTail(run_log)
    workers = [start_worker(connector, pipeline, data_dir, run_log) for _ in range(2)]
    killed: set[int] = set()
    try:
        last_kill = time.monotonic()
        while len(killed) < CRASH_KILLS:
            assert time.monotonic() - began < CRASH_DEADLINE_S, f"{len(killed)} kills only"
            time.sleep(0.1)
            seen = len(tail.runs)
            tail.read()
            # Kill a worker while it works (it has finished something since the last look),
            # each in turn where both work (on some brokers a newcomer gets only new work).
            working = {pid for _, pid in tail.runs[seen:]}
            slot = next((s for s in (len(killed) % 2, 1 - len(killed) % 2)
                         if workers[s].pid in working), None)
            if time.monotonic() - last_kill < CRASH_MIN_GAP_S or slot is None:
                continue
            victim = workers[slot]
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            killed.add(victim.pid)
            workers[slot] = start_worker(connector, pipeline, data_dir, run_log)
            last_kill = time.monotonic()
        while len(tail.done) < len(sent) and time.monotonic() - began < 2 * CRASH_DEADLINE_S:
            time.sleep(0.2)
            tail.read()
    finally:
        for w in workers:
            stop_worker(w)
    tail.read()
    runs = Counter(t for t, _ in tail.runs)
    lost = {i.task_id for i in sent} - set(runs)
    unexplained = unexplained_repeats(tail.runs, killed)
    report = {"connector": type(connector).__name__, "messages": len(sent),
              "kills": len(killed), "lost": len(lost),
              "repeated_calls": sum(n - 1 for n in runs.values()),
              "unexplained_repeats": len(unexplained),
              "seconds": round(time.monotonic() - began, 1)}
    print("\ncrash test:", json.dumps(report))
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}"
    assert not unexplained, unexplained[:10]
