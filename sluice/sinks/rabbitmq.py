"""Sink to a RabbitMQ queue: dead letters (``dead_letter: {rabbitmq: {queue: jobs.dlq}}``) and
results (``on_success: [{rabbitmq: {queue: orders.priced}}]``).

Invariants:

1. Every record is published persistent, ``mandatory``, on a channel in confirm mode: ``send``
   returns only once the broker confirmed every record of the batch (for a quorum queue: once
   a majority of its replicas has it), and raises :class:`~sluice.errors.DeliveryError` if any
   was refused, returned unroutable (its queue missing) or not confirmed (the connection lost).
   As a dead letter, the consumer layer settles the failed message only after the send
   returned; under ``on_success``/``on_failure``, records go through the pipeline's durable
   outbox first (:mod:`sluice.sinks.delivery`), which retries a failed send.
2. The queue is declared (durable, ``queue_type``) before its first record, unless
   ``topology: check`` (then it must exist: an unroutable record fails the send).
3. A record keeps its headers, with ``sluice-task-id`` (also its ``message_id``) and its key in
   ``sluice-key``; with ``shards: N`` it goes to the key's shard queue
   (:func:`~sluice.connectors.rabbitmq_client.shard_of`), for a sharded pipeline to read.
4. The connection comes back by itself after an outage (:class:`~sluice.connectors.
   rabbitmq_client.Link`); a send meanwhile fails at once (retried by its caller).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors import rabbitmq_client as rc
from sluice.connectors.base import SinkRecord
from sluice.errors import DeliveryError, SourceError
from sluice.sinks.http import DELIVERY_FIELDS
from sluice.spec import REQUIRED, Field, ObjectSpec

log = logging.getLogger(__name__)

NAME = "rabbitmq"
TOPOLOGY = "topology"

CONFIG = ObjectSpec(
    Field(rc.QUEUE, "string", "Queue to publish records to (through the default exchange).",
          default=REQUIRED, pattern=rc.QUEUE_PATTERN),
    rc.url_field("default: the url of the pipeline's rabbitmq source"),
    Field(TOPOLOGY, "string", "declare: declare the queue (durable, queue_type) before its "
          "first record; check: it must exist (a record to a missing queue fails its send).",
          default=rc.DECLARE, enum=(rc.DECLARE, rc.CHECK)),
    rc.queue_type_field(),
    rc.shards_field(),
    rc.queue_arguments_field(),
    label_field(rc.QUEUE),
    *DELIVERY_FIELDS,  # used under on_success / on_failure (the outbox's retries)
)


@dataclass(frozen=True, slots=True)
class RabbitSinkConfig(SinkSettings):
    """The typed ``rabbitmq`` sink config (the keys of :data:`CONFIG`)."""

    queue: str
    url: str | None
    topology: str
    queue_type: str
    shards: int
    queue_arguments: dict[str, Any] | None
    label: str | None
    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int

    @property
    def target(self) -> str:
        return self.queue


class RabbitSink:
    """Publishes records to one queue (or its key shards) with confirms (see the invariants)."""

    takes_batches = True  # a batch is published in one go and confirmed together

    def __init__(self, config: RabbitSinkConfig, url: str, what: str | None = None) -> None:
        self.cfg = config
        self.queue = config.queue
        self.url = url
        self.topology = rc.Topology(config.queue_type, config.queue_arguments,
                                    declare=config.topology == rc.DECLARE)
        self.link = rc.Link(url, what or f"rabbitmq sink to {config.queue!r}", self._on_open)
        self._channel: Any = None
        self._declared: set[str] = set()  # queues declared on this connection

    async def _on_open(self, connection: Any) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.link.watch(channel)
        self._channel = channel
        self._declared = set()

    async def send(self, records: Sequence[SinkRecord]) -> None:
        await self.publish(records)

    async def publish(self, records: Sequence[SinkRecord], delay_s: float = 0.0) -> None:
        """Publish and wait for the broker's confirms (rule 1); with ``delay_s``, through the
        delay queue of each record's queue (the record is in its queue after the delay)."""
        if not records:
            return
        where = f"rabbitmq sink to {self.queue!r} on {self.link.where}"
        try:
            await self.link.start()
        except SourceError as exc:  # unreachable, or refused: may come right later
            raise DeliveryError(str(exc), permanent=not exc.retriable) from None
        if not self.link.up:
            raise DeliveryError(f"{where}: the broker is unreachable (reconnecting)")
        channel = self._channel
        try:
            with rc.map_amqp_errors(where):
                targets = [await self._target(channel, r, delay_s) for r in records]
                results = await asyncio.gather(
                    *(channel.default_exchange.publish(rc.message(r), routing_key=t,
                                                       mandatory=True)
                      for r, t in zip(records, targets, strict=True)),
                    return_exceptions=True)
        except SourceError as exc:
            raise DeliveryError(str(exc), permanent=not exc.retriable) from None
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise DeliveryError(f"{where}: {len(failed)} of {len(records)} record(s) not "
                                f"confirmed: {_reason(failed[0])}")

    async def _target(self, channel: Any, record: SinkRecord, delay_s: float) -> str:
        queue = rc.shard_of(self.queue, self.cfg.shards, record.key, record.task_id)
        if queue not in self._declared:
            if self.topology.declare:
                await self.topology.main(channel, queue, single_active=self.cfg.shards > 0)
            self._declared.add(queue)
        if delay_s > 0:
            return await self.topology.delay(channel, queue, rc.delay_ms(delay_s))
        return queue

    async def close(self) -> None:
        await self.link.close()


def _reason(exc: BaseException) -> str:
    import aiormq.exceptions as ex

    if isinstance(exc, ex.PublishError):
        return "returned unroutable: the queue does not exist (topology: check?)"
    if isinstance(exc, ex.DeliveryError):
        return "refused by the broker (basic.nack: the queue is full or unavailable)"
    return f"{type(exc).__name__}: {exc}"


def sink_url(config: RabbitSinkConfig, ctx: registry.BuildContext) -> str:
    """Its own ``url``, else that of the pipeline's rabbitmq source."""
    return ctx.own_or_source_url(config.url, NAME, f"the rabbitmq sink to {config.queue!r}",
                                 "amqp://user:password@host:5672/")


def build_sink(config: RabbitSinkConfig, ctx: registry.BuildContext) -> RabbitSink:
    rc.aio_pika()  # a missing extra is reported when the pipeline is built
    return RabbitSink(config, sink_url(config, ctx),
                      f"rabbitmq sink to {config.queue!r} (pipeline {ctx.pipeline})")


SPEC = registry.register(registry.ComponentSpec(
    family="sink",
    name=NAME,
    summary="A RabbitMQ queue, published to with publisher confirms; a send returns once the "
            "broker confirmed every record.",
    config=CONFIG,
    factory=build_sink,
    settings=RabbitSinkConfig.from_mapping,
    extra="rabbitmq",
))
