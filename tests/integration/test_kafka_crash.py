"""Crash test on the real broker: 2 worker processes on a 6-partition topic, 20 SIGKILLs of a
worker during 100,000 messages (a new worker started after each kill): none lost; and with
``consumer.exactly_once``, each result in the output topic exactly once (read_committed).

A handler call is repeated only for work a killed worker had in flight (it ran, but its end was
not recorded before the kill). The numbers are printed (run with ``-s`` to see them) and written
to ``crash-report.json`` in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from sluice.datadir import Database
from tests.conftest import ROOT, sluice_cmd, subprocess_env
from tests.helpers import kafka as kt
from tests.helpers.crash import LogTail, unexplained_repeats

MESSAGES = 100_000
PARTITIONS = 6
KILLS = 20
DEADLINE_S = 170.0  # the whole test stops by itself
MIN_GAP_S = 2.0  # between kills, at least
HANDLER_SLEEP_S = 0.02  # with concurrency 16: at most 800 messages/s per worker, on any
# machine, so the 100,000 last through the 20 kills (whose pace the session timeout sets)

PIPELINE = """
name: crash
source:
  kafka: {{brokers: "{brokers}", topic: {topic}, group: {topic}, lease_s: 2,
          session_timeout_ms: 6000, commit_interval_ms: 200,
          instance_id: "${{SLUICE_INSTANCE_ID:-}}"}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{concurrency: 16, timeout_s: 30, retry: {{max_attempts: 50}}{exactly_once}}}
{outputs}
"""


def start(pipeline: Path, data_dir: Path, run_log: str, slot: int) -> subprocess.Popen[bytes]:
    """A worker; its log goes to ``worker-<n>.log`` beside the pipeline file.

    Workers are static group members (``instance_id`` per slot): a replacement takes the killed
    worker's partitions back at once. (Without it, each kill would cost a session timeout, at
    least 6 s on a default broker, before the partitions move; the conformance suite covers that
    path with a crash and a dynamic member.)
    """
    n = len(list(pipeline.parent.glob("worker-*.log")))
    with open(pipeline.parent / f"worker-{n:02d}.log", "wb") as log:
        return subprocess.Popen(
            [*sluice_cmd(), "run", str(pipeline), "--data-dir", str(data_dir)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
            env=subprocess_env(SLUICE_TEST_LOG=run_log, SLUICE_INSTANCE_ID=f"crash-{slot}"),
        )


@pytest.mark.slow
@pytest.mark.parametrize("exactly_once", [False, True], ids=["at_least_once", "exactly_once"])
def test_20_kills_during_100k_messages_lose_nothing(tmp_path: Path, data_dir: Path,
                                                    run_log: str, exactly_once: bool) -> None:
    kt.require_broker()
    topic = kt.new_topic(PARTITIONS, "sluice-crash")
    out = kt.new_topic(PARTITIONS, "sluice-crash-out") if exactly_once else ""
    began = time.monotonic()
    kt.produce(topic, (kt.Out({"i": i, "sleep_s": HANDLER_SLEEP_S}) for i in range(MESSAGES)))
    pipeline = tmp_path / "crash.yaml"
    pipeline.write_text(PIPELINE.format(
        brokers=kt.BROKERS, topic=topic, exactly_once=", exactly_once: true" if out else "",
        outputs=f"on_success: [{{kafka: {{topic: {out}}}}}]" if out else ""))
    tail = LogTail(run_log)
    workers = [start(pipeline, data_dir, run_log, slot) for slot in range(2)]
    killed: set[int] = set()
    kill_at: list[int] = []  # messages done when each kill happened
    deadline = began + DEADLINE_S
    try:
        last_kill = time.monotonic()
        while len(killed) < KILLS:
            assert time.monotonic() < deadline, f"only {len(killed)} kills before the deadline"
            time.sleep(0.1)
            seen = len(tail.runs)
            tail.read()
            slot = len(killed) % 2
            # Kill a worker while it works (it has joined the group and has work in flight).
            if (time.monotonic() - last_kill < MIN_GAP_S
                    or workers[slot].pid not in {pid for _, pid in tail.runs[seen:]}):
                continue
            done = len(tail.done)
            victim = workers[slot]
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            killed.add(victim.pid)
            kill_at.append(done)
            workers[slot] = start(pipeline, data_dir, run_log, slot)
            last_kill = time.monotonic()
        while len(tail.done) < MESSAGES and time.monotonic() < deadline:
            time.sleep(0.2)
            tail.read()
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
    elapsed = time.monotonic() - began
    tail.read()

    runs = Counter(t for t, _ in tail.runs)
    expected = {f"{topic}/{p}/{o}" for p, o in _offsets(topic)}
    lost = expected - set(runs)
    repeated = {t: n for t, n in runs.items() if n > 1}
    unexplained = unexplained_repeats(tail.runs, killed)
    states = dict(Database.open(data_dir).run_sync(lambda c: c.execute(
        "SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()))
    outputs = Counter(m.headers["sluice-task-id"] for m in kt.read_to_end(out)) if out else None
    report = {
        "messages": MESSAGES, "partitions": PARTITIONS, "kills": len(killed),
        "exactly_once": bool(out),
        "kill_at_done": kill_at, "lost": len(lost), "handled": len(runs),
        "handler_calls": sum(runs.values()), "repeated_tasks": len(repeated),
        "repeated_calls": sum(n - 1 for n in repeated.values()),
        "unexplained_repeats": len(unexplained), "task_states": states,
        "seconds": round(elapsed, 1),
    }
    if outputs is not None:
        report["output_records"] = sum(outputs.values())
        report["output_duplicates"] = sum(n - 1 for n in outputs.values())
    (tmp_path / "crash-report.json").write_text(json.dumps(report, indent=2))
    print("\ncrash test:", json.dumps(report))
    kt.delete_topics(*(t for t in (topic, out) if t))
    assert len(killed) == KILLS
    assert not lost, f"{len(lost)} lost, e.g. {sorted(lost)[:5]}"
    assert set(runs) == expected
    assert not unexplained, unexplained[:10]
    assert states == {"SUCCEEDED": MESSAGES}
    if outputs is not None:  # each result exactly once, none missing
        assert set(outputs) == expected
        assert report["output_duplicates"] == 0, [t for t, n in outputs.items() if n > 1][:10]


def _offsets(topic: str) -> list[tuple[int, int]]:
    """(partition, offset) of every message in the topic, from its watermarks."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": kt.BROKERS, "group.id": f"x-{os.getpid()}"})
    try:
        out: list[tuple[int, int]] = []
        for p in range(PARTITIONS):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out.extend((p, o) for o in range(low, high))
        return out
    finally:
        consumer.close()
