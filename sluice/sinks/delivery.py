"""Reliable delivery of result records: a durable outbox per destination, drained with retries.

Invariants:

1. A task's result records enter its destinations' outboxes (embedded queues named
   ``sluice.outbox.<pipeline>.<destination>``) in the same transaction that records the task
   final; its source message is finished after that. So a recorded result is never lost, and a
   destination that is down holds up nothing but its own outbox.
2. A deliverer takes at most ``concurrency`` records at a time from its outbox (leased as any
   embedded message); memory stays bounded however long the destination is down. A sink that
   takes batches (``takes_batches``: Kafka, an embedded queue) gets up to ``BATCH_MAX``
   records per send, and their outbox rows and statuses are settled in one transaction; a
   failed batch is retried record by record.
3. A failed attempt puts the record back with exponential backoff and full jitter, or after
   the destination's ``Retry-After`` if that is longer; after ``max_attempts`` (or
   ``max_age_s``), or at once for a permanent error, the record goes to the pipeline's dead
   letter with the reason, and only then leaves the outbox.
4. Each outcome is written into the task's ``deliveries`` (pending → delivered | failed).
5. Delivery is at least once: a crash between sending and deleting sends the record again,
   with the same id (the task id; ``webhook-id`` for webhooks), so a receiver can drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice.config.model import ComponentConfig, RetryConfig
from sluice.connectors.base import Delivery, Sink, SinkRecord
from sluice.connectors.embedded import EmbeddedSource
from sluice.consumer.retry import RetryPolicy
from sluice.datadir import Database
from sluice.errors import DeliveryError
from sluice.tasks.sqlite import SqliteTaskStore, record_deliveries_in

log = logging.getLogger(__name__)

OUTBOX_PREFIX = "sluice.outbox."
IDLE_WAIT_S = 0.25
BATCH_MAX = 500  # records per send to a sink that takes batches


def outbox_queue(pipeline: str, destination: str) -> str:
    return f"{OUTBOX_PREFIX}{pipeline}.{destination}"


@dataclass(frozen=True)
class Destination:
    """One entry of on_success / on_failure: ``name`` is e.g. ``on_success.0.webhook``."""

    name: str
    component: ComponentConfig

    def setting(self, key: str, default: Any) -> Any:
        config = self.component.config
        return config.get(key, default) if isinstance(config, dict) else default


class Deliverer:
    def __init__(self, pipeline: str, destination: Destination, sink: Sink,
                 dead_letter: Sink, db: Database, store: SqliteTaskStore) -> None:
        self.pipeline = pipeline
        self.destination = destination
        self.sink = sink
        self.dead_letter = dead_letter
        self.store = store
        self.timeout_s = float(destination.setting("timeout_s", 10.0))
        self.concurrency = int(destination.setting("concurrency", 8))
        self.policy = RetryPolicy(RetryConfig(
            max_attempts=int(destination.setting("max_attempts", 10)),
            initial_backoff_s=float(destination.setting("initial_backoff_s", 1.0)),
            max_backoff_s=float(destination.setting("max_backoff_s", 300.0)),
            max_age_s=float(destination.setting("max_age_s", 86400.0)),
        ))
        lease_s = self.timeout_s + 30.0
        self.outbox = EmbeddedSource(db, outbox_queue(pipeline, destination.name), lease_s, 0.05)
        self._in_flight: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    async def run(self, stop: asyncio.Event, upstream_done: asyncio.Event) -> None:
        """Deliver until ``stop``; or, once ``upstream_done`` is set, until the outbox is empty."""
        batches = bool(getattr(self.sink, "takes_batches", False))
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                records = await self.outbox.fetch(BATCH_MAX if batches else free, IDLE_WAIT_S)
                work = [self._deliver_batch(records)] if batches and records else [
                    self._deliver(record) for record in records]
                for job in work:
                    task = asyncio.create_task(job)
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if (not records and not self._in_flight and upstream_done.is_set()
                        and await self.outbox.pending() == 0):
                    return
        finally:
            if self._in_flight:
                await asyncio.wait(set(self._in_flight), timeout=self.timeout_s + 1)
            with contextlib.suppress(Exception):
                await self.sink.close()  # the deliverer owns its sink

    async def _deliver(self, item: Delivery) -> None:
        record = SinkRecord(item.task_id, item.body, item.content_type, item.key, item.headers)
        attempts = item.deliveries
        try:
            await asyncio.wait_for(self.sink.send([record]), self.timeout_s)
        except (DeliveryError, TimeoutError, OSError) as exc:
            await self._failed(item, record, attempts, exc)
            return
        except Exception as exc:  # a sink's own bug: never lose the record over it
            log.exception("destination %s raised unexpectedly", self.destination.name)
            await self._failed(item, record, attempts, exc)
            return
        await self.outbox.ack([item])
        self.delivered += 1
        await self._status(item.task_id, "delivered", attempts)

    async def _deliver_batch(self, items: Sequence[Delivery]) -> None:
        """Many records in one send (a sink that takes batches: Kafka, an embedded queue);
        then the outbox rows and their delivery status in one transaction. If the send fails,
        each record is tried on its own (rule 2: per-record retries; what the failed batch
        did deliver may be delivered twice, as any retry may)."""
        records = [SinkRecord(i.task_id, i.body, i.content_type, i.key, i.headers)
                   for i in items]
        try:
            await asyncio.wait_for(self.sink.send(records), self.timeout_s)
        except Exception:
            await asyncio.gather(*(self._deliver(item) for item in items))
            return
        now = time.time()
        statuses: list[tuple[str, dict[str, object]]] = [
            (i.task_id, {"state": "delivered", "at": now, "attempts": i.deliveries})
            for i in items]

        def done(conn: sqlite3.Connection) -> None:
            self.outbox.q.delete_in(conn, items)
            record_deliveries_in(conn, self.pipeline, self.destination.name, statuses)

        await self.outbox.db.run(done)
        self.delivered += len(items)

    async def _failed(self, item: Delivery, record: SinkRecord, attempts: int,
                      exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DeliveryError) else str(exc)
        permanent = isinstance(exc, DeliveryError) and exc.permanent
        wait = exc.retry_after_s if isinstance(exc, DeliveryError) else None
        decision = self.policy.decide(attempts, item.enqueued_at, time.time())
        if not permanent and decision.retry:
            delay = max(decision.delay_s, wait or 0.0)
            log.info("delivery of task %s to %s failed (%s); retry in %.1fs", item.task_id,
                     self.destination.name, error, delay)
            await self.outbox.retry_later([(item, delay)])
            await self._status(item.task_id, "pending", attempts, error)
            return
        reason = "permanent error" if permanent else decision.reason
        headers = {**record.headers, "sluice-pipeline": self.pipeline,
                   "sluice-destination": self.destination.name,
                   "sluice-error-message": error, "sluice-attempts": str(attempts),
                   "sluice-reason": f"delivery failed: {reason}"}
        try:
            await self.dead_letter.send([SinkRecord(record.task_id, record.body,
                                                    record.content_type, record.key, headers)])
        except Exception as dl_exc:
            log.error("dead letter unavailable for a failed delivery of task %s (%s); will "
                      "retry", item.task_id, dl_exc)
            await self.outbox.retry_later([(item, 5.0)])
            return
        await self.outbox.ack([item])
        self.failed += 1
        log.warning("delivery of task %s to %s failed for good (%s: %s); sent to the dead "
                    "letter", item.task_id, self.destination.name, reason, error)
        await self._status(item.task_id, "failed", attempts, f"{error} ({reason})")

    async def _status(self, task_id: str, state: str, attempts: int,
                      error: str | None = None) -> None:
        status: dict[str, object] = {"state": state, "at": time.time(), "attempts": attempts}
        if error:
            status["error"] = error
        with contextlib.suppress(Exception):  # the status is a view; the outbox is the truth
            await self.store.record_delivery(self.pipeline, task_id, self.destination.name,
                                             status)

    async def pending(self) -> int:
        return await self.outbox.pending()
