"""The embedded queue on PostgreSQL: :class:`PgQueueSource`, a
:class:`~sluice.connectors.base.Source` over one named queue of the ``messages`` table, shared
by every process of the store on every machine.

The semantics are those of the SQLite queue, numbered in :mod:`sluice.connectors.embedded`
(visibility-timeout leases with tokens, delayed visibility, ordered keys, the wake of a held
message). Invariants of this implementation:

1. Every time is the database's clock (postgres_schema invariant 2), read in the statement
   that uses it: a lease taken on one machine lapses at the same moment for every other, and a
   worker's clock is never read.
2. A fetch is one statement: it selects the visible messages ``FOR UPDATE SKIP LOCKED`` (once,
   as an array, so the ``LIMIT`` holds) and leases them in the same ``UPDATE … RETURNING``: no
   message is leased twice, and concurrent fetchers never wait for each other's rows. With
   ordered keys only the oldest message of each key is taken (rule 6 there).
3. Each fetch leases under a token of its own (the source's owner id and a counter); ack,
   requeue and extend act only on rows whose ``lease_token`` is still the delivery's, so a
   stale delivery (its lease lapsed and the message was leased again) changes nothing. Each is
   one statement over arrays, whatever the number of deliveries.
4. An idle source does not poll hard: it listens on
   :data:`~sluice.stores.postgres_schema.QUEUE_CHANNEL` (one registration per source, made at
   its first wait) and looks again when its queue is announced (a put, a requeue, a wake),
   when the listening connection reconnects (payload ``""``), when the next delayed or leased
   message is due (asked in the same statement as the empty fetch), or after
   :data:`IDLE_LOOK_S` (notifications are lost while the listener reconnects), whichever comes
   first. That state outlives a fetch: a fetch that ends before any of them returns without a
   query. Messages visible but not taken (their keys busy, or locked by another fetcher) are
   looked at again every ``poll_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from sluice.connectors.base import Delivery
from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_schema import QUEUE_CHANNEL, notify_sql, now_sql

IDLE_LOOK_S = 1.0  # an idle source looks at its queue at least this often (invariant 4)

NOW = now_sql("NULL")  # the database's clock (invariant 1)

_LEASE = (
    "WITH leased AS (UPDATE messages SET visible_at = {now} + $2::float8, lease_token = $3,"
    " deliveries = messages.deliveries + 1 WHERE messages.id = ANY(ARRAY("
    " SELECT m.id FROM messages m WHERE m.queue = $1 AND m.visible_at <= {now}{head_of_key}"
    " ORDER BY m.visible_at, m.id LIMIT $4 FOR UPDATE SKIP LOCKED))"
    " RETURNING messages.id, messages.task_id, messages.body, messages.content_type,"
    " messages.key, messages.headers, messages.enqueued_at, messages.deliveries)"
    " SELECT id, task_id, body, content_type, key, headers, enqueued_at, deliveries,"
    " NULL::float8 AS next_in_s FROM leased"
    " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " (SELECT MIN(visible_at) FROM messages WHERE queue = $1) - {now}"
    " WHERE NOT EXISTS (SELECT 1 FROM leased)"
)
_HEAD_OF_KEY = (" AND (m.key IS NULL OR NOT EXISTS (SELECT 1 FROM messages h"
                " WHERE h.queue = m.queue AND h.key = m.key AND h.id < m.id))")
LEASE_SQL = _LEASE.format(now=NOW, head_of_key="")
LEASE_ORDERED_SQL = _LEASE.format(now=NOW, head_of_key=_HEAD_OF_KEY)

DELETE_SQL = (
    "WITH d AS (DELETE FROM messages m USING unnest($1::bigint[], $2::text[]) AS u(id, token)"
    f" WHERE m.id = u.id AND m.lease_token = u.token RETURNING 1) SELECT {NOW},"
    " (SELECT count(*) FROM d)"
)
REQUEUE_SQL = (
    f"WITH n AS (SELECT {NOW} AS now),"
    " r AS (UPDATE messages m SET visible_at = n.now + u.delay_s, lease_token = NULL"
    " FROM n, unnest($1::bigint[], $2::text[], $3::float8[]) AS u(id, token, delay_s)"
    " WHERE m.id = u.id AND m.lease_token = u.token RETURNING m.queue)"
    f" SELECT n.now, (SELECT count(*) FROM (SELECT {notify_sql('$4', 'q.queue')}"
    " FROM (SELECT DISTINCT queue FROM r) q) s) FROM n"
)
EXTEND_SQL = (
    f"UPDATE messages m SET visible_at = {NOW} + $3::float8"
    " FROM unnest($1::bigint[], $2::text[]) AS u(id, token)"
    " WHERE m.id = u.id AND m.lease_token = u.token"
)
WAKE_SQL = (
    f"WITH n AS (SELECT {NOW} AS now),"
    " w AS (UPDATE messages SET visible_at = n.now FROM n WHERE queue = $1 AND task_id = $2"
    " AND lease_token IS NULL AND deliveries > 0 AND visible_at > n.now RETURNING 1)"
    f" SELECT {notify_sql('$3', '$1')} WHERE EXISTS (SELECT 1 FROM w)"
)
COUNT_SQL = "SELECT COUNT(*) FROM messages WHERE queue = $1"


def _refs(deliveries: Sequence[Delivery]) -> tuple[list[int], list[str]]:
    return [d.ref[0] for d in deliveries], [d.ref[1] for d in deliveries]


async def lease_in(conn: Any, queue: str, max_n: int, lease_s: float, token: str,
                   ordered_keys: bool) -> tuple[list[Delivery], float | None]:
    """Lease up to ``max_n`` visible messages of ``queue`` under ``token`` (invariant 2),
    sorted by id; with none, also the seconds until the next message is visible (negative or
    zero: one is visible but could not be taken; ``None``: the queue is empty)."""
    rows = await conn.fetch(LEASE_ORDERED_SQL if ordered_keys else LEASE_SQL,
                            queue, float(lease_s), token, max_n)
    got = [
        Delivery(task_id=r[1], body=r[2], content_type=r[3], key=r[4],
                 headers=json.loads(r[5]) if r[5] else {}, enqueued_at=r[6],
                 deliveries=r[7], ref=(r[0], token))
        for r in rows if r[0] is not None
    ]
    if got:
        got.sort(key=lambda d: int(d.ref[0]))
        return got, None
    next_in_s = rows[0][8] if rows else None
    return [], None if next_in_s is None else float(next_in_s)


async def delete_in(conn: Any, deliveries: Sequence[Delivery]) -> float:
    """Remove the messages whose leases the deliveries still hold (invariant 3); the
    database's time of it."""
    ids, tokens = _refs(deliveries)
    row = await conn.fetchrow(DELETE_SQL, ids, tokens)
    return float(row[0])


async def requeue_in(conn: Any, items: Sequence[tuple[Delivery, float]]) -> float:
    """End the leases still held: each message visible again after its delay (seconds), its
    queue announced (invariants 3, 4); the database's time of it."""
    ids, tokens = _refs([d for d, _ in items])
    row = await conn.fetchrow(REQUEUE_SQL, ids, tokens, [float(s) for _, s in items],
                              QUEUE_CHANNEL)
    return float(row[0])


async def extend_in(conn: Any, deliveries: Sequence[Delivery], lease_s: float) -> None:
    """Lease the messages still held until ``lease_s`` from now (invariant 3)."""
    ids, tokens = _refs(deliveries)
    await conn.execute(EXTEND_SQL, ids, tokens, float(lease_s))


async def count_in(conn: Any, queue: str) -> int:
    """Messages on ``queue``: visible, delayed or leased."""
    return int(await conn.fetchval(COUNT_SQL, queue))


async def wake(target: PgDatabase | Any, queue: str, task_id: str) -> None:
    """Make the held message of ``task_id`` on ``queue`` (handed out, then put back while its
    task was paused; not leased) visible now, and announce the queue; others are left alone.
    ``target``: the database (a transaction of its own) or a connection in the caller's."""
    if isinstance(target, PgDatabase):
        async with target.connection() as conn:
            await conn.execute(WAKE_SQL, queue, task_id, QUEUE_CHANNEL)
    else:
        await target.execute(WAKE_SQL, queue, task_id, QUEUE_CHANNEL)


class PgQueueSource:
    """:class:`~sluice.connectors.base.Source` over one queue of a PostgreSQL store (see the
    invariants)."""

    # Workers on several machines share the queue, and each holds what it fetched (leased, its
    # tasks claimed) until it runs them: without consumer.prefetch, a worker holds about what
    # it finishes in a quarter second (rule 1 of the consumer loop), not 1,000.
    shares_backlog = True

    def __init__(self, db: PgDatabase, queue: str, lease_s: float, poll_interval_s: float,
                 ordered_keys: bool = False) -> None:
        self.db = db
        self.queue = queue
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.ordered_keys = ordered_keys
        self.orders_keys = ordered_keys  # the dispatcher need not hold lanes for retries
        self._owner = uuid.uuid4().hex
        self._tokens = itertools.count()
        self._announced = asyncio.Event()  # the queue was announced since the last look
        self._look_at_monotonic = 0.0  # when to look without an announcement (invariant 4)
        self._stop_listening: Callable[[], None] | None = None
        self._closed = False

    async def start(self) -> None:
        return None

    def _on_notification(self, payload: str) -> None:
        if payload == self.queue or not payload:
            self._announced.set()

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        if max_n <= 0:
            return []
        deadline = time.monotonic() + wait_s
        while True:
            if self._announced.is_set() or time.monotonic() >= self._look_at_monotonic:
                self._announced.clear()
                got, next_in_s = await self._lease(max_n)
                if got:
                    self._look_at_monotonic = 0.0
                    return got
                self._look_at_monotonic = time.monotonic() + self._pause_s(next_in_s)
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return []
            if self._stop_listening is None and not self._closed:
                self._stop_listening = await self.db.listen(QUEUE_CHANNEL,
                                                            self._on_notification)
                self._announced.set()  # a put before the registration: look once more
                continue
            wait_s_now = min(remaining_s, max(self._look_at_monotonic - time.monotonic(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announced.wait(), wait_s_now)

    def _pause_s(self, next_in_s: float | None) -> float:
        if next_in_s is None:
            return IDLE_LOOK_S
        if next_in_s <= 0:
            return min(self.poll_interval_s, IDLE_LOOK_S)
        return min(next_in_s, IDLE_LOOK_S)

    async def _lease(self, max_n: int) -> tuple[list[Delivery], float | None]:
        token = f"{self._owner}:{next(self._tokens)}"
        async with self.db.connection() as conn:
            return await lease_in(conn, self.queue, max_n, self.lease_s, token,
                                  self.ordered_keys)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            async with self.db.connection() as conn:
                await delete_in(conn, deliveries)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if deliveries:
            async with self.db.connection() as conn:
                await requeue_in(conn, deliveries)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            async with self.db.connection() as conn:
                await extend_in(conn, deliveries, self.lease_s)

    async def pending(self) -> int:
        async with self.db.connection() as conn:
            return await count_in(conn, self.queue)

    async def close(self) -> None:
        self._closed = True
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        self._announced.set()
