"""The PostgreSQL outbox: :class:`~sluice.tasks.store.Outbox` on queues of the PostgreSQL
store, as :mod:`sluice.tasks.sqlite_outbox` is on SQLite's (its invariants 1-4 hold here).

Invariants:

1. The entries of one destination wait on the queue :func:`~sluice.tasks.sqlite.outbox_queue`
   ``(pipeline, label)``, taken through a :class:`~sluice.stores.postgres_queue.PgQueueSource`
   (leases, tokens and the database's clock as there).
2. Removing (or requeueing) entries and writing their delivery status are one transaction;
   the status's time is the database's, read by the statement that removes them.
3. Legacy positional names are drained first, as in SQLite's (rule 3 there); stranded outboxes
   are only reported (:func:`stranded`), never read or deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_queue import PgQueueSource, delete_in, requeue_in
from sluice.stores.postgres_tasks import record_deliveries_in
from sluice.tasks.sqlite import outbox_queue
from sluice.tasks.sqlite_outbox import (
    COUNT_UP_TO,
    POLL_INTERVAL_S,
    SLOT_PREFIXES,
    take_in_order,
)
from sluice.tasks.store import OutboxItem

Status = dict[str, object]

# Each distinct queue of the store is one index seek (a skip scan over messages_ready); the
# pipeline's prefix is matched exactly, whatever the database's collation orders it by.
STRANDED_SQL = """
WITH RECURSIVE q AS (
    SELECT MIN(queue) AS queue FROM messages
    UNION ALL
    SELECT (SELECT MIN(m.queue) FROM messages m WHERE m.queue > q.queue)
    FROM q WHERE q.queue IS NOT NULL
), named AS (
    SELECT queue, substr(queue, length($1) + 1) AS name FROM q
    WHERE queue IS NOT NULL AND starts_with(queue, $1)
)
SELECT name, (SELECT COUNT(*) FROM (SELECT 1 FROM messages m WHERE m.queue = named.queue
                                    LIMIT $4) c)
FROM named
WHERE NOT (name = ANY($2::text[]))
  AND EXISTS (SELECT 1 FROM unnest($3::text[]) AS p(prefix) WHERE starts_with(name, prefix))
"""
PENDING_SQL = "SELECT COUNT(*) FROM messages WHERE queue = ANY($1::text[])"


async def stranded(db: PgDatabase, pipeline: str, taken: Collection[str]) -> dict[str, int]:
    """The outboxes of ``pipeline`` with records waiting whose names (a default label or a
    positional name) are not in ``taken``, with their record counts (up to
    :data:`~sluice.tasks.sqlite_outbox.COUNT_UP_TO`); one statement."""
    async with db.connection() as conn:
        rows = await conn.fetch(STRANDED_SQL, outbox_queue(pipeline, ""), list(taken),
                                list(SLOT_PREFIXES), COUNT_UP_TO)
    return {str(r[0]): int(r[1]) for r in rows}


class PgOutbox:
    """The outbox of one destination (by ``label``) of one pipeline; see the invariants."""

    def __init__(self, db: PgDatabase, pipeline: str, label: str, lease_s: float,
                 legacy: Sequence[str] = ()) -> None:
        self.db = db
        self.pipeline = pipeline
        self.label = label
        self._queue = PgQueueSource(db, outbox_queue(pipeline, label), lease_s, POLL_INTERVAL_S)
        self._legacy = [(name, PgQueueSource(db, outbox_queue(pipeline, name), lease_s,
                                             POLL_INTERVAL_S))
                        for name in dict.fromkeys(legacy) if name != label]
        self._queues = [outbox_queue(pipeline, label),
                        *(source.queue for _, source in self._legacy)]

    async def take(self, max_n: int, wait_s: float) -> list[OutboxItem]:
        return await take_in_order(self._legacy, self.label, self._queue, max_n,
                                   wait_s)

    async def delivered(self, items: Sequence[OutboxItem]) -> None:
        await self._settle(items, lambda i, now: {"state": "delivered", "at": now,
                                                  "attempts": i.attempts})

    async def failed(self, item: OutboxItem, error: str) -> None:
        await self._settle([item], lambda i, now: {"state": "failed", "at": now,
                                                   "attempts": i.attempts, "error": error})

    async def retry_later(self, item: OutboxItem, delay_s: float, error: str | None) -> None:
        async with self.db.transaction() as conn:
            now = await requeue_in(conn, [(item.ref, delay_s)])
            if error is not None:
                status: Status = {"state": "pending", "at": now, "attempts": item.attempts,
                                  "error": error}
                await record_deliveries_in(conn, self.pipeline, item.destination,
                                           [(item.record.task_id, status)])

    async def _settle(self, items: Sequence[OutboxItem],
                      status: Callable[[OutboxItem, float], Status]) -> None:
        """Invariant 2: remove ``items`` and write their statuses in one transaction."""
        if not items:
            return
        async with self.db.transaction() as conn:
            now = await delete_in(conn, [i.ref for i in items])
            for name in dict.fromkeys(i.destination for i in items):
                await record_deliveries_in(
                    conn, self.pipeline, name,
                    [(i.record.task_id, status(i, now)) for i in items if i.destination == name])

    async def pending(self) -> int:
        async with self.db.connection() as conn:
            return int(await conn.fetchval(PENDING_SQL, self._queues))

    async def close(self) -> None:
        """Stop listening for the outbox's queues (the store's pool stays open)."""
        for _, source in self._legacy:
            await source.close()
        await self._queue.close()
