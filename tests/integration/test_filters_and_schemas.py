"""A pipeline's `filter` and `schema` through the consumer loop, on the embedded queue and on
Kafka: a filtered message is acknowledged (the queue empty, the offsets committed), counted
(LoopStats.filtered and sluice_filtered_total), its task FILTERED, with no result record and
no dead letter; a payload that fails the schema (or does not decode) is dead-lettered with the
validation error as its reason (error type InvalidPayload, no retries); the handler runs for
neither, and the other messages run as before."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from sluice import metrics
from sluice.config.load import parse_pipeline
from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.consumer.loop import ConsumerLoop, LoopStats
from sluice.datadir import Database
from sluice.runtime import build, run_pipelines
from sluice.tasks.state import TaskState
from tests.helpers import kafka as kt
from tests.helpers.handlers import read_log

DEADLINE_S = 60.0
SCHEMA = """\
filter: headers."x-region" == 'eu' && payload.kind == 'order'
schema:
  type: object
  required: [kind, amount]
  properties:
    kind: {type: string}
    amount: {type: number, minimum: 0}
"""
# task id → (body, headers, what becomes of it)
MESSAGES: dict[str, tuple[bytes, dict[str, str], str]] = {
    "run-1": (b'{"kind": "order", "amount": 5}', {"x-region": "eu"}, "run"),
    "run-2": (b'{"kind": "order", "amount": 0.5}', {"x-region": "eu"}, "run"),
    "refund": (b'{"kind": "refund", "amount": 5}', {"x-region": "eu"}, "filtered"),
    "us": (b'{"kind": "order", "amount": 5}', {"x-region": "us"}, "filtered"),
    "no-region": (b'{"kind": "order", "amount": 5}', {}, "filtered"),
    "negative": (b'{"kind": "order", "amount": -1}', {"x-region": "eu"}, "invalid"),
    # The filter would drop it, but the schema comes first: dead-lettered, not dropped.
    "no-amount": (b'{"kind": "refund"}', {"x-region": "us"}, "invalid"),
    "not-json": (b'{"kind": ', {"x-region": "eu"}, "invalid"),
}
REASONS = {
    "negative": "schema: $.amount: -1 is less than the minimum of 0",
    "no-amount": "schema: $: 'amount' is a required property",
    "not-json": "the body is not valid JSON (application/json): Expecting value: line 1 column "
                "10 (char 9)",
}
RUN = sorted(t for t, (_, _, what) in MESSAGES.items() if what == "run")
FILTERED = sorted(t for t, (_, _, what) in MESSAGES.items() if what == "filtered")
INVALID = sorted(t for t, (_, _, what) in MESSAGES.items() if what == "invalid")


# Until the consumer loop calls the gate (LoopStats gets its `filtered` count with it), the
# gated runs are expected to fail; strict, so the marker goes once the loop is wired.
GATED = pytest.mark.xfail(
    "filtered" not in {f.name for f in dataclasses.fields(LoopStats)}, strict=True,
    reason="the consumer loop does not call sluice.consumer.gate yet")


def filtered_total(pipeline: str) -> float:
    return metrics.REGISTRY.get_sample_value("sluice_filtered_total",
                                             {"pipeline": pipeline}) or 0.0


def stats_filtered(loop: ConsumerLoop) -> Any:
    """LoopStats.filtered (read by name: the field comes with the loop's gate)."""
    return dataclasses.asdict(loop.stats).get("filtered")


def handled(run_log: str) -> list[str]:
    return sorted(task_id for event, task_id, _, _ in read_log(run_log) if event == "done")


async def assert_tasks(loop: ConsumerLoop, pipeline: str) -> None:
    for task_id in RUN:
        assert (await loop.store.get(task_id, pipeline)).state == TaskState.SUCCEEDED
    for task_id in FILTERED:
        rec = await loop.store.get(task_id, pipeline)
        assert (rec.state, rec.result, rec.error_type) == (TaskState.FILTERED, None, None)
        assert rec.finished_at is not None
    for task_id in INVALID:
        rec = await loop.store.get(task_id, pipeline)
        assert (rec.state, rec.error_type) == (TaskState.FAILED, "InvalidPayload")
        assert (rec.error_message or "").startswith(REASONS[task_id])  # (+ why not retried)
        assert rec.attempts == 1  # never retried
    kept = await loop.store.dead_letters(pipeline)  # for a replay once the cause is fixed
    assert sorted(d.task_id for d in kept) == INVALID


def assert_dead_letter(task_id: str, body: bytes, headers: Mapping[str, str]) -> None:
    assert body == MESSAGES[task_id][0]  # the message itself
    assert headers["sluice-error-type"] == "InvalidPayload"
    assert headers["sluice-error-message"] == REASONS[task_id]
    assert headers["sluice-task-id"] == task_id


# -- the embedded queue ---------------------------------------------------------------------

@GATED
async def test_filter_and_schema_on_the_embedded_queue(data_dir: Path, run_log: str) -> None:
    name = "gated-embedded"
    config = parse_pipeline(f"""
name: {name}
source: {{embedded: {{queue: gated}}}}
handler: {{python: tests.helpers.handlers:echo}}
on_success: [{{embedded: {{queue: gated.results}}}}]
consumer: {{concurrency: 4, retry: {{max_attempts: 3, initial_backoff_s: 0.05}}}}
{SCHEMA}""")
    db = Database.open(data_dir)
    embedded.submit(db, name, "default", "gated", [
        QueuedMessage(task_id, body, "application/json", None, headers or None)
        for task_id, (body, headers, _) in MESSAGES.items()])
    before = filtered_total(name)
    loop = build(config, data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), DEADLINE_S)

    assert handled(run_log) == RUN  # the handler saw none of the others
    assert await loop.source.pending() == 0  # every message acknowledged (deleted)
    assert (loop.stats.succeeded, stats_filtered(loop)) == (len(RUN), len(FILTERED))
    assert filtered_total(name) - before == len(FILTERED)
    await assert_tasks(loop, name)

    now = time.time()
    letters = db.run_sync(lambda c: EmbeddedQueue(db, f"{name}.dlq").lease_in(c, 100, now))
    assert sorted(m.task_id for m in letters) == INVALID  # none of the filtered ones
    for m in letters:
        assert_dead_letter(m.task_id, m.body, m.headers or {})
    results = db.run_sync(lambda c: EmbeddedQueue(db, "gated.results").lease_in(c, 100, now))
    assert sorted(json.loads(r.body)["data"]["task_id"] for r in results) == RUN


async def test_a_pipeline_without_filter_or_schema_runs_everything(data_dir: Path,
                                                                   run_log: str) -> None:
    config = parse_pipeline("""
name: ungated
source: {embedded: {queue: ungated}}
handler: {python: tests.helpers.handlers:echo}
""")
    db = Database.open(data_dir)
    embedded.submit(db, "ungated", "default", "ungated", [
        QueuedMessage(t, MESSAGES[t][0], "application/json", None, MESSAGES[t][1] or None)
        for t in ("refund", "us", "negative")])
    loop = build(config, data_dir)
    await asyncio.wait_for(loop.run(asyncio.Event(), drain=True), DEADLINE_S)
    assert handled(run_log) == ["negative", "refund", "us"]
    assert stats_filtered(loop) in (0, None)


# -- Kafka ----------------------------------------------------------------------------------

def produce_raw(topic: str) -> None:
    """MESSAGES as they are (a body that is not JSON included), with their headers."""
    producer = Producer({"bootstrap.servers": kt.BROKERS, "enable.idempotence": True})
    for task_id, (body, headers, _) in MESSAGES.items():
        producer.produce(topic, body, key=task_id,
                         headers=[("sluice-task-id", task_id.encode()),
                                  *((k, v.encode()) for k, v in headers.items())])
    assert producer.flush(60) == 0


@GATED
@pytest.mark.parametrize("track_tasks", [True, False], ids=["tracked", "untracked"])
async def test_filter_and_schema_on_kafka(tmp_path: Path, run_log: str,
                                          track_tasks: bool) -> None:
    kt.require_broker()
    source_topic, results, dlq = kt.new_topic(2), kt.new_topic(1), kt.new_topic(1)
    name = f"gated-kafka-{'tracked' if track_tasks else 'untracked'}"
    try:
        produce_raw(source_topic)
        config = parse_pipeline(f"""
name: {name}
source: {{kafka: {{brokers: "{kt.BROKERS}", topic: {source_topic}}}}}
handler: {{python: "tests.helpers.handlers:echo"}}
consumer: {{track_tasks: {str(track_tasks).lower()}, retry: {{max_attempts: 3}}}}
on_success: [{{kafka: {{topic: {results}}}}}]
dead_letter: {{kafka: {{topic: {dlq}}}}}
{SCHEMA}""")
        before = filtered_total(name)
        loop = build(config, tmp_path / "data")
        await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)

        assert handled(run_log) == RUN
        # Every message is finished: the group committed the end of each partition.
        assert (kt.committed(f"sluice.{name}", source_topic, [0, 1])
                == kt.written_ends(source_topic))
        assert (loop.stats.succeeded, stats_filtered(loop)) == (len(RUN), len(FILTERED))
        assert filtered_total(name) - before == len(FILTERED)
        if track_tasks:
            await assert_tasks(loop, name)
        letters = kt.read_all(dlq, len(INVALID))
        assert sorted(m.headers["sluice-task-id"] for m in letters) == INVALID
        for m in letters:
            assert_dead_letter(m.headers["sluice-task-id"], m.value, m.headers)
        events = [json.loads(m.value) for m in kt.read_all(results, len(RUN))]
        assert sorted(e["id"] for e in events) == RUN
    finally:
        kt.delete_topics(source_topic, results, dlq)
