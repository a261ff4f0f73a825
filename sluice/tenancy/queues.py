"""The seam between hosting and a source type: how a hosting pipeline makes, reads, feeds and
deletes its functions' dedicated queues. A source spec offers it as its ``hosting`` hook
(:attr:`sluice.registry.ComponentSpec.hosting`); a source without one hosts functions on its
shared queue only (``tenancy.isolation.enabled: false``).

Rules every implementation keeps:

1. ``create`` and ``delete`` are idempotent; ``create`` makes the queue like the shared one
   (a Kafka topic: the same partition count).
2. ``member`` is the source of one queue, with the shared source's settings.
3. ``publish`` puts messages on a queue durably (confirmed) before it returns, keeping each
   message's task id and headers: a delivery forwarded from the shared queue is published to
   its function's queue first and acknowledged on the shared one after, so a crash between
   the two leaves it twice, never lost (the task store's claim runs it once).
4. ``moves_in_store``: the queues are rows of the store, so a route change moves the
   function's messages in its own transaction (:mod:`sluice.tenancy.routes` invariant 2).
5. ``backlog`` counts a queue's messages by (tenant, function), or returns None where the
   broker cannot tell (the worker then counts what it holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sluice.connectors.base import Source
    from sluice.datadir import QueuedMessage
    from sluice.stores.base import Store


class QueueOps(Protocol):
    moves_in_store: bool
    shared: str  # the shared queue's name (the source's own queue or topic)

    async def create(self, queue: str) -> None: ...

    async def delete(self, queue: str) -> None: ...

    def member(self, queue: str) -> Source: ...

    async def publish(self, queue: str, messages: Sequence[QueuedMessage]) -> None: ...

    async def backlog(self, queue: str) -> dict[tuple[str, str], int] | None: ...

    async def close(self) -> None: ...


class StoreQueues:
    """:class:`QueueOps` of the embedded queue: queues are rows of the store (SQLite or
    PostgreSQL), made by putting a message and gone when the last is deleted."""

    moves_in_store = True

    def __init__(self, store: Store, shared: str, lease_s: float, poll_interval_s: float,
                 ordered_keys: bool) -> None:
        self.store = store
        self.shared = shared
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.ordered_keys = ordered_keys

    async def create(self, queue: str) -> None:
        return None

    async def delete(self, queue: str) -> None:
        return None

    def member(self, queue: str) -> Source:
        return self.store.source(queue, self.lease_s, self.poll_interval_s, self.ordered_keys)

    async def publish(self, queue: str, messages: Sequence[QueuedMessage]) -> None:
        await self.store.put(queue, messages)

    async def backlog(self, queue: str) -> dict[tuple[str, str], int] | None:
        return await self.store.routes.backlog(queue)

    async def close(self) -> None:
        return None
