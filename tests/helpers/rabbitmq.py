"""Talking to the real RabbitMQ broker in tests (its conformance connector: ``connector``).

The broker is the one ``scripts/services start rabbitmq`` runs (``SLUICE_RABBITMQ_URL``,
default amqp://guest:guest@127.0.0.1:5672/). Each call runs aio-pika in an event loop of its
own on a thread of its own, so a test may call these from inside its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aio_pika

from sluice.connectors.base import Source
from sluice.connectors.rabbitmq import RabbitSource
from sluice.connectors.rabbitmq_client import header_text, queue_arguments
from tests.conformance.conftest import Connector, DeadLetter, Item, closed_port, require_service

URL = os.environ.get("SLUICE_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
T = TypeVar("T")

_unreachable: list[str] = []


def run(use: Callable[[aio_pika.abc.AbstractChannel], Awaitable[T]]) -> T:
    """``use(channel)`` on a fresh connection (a confirm channel), in a loop of its own."""
    async def main() -> T:
        connection = await aio_pika.connect(URL, timeout=10)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            return await use(channel)
        finally:
            await connection.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, main()).result()


def broker_problem() -> str | None:
    """Why the broker cannot be used (``None``: it answers); asked once per session."""
    if not _unreachable:
        try:
            run(lambda ch: asyncio.sleep(0))
            return None
        except Exception as exc:
            _unreachable.append(f"{type(exc).__name__}: {exc}")
    return (f"RabbitMQ is not reachable at {URL} ({_unreachable[0]}); start it with "
            "`scripts/services start rabbitmq` (scripts/test does)")


def new_queue(prefix: str = "sluice-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def declare(*queues: str, queue_type: str = "quorum", single_active: bool = False) -> None:
    async def use(ch: aio_pika.abc.AbstractChannel) -> None:
        for q in queues:
            await ch.declare_queue(q, durable=True, arguments=queue_arguments(
                queue_type, single_active=single_active))

    run(use)


def delete(*queues: str) -> None:
    async def use(ch: aio_pika.abc.AbstractChannel) -> None:
        for q in queues:
            await ch.queue_delete(q)

    run(use)


def count(queue: str) -> int:
    """Ready messages in ``queue``."""
    async def use(ch: aio_pika.abc.AbstractChannel) -> int:
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)

    return run(use)


@dataclass(frozen=True)
class Out:
    """One message to publish."""

    body: bytes
    task_id: str | None = None
    key: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    content_type: str | None = "application/json"


def publish(queue: str, messages: Sequence[Out]) -> None:
    """Publish persistent messages to ``queue`` and wait for the broker's confirms."""
    async def use(ch: aio_pika.abc.AbstractChannel) -> None:
        sends = []
        for m in messages:
            headers: dict[str, Any] = dict(m.headers)
            if m.task_id is not None:
                headers["sluice-task-id"] = m.task_id
            if m.key is not None:
                headers["sluice-key"] = m.key
            sends.append(ch.default_exchange.publish(aio_pika.Message(
                m.body, headers=headers, message_id=m.message_id, content_type=m.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue))
        for i in range(0, len(sends), 1000):
            await asyncio.gather(*sends[i:i + 1000])

    run(use)


@dataclass(frozen=True)
class In:
    """One message read back."""

    body: bytes
    headers: dict[str, str]
    message_id: str | None
    redelivered: bool


def read_all(queue: str, expected: int, timeout_s: float = 30.0) -> list[In]:
    """Consume (and acknowledge) messages of ``queue`` until ``expected`` have come (or the
    timeout: then what came, for the test to report). A consumer, not basic.get: quorum queues
    with a single active consumer refuse basic.get."""
    async def use(ch: aio_pika.abc.AbstractChannel) -> list[In]:
        q = await ch.declare_queue(queue, passive=True)
        out: list[In] = []
        enough = asyncio.Event()

        async def take(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            headers = {k: t for k, v in (m.headers or {}).items()
                       if not k.startswith("x-") and (t := header_text(v)) is not None}
            out.append(In(m.body, headers, m.message_id, bool(m.redelivered)))
            await m.ack()
            if len(out) >= expected:
                enough.set()

        tag = await q.consume(take)
        if expected > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), timeout_s)
        await q.cancel(tag)
        return out

    return run(use)


def _flow(value: dict[str, Any]) -> str:
    return json.dumps(value)


class RabbitConnector(Connector):
    """A fresh quorum queue per test (and its dead-letter queue), deleted after."""

    observable_backpressure = True
    service = "rabbitmq"

    def __init__(self) -> None:
        self.queue = new_queue("sluice-conf")
        self.dlq = f"{self.queue}.dlq"
        declare(self.queue)

    def source_yaml(self, *, lease_s: float = 2.0, max_buffered: int | None = None) -> str:
        limit = {} if max_buffered is None else {"max_prefetch": max_buffered}
        return _flow({"rabbitmq": {"url": URL, "queue": self.queue, "lease_s": lease_s,
                                   **limit}})

    def dead_letter_yaml(self) -> str:
        return _flow({"rabbitmq": {"queue": self.dlq}})

    def publish(self, items: Sequence[Item]) -> None:
        publish(self.queue, [Out(json.dumps(i.payload).encode(), i.task_id, i.key)
                             for i in items])

    def publish_raw(self, messages: Sequence[tuple[str, bytes]]) -> None:
        publish(self.queue, [Out(body, task_id, content_type="application/octet-stream")
                             for task_id, body in messages])

    def dead_letters(self, expected: int) -> list[DeadLetter]:
        return [DeadLetter(m.headers["sluice-task-id"], m.headers, m.body)
                for m in read_all(self.dlq, expected)]

    def unreachable_source_yaml(self) -> str | None:
        return _flow({"rabbitmq": {"url": f"amqp://guest:guest@127.0.0.1:{closed_port()}/",
                                   "queue": self.queue}})

    def holding_back(self, source: Source) -> bool:
        """The broker sends no more: the source never consumed (nothing fetched), or its
        deliveries fill the channel's prefetch."""
        assert isinstance(source, RabbitSource), source
        held = len(source._buffer) + source._out
        return not source._consuming or held >= source._prefetch * len(source.queues)

    def close(self) -> None:
        delete(self.queue, self.dlq)


def connector(data_dir: Path) -> Connector:
    require_service(broker_problem())
    return RabbitConnector()
