"""Results written with the Kafka source's commits, on the real broker: exactly once
(``consumer.exactly_once``: results and source offsets in one transaction) and at least once
(offsets committed after the broker acknowledged the results). An output waits for its
offset's commit; a task already final gets its result from the task store; a member pushed out
of its group cannot commit.

The crash half (SIGKILLs, 0 duplicates in the output) is in ``test_kafka_crash.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sluice.config.load import parse_pipeline
from sluice.connectors.base import Delivery, Output, SinkRecord
from sluice.connectors.kafka import SPEC, KafkaSource
from sluice.datadir import Database
from sluice.runtime import build, run_pipelines
from sluice.tasks.sqlite import SqliteTaskStore
from sluice.tasks.state import TaskState
from sluice.tasks.store import Claim, Completion, NewTask
from tests.helpers import kafka as kt
from tests.helpers.waiting import wait_until

DEADLINE_S = 60.0

PIPELINE = """
name: eos
source: {{kafka: {{brokers: "{brokers}", topic: {source}, group: g-{source},
          commit_interval_ms: 100}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{exactly_once: true, concurrency: 8, retry: {{max_attempts: 1}}}}
on_success: [{{kafka: {{topic: {ok}}}}}]
on_failure: [{{kafka: {{topic: {bad}}}}}]
"""


def eos_source(topic: str, out: str, exactly_once: bool = True,
               **options: Any) -> KafkaSource:
    config = SPEC.typed({"brokers": kt.BROKERS, "topic": topic, "session_timeout_ms": 6000,
                         "commit_interval_ms": 50, **options})
    src = KafkaSource(config, f"g-{topic}", exactly_once=exactly_once)
    src.produce_to([(out, None)])
    return src



def output(topic: str, delivery: Delivery) -> tuple[Output, ...]:
    return (Output(topic, SinkRecord(delivery.task_id, delivery.body, "application/json",
                                     delivery.key)),)


def run_ids(run_log: str) -> Counter[str]:
    lines = Path(run_log).read_text().split() if Path(run_log).exists() else []
    return Counter(lines[i + 1] for i in range(0, len(lines), 4) if lines[i] == "done")


async def test_results_and_offsets_commit_in_one_transaction(tmp_path: Path,
                                                             run_log: str) -> None:
    kt.require_broker()
    source, ok, bad = kt.new_topic(3), kt.new_topic(2), kt.new_topic(1)
    try:
        kt.produce(source, [kt.Out({"n": i, **({"reject": "no"} if i % 10 == 0 else {})},
                                   task_id=f"t{i}", key=f"k{i % 7}") for i in range(60)])
        config = parse_pipeline(PIPELINE.format(brokers=kt.BROKERS, source=source, ok=ok,
                                                bad=bad))
        loop = build(config, tmp_path / "data")
        await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)

        good = kt.read_all(ok, 54, isolation="read_committed")
        failed = kt.read_all(bad, 6, isolation="read_committed")
        ids = Counter(json.loads(m.value)["id"] for m in good)
        assert ids == Counter(f"t{i}" for i in range(60) if i % 10)  # each exactly once
        assert Counter(json.loads(m.value)["id"] for m in failed) == Counter(
            f"t{i}" for i in range(0, 60, 10))
        first = json.loads(next(m.value for m in good if m.headers["sluice-task-id"] == "t3"))
        assert first["type"] == "sluice.task.succeeded"
        assert first["data"]["result"] == {"attempt": 1}
        assert next(m.key for m in good if m.headers["sluice-task-id"] == "t3") == "k3"
        # Nothing aborted on the way: a read_uncommitted reader sees the same records.
        assert len(kt.read_all(ok, 54)) == 54
        # The offsets went in the same transactions: the group is at the end of each partition.
        assert kt.committed(f"g-{source}", source, [0, 1, 2]) == kt.written_ends(source)
        # No outbox for a transactional destination: the result went with the offsets.
        db = Database.open(tmp_path / "data")
        queues = db.run_sync(lambda c: c.execute(
            "SELECT COUNT(*) FROM messages WHERE queue LIKE 'sluice.outbox.%'").fetchone()[0])
        assert queues == 0
    finally:
        kt.delete_topics(source, ok, bad)


@pytest.mark.parametrize("exactly_once", [True, False], ids=["transaction", "acknowledged"])
async def test_an_output_waits_for_its_offset_to_be_committed(exactly_once: bool) -> None:
    """The outputs of finished messages are written only when the commit point passes them,
    before it is committed (in its transaction, or acknowledged by the broker first)."""
    kt.require_broker()
    topic, out = kt.new_topic(1), kt.new_topic(1)
    src = eos_source(topic, out, exactly_once)
    try:
        kt.produce(topic, [kt.Out({"n": i}) for i in range(3)])
        await src.start()
        got = await kt.fetch_n(src, 3)
        # 1 and 2 finish; 0 still runs: the commit point stays at 0, so their outputs wait.
        await src.ack_producing([(d, output(out, d)) for d in got[1:]])
        await asyncio.sleep(0.5)  # ten commit intervals
        assert kt.read_all(out, 1, timeout_s=1) == []
        assert kt.committed(f"g-{topic}", topic, [0]) in ({}, {0: 0})
        await src.ack_producing([(got[0], output(out, got[0]))])
        await wait_until(lambda: kt.committed(f"g-{topic}", topic, [0]) == {0: 3})
        written = kt.read_all(out, 3, isolation="read_committed")
        assert [m.headers["sluice-task-id"] for m in written] == [f"{topic}/0/{i}"
                                                                 for i in range(3)]
    finally:
        await src.close()
        kt.delete_topics(topic, out)


async def test_a_task_already_final_gets_its_result_from_the_store(tmp_path: Path,
                                                                   run_log: str) -> None:
    """A worker recorded the task SUCCEEDED and died before its transaction committed: the
    message comes again, the handler does not run again, and the result is written once."""
    kt.require_broker()
    source, ok, bad = kt.new_topic(1), kt.new_topic(1), kt.new_topic(1)
    try:
        store = SqliteTaskStore(Database.open(tmp_path / "data"))
        now = time.time()
        await store.create("eos", "default", [NewTask("done-1", "k")], now)
        await store.claim("eos", "default", [Claim("done-1", "k")], "dead-worker", 30, now)
        await store.complete("eos", [Completion("done-1", TaskState.SUCCEEDED, b'{"was": 1}',
                                                "application/json")], "dead-worker", now)
        kt.produce(source, [kt.Out({"n": 1}, task_id="done-1", key="k"),
                            kt.Out({"n": 2}, task_id="new-2", key="k")])
        config = parse_pipeline(PIPELINE.format(brokers=kt.BROKERS, source=source, ok=ok,
                                                bad=bad))
        loop = build(config, tmp_path / "data")
        await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)
        events = {json.loads(m.value)["id"]: json.loads(m.value)
                  for m in kt.read_all(ok, 2, isolation="read_committed")}
        assert set(events) == {"done-1", "new-2"}
        assert events["done-1"]["data"]["result"] == {"was": 1}
        assert events["done-1"]["data"]["request"]["json"] == {"n": 1}
        assert run_ids(run_log) == Counter({"new-2": 1})  # done-1 did not run again
        assert len(kt.read_all(ok, 3, timeout_s=2)) == 2
    finally:
        kt.delete_topics(source, ok, bad)


@pytest.mark.slow
async def test_a_member_pushed_out_of_its_group_cannot_commit_its_outputs() -> None:
    """A stalls past max.poll.interval.ms with work finished but not committed; B takes the
    partition and commits its own outputs. When A wakes, its transaction must not commit:
    each message's output is in the topic once."""
    kt.require_broker()
    topic, out = kt.new_topic(1), kt.new_topic(1)
    a = eos_source(topic, out, max_poll_interval_ms=6000, commit_interval_ms=60000)
    b = eos_source(topic, out)
    try:
        kt.produce(topic, [kt.Out({"n": i}) for i in range(5)])
        await a.start()
        got_a = await kt.fetch_n(a, 5)
        await a.ack_producing([(d, output(out, d)) for d in got_a])
        stall = asyncio.ensure_future(a._ask(lambda: time.sleep(10)))  # A's poll thread stalls
        await b.start()
        got_b = await kt.fetch_n(b, 5)
        assert [d.ref.offset for d in got_b] == [0, 1, 2, 3, 4]
        await b.ack_producing([(d, output(out, d)) for d in got_b])
        await wait_until(lambda: kt.committed(f"g-{topic}", topic, [0]) == {0: 5})
        await stall
        await a.close()  # A's commit at close: refused, or nothing left of the partition
        written = kt.read_all(out, 6, timeout_s=5, isolation="read_committed")
        assert Counter(m.headers["sluice-task-id"] for m in written) == Counter(
            f"{topic}/0/{i}" for i in range(5))
    finally:
        await b.close()
        kt.delete_topics(topic, out)
