"""Reliable delivery of result records: a durable outbox per destination, drained with retries.

Invariants:

1. A task's result records enter its destinations' outboxes (:class:`~sluice.tasks.store.
   Outbox`, one per destination, by its stable label: :mod:`sluice.config.destinations`) in
   the same transaction that records the task final; its source message is finished after
   that. So a recorded result is never lost, and a destination that is down holds up nothing
   but its own outbox.
2. A deliverer takes at most ``concurrency`` records at a time from its outbox (leased);
   memory stays bounded however long the destination is down. A sink that takes batches
   (``takes_batches``: Kafka, an embedded queue) gets up to ``BATCH_MAX`` records per send,
   and their removal and statuses are settled in one transaction; a failed batch is retried
   record by record.
3. A failed attempt puts the record back with exponential backoff and full jitter, or after
   the destination's ``Retry-After`` if that is longer; after ``max_attempts`` (or
   ``max_age_s``), or at once for a permanent error, the record goes to the pipeline's dead
   letter with the reason (:func:`~sluice.sinks.record.dead_letter_headers`), and only
   then leaves the outbox.
4. Each outcome is written into the task's ``deliveries`` (pending → delivered | failed), under
   the destination's label, with the outbox change it goes with.
5. Delivery is at least once: a crash between sending and removing sends the record again,
   with the same id (the task id; ``webhook-id`` for webhooks), so a receiver can drop it.
6. Records waiting under a destination's name from before labels (``on_success.<i>.<type>``,
   by position) are delivered first by the destination now at that position, and keep that
   name in the task's ``deliveries`` (the outbox drains that name once: rule 3 of
   :mod:`sluice.tasks.sqlite_outbox`). Upgrade before reordering entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sluice import tracing
from sluice.config.destinations import Destination as Destination  # re-exported: the runtime's
from sluice.config.model import RetryConfig
from sluice.connectors.base import Sink, SinkRecord
from sluice.consumer.retry import RetryPolicy
from sluice.errors import DeliveryError
from sluice.sinks.http import DELIVERY_DEFAULTS, DeliveryConfig, DeliverySettings
from sluice.sinks.record import dead_letter_headers
from sluice.tasks.store import Outbox, OutboxItem

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.25
BATCH_MAX = 500  # records per send to a sink that takes batches
DEAD_LETTER_RETRY_S = 5.0
LEASE_MARGIN_S = 30.0  # an outbox lease outlasts a delivery attempt by this much


def delivery_settings(settings: Any) -> DeliverySettings:
    """The delivery keys of a destination's sink (its typed config, :attr:`Destination.
    settings`): its own fields; :data:`~sluice.sinks.http.DELIVERY_DEFAULTS` for a sink
    without them (the embedded queue), or for those a third party's sink does not give (its
    untyped mapping, or typed config, is read by the keys' names)."""
    if isinstance(settings, DeliverySettings):
        return settings
    keys = DELIVERY_DEFAULTS.to_mapping()
    for name in list(keys):
        value = (settings.get(name) if isinstance(settings, Mapping)
                 else getattr(settings, name, None))
        if value is not None:
            keys[name] = value
    return DeliveryConfig.from_mapping(keys)


def outbox_lease_s(destination: Destination) -> float:
    """How long a record taken from the destination's outbox stays leased to its deliverer."""
    return float(delivery_settings(destination.settings).timeout_s) + LEASE_MARGIN_S


class Deliverer:
    def __init__(self, pipeline: str, destination: Destination, sink: Sink,
                 dead_letter: Sink, outbox: Outbox) -> None:
        self.pipeline = pipeline
        self.destination = destination
        self.sink = sink
        self.dead_letter = dead_letter
        self.outbox = outbox
        settings = delivery_settings(destination.settings)
        self.timeout_s = float(settings.timeout_s)
        self.concurrency = settings.concurrency
        self.policy = RetryPolicy(RetryConfig(
            max_attempts=settings.max_attempts,
            initial_backoff_s=float(settings.initial_backoff_s),
            max_backoff_s=float(settings.max_backoff_s),
            max_age_s=float(settings.max_age_s),
        ))
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, upstream_done: asyncio.Event) -> None:
        """Deliver until ``stop``; or, once ``upstream_done`` is set, until the outbox is empty."""
        batches = bool(getattr(self.sink, "takes_batches", False))
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                    continue
                items = await self.outbox.take(BATCH_MAX if batches else free, IDLE_WAIT_S)
                work = [self._deliver_batch(items)] if batches and items else [
                    self._deliver(item) for item in items]
                for job in work:
                    task = asyncio.create_task(job)
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if (not items and not self._in_flight and upstream_done.is_set()
                        and await self.outbox.pending() == 0):
                    return
        finally:
            if self._in_flight:
                await asyncio.wait(set(self._in_flight), timeout=self.timeout_s + 1)
            with contextlib.suppress(Exception):
                await self.sink.close()  # the deliverer owns its sink

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            if tracing.ENABLED:  # tracing (issue 17 item 3): the send in its delivery span
                with tracing.delivery_span(self.pipeline, self.destination.label,
                                           [item.record], item.attempts):
                    await asyncio.wait_for(self.sink.send([item.record]), self.timeout_s)
            else:
                await asyncio.wait_for(self.sink.send([item.record]), self.timeout_s)
        except (DeliveryError, TimeoutError, OSError) as exc:
            await self._failed(item, exc)
            return
        except Exception as exc:  # a sink's own bug: never lose the record over it
            log.exception("destination %s raised unexpectedly", self.destination.label)
            await self._failed(item, exc)
            return
        await self.outbox.delivered([item])

    async def _deliver_batch(self, items: Sequence[OutboxItem]) -> None:
        """Many records in one send (a sink that takes batches: Kafka, an embedded queue);
        then their removal and delivery status in one transaction. If the send fails, each
        record is tried on its own (rule 2: per-record retries; what the failed batch did
        deliver may be delivered twice, as any retry may)."""
        records = [i.record for i in items]
        try:
            if tracing.ENABLED:  # tracing (issue 17 item 3): a delivery span per record
                with tracing.delivery_span(self.pipeline, self.destination.label, records):
                    await asyncio.wait_for(self.sink.send(records), self.timeout_s)
            else:
                await asyncio.wait_for(self.sink.send(records), self.timeout_s)
        except Exception:
            await asyncio.gather(*(self._deliver(item) for item in items))
            return
        await self.outbox.delivered(items)

    async def _failed(self, item: OutboxItem, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DeliveryError) else str(exc)
        permanent = isinstance(exc, DeliveryError) and exc.permanent
        wait = exc.retry_after_s if isinstance(exc, DeliveryError) else None
        attempts = item.attempts
        decision = self.policy.decide(attempts, item.enqueued_at, time.time())
        if not permanent and decision.retry:
            delay = max(decision.delay_s, wait or 0.0)
            log.info("delivery of task %s to %s failed (%s); retry in %.1fs",
                     item.record.task_id, self.destination.label, error, delay)
            await self.outbox.retry_later(item, delay, error)
            return
        reason = "permanent error" if permanent else decision.reason
        record = item.record
        headers = dead_letter_headers(
            record.headers, pipeline=self.pipeline, task_id=record.task_id, attempts=attempts,
            reason=f"delivery failed: {reason}", error_type=type(exc).__name__,
            error_message=error, destination=item.destination)
        letter = SinkRecord(record.task_id, record.body, record.content_type, record.key, headers)
        try:
            await self.dead_letter.send([letter])
        except Exception as dl_exc:
            log.error("dead letter unavailable for a failed delivery of task %s (%s); will "
                      "retry", record.task_id, dl_exc)
            await self.outbox.retry_later(item, DEAD_LETTER_RETRY_S, None)
            return
        log.warning("delivery of task %s to %s failed for good (%s: %s); sent to the dead "
                    "letter", record.task_id, self.destination.label, reason, error)
        await self.outbox.failed(item, f"{error} ({reason})")
