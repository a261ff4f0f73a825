"""The source seam: :class:`Source` yields :class:`Delivery` batches and settles them in batches.

Sources are pulled, never pushed: the consumer layer asks for at most as many deliveries as it
has free slots, so a full layer stops fetching (backpressure) without a separate signal.
Settling is batched (``ack``/``retry_later``/``extend``): one round trip for many messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(slots=True)
class Delivery:
    """One message from a source, as the consumer layer handles it."""

    task_id: str
    body: bytes
    content_type: str = "application/json"
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    enqueued_at: float | None = None  # when the source accepted it (epoch seconds)
    deliveries: int = 1  # how many times the source has handed it out, this one included
    ref: Any = None  # the source's own handle: a row id and lease token, a partition/offset …
    partition: int | None = None  # for ordering: partition; None for an unpartitioned queue
    # A hosting pipeline's (sluice.tenancy.source sets them): whose task, which function.
    tenant: str | None = None
    function: str | None = None


class Source(Protocol):
    """A source of deliveries for one pipeline."""

    lease_s: float  # how long a fetched delivery stays ours unless extended

    async def start(self) -> None: ...

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        """Up to ``max_n`` deliveries, waiting up to ``wait_s`` for the first one."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """These are finished: never deliver them again."""
        ...

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        """Deliver each again after its delay (seconds)."""
        ...

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        """Keep these ours for another ``lease_s`` (the handler is still running)."""
        ...

    async def pending(self) -> int:
        """Messages not yet finished (visible, delayed or leased); used by ``run --drain``."""
        ...

    async def close(self) -> None: ...


class Sink(Protocol):
    """A destination for records (dead letters now; results with the sinks family)."""

    async def send(self, records: Sequence[SinkRecord]) -> None:
        """Deliver durably, or raise :class:`~sluice.errors.SourceError`."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class SinkRecord:
    task_id: str
    body: bytes
    content_type: str
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)  # never changed once made (frozen: a 5x slower init, per message)
class Output:
    """A record to write with its source message's acknowledgement (:class:`ProducingSource`)."""

    topic: str
    record: SinkRecord


@runtime_checkable
class ProducingSource(Source, Protocol):
    """A source that writes results with its own commits (Kafka, for Kafka destinations on its
    brokers): a message's outputs are written before its acknowledgement is committed (after
    the broker acknowledged them, or in the same transaction with ``consumer.exactly_once``),
    and are made again if the message is read again."""

    def produce_to(self, topics: Sequence[tuple[str, Any]]) -> None:
        """Before :meth:`start`: the output topics, each with its ``create_topic`` setting."""
        ...

    async def ack_producing(self, items: Sequence[tuple[Delivery, Sequence[Output]]]) -> None:
        """Acknowledge each delivery; its outputs are written before its acknowledgement is
        committed."""
        ...
