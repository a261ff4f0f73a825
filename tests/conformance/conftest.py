"""The connectors the conformance suites run over, each on its real broker.

A connector joins the suites by adding an entry to :data:`CONNECTORS`: its name and a factory
of its :class:`Connector` (as dramatiq's suite keeps its brokers in a dict of factories behind
one parametrised fixture). A :class:`Connector` says how to publish to the connector and read
its dead letters back, and declares what the connector can do in class attributes; the generic
tests read those attributes, never a connector's name.

Each test gets a fresh queue or topic, and its own data directory (task store). A connector
whose broker does not answer is skipped on a developer's machine and fails in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sluice import registry, stores
from sluice.connectors.base import Delivery, Source
from sluice.datadir import QueuedMessage
from sluice.registry import Submission
from sluice.stores import open_store
from sluice.stores.base import Store
from sluice.stores.postgres import PostgresStore
from sluice.tasks.store import TaskStore
from tests.conftest import PLUGINS
from tests.helpers import kafka as kt
from tests.helpers import postgres as pg

T = TypeVar("T")

LEASE_S = 2.0  # the sources' lease in the suites (short: a lapsed lease is seen soon)


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
    """One connector under test: its pipeline YAML, publishing, its dead letters, and what it
    can do."""

    # What the connector can do (the generic tests read these):
    partitions = 1
    """Partitions of the test queue or topic (1 for a queue without partitions)."""
    observable_backpressure = False
    """The source stops reading when it holds ``max_buffered`` messages, and
    :meth:`holding_back` tells when it did."""
    per_message_leases = False
    """A fetched delivery is leased: no other consumer of the queue gets it until its lease
    lapses, and ``extend`` renews the lease (a visibility timeout, as in SQS). Without it, a
    delivery is its consumer's for as long as the consumer holds its partition."""
    store_url: str | None = None
    """The store the pipeline's workers use (``--store``); ``None``: the test's data directory."""
    service: str | None = None
    """Its broker's name for ``scripts/services`` (the restart test stops and starts it);
    ``None``: no broker of its own (the embedded queue)."""

    def task_store(self, data_dir: Path) -> TaskStore:
        """The task records of the store the pipeline's workers use."""
        return open_store(self.store_url, data_dir).tasks

    def source_yaml(self, *, lease_s: float = LEASE_S, max_buffered: int | None = None) -> str:
        """The pipeline's ``source``; ``max_buffered``: where the source buffers messages, how
        many it may hold before it stops reading."""
        raise NotImplementedError

    def dead_letter_yaml(self) -> str:
        raise NotImplementedError

    def publish(self, items: Sequence[Item]) -> None:
        raise NotImplementedError

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        raise NotImplementedError

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish bodies as they are (task id, body): bytes that are not JSON, not UTF-8."""
        raise NotImplementedError

    def unreachable_source_yaml(self) -> str | None:
        """The pipeline's ``source`` pointing at an address where no broker answers (a closed
        port on 127.0.0.1); ``None``: the connector has no broker to miss."""
        return None

    def holding_back(self, source: Source) -> bool:
        """Whether ``source`` stopped reading (backpressure); with ``observable_backpressure``."""
        raise NotImplementedError

    def close(self) -> None:
        return None


def _flow(value: dict[str, Any]) -> str:
    return json.dumps(value)  # JSON is YAML flow style


class EmbeddedConnector(Connector):
    """The embedded queue in the test's data directory (SQLite)."""

    per_message_leases = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def source_yaml(self, *, lease_s: float = LEASE_S, max_buffered: int | None = None) -> str:
        return _flow({"embedded": {"queue": "jobs", "lease_s": lease_s}})  # no buffer

    def dead_letter_yaml(self) -> str:
        return _flow({"embedded": {"queue": "jobs.dlq"}})

    def _on_store(self, use: Callable[[Store], Awaitable[T]]) -> T:
        """Run ``use`` on the store in an event loop of its own on a thread of its own (the
        caller may be inside a test's loop), closed after."""
        store = open_store(self.store_url, self.data_dir)

        async def main() -> T:
            try:
                return await use(store)
            finally:
                await store.close()

        with ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, main()).result()

    def publish(self, items: Sequence[Item]) -> None:
        messages = [QueuedMessage(i.task_id, json.dumps(i.payload).encode(), key=i.key)
                    for i in items]
        self._on_store(lambda store: store.submit("jobs", [
            Submission("jobs", "default", m) for m in messages]))

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        queued = [QueuedMessage(task_id, body) for task_id, body in messages]
        self._on_store(lambda store: store.submit("jobs", [
            Submission("jobs", "default", m) for m in queued]))

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        async def take(store: Store) -> list[Delivery]:
            return await store.source("jobs.dlq", 600.0, 0.01).fetch(10_000, 0.0)

        got = self._on_store(take)
        return [DeadLetter(d.task_id, dict(d.headers), d.body) for d in got]


class PostgresEmbeddedConnector(EmbeddedConnector):
    """The embedded queue in a PostgreSQL store: a schema of its own per test, dropped after."""

    service = "postgres"

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._url = contextlib.ExitStack()
        self.store_url = self._url.enter_context(pg.fresh_url())

    def close(self) -> None:
        store = open_store(self.store_url)
        assert isinstance(store, PostgresStore)
        store.db.terminate()
        stores.forget(self.store_url or "")
        self._url.close()


class KafkaConnector(Connector):
    partitions = 3
    observable_backpressure = True
    service = "kafka"

    def __init__(self) -> None:
        self.topic = kt.new_topic(self.partitions, "sluice-conf")
        self.dlq = f"{self.topic}.dlq"

    def source_yaml(self, *, lease_s: float = LEASE_S, max_buffered: int | None = None) -> str:
        limit = {} if max_buffered is None else {"max_uncommitted": max_buffered}
        return _flow({"kafka": {"brokers": kt.BROKERS, "topic": self.topic, "group": self.topic,
                                "lease_s": lease_s, "session_timeout_ms": 6000,
                                "commit_interval_ms": 200, **limit}})

    def dead_letter_yaml(self) -> str:
        return _flow({"kafka": {"topic": self.dlq, "create_topic": {"partitions": 1}}})

    def publish(self, items: Sequence[Item]) -> None:
        kt.produce(self.topic, [kt.Out(i.payload, i.task_id, i.key) for i in items])

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        kt.produce_raw(self.topic, messages)

    def unreachable_source_yaml(self) -> str | None:
        return _flow({"kafka": {"brokers": f"127.0.0.1:{closed_port()}", "topic": self.topic,
                                "group": self.topic}})

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        return [DeadLetter(m.headers["sluice-task-id"], m.headers, m.value)
                for m in kt.read_all(self.dlq, expected)]

    def holding_back(self, source: Source) -> bool:
        return bool(kt.paused(source))

    def close(self) -> None:
        kt.delete_topics(self.topic, self.dlq)


@contextlib.contextmanager
def installed(path: Path) -> Iterator[None]:
    """The packages in ``path`` (with their dist-info) importable and their entry points found,
    in this process and in the processes it starts, while the block runs."""
    entry, before = str(path), os.environ.get("PYTHONPATH")
    sys.path.insert(0, entry)
    os.environ["PYTHONPATH"] = entry + (os.pathsep + before if before else "")
    try:
        yield
    finally:
        sys.path.remove(entry)
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


class ToyQueueConnector(Connector):
    """The toy queue of ``tests/plugins/sluice_toyqueue``: a connector outside sluice, found by
    the entry point of its distribution. While it is in use its package is installed (on the
    import path of this process and its workers) and the default registry is a fresh one,
    loaded from the built-ins and the entry points; other tests never see it."""

    per_message_leases = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(installed(PLUGINS))
        reg = self._installed.enter_context(registry.using(registry.Registry()))
        assert "toyqueue" in reg.names("source"), "the toy queue's entry point was not found"
        self.toy = importlib.import_module("sluice_toyqueue")  # its client API

    def source_yaml(self, *, lease_s: float = LEASE_S, max_buffered: int | None = None) -> str:
        return _flow({"toyqueue": {"queue": "jobs", "lease_s": lease_s}})  # no buffer

    def dead_letter_yaml(self) -> str:
        return _flow({"toyqueue": {"queue": "jobs.dlq"}})

    def publish(self, items: Sequence[Item]) -> None:
        self.toy.publish(self.data_dir, "jobs", [
            self.toy.Message(i.task_id, json.dumps(i.payload).encode(), key=i.key)
            for i in items])

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        self.toy.publish(self.data_dir, "jobs", [
            self.toy.Message(task_id, body) for task_id, body in messages])

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        q = self.toy.ToyQueue(self.toy.queue_file(self.data_dir), "jobs.dlq")
        try:
            got = q.lease(10_000, 600.0, time.time())
        finally:
            q.close()
        return [DeadLetter(str(d.message.task_id), dict(d.message.headers),
                           bytes(d.message.body)) for d in got]

    def close(self) -> None:
        self._installed.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def require_service(problem: str | None) -> None:
    """Skip the test when its service is missing (``problem``), but fail it in CI."""
    if problem is None:
        return
    if in_ci():
        pytest.fail(problem, pytrace=False)
    pytest.skip(problem)


def kafka_connector(data_dir: Path) -> Connector:
    require_service(kt.broker_problem())
    return KafkaConnector()


def broker_connector(name: str) -> Callable[[Path], Connector]:
    """The factory of a broker's connector, ``tests.helpers.<name>.connector`` (imported when
    a test uses it, so the suites' import does not need every broker's client)."""
    def make(data_dir: Path) -> Connector:
        factory: Callable[[Path], Connector] = importlib.import_module(
            f"tests.helpers.{name}").connector
        return factory(data_dir)

    return make


BROKERS = ("rabbitmq", "nats", "redis", "mqtt")
"""The brokers whose connectors live in ``tests/helpers/<name>.py`` (each ``connector(data_dir)``
skips, or fails in CI, when its broker does not answer)."""

CONNECTORS: dict[str, Callable[[Path], Connector]] = {
    "embedded": EmbeddedConnector,
    "embedded-postgres": PostgresEmbeddedConnector,
    "kafka": kafka_connector,
    "toyqueue": ToyQueueConnector,
    **{name: broker_connector(name) for name in BROKERS
       if hasattr(importlib.import_module(f"tests.helpers.{name}"), "connector")},
}
"""Every connector the suites run over: name → factory (given the test's data directory)."""


@pytest.fixture(params=sorted(CONNECTORS))
def connector(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Connector]:
    conn = CONNECTORS[request.param](data_dir)
    try:
        yield conn
    finally:
        conn.close()
