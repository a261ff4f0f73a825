"""The plain loop on Kafka for bench/brokers.py: confluent-kafka, consume 500 at a time,
produce each to the output topic, commit asynchronously (no tracking, no retries)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

BROKERS = os.environ.get("SLUICE_KAFKA_BROKERS", "127.0.0.1:9092")
PARTITIONS = 6


def _create(*topics: str) -> None:
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for future in admin.create_topics([NewTopic(t, num_partitions=PARTITIONS,
                                                replication_factor=1) for t in topics]).values():
        future.result(60)


def _fill(queue: str, n: int, size_b: int) -> None:
    _create(queue)
    producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 20,
                         "batch.size": 1_000_000, "enable.idempotence": True})
    pad = "x" * max(size_b - 60, 0)
    for i in range(n):
        body = json.dumps({"i": i, "pad": pad}).encode()
        while True:
            try:
                producer.produce(queue, body, key=str(i).encode(),
                                 headers=[("sluice-task-id", f"t{i}".encode())])
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError(f"filling {queue}: messages left unsent")


async def fill(queue: str, n: int, size_b: int) -> None:
    await asyncio.to_thread(_fill, queue, n, size_b)


async def prepare(out: str) -> None:
    """The output topic (the broker does not create topics on use)."""
    await asyncio.to_thread(_create, out)


def _loop(queue: str, out: str, n: int) -> None:
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"plain-{queue}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 5,
                         "enable.idempotence": True})
    consumer.subscribe([queue])
    done = 0
    while done < n:
        batch = consumer.consume(500, 0.2)
        for m in batch:
            if m.error():
                continue
            while True:
                try:
                    producer.produce(out, m.value(), m.key())
                    break
                except BufferError:
                    producer.poll(0.01)
            done += 1
        producer.poll(0)
        if batch:
            consumer.commit(asynchronous=True)
    producer.flush(30)
    consumer.close()


async def plain_loop(queue: str, out: str, n: int) -> None:
    await asyncio.to_thread(_loop, queue, out, n)


def pipeline_yaml(name: str, queue: str, out: str) -> str:
    return (f"name: {name}\n"
            f"source: {{kafka: {{brokers: \"{BROKERS}\", topic: {queue}, "
            f"group: sluice-{queue}}}}}\n"
            f"handler: {{python: \"bench.handlers:noop\"}}\n"
            f"on_success:\n  - kafka: {{topic: {out}}}\n")


def _count(out: str) -> int:
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"watch-{uuid.uuid4().hex}"})
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(out, p), timeout=10)[1]
                   for p in range(PARTITIONS))
    finally:
        consumer.close()


async def count(out: str) -> int:
    return await asyncio.to_thread(_count, out)


async def delete(*queues: str) -> None:
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for future in admin.delete_topics(list(queues), operation_timeout=30).values():
        await asyncio.to_thread(future.result, 60)
