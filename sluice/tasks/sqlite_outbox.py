"""The SQLite outbox: :class:`~sluice.tasks.store.Outbox` on embedded queues in the data dir.

Invariants:

1. The entries of one destination wait on the embedded queue
   :func:`~sluice.tasks.sqlite.outbox_queue` ``(pipeline, label)`` (a
   :class:`~sluice.tasks.queue.MessageQueue`, used in this module's transactions), put there by
   :func:`~sluice.tasks.sqlite.put_outbox` in the transaction that records their task final.
2. Removing an entry and writing its delivery status are one transaction.
3. Records put under a destination's positional name from before labels (``legacy``) are
   taken first, until that queue is found empty once; each keeps its old name as its status
   key (where its task's ``pending`` status was written). After that only the label's queue
   is read.
4. An outbox under a default label or a positional name that no destination of its pipeline
   takes any more (a target changed, so its default label did) is reported by
   :func:`stranded_in`, never read or deleted: declaring its name as a destination's
   ``label`` delivers its records.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Sequence
from typing import TypeVar

from sluice.connectors.base import Delivery, SinkRecord, Source
from sluice.connectors.embedded import EmbeddedSource
from sluice.datadir import Database
from sluice.tasks.queue import MessageQueue
from sluice.tasks.sqlite import outbox_queue, record_deliveries_in
from sluice.tasks.store import OutboxItem

S = TypeVar("S", bound=Source)

POLL_INTERVAL_S = 0.05
SLOT_PREFIXES = ("on_success", "on_failure")  # how default labels and positional names start
COUNT_UP_TO = 1_000_000  # a stranded outbox's records are counted up to this many


def stranded_in(conn: sqlite3.Connection, pipeline: str,
                taken: Collection[str]) -> dict[str, int]:
    """Rule 4: the outboxes of ``pipeline`` with records waiting whose names (a default label
    or a positional name) are not in ``taken``, with their record counts. One index seek per
    outbox (the queues are walked in order, not scanned)."""
    prefix = outbox_queue(pipeline, "")
    out: dict[str, int] = {}
    after = prefix
    while True:
        row = conn.execute("SELECT queue FROM messages WHERE queue > ? AND queue < ?"
                           " ORDER BY queue LIMIT 1", (after, prefix + "\U0010ffff")).fetchone()
        if row is None:
            return out
        after = str(row[0])
        name = after[len(prefix):]
        if name.startswith(SLOT_PREFIXES) and name not in taken:
            (count,) = conn.execute("SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE"
                                    " queue = ? LIMIT ?)", (after, COUNT_UP_TO)).fetchone()
            out[name] = int(count)


def outbox_item(name: str, d: Delivery) -> OutboxItem:
    """An outbox entry taken from its queue under ``name`` (its key in the task's
    ``delivered`` map)."""
    return OutboxItem(name, SinkRecord(d.task_id, d.body, d.content_type, d.key, d.headers),
                      d.deliveries, d.enqueued_at, d)


async def take_in_order(legacy: list[tuple[str, S]], label: str, queue: Source,
                        max_n: int, wait_s: float) -> list[OutboxItem]:
    """Rule 3, for any store's queues: the positional names' entries first, each name dropped
    from ``legacy`` once found empty, then the label's."""
    while legacy:
        name, source = legacy[0]
        got = await source.fetch(max_n, 0.0)
        if got:
            return [outbox_item(name, d) for d in got]
        if await source.pending() == 0:
            legacy.pop(0)  # drained: never read again
            await source.close()
        else:
            break  # its entries are delayed or leased: the label's queue meanwhile
    return [outbox_item(label, d) for d in await queue.fetch(max_n, wait_s)]


class SqliteOutbox:
    """The outbox of one destination (by ``label``) of one pipeline; see the invariants."""

    def __init__(self, db: Database, pipeline: str, label: str, lease_s: float,
                 legacy: Sequence[str] = ()) -> None:
        self.db = db
        self.pipeline = pipeline
        self.label = label
        self._queue = EmbeddedSource(db, outbox_queue(pipeline, label), lease_s, POLL_INTERVAL_S)
        # Rule 3: (name, queue) of the positional names still to drain.
        self._legacy = [(name, EmbeddedSource(db, outbox_queue(pipeline, name), lease_s,
                                              POLL_INTERVAL_S))
                        for name in dict.fromkeys(legacy) if name != label]
        self._sources = {label: self._queue, **dict(self._legacy)}

    async def take(self, max_n: int, wait_s: float) -> list[OutboxItem]:
        return await take_in_order(self._legacy, self.label, self._queue, max_n,
                                   wait_s)

    async def delivered(self, items: Sequence[OutboxItem]) -> None:
        now = time.time()
        await self._settle(items, [{"state": "delivered", "at": now, "attempts": i.attempts}
                                   for i in items])

    async def failed(self, item: OutboxItem, error: str) -> None:
        await self._settle([item], [{"state": "failed", "at": time.time(),
                                     "attempts": item.attempts, "error": error}])

    async def retry_later(self, item: OutboxItem, delay_s: float, error: str | None) -> None:
        queue: MessageQueue[sqlite3.Connection] = self._sources[item.destination].q
        now = time.time()
        status: dict[str, object] = {"state": "pending", "at": now, "attempts": item.attempts,
                                     "error": error}

        def write(conn: sqlite3.Connection) -> None:
            queue.requeue_in(conn, [(item.ref, delay_s)], now)
            if error is not None:
                record_deliveries_in(conn, self.pipeline, item.destination,
                                     [(item.record.task_id, status)])

        await self.db.run(write)

    async def _settle(self, items: Sequence[OutboxItem],
                      statuses: Sequence[dict[str, object]]) -> None:
        """Rule 2: remove ``items`` and write their statuses in one transaction."""
        if not items:
            return

        def write(conn: sqlite3.Connection) -> None:
            for name, source in self._sources.items():
                mine = [(i, s) for i, s in zip(items, statuses, strict=True)
                        if i.destination == name]
                if mine:
                    source.q.delete_in(conn, [i.ref for i, _ in mine])
                    record_deliveries_in(conn, self.pipeline, name,
                                         [(i.record.task_id, s) for i, s in mine])

        await self.db.run(write)

    async def pending(self) -> int:
        counts = [await source.pending() for source in self._sources.values()]
        return sum(counts)
