"""Talking to the real Kafka broker in tests: topics, producing, reading a topic back.

The broker is the one ``scripts/services start kafka`` runs (``SLUICE_KAFKA_BROKERS``, default
127.0.0.1:9092). A test that needs it and cannot reach it fails (:func:`require_broker`); the
conformance suite skips instead on a machine that is not CI (see its conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from sluice.connectors.base import Delivery, Source
from sluice.connectors.kafka import KafkaSource
from sluice.connectors.kafka_client import headers_dict
from sluice.consumer.offsets import Partition

BROKERS = os.environ.get("SLUICE_KAFKA_BROKERS", "127.0.0.1:9092")


_unreachable: list[str] = []  # the first failure, so later tests fail at once


def broker_problem() -> str | None:
    """Why the broker cannot be used (``None``: it answers); asked once per session."""
    if not _unreachable:
        try:
            AdminClient({"bootstrap.servers": BROKERS}).list_topics(timeout=10)
            return None
        except KafkaException as exc:
            _unreachable.append(str(exc))
    return (f"Kafka is not reachable at {BROKERS} ({_unreachable[0]}); start it with "
            "`scripts/services start kafka` (scripts/test does)")


def require_broker() -> None:
    """Fail (not skip) the test when the broker does not answer."""
    problem = broker_problem()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def paused(src: Source) -> list[Partition]:
    """The partitions a Kafka source paused for backpressure (it stopped reading them)."""
    assert isinstance(src, KafkaSource), src
    return src.buffer.paused()


def new_topic(partitions: int = 1, prefix: str = "sluice-test") -> str:
    """A fresh topic (offsets and task ids never collide with an earlier run)."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": BROKERS})
    admin.create_topics([NewTopic(name, num_partitions=partitions,
                                  replication_factor=1)])[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = admin.list_topics(name, timeout=10).topics.get(name)
        if meta is not None and meta.error is None and len(meta.partitions) == partitions:
            return name
        time.sleep(0.05)
    raise AssertionError(f"topic {name} did not appear")


def delete_topics(*names: str) -> None:
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for future in admin.delete_topics(list(names), operation_timeout=30).values():
        with contextlib.suppress(KafkaException):
            future.result(timeout=30)


def produce_raw(topic: str, messages: Iterable[tuple[str, bytes]]) -> None:
    """Produce bodies as they are, each with its task id header."""
    producer = Producer({"bootstrap.servers": BROKERS, "enable.idempotence": True})
    for task_id, body in messages:
        producer.produce(topic, body, headers=[("sluice-task-id", task_id.encode())])
    assert producer.flush(60) == 0, "messages not delivered"


@dataclass(frozen=True)
class Out:
    """One message to produce."""

    payload: Any
    task_id: str | None = None
    key: str | None = None
    partition: int | None = None


def produce(topic: str, messages: Iterable[Out]) -> None:
    producer = Producer({"bootstrap.servers": BROKERS, "enable.idempotence": True,
                         "linger.ms": 5})
    failures: list[KafkaError] = []

    def report(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    for m in messages:
        headers: list[tuple[str, str | bytes | None]] = (
            [("sluice-task-id", m.task_id.encode())] if m.task_id else [])
        extra: dict[str, Any] = {} if m.partition is None else {"partition": m.partition}
        while True:
            try:
                producer.produce(topic, json.dumps(m.payload).encode(), key=m.key,
                                 headers=headers, on_delivery=report, **extra)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0, "messages not delivered"
    assert not failures, failures


@dataclass(frozen=True)
class In:
    """One message read back."""

    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]


def read_all(topic: str, expected: int, timeout_s: float = 30,
             isolation: str = "read_uncommitted") -> list[In]:
    """Every message of ``topic`` from the start, once ``expected`` have arrived (or the
    timeout: then what arrived, for the test to report)."""
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": isolation})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        out: list[In] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                if m.error() is None:
                    out.append(In(m.partition() or 0, m.offset() or 0,
                                  None if m.key() is None else (m.key() or b"").decode(),
                                  m.value() or b"",
                                  headers_dict(m.headers())))
        return out
    finally:
        consumer.close()


def committed(group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
    """The group's committed offsets (absent: no commit yet)."""
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": group,
                         "enable.auto.commit": False})
    try:
        got = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in got if tp.offset >= 0}
    finally:
        consumer.close()


def ends(topic: str) -> dict[int, int]:
    """The end offset (high watermark) of each partition of ``topic``. A partition of a topic
    created a moment ago may answer "not leader" until its broker has loaded it: asked again,
    for up to 10 s."""
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"ends-{uuid.uuid4().hex}"})
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                meta = consumer.list_topics(topic, timeout=10).topics[topic]
                return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                        for p in meta.partitions}
            except KafkaException as exc:
                retriable = exc.args[0].code() in (KafkaError.NOT_LEADER_FOR_PARTITION,
                                                   KafkaError.LEADER_NOT_AVAILABLE)
                if not retriable or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        consumer.close()


def written_ends(topic: str) -> dict[int, int]:
    """:func:`ends` of the partitions that hold messages: what a group that finished them all
    has committed (it commits nothing for an empty partition, and a batch of keyless messages
    may all go to one partition)."""
    return {p: end for p, end in ends(topic).items() if end > 0}


def read_to_end(topic: str, timeout_s: float = 60,
                isolation: str = "read_committed") -> list[In]:
    """Every message of ``topic`` up to the end of each partition as it is now (for
    read_committed: up to its last stable offset)."""
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": isolation,
                         "enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        at_end: set[int] = set()
        out: list[In] = []
        deadline = time.monotonic() + timeout_s
        while len(at_end) < len(meta.partitions):
            assert time.monotonic() < deadline, f"{topic}: not at the end in {timeout_s}s"
            for m in consumer.consume(1000, 0.2):
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end.add(m.partition() or 0)
                    continue
                at_end.discard(m.partition() or 0)
                out.append(In(m.partition() or 0, m.offset() or 0,
                              None if m.key() is None else (m.key() or b"").decode(),
                              m.value() or b"", headers_dict(m.headers())))
        return out
    finally:
        consumer.close()


async def fetch_n(src: Source, n: int, timeout_s: float = 60.0) -> list[Delivery]:
    """Exactly ``n`` deliveries from ``src`` (fetched in as many calls as it takes)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"got {len(got)} of {n}"
        got.extend(await src.fetch(n - len(got), 0.2))
    return got
