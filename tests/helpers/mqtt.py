"""Talking to the real MQTT broker in tests (Mosquitto 2, ``scripts/services start mqtt``;
``SLUICE_MQTT_URL``, default mqtt://127.0.0.1:1883), and its conformance connector
(:func:`connector`).

An MQTT broker keeps messages only for sessions subscribed to their topic: a test makes the
sessions first (the pipeline's worker's, :func:`subscribe`), then publishes.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sluice.connectors import mqtt_client as mc
from sluice.connectors.base import Source
from sluice.connectors.mqtt import SPEC, MqttSource
from tests.conformance.conftest import (
    Connector,
    DeadLetter,
    Item,
    closed_port,
    require_service,
)

URL = os.environ.get("SLUICE_MQTT_URL", "mqtt://127.0.0.1:1883")
ADDRESS = mc.parse_url(URL)
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run ``coro`` on an event loop of its own, on a thread of its own (the caller may be
    inside a test's loop)."""
    async def main() -> T:
        return await coro

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, main()).result()


_problem: list[str] = []


def broker_problem() -> str | None:
    """Why the broker cannot be used (``None``: it answers); asked once per session."""
    if not _problem:
        try:
            run(mc.wipe_session(ADDRESS, f"sluice-test-probe-{uuid.uuid4().hex[:8]}"))
            return None
        except Exception as exc:
            _problem.append(str(exc))
    return (f"MQTT broker not reachable at {URL} ({_problem[0]}); start it with "
            "`scripts/services start mqtt`")


async def _open(client_id: str, *, on_message: mc.OnMessage | None = None,
                persistent: bool = True) -> mc.Connection:
    conn = mc.Connection(ADDRESS, client_id, what=f"test client {client_id}",
                         persistent=persistent, session_expiry_s=3600, on_message=on_message,
                         manual_ack=False)
    await conn.open()
    return conn


async def subscribe_async(client_id: str, topic_filter: str) -> None:
    conn = await _open(client_id)
    try:
        await conn.subscribe(topic_filter)
    finally:
        await conn.close()


def subscribe(client_id: str, topic_filter: str) -> None:
    """Make (or keep) the persistent session ``client_id`` subscribed to ``topic_filter``."""
    run(subscribe_async(client_id, topic_filter))


@dataclass(frozen=True)
class Out:
    """One message to publish: its body, task id, key, user properties and content type."""

    body: bytes
    task_id: str | None = None
    key: str | None = None
    headers: dict[str, str] | None = None
    content_type: str | None = None
    not_before: float | None = None


async def publish_async(topic: str, messages: Sequence[Out], *,
                        wait_for_subscriber_s: float = 30.0) -> list[int]:
    """Publish at QoS 1; each PUBACK's reason code. A message the broker dropped for want of
    a subscriber (0x10: a broker just restarted without the sessions, before the worker is
    back) is published again until one subscribed, for up to ``wait_for_subscriber_s``."""
    conn = await _open(f"sluice-test-pub-{uuid.uuid4().hex[:12]}", persistent=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_for_subscriber_s

    async def one(m: Out) -> int:
        while True:
            code = await conn.publish(topic, m.body, mc.publish_properties(
                m.task_id, m.content_type, m.headers or {}, m.key, m.not_before))
            if code != mc.NO_MATCHING_SUBSCRIBERS or loop.time() > deadline:
                return code
            await asyncio.sleep(0.2)

    try:
        return list(await asyncio.gather(*(one(m) for m in messages)))
    finally:
        await conn.close()


def publish(topic: str, messages: Sequence[Out], *,
            wait_for_subscriber_s: float = 30.0) -> list[int]:
    """Publish at QoS 1; each PUBACK's reason code (see :func:`publish_async`)."""
    return run(publish_async(topic, messages, wait_for_subscriber_s=wait_for_subscriber_s))


def publish_json(topic: str, items: Sequence[Item]) -> None:
    publish(topic, [Out(json.dumps(i.payload).encode(), i.task_id, i.key) for i in items])


@dataclass(frozen=True)
class Received:
    topic: str
    body: bytes
    properties: dict[str, str]
    content_type: str | None


async def read_async(client_id: str, expected: int, timeout_s: float = 10.0,
                     quiet_s: float = 0.3) -> list[Received]:
    """Messages queued for the persistent session ``client_id`` (acknowledged as read): until
    ``expected`` came, then ``quiet_s`` more for any beyond, or ``timeout_s`` in all."""
    got: list[Received] = []
    arrived = asyncio.Event()

    def on_message(_conn: mc.Connection, message: Any, _epoch: int) -> None:
        content_type, props = mc.read_properties(message)
        got.append(Received(message.topic, bytes(message.payload), props, content_type))
        arrived.set()

    conn = await _open(client_id, on_message=on_message)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            wait_s = quiet_s if len(got) >= expected else deadline - loop.time()
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), max(wait_s, 0.0))
            except TimeoutError:
                if len(got) >= expected:
                    break
    finally:
        await conn.close()
    return got


def read(client_id: str, expected: int, timeout_s: float = 10.0) -> list[Received]:
    return run(read_async(client_id, expected, timeout_s))


async def wipe_async(*client_ids: str) -> None:
    for client_id in client_ids:
        await mc.wipe_session(ADDRESS, client_id)


def wipe(*client_ids: str) -> None:
    """End these sessions at the broker (and what it queued for them)."""
    run(wipe_async(*client_ids))


def worker_ids(source_config: dict[str, Any], pipeline: str, slots: int = 4) -> list[str]:
    """The client ids the pipeline's workers use (rule 4 of the source): slots 0..slots-1."""
    base = SPEC.typed(source_config).client_base(pipeline)
    return [f"{base}-{n}" for n in range(slots)]


SESSIONS = 1  # the workers' sessions a conformance connector makes before a test publishes


def new_topic(prefix: str = "sluice-test") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


class MqttConnector(Connector):
    """A fresh topic per test, its first worker's session made beforehand (an MQTT broker keeps
    messages only for subscribed sessions), and a reader session on the dead-letter topic."""

    service = "mqtt"
    observable_backpressure = True  # receive_maximum: the broker stops sending

    def __init__(self, data_dir: Path) -> None:
        self.topic = new_topic("sluice-conf")
        self.group = f"conf-{uuid.uuid4().hex[:12]}"
        self.dlq = f"{self.topic}.dlq"
        self.reader = f"sluice-test-dlq-{uuid.uuid4().hex[:12]}"
        self.config = {"url": URL, "topic": self.topic, "group": self.group}
        self.ids = worker_ids(self.config, "jobs")
        # The first worker's session, as if it had run before: what is published before the
        # worker starts waits there (a second worker gets a share of what comes after it
        # joined).
        for n in range(SESSIONS):
            subscribe(self.ids[n], f"$share/{self.group}/{self.topic}")
            slot = mc.slot_path(mc.slot_dir(data_dir), SPEC.typed(self.config).client_base(
                "jobs"), n)
            slot.parent.mkdir(parents=True, exist_ok=True)
            slot.touch()
        subscribe(self.reader, self.dlq)

    def source_yaml(self, *, lease_s: float = 2.0, max_buffered: int | None = None) -> str:
        limit = {} if max_buffered is None else {"receive_maximum": max_buffered}
        return json.dumps({"mqtt": {**self.config, "lease_s": lease_s, **limit}})

    def dead_letter_yaml(self) -> str:
        return json.dumps({"mqtt": {"topic": self.dlq}})

    def publish(self, items: Sequence[Item]) -> None:
        publish_json(self.topic, items)

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        publish(self.topic, [Out(body, task_id, content_type="application/octet-stream")
                             for task_id, body in messages])

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        return [DeadLetter(m.properties["sluice-task-id"], m.properties, m.body)
                for m in read(self.reader, expected)]

    def unreachable_source_yaml(self) -> str | None:
        return json.dumps({"mqtt": {**self.config,
                                    "url": f"mqtt://127.0.0.1:{closed_port()}"}})

    def holding_back(self, source: Source) -> bool:
        assert isinstance(source, MqttSource)
        return len(source._held) >= source.cfg.receive_maximum

    def close(self) -> None:
        wipe(*self.ids, self.reader)


def connector(data_dir: Path) -> Connector:
    require_service(broker_problem())
    return MqttConnector(data_dir)
