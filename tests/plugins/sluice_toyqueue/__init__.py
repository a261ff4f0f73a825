"""sluice-toyqueue: a third-party connector, shipped as its own package.

A toy queue kept in its own SQLite file (:mod:`sluice_toyqueue.store`) with a source and a sink
for sluice. It is registered the way any third-party connector is, by the entry point of its
installed distribution (``sluice_toyqueue-0.1.dist-info/entry_points.txt``)::

    [sluice.components]
    toyqueue = sluice_toyqueue:register

The conformance suites run over it (``tests/conformance/conftest.py``) to show that a connector
outside sluice passes them without a change to sluice.

What it can do, as its spec declares it: nothing beyond the ``Source`` protocol. It takes no
submits (tasks arrive by :func:`publish`), so it has no submitter, and no delayed submits
either; it does not keep a key's messages in order itself (the dispatcher's lanes do), writes
no outputs with its acknowledgement and cannot stand in for the task store.

Rules of the source (those of :mod:`sluice_toyqueue.store`, seen through the ``Source``
protocol):

1. A fetched delivery is leased for ``lease_s``; ``extend`` renews the lease, ``ack`` deletes
   the message, ``retry_later`` makes it visible again after its delay.
2. An ack is final once its transaction committed; a lapsed lease (a dead worker) hands the
   message out again, so a crash repeats at most the attempts whose ack was not committed.
3. ``fetch`` polls the file every ``poll_interval_s`` (or until the next delayed message is
   due), until ``wait_s`` has passed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice import registry
from sluice.config.destinations import label_field
from sluice.connectors.base import Delivery, SinkRecord
from sluice.spec import REQUIRED, Field, ObjectSpec

from .store import Leased, Message, ToyQueue, queue_file

__all__ = ["Message", "ToyQueue", "publish", "queue_file", "register"]

NAME = "toyqueue"
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

# Config keys (field names as constants).
QUEUE = "queue"
LEASE_S = "lease_s"
POLL_INTERVAL_S = "poll_interval_s"

SOURCE_CONFIG = ObjectSpec(
    Field(QUEUE, "string", "Queue name; default: the pipeline's name.", default=None,
          pattern=QUEUE_PATTERN),
    Field(LEASE_S, "number", "How long a fetched message stays leased unless extended.",
          default=30.0, exclusive_minimum=0),
    Field(POLL_INTERVAL_S, "number", "Pause between polls of an empty queue.", default=0.02,
          exclusive_minimum=0, maximum=10),
)

SINK_CONFIG = ObjectSpec(
    Field(QUEUE, "string", "Queue to put records on.", default=REQUIRED, pattern=QUEUE_PATTERN),
    label_field(QUEUE),
)


@dataclass(frozen=True)
class SourceConfig:
    queue: str
    lease_s: float
    poll_interval_s: float

    @classmethod
    def of(cls, config: dict[str, Any], pipeline: str) -> SourceConfig:
        return cls(str(config.get(QUEUE) or pipeline), float(config[LEASE_S]),
                   float(config[POLL_INTERVAL_S]))


def publish(data_dir: str | Path | None, queue: str, messages: Sequence[Message],
            delay_s: float = 0.0) -> None:
    """Put ``messages`` on ``queue`` of the toy queue file in ``data_dir``, in one
    transaction."""
    q = ToyQueue(queue_file(data_dir), queue)
    try:
        q.put(messages, time.time(), delay_s)
    finally:
        q.close()


def delivery(leased: Leased) -> Delivery:
    m = leased.message
    return Delivery(task_id=m.task_id, body=m.body, content_type=m.content_type, key=m.key,
                    headers=dict(m.headers), enqueued_at=leased.enqueued_at,
                    deliveries=leased.deliveries, ref=leased.ref)


class ToyQueueSource:
    """:class:`~sluice.connectors.base.Source` over one toy queue (rules 1-3)."""

    def __init__(self, queue: ToyQueue, lease_s: float, poll_interval_s: float) -> None:
        self.q = queue
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s

    async def start(self) -> None:
        await asyncio.to_thread(self.q.count)  # the file and its table exist, or say why not

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_s
        while True:
            now = time.time()
            next_at = await asyncio.to_thread(self.q.next_visible)
            pause = self.poll_interval_s
            if next_at is not None and next_at <= now:
                got = await asyncio.to_thread(self.q.lease, max_n, self.lease_s, time.time())
                if got:
                    return [delivery(leased) for leased in got]
            elif next_at is not None:
                pause = min(pause, max(next_at - now, 0.0))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(pause, remaining))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await asyncio.to_thread(self.q.delete, [d.ref for d in deliveries])

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if deliveries:
            await asyncio.to_thread(self.q.requeue, [(d.ref, delay_s) for d, delay_s
                                                     in deliveries], time.time())

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await asyncio.to_thread(self.q.extend, [d.ref for d in deliveries], self.lease_s,
                                    time.time())

    async def pending(self) -> int:
        return await asyncio.to_thread(self.q.count)

    async def close(self) -> None:
        await asyncio.to_thread(self.q.close)


class ToyQueueSink:
    """Puts records on a toy queue (dead letters; another pipeline can consume them)."""

    takes_batches = True  # one transaction for the whole batch

    def __init__(self, queue: ToyQueue) -> None:
        self.q = queue

    async def send(self, records: Sequence[SinkRecord]) -> None:
        messages = [Message(r.task_id, r.body, r.content_type, r.key, dict(r.headers))
                    for r in records]
        await asyncio.to_thread(self.q.put, messages, time.time())

    async def close(self) -> None:
        await asyncio.to_thread(self.q.close)


def build_source(config: dict[str, Any], ctx: registry.BuildContext) -> ToyQueueSource:
    typed = SourceConfig.of(config, ctx.pipeline)
    return ToyQueueSource(ToyQueue(queue_file(ctx.data_dir), typed.queue), typed.lease_s,
                          typed.poll_interval_s)


def build_sink(config: dict[str, Any], ctx: registry.BuildContext) -> ToyQueueSink:
    return ToyQueueSink(ToyQueue(queue_file(ctx.data_dir), str(config[QUEUE])))


SOURCE = registry.ComponentSpec(
    family="source", name=NAME, config=SOURCE_CONFIG, factory=build_source,
    summary="A toy queue in its own SQLite file (a third-party plugin of the test suite).",
    capabilities=frozenset(),  # the Source protocol, nothing more (see the module docstring)
)
SINK = registry.ComponentSpec(
    family="sink", name=NAME, config=SINK_CONFIG, factory=build_sink,
    summary="A toy queue in its own SQLite file (a third-party plugin of the test suite).",
)


def register(reg: registry.Registry) -> None:
    """The entry point: add the toy queue's source and sink to ``reg``."""
    reg.register(SOURCE)
    reg.register(SINK)
