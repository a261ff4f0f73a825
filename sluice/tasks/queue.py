"""The queue seam: :class:`MessageQueue`, one named visibility-timeout queue of a store.

A store provides the queue beside its :class:`~sluice.tasks.store.TaskStore` and
:class:`~sluice.tasks.store.Outbox`: the embedded source consumes it, the embedded sink and the
submitters put on it, the outbox keeps its entries on it. Its implementation for the data
directory's SQLite database is :class:`~sluice.connectors.embedded.EmbeddedQueue` (the
semantics are numbered there).

Invariants:

1. Every operation runs in the caller's transaction ``tx`` (the store's handle: a
   ``sqlite3.Connection`` for SQLite), never in one of its own: a caller writes a message with
   its task (submit), or removes an entry with its delivery status (the outbox), atomically,
   and one caller transaction is one round trip, whatever it does on the queue.
2. A leased message is a :class:`~sluice.connectors.base.Delivery` whose ``ref`` is the
   queue's own handle (the message and its lease token): only the current holder's ``ref``
   deletes, requeues or extends it; a stale one (its lease lapsed and the message was leased
   again) changes nothing.
3. ``now`` is an argument of every operation that reads or sets a time, so a test drives the
   clock and callers read it once per transaction.

``tests/conformance/test_message_queue.py`` is the contract every implementation passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from sluice.connectors.base import Delivery
    from sluice.datadir import QueuedMessage

Tx_contra = TypeVar("Tx_contra", contravariant=True)


class MessageQueue(Protocol[Tx_contra]):
    """One named queue; each method runs in the caller's transaction ``tx`` (invariant 1)."""

    @property
    def queue(self) -> str:
        """The queue's name."""
        ...

    def put_in(self, tx: Tx_contra, messages: Sequence[QueuedMessage], now: float,
               delay_s: float = 0.0) -> None:
        """Put ``messages``, visible from ``now + delay_s`` (a delay: retries, scheduling)."""
        ...

    def lease_in(self, tx: Tx_contra, max_n: int, now: float) -> list[Delivery]:
        """Up to ``max_n`` visible messages, oldest first, each leased (invisible) until
        ``now`` plus the queue's lease time, with a fresh lease in its ``ref``."""
        ...

    def next_visible_in(self, tx: Tx_contra) -> float | None:
        """When the next message is visible (past: one is now); ``None``: the queue is empty."""
        ...

    def delete_in(self, tx: Tx_contra, deliveries: Sequence[Delivery]) -> None:
        """Remove these messages (acknowledged), those whose lease the caller still holds."""
        ...

    def requeue_in(self, tx: Tx_contra, items: Sequence[tuple[Delivery, float]],
                   now: float) -> None:
        """End these leases: each message is visible again after its delay (retry later)."""
        ...

    def extend_in(self, tx: Tx_contra, deliveries: Sequence[Delivery], now: float) -> None:
        """Lease these messages again until ``now`` plus the lease time (the handler runs)."""
        ...

    def count_in(self, tx: Tx_contra) -> int:
        """Messages on the queue: visible, delayed or leased (pending)."""
        ...

    def wake_in(self, tx: Tx_contra, task_id: str, now: float) -> None:
        """Make the held message of ``task_id`` (handed out, then put back for later while its
        task was paused; not leased) visible now: a resumed task. Others are left alone."""
        ...
