"""Batch handlers (``handler.batch``) on a real Kafka topic of several partitions, through the
consumer loop run as ``sluice run --drain`` runs it: an item that is a ``Reject`` fails its task
alone (dead-lettered to the Kafka dead letter topic), a ``Retry`` item retries its task alone;
under ``ordering: key`` a batch never holds two messages of one key, and each key's messages
run in the order produced, a retry included; the group commits every partition's end."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.config.load import parse_pipeline
from sluice.consumer.loop import ConsumerLoop
from sluice.runtime import build, run_pipelines
from sluice.tasks.state import TaskState
from tests.helpers import kafka as kt
from tests.helpers.batch_handlers import CALLS, batch_of, keys_per_call_unique, seen

DEADLINE_S = 90.0
PARTITIONS = 3


@pytest.fixture(autouse=True)
def _no_calls_yet() -> None:
    CALLS.clear()


@pytest.fixture
def topics() -> Iterator[tuple[str, str]]:
    """A fresh source topic of PARTITIONS partitions, and the name of its dead letter topic
    (made by the sink)."""
    kt.require_broker()
    source = kt.new_topic(PARTITIONS, "sluice-batch")
    dlq = f"{source}.dlq"
    yield source, dlq
    kt.delete_topics(source, dlq)


def loop_for(tmp_path: Path, source: str, dlq: str, *, max_size: int) -> ConsumerLoop:
    return build(parse_pipeline(f"""
name: batched
source: {{kafka: {{brokers: "{kt.BROKERS}", topic: {source}, group: {source},
                   session_timeout_ms: 6000, commit_interval_ms: 100}}}}
handler: {{python: "tests.helpers.batch_handlers:handle",
           batch: {{max_size: {max_size}, max_wait_ms: 20}}}}
consumer:
  concurrency: 4
  ordering: key
  timeout_s: 30
  retry: {{max_attempts: 3, initial_backoff_s: 0.05, max_backoff_s: 0.1}}
dead_letter: {{kafka: {{topic: {dlq}, create_topic: {{partitions: 1}}}}}}
"""), tmp_path / "data")


async def drain(loop: ConsumerLoop) -> None:
    await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)


async def test_items_fail_or_retry_alone_on_kafka(tmp_path: Path,
                                                  topics: tuple[str, str]) -> None:
    source, dlq = topics
    ids = [f"m{i:03d}" for i in range(60)]
    payloads = {"m013": {"reject": "bad"}, "m021": {"retry_once": True}}
    kt.produce(source, [kt.Out(payloads.get(t, {"n": i}), task_id=t, key=f"key-{t}")
                        for i, t in enumerate(ids)])
    loop = loop_for(tmp_path, source, dlq, max_size=50)
    await drain(loop)

    assert len(batch_of("m013", 1)) > 1 and len(batch_of("m021", 1)) > 1  # items of batches
    assert sum(len(c.items) > 1 for c in CALLS) > len(CALLS) / 2
    assert all(len(c.items) <= 50 for c in CALLS)
    bad = await loop.store.get("m013", "batched")
    assert (bad.state, bad.attempts, bad.error_type, bad.error_message) == (
        TaskState.FAILED, 1, "Reject", "bad")
    assert seen("m013") == [1]
    retried = await loop.store.get("m021", "batched")
    assert (retried.state, retried.attempts) == (TaskState.SUCCEEDED, 2)
    assert seen("m021") == [1, 2]
    assert json.loads(retried.result or b"")["attempt"] == 2
    for task_id in ids:
        if task_id not in payloads:
            rec = await loop.store.get(task_id, "batched")
            assert (rec.state, rec.attempts) == (TaskState.SUCCEEDED, 1), task_id
            assert json.loads(rec.result or b"")["task"] == task_id
            assert seen(task_id) == [1], task_id
    assert [d.task_id for d in await loop.store.dead_letters("batched")] == ["m013"]
    (letter,) = kt.read_all(dlq, 1)
    assert letter.headers["sluice-task-id"] == "m013"
    assert letter.headers["sluice-error-type"] == "Reject"
    assert letter.headers["sluice-reason"] == "rejected by the handler"
    assert json.loads(letter.value) == {"reject": "bad"}
    # Every message is finished: the group committed the end of each partition.
    assert kt.committed(source, source, range(PARTITIONS)) == kt.written_ends(source)
    assert (loop.stats.succeeded, loop.stats.failed, loop.stats.retried) == (59, 1, 1)


async def test_a_batch_never_holds_two_messages_of_one_key_on_kafka(
        tmp_path: Path, topics: tuple[str, str]) -> None:
    source, dlq = topics
    # 20 keys x 10 messages in sequence, interleaved; one in the middle of its key retries.
    out = []
    for n in range(10):
        for k in range(20):
            payload: dict[str, object] = {"seq": n}
            if (k, n) == (3, 4):
                payload["retry_once"] = True
            out.append(kt.Out(payload, task_id=f"k{k:02d}-{n}", key=f"k{k:02d}"))
    kt.produce(source, out)
    loop = loop_for(tmp_path, source, dlq, max_size=50)
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
    records = await loop.store.stats("batched")
    assert len(records) == 200
    assert all(r.state == TaskState.SUCCEEDED for r in records)
    assert kt.committed(source, source, range(PARTITIONS)) == kt.written_ends(source)
