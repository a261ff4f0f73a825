"""The Kafka source and sink on the real broker, below the consumer loop: contiguous commits,
in-memory retries, revocation, backpressure, missing topics, the idempotent sink."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice import registry
from sluice.config.load import parse_pipeline
from sluice.config.model import ComponentConfig
from sluice.connectors import kafka_client
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.kafka import SPEC, KafkaSource
from sluice.datadir import Database
from sluice.errors import DeliveryError, SourceError
from sluice.runtime import build, run_pipelines
from sluice.sinks.kafka import SPEC as SINK
from sluice.sinks.kafka import KafkaSink, build_sink
from tests.helpers import kafka as kt
from tests.helpers.waiting import wait_until

DEADLINE_S = 60.0


@pytest.fixture
def topic() -> Iterator[str]:
    kt.require_broker()
    name = kt.new_topic(1)
    yield name
    kt.delete_topics(name)


def source(topic: str, **options: Any) -> KafkaSource:
    config = SPEC.typed({"brokers": kt.BROKERS, "topic": topic, "session_timeout_ms": 6000,
                         "commit_interval_ms": 50, **options})
    return KafkaSource(config, config.group or f"g-{topic}")


@pytest.fixture
async def opened() -> AsyncIterator[Callable[[KafkaSource], Awaitable[KafkaSource]]]:
    started: list[KafkaSource] = []

    async def start(src: KafkaSource) -> KafkaSource:
        started.append(src)
        await src.start()
        return src

    yield start
    for src in started:
        await src.close()



def offsets(deliveries: list[Delivery]) -> list[int]:
    return [d.ref.offset for d in deliveries]


async def test_delivery_carries_the_record(topic: str, opened: Any) -> None:
    kt.produce(topic, [kt.Out({"n": 1}, key="k1"), kt.Out({"n": 2}, task_id="mine")])
    src = await opened(source(topic))
    first, second = await kt.fetch_n(src, 2)
    assert first.task_id == f"{topic}/0/0"  # no task id header: topic/partition/offset
    assert second.task_id == "mine"
    assert (first.body, first.key, first.content_type) == (b'{"n": 1}', "k1", "application/json")
    assert first.enqueued_at is not None and abs(first.enqueued_at - time.time()) < 600
    assert first.deliveries == 1


async def test_commits_only_below_the_lowest_unfinished(topic: str, opened: Any) -> None:
    kt.produce(topic, [kt.Out({"n": i}) for i in range(6)])
    src = await opened(source(topic, group=f"g-{topic}"))
    got = await kt.fetch_n(src, 6)
    assert offsets(got) == [0, 1, 2, 3, 4, 5]
    await src.ack([got[i] for i in (1, 2, 4, 5)])  # 0 and 3 still running
    await asyncio.sleep(0.3)  # several commit intervals: nothing may be committed past 0
    assert kt.committed(f"g-{topic}", topic, [0]) in ({}, {0: 0})
    await src.ack([got[0]])
    await wait_until(lambda: kt.committed(f"g-{topic}", topic, [0]) == {0: 3})
    await src.close()
    assert kt.committed(f"g-{topic}", topic, [0]) == {0: 3}

    # The next member of the group starts at the unfinished 3; 4 and 5 come again too.
    again = await opened(source(topic, group=f"g-{topic}"))
    redelivered = await kt.fetch_n(again, 3)
    assert offsets(redelivered) == [3, 4, 5]
    await again.ack(redelivered)
    await again.close()
    assert kt.committed(f"g-{topic}", topic, [0]) == {0: 6}


async def test_retry_later_redelivers_from_memory_without_committing(topic: str,
                                                                     opened: Any) -> None:
    kt.produce(topic, [kt.Out({"n": i}) for i in range(3)])
    src = await opened(source(topic, group=f"g-{topic}"))
    got = await kt.fetch_n(src, 3)
    await src.retry_later([(got[0], 0.2)])
    await src.ack(got[1:])
    (back,) = await kt.fetch_n(src, 1)
    assert (back.ref.offset, back.deliveries) == (0, 2)
    assert kt.committed(f"g-{topic}", topic, [0]) in ({}, {0: 0})
    await src.ack([back])
    await wait_until(lambda: kt.committed(f"g-{topic}", topic, [0]) == {0: 3})


async def test_pending_counts_lag_and_work_in_hand(topic: str, opened: Any) -> None:
    kt.produce(topic, [kt.Out({"n": i}) for i in range(10)])
    src = await opened(source(topic, max_poll_records=4, max_uncommitted=4))
    await wait_until(lambda: bool(kt.paused(src)))  # backpressure
    assert await src.pending() == 10
    first = await kt.fetch_n(src, 4)
    assert await src.pending() == 10  # running: not finished
    assert kt.paused(src) != []  # 4 tracked: still at the bound
    await src.ack(first)
    rest: list[Delivery] = []
    while len(rest) < 6:  # resumed each time it is down to half the bound
        more = await kt.fetch_n(src, 1)
        await src.ack(more)
        rest.extend(more)
    assert offsets(first + rest) == list(range(10))
    assert await src.pending() == 0
    assert kt.paused(src) == []


async def test_revocation_waits_for_work_in_flight_then_commits(opened: Any) -> None:
    kt.require_broker()
    topic = kt.new_topic(2)
    try:
        kt.produce(topic, [kt.Out({"n": i}, partition=i % 2) for i in range(10)])
        group = f"g-{topic}"
        first = await opened(source(topic, group=group, revoke_timeout_s=60))
        held = await kt.fetch_n(first, 10)  # both partitions, none finished
        second = await opened(source(topic, group=group))
        # cooperative-sticky moves one partition to the newcomer; the first member holds on to
        # it while its work is in flight.
        await wait_until(lambda: bool(first.buffer.revoking()))
        (moving,) = first.buffer.revoking()
        assert await second.fetch(10, 0.5) == []
        await first.ack(held)
        await wait_until(lambda: kt.committed(group, topic, [moving[1]]) == {moving[1]: 5})
        kt.produce(topic, [kt.Out({"after": True}, partition=moving[1])])
        (after,) = await kt.fetch_n(second, 1)  # finished work is not handed out again
        assert (after.ref.partition, after.ref.offset) == (moving, 5)
    finally:
        kt.delete_topics(topic)


async def test_revocation_lets_go_after_its_timeout(opened: Any) -> None:
    kt.require_broker()
    topic = kt.new_topic(2)
    try:
        kt.produce(topic, [kt.Out({"n": i}, partition=i % 2) for i in range(10)])
        group = f"g-{topic}"
        first = await opened(source(topic, group=group, revoke_timeout_s=0.5))
        await kt.fetch_n(first, 10)  # never finished: a stuck handler
        second = await opened(source(topic, group=group))
        again = await kt.fetch_n(second, 5)  # the moved partition is read again (at-least-once)
        assert sorted(offsets(again)) == [0, 1, 2, 3, 4]
        assert len({d.ref.partition for d in again}) == 1
    finally:
        kt.delete_topics(topic)


async def test_missing_topic_is_a_clear_error() -> None:
    kt.require_broker()
    src = source("sluice-no-such-topic-here")
    with pytest.raises(SourceError, match=r"kafka topic 'sluice-no-such-topic-here' does not "
                       rf"exist on brokers {kt.BROKERS}; .*create_topic"):
        await src.start()
    await src.close()


async def test_create_topic_creates_it(opened: Any) -> None:
    kt.require_broker()
    name = f"sluice-created-{time.time_ns()}"
    try:
        await opened(source(name, create_topic={"partitions": 3}))
        assert sorted(kt.ends(name)) == [0, 1, 2]  # seen by another client: it exists
    finally:
        kt.delete_topics(name)


async def test_unreachable_brokers_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kafka_client, "METADATA_TIMEOUT_S", 1.0)
    src = KafkaSource(SPEC.typed({"brokers": "127.0.0.1:1", "topic": "t"}), "g")
    with pytest.raises(SourceError, match=r"cannot reach kafka brokers 127.0.0.1:1"):
        await src.start()
    await src.close()


async def test_sink_writes_records_acknowledged(topic: str) -> None:
    sink = KafkaSink(SINK.typed({"topic": topic}), kt.BROKERS)
    try:
        await sink.send([SinkRecord(f"t{i}", b'{"ok": true}', "application/json", key=f"k{i}",
                                    headers={"sluice-reason": "x"}) for i in range(50)])
        # Acknowledged by the broker when send returned, before any flush at close.
        assert sum(kt.ends(topic).values()) == 50
    finally:
        await sink.close()
    got = kt.read_all(topic, 50)
    assert len(got) == 50  # all acknowledged before send returned; none twice
    assert [m.headers["sluice-task-id"] for m in got] == [f"t{i}" for i in range(50)]
    assert got[0].headers["content-type"] == "application/json"
    assert got[0].headers["sluice-reason"] == "x" and got[0].key == "k0"


async def test_sink_defaults_to_the_source_brokers_and_checks_its_topic() -> None:
    kt.require_broker()
    ctx = registry.BuildContext(pipeline="p", source=ComponentConfig(
        "kafka", {"brokers": kt.BROKERS, "topic": "jobs"}))
    sink = build_sink(SINK.typed({"topic": "sluice-no-such-dlq"}), ctx)
    assert sink.brokers == kt.BROKERS
    with pytest.raises(DeliveryError, match="'sluice-no-such-dlq' does not exist"):
        await sink.send([SinkRecord("t", b"{}", "application/json")])
    await sink.close()
    with pytest.raises(SourceError, match="needs brokers"):
        build_sink(SINK.typed({"topic": "x"}), registry.BuildContext("p"))


@pytest.mark.parametrize("outbox", [False, True], ids=["with_offsets", "outbox"])
async def test_results_to_a_kafka_topic(tmp_path: Path, run_log: str, outbox: bool) -> None:
    """By default the source writes the results with its commits; ``outbox: true`` sends them
    through the durable outbox (with a delivery status per task)."""
    kt.require_broker()
    source_topic, results = kt.new_topic(2), kt.new_topic(1)
    try:
        kt.produce(source_topic, [kt.Out({"n": i}, task_id=f"r{i}") for i in range(20)])
        config = parse_pipeline(f"""
name: results
source: {{kafka: {{brokers: "{kt.BROKERS}", topic: {source_topic}}}}}
handler: {{python: "tests.helpers.handlers:echo"}}
on_success: [{{kafka: {{topic: {results}, outbox: {str(outbox).lower()}}}}}]
""")
        loop = build(config, tmp_path / "data")
        assert bool(loop.deliverers) == outbox
        await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)
        got = kt.read_all(results, 20)
        events = {json.loads(m.value)["id"]: json.loads(m.value) for m in got}
        assert set(events) == {f"r{i}" for i in range(20)}
        assert events["r3"]["type"] == "sluice.task.succeeded"
        assert events["r3"]["data"]["result"] == {"n": 3}
        assert got[0].headers["content-type"] == "application/cloudevents+json"
        assert (kt.committed("sluice.results", source_topic, [0, 1])
                == kt.written_ends(source_topic))
        task = await loop.store.get("r3", "results")
        states = {name: d["state"] for name, d in (task.delivered or {}).items()}
        assert states == ({f"on_success:kafka:{results}": "delivered"} if outbox else {})
    finally:
        kt.delete_topics(source_topic, results)


async def test_a_pipeline_that_does_not_track_tasks(tmp_path: Path, run_log: str) -> None:
    """consumer.track_tasks: false: no task record, yet retries, dead letters and results
    work, and the offsets are committed at the end."""
    kt.require_broker()
    source_topic, results, dlq = kt.new_topic(2), kt.new_topic(1), kt.new_topic(1)
    try:
        kt.produce(source_topic, [kt.Out({"n": i, "fail_until": 2, "retry_delay_s": 0.05}
                                         if i == 3 else {"reject": "no"} if i == 4 else
                                         {"n": i}, task_id=f"u{i}") for i in range(30)])
        config = parse_pipeline(f"""
name: untracked
source: {{kafka: {{brokers: "{kt.BROKERS}", topic: {source_topic}}}}}
handler: {{python: "tests.helpers.handlers:behave"}}
consumer: {{track_tasks: false, retry: {{max_attempts: 3, initial_backoff_s: 0.05}}}}
on_success: [{{kafka: {{topic: {results}}}}}]
dead_letter: {{kafka: {{topic: {dlq}}}}}
""")
        loop = build(config, tmp_path / "data")
        await asyncio.wait_for(run_pipelines([loop], asyncio.Event(), drain=True), DEADLINE_S)
        events = {json.loads(m.value)["id"]: json.loads(m.value)
                  for m in kt.read_all(results, 29)}
        assert set(events) == {f"u{i}" for i in range(30) if i != 4}
        assert events["u3"]["data"]["attempts"] == 2  # retried once, counted by the source
        assert events["u3"]["data"]["result"] == {"attempt": 2}
        (dead,) = kt.read_all(dlq, 1)
        assert dead.headers["sluice-task-id"] == "u4"
        assert (kt.committed("sluice.untracked", source_topic, [0, 1])
                == kt.written_ends(source_topic))
        count = Database.open(tmp_path / "data").run_sync(
            lambda c: c.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
        assert count == 0
    finally:
        kt.delete_topics(source_topic, results, dlq)
