"""The embedded durable queue: named queues in the process's store, the data directory's SQLite
database (WAL) by default (:class:`EmbeddedQueue`, here), or a PostgreSQL store shared by many
machines (:mod:`sluice.stores.postgres_queue`, the same semantics).

Semantics (those of a visibility-timeout queue such as SQS):

1. A fetched message becomes invisible for ``lease_s`` (its ``visible_at`` moves ahead) and gets
   a fresh lease token; only the holder of that token can extend, requeue or delete it.
2. The consumer extends the lease while the handler runs and deletes the message once the task
   is finished (its final state recorded first, in the task store).
3. A message whose lease lapses (its worker died) is visible again; the next fetch takes it and
   the task store's claim decides whether it runs again (see :mod:`sluice.tasks.state`).
4. ``visible_at`` in the future delays a message: retry backoff and scheduled tasks.
5. Several processes may share one store: a fetch selects and leases in a single ``UPDATE …
   RETURNING`` (SQLite: in one ``BEGIN IMMEDIATE`` transaction; PostgreSQL: over a ``FOR UPDATE
   SKIP LOCKED`` select), so no message is leased twice.
6. With ``consumer.ordering: key``, only the oldest message of each key can be taken (as in an
   SQS FIFO message group): while it is leased or waiting for a retry, the key's later
   messages wait, across every worker process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors.base import Delivery, Source
from sluice.datadir import Database
from sluice.datadir import QueuedMessage as QueuedMessage  # re-exported: the queue API
from sluice.datadir import put_in as put_in
from sluice.spec import Field, ObjectSpec, Settings
from sluice.stores.sqlite_routes import queue_in
from sluice.tasks.queue import MessageQueue
from sluice.tasks.sqlite import create_in
from sluice.tasks.store import TaskRecord
from sluice.tenancy.queues import StoreQueues

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig

QUEUE, LEASE_S, POLL_INTERVAL_S = "queue", "lease_s", "poll_interval_s"
QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"

CONFIG = ObjectSpec(
    Field(QUEUE, "string", "Queue name; default: the pipeline's name.", default=None,
          pattern=QUEUE_PATTERN),
    Field(LEASE_S, "number", "Visibility timeout: how long a taken message stays invisible "
          "unless its worker extends it (it does, every lease_s/3, while the handler runs).",
          default=30.0, exclusive_minimum=0),
    Field(POLL_INTERVAL_S, "number", "Pause between polls of an empty queue.", default=0.01,
          exclusive_minimum=0, maximum=10),
)


@dataclass(frozen=True, slots=True)
class EmbeddedSourceConfig(Settings):
    """The typed ``embedded`` source config (the keys of :data:`CONFIG`)."""

    queue: str | None
    lease_s: float
    poll_interval_s: float

    def queue_of(self, pipeline: str) -> str:
        """The queue consumed: ``queue``, else the pipeline's name."""
        return self.queue or pipeline


Submission = registry.Submission  # re-exported: what a submitter takes


def source_queue(config: PipelineConfig) -> str:
    """The queue a pipeline with an embedded source consumes (``queue``, else its name)."""
    return SPEC.typed(config.source.config).queue_of(config.name)


def submit_in(conn: sqlite3.Connection, queue: str, items: Sequence[Submission],
              now: float) -> list[TaskRecord | None]:
    """Create the tasks and put their messages on ``queue``, in the caller's transaction.

    A task id already used in its pipeline (before, or earlier in ``items``) is not enqueued
    again: its slot in the returned list is ``None`` (the caller reports the existing task).
    A hosted function's task goes to its dedicated queue if its route names one, read in this
    transaction (sluice.tenancy.routes invariant 3).
    """
    out: list[TaskRecord | None] = []
    for item in items:
        m = item.message
        (created,) = create_in(conn, item.pipeline, item.tenant, [item.new_task()], now)
        if created is not None:
            target = queue
            if item.function is not None:
                target = queue_in(conn, item.pipeline, item.tenant, item.function) or queue
            put_in(conn, target, [m], now, item.delay_s)
        out.append(created)
    return out


def submit(db: Database, pipeline: str, tenant: str, queue: str,
           messages: Sequence[QueuedMessage], *, delay_s: float = 0.0,
           received_at: float | None = None) -> list[TaskRecord | None]:
    """Submit ``messages`` to one pipeline in one transaction (all or nothing)."""
    items = [Submission(pipeline, tenant, m, delay_s, received_at) for m in messages]
    return db.run_sync(lambda c: submit_in(c, queue, items, time.time()))


class EmbeddedSubmitter:
    """:class:`~sluice.registry.Submitter` of a pipeline with an embedded source: task and
    message in one transaction of the store (:meth:`sluice.stores.base.Store.submit`)."""

    def __init__(self, config: PipelineConfig, ctx: registry.SubmitContext) -> None:
        self.queue = source_queue(config)
        self.store = ctx.store

    async def submit(self, items: Sequence[Submission]) -> list[TaskRecord | None]:
        return await self.store.submit(self.queue, items)

    async def close(self) -> None:
        return None


async def wake(config: PipelineConfig, task_id: str, ctx: registry.SubmitContext) -> None:
    """A resumed task's message, held back while it was paused, is visible now."""
    await ctx.store.wake(source_queue(config), task_id)


def wake_in(conn: sqlite3.Connection, queue: str, task_id: str, now: float) -> None:
    """Make a waiting (not leased) message of ``task_id`` visible now: a resumed task."""
    # deliveries > 0: it was handed out and put back (held while paused), not a scheduled one.
    conn.execute("UPDATE messages SET visible_at = ? WHERE queue = ? AND task_id = ?"
                 " AND lease_token IS NULL AND deliveries > 0 AND visible_at > ?",
                 (now, queue, task_id, now))


def new_task_id() -> str:
    return uuid.uuid4().hex


class EmbeddedQueue:
    """:class:`~sluice.tasks.queue.MessageQueue` on one named queue of the SQLite database
    (sync, in the caller's transaction; the async source wraps them)."""

    def __init__(self, db: Database, queue: str, lease_s: float = 30.0,
                 ordered_keys: bool = False) -> None:
        self.db = db
        self.queue = queue
        self.lease_s = lease_s
        self.ordered_keys = ordered_keys
        self._owner = uuid.uuid4().hex[:12]
        self._tokens = itertools.count()

    def put_in(self, conn: sqlite3.Connection, messages: Sequence[QueuedMessage], now: float,
               delay_s: float = 0.0) -> None:
        put_in(conn, self.queue, messages, now, delay_s)

    def wake_in(self, conn: sqlite3.Connection, task_id: str, now: float) -> None:
        wake_in(conn, self.queue, task_id, now)

    def lease_in(self, conn: sqlite3.Connection, max_n: int, now: float) -> list[Delivery]:
        token = f"{self._owner}:{next(self._tokens)}"
        head_of_key = (" AND (m.key IS NULL OR m.id = (SELECT MIN(h.id) FROM messages h"
                       " WHERE h.queue = m.queue AND h.key = m.key))"
                       if self.ordered_keys else "")
        rows = conn.execute(
            "UPDATE messages SET visible_at = ?, lease_token = ?, deliveries = deliveries + 1"
            " WHERE id IN (SELECT m.id FROM messages m WHERE m.queue = ? AND m.visible_at <= ?"
            f"{head_of_key} ORDER BY m.visible_at, m.id LIMIT ?)"
            " RETURNING id, task_id, body, content_type, key, headers, enqueued_at, deliveries",
            (now + self.lease_s, token, self.queue, now, max_n),
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        return [
            Delivery(task_id=r[1], body=r[2], content_type=r[3], key=r[4],
                     headers=json.loads(r[5]) if r[5] else {}, enqueued_at=r[6],
                     deliveries=r[7], ref=(r[0], token))
            for r in rows
        ]

    def next_visible_in(self, conn: sqlite3.Connection) -> float | None:
        row = conn.execute("SELECT MIN(visible_at) FROM messages WHERE queue = ?",
                           (self.queue,)).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    @staticmethod
    def refs(deliveries: Sequence[Delivery]) -> list[tuple[Any, Any]]:
        return [(d.ref[0], d.ref[1]) for d in deliveries]

    def delete_in(self, conn: sqlite3.Connection, deliveries: Sequence[Delivery]) -> None:
        conn.executemany("DELETE FROM messages WHERE id = ? AND lease_token = ?",
                         self.refs(deliveries))

    def requeue_in(self, conn: sqlite3.Connection, items: Sequence[tuple[Delivery, float]],
                   now: float) -> None:
        conn.executemany(
            "UPDATE messages SET visible_at = ?, lease_token = NULL"
            " WHERE id = ? AND lease_token = ?",
            [(now + delay, d.ref[0], d.ref[1]) for d, delay in items],
        )

    def extend_in(self, conn: sqlite3.Connection, deliveries: Sequence[Delivery],
                  now: float) -> None:
        conn.executemany(
            "UPDATE messages SET visible_at = ? WHERE id = ? AND lease_token = ?",
            [(now + self.lease_s, d.ref[0], d.ref[1]) for d in deliveries],
        )

    def count_in(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                           (self.queue,)).fetchone()
        return int(row[0])


class EmbeddedSource:
    """:class:`~sluice.connectors.base.Source` over an :class:`EmbeddedQueue`."""

    def __init__(self, db: Database, queue: str, lease_s: float, poll_interval_s: float,
                 ordered_keys: bool = False) -> None:
        self.q: MessageQueue[sqlite3.Connection] = EmbeddedQueue(db, queue, lease_s,
                                                                 ordered_keys)
        self.orders_keys = ordered_keys  # the dispatcher need not hold lanes for retries
        self.db = db
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s

    async def start(self) -> None:
        return None

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_s
        while True:
            now = time.time()
            next_at = await self.db.read(self.q.next_visible_in)
            pause = self.poll_interval_s
            if next_at is not None and next_at <= now:
                got = await self.db.run(lambda c: self.q.lease_in(c, max_n, time.time()))
                if got:
                    return got
                # Visible, but none can be taken (their keys are busy, rule 6): poll again.
            elif next_at is not None:
                pause = min(pause, max(next_at - now, 0.0))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(pause, remaining))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self.db.run(lambda c: self.q.delete_in(c, deliveries))

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if deliveries:
            await self.db.run(lambda c: self.q.requeue_in(c, deliveries, time.time()))

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self.db.run(lambda c: self.q.extend_in(c, deliveries, time.time()))

    async def pending(self) -> int:
        return await self.db.read(self.q.count_in)

    async def close(self) -> None:
        return None


def build_source(config: EmbeddedSourceConfig, ctx: registry.BuildContext) -> Source:
    """The queue of the process's store (SQLite: :class:`EmbeddedSource`; PostgreSQL: its
    own, with the same semantics)."""
    return ctx.store.source(config.queue_of(ctx.pipeline), float(config.lease_s),
                            float(config.poll_interval_s), ordered_keys=ctx.ordering == "key")


def hosting(config: EmbeddedSourceConfig, ctx: registry.BuildContext) -> StoreQueues:
    """A hosting pipeline's dedicated queues: other queues of the same store."""
    return StoreQueues(ctx.store, config.queue_of(ctx.pipeline), float(config.lease_s),
                       float(config.poll_interval_s), ordered_keys=ctx.ordering == "key")


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name="embedded",
    summary="The embedded durable queue, in the store (SQLite in the data directory by "
            "default, or a shared PostgreSQL: --store); no broker needed.",
    config=CONFIG,
    factory=build_source,
    settings=EmbeddedSourceConfig.from_mapping,
    capabilities=frozenset({registry.Capability.SUBMIT, registry.Capability.DELAYED_REDELIVERY,
                            registry.Capability.KEY_ORDER}),
    submitter=EmbeddedSubmitter,
    wake=wake,
    hosting=hosting,
    # Every pipeline's default dead letter, whatever its source: the queue '<name>.dlq'.
    default_dead_letter=lambda pipeline: {"embedded": {QUEUE: f"{pipeline}.dlq"}},
))
