"""The connectors the conformance suite runs over, each on its real broker.

A connector joins the suite by adding a :class:`Connector` here and its name to ``CONNECTORS``
(as dramatiq's suite takes ``params=["rabbitmq", "redis", "stub"]``). Each test gets a fresh
queue or topic, and its own data directory (task store).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sluice.connectors import embedded
from sluice.connectors.embedded import EmbeddedQueue, QueuedMessage
from sluice.datadir import Database
from tests.helpers import kafka as kt

CONNECTORS = ["embedded", "kafka"]


@dataclass(frozen=True)
class Item:
    task_id: str
    payload: Any
    key: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    task_id: str
    headers: dict[str, str]
    body: bytes


class Connector:
    name = ""
    partitions = 1

    def source_yaml(self, **options: Any) -> str:
        raise NotImplementedError

    def dead_letter_yaml(self) -> str:
        raise NotImplementedError

    def publish(self, items: Sequence[Item]) -> None:
        raise NotImplementedError

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        raise NotImplementedError

    def backpressure_seen(self, source: Any) -> bool | None:
        """Whether the source held back (paused) reading; ``None`` where it does not apply."""
        return None

    def close(self) -> None:
        return None


def _flow(value: dict[str, Any]) -> str:
    return json.dumps(value)  # JSON is YAML flow style


class EmbeddedConnector(Connector):
    name = "embedded"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def source_yaml(self, **options: Any) -> str:
        return _flow({"embedded": {"queue": "jobs", "lease_s": 2}})

    def dead_letter_yaml(self) -> str:
        return _flow({"embedded": {"queue": "jobs.dlq"}})

    def publish(self, items: Sequence[Item]) -> None:
        embedded.submit(Database.open(self.data_dir), "jobs", "default", "jobs", [
            QueuedMessage(i.task_id, json.dumps(i.payload).encode(), key=i.key) for i in items])

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        db = Database.open(self.data_dir)
        q = EmbeddedQueue(db, "jobs.dlq")
        got = db.run_sync(lambda c: q.lease_in(c, 10_000, time.time()))
        return [DeadLetter(d.task_id, dict(d.headers), d.body) for d in got]


class KafkaConnector(Connector):
    name = "kafka"
    partitions = 3

    def __init__(self) -> None:
        kt.require_broker()
        self.topic = kt.new_topic(self.partitions, "sluice-conf")
        self.dlq = f"{self.topic}.dlq"

    def source_yaml(self, **options: Any) -> str:
        return _flow({"kafka": {"brokers": kt.BROKERS, "topic": self.topic, "group": self.topic,
                                "lease_s": 2, "session_timeout_ms": 6000,
                                "commit_interval_ms": 200, **options}})

    def dead_letter_yaml(self) -> str:
        return _flow({"kafka": {"topic": self.dlq, "create_topic": {"partitions": 1}}})

    def publish(self, items: Sequence[Item]) -> None:
        kt.produce(self.topic, [kt.Out(i.payload, i.task_id, i.key) for i in items])

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        return [DeadLetter(m.headers["sluice-task-id"], m.headers, m.value)
                for m in kt.read_all(self.dlq, expected)]

    def backpressure_seen(self, source: Any) -> bool | None:
        return bool(source.paused_partitions())

    def close(self) -> None:
        kt.delete_topics(self.topic, self.dlq)


@pytest.fixture(params=CONNECTORS)
def connector(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Connector]:
    conn: Connector = (EmbeddedConnector(data_dir) if request.param == "embedded"
                       else KafkaConnector())
    try:
        yield conn
    finally:
        conn.close()
