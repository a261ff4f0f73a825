"""Create, read and delete the Kafka walk-through's topics (docs/kafka.md), with confluent-kafka.

    python -m pipelines.kafka_topics create orders:3 orders.priced orders.dlq   # NAME[:PARTITIONS]
    python -m pipelines.kafka_topics read orders.priced      # every record, from the beginning
    python -m pipelines.kafka_topics delete orders orders.priced orders.dlq

The brokers are ``$KAFKA_BROKERS`` (default ``127.0.0.1:9092``), as in kafka_orders.yaml.
``read`` prints one line per record: partition, offset, key, the ``sluice-*`` headers and the
value, and stops at the end of every partition. The same with Kafka's own tools:
``kafka-topics.sh --create``, ``kafka-console-consumer.sh --from-beginning``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
TIMEOUT_S = 30.0


def create(specs: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": BROKERS})
    topics = []
    for spec in specs:
        name, _, partitions = spec.partition(":")
        topics.append(NewTopic(name, num_partitions=int(partitions or 1), replication_factor=1))
    for name, future in admin.create_topics(topics, operation_timeout=TIMEOUT_S).items():
        future.result(timeout=TIMEOUT_S)
        print(f"created {name}")


def delete(names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for name, future in admin.delete_topics(list(names), operation_timeout=TIMEOUT_S).items():
        try:
            future.result(timeout=TIMEOUT_S)
            print(f"deleted {name}")
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            print(f"no topic {name}")
    deadline = time.monotonic() + TIMEOUT_S  # deleting completes in the background
    while set(names) & set(admin.list_topics(timeout=TIMEOUT_S).topics):
        if time.monotonic() > deadline:
            raise SystemExit(f"topics still listed after {TIMEOUT_S:.0f} s: {names}")
        time.sleep(0.1)


def read(name: str) -> None:
    consumer = Consumer({"bootstrap.servers": BROKERS, "group.id": f"read-{os.getpid()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    meta = consumer.list_topics(name, timeout=TIMEOUT_S).topics[name]
    if meta.error is not None:
        raise SystemExit(f"topic {name}: {meta.error.str()}")
    consumer.subscribe([name])
    at_end: set[int] = set()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(at_end) < len(meta.partitions) and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                at_end.add(msg.partition() or 0)
                continue
            fields = [f"{msg.partition()}/{msg.offset()}",
                      f"key={(msg.key() or b'').decode(errors='replace')}"]
            fields += sluice_headers(msg)
            fields.append((msg.value() or b"").decode(errors="replace"))
            print(" ".join(fields))
    finally:
        consumer.close()


def sluice_headers(msg: Message) -> list[str]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [f"{k}={v.decode(errors='replace') if isinstance(v, bytes) else v or ''}"
            for k, v in pairs if k.startswith("sluice-")]


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("create", "read", "delete"):
        raise SystemExit(__doc__)
    if argv[0] == "create":
        create(argv[1:])
    elif argv[0] == "delete":
        delete(argv[1:])
    else:
        for name in argv[1:]:
            read(name)


if __name__ == "__main__":
    main(sys.argv[1:])
