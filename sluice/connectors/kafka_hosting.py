"""A hosting pipeline's dedicated queues on Kafka (:class:`~sluice.tenancy.queues.QueueOps`):
a function's queue is a topic of its own, made with the shared topic's partition count and
replication, read by a consumer group of its own (``<group>.<topic>``, from the earliest
offset, so what was forwarded before any worker joined is read), and deleted once reclaimed.

Waiting tasks are not moved in the store: the shared topic's consumers forward each message of
an isolated function as it comes (published to the function's topic, confirmed, then
committed past on the shared one: :mod:`sluice.tenancy.source` rule 4). Kafka cannot count a
topic's messages by function, so ``backlog`` is None.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sluice.connectors import kafka_client as kc
from sluice.connectors.base import SinkRecord
from sluice.sinks import kafka as kafka_sink
from sluice.sinks.kafka import KafkaSink

if TYPE_CHECKING:
    from sluice import registry
    from sluice.connectors.base import Source
    from sluice.connectors.kafka import KafkaSourceConfig
    from sluice.datadir import QueuedMessage


class KafkaQueues:
    moves_in_store = False

    def __init__(self, config: KafkaSourceConfig, ctx: registry.BuildContext) -> None:
        self.config = config
        self.shared = config.topic
        self.group = config.group_of(ctx.pipeline)
        self.exactly_once = ctx.exactly_once
        self._sinks: dict[str, KafkaSink] = {}

    def _admin(self) -> Any:
        return kc.confluent().admin.AdminClient(self._settings())

    def _settings(self) -> dict[str, Any]:
        return kc.client_config(self.config.brokers, self.config.config)

    def _create(self, topic: str) -> None:
        admin = self._admin()
        settings = self._settings()
        partitions = kc.ensure_topic(admin, self.config.brokers, self.shared, None, settings)
        kc.ensure_topic(admin, self.config.brokers, topic, kc.CreateTopicConfig(
            partitions, self.config.create_topic.replication_factor), settings)

    async def create(self, queue: str) -> None:
        await asyncio.to_thread(self._create, queue)

    def _delete(self, topic: str) -> None:
        ck = kc.confluent()
        with kc.map_kafka_errors(f"cannot delete kafka topic {topic!r} on brokers "
                                 f"{self.config.brokers}"):
            admin = self._admin()  # held until the result: a dropped client ends its requests
            try:
                admin.delete_topics([topic], operation_timeout=kc.METADATA_TIMEOUT_S)[
                    topic].result(timeout=kc.METADATA_TIMEOUT_S)
            except ck.KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if getattr(error, "code", lambda: None)() != ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise

    async def delete(self, queue: str) -> None:
        sink = self._sinks.pop(queue, None)
        if sink is not None:
            await sink.close()
        await asyncio.to_thread(self._delete, queue)

    def member(self, queue: str) -> Source:
        from sluice.connectors.kafka import KafkaSource

        own = dataclasses.replace(self.config, topic=queue, instance_id=None,
                                  transactional_id=None, auto_offset_reset="earliest")
        return KafkaSource(own, f"{self.group}.{queue}", exactly_once=self.exactly_once)

    async def publish(self, queue: str, messages: Sequence[QueuedMessage]) -> None:
        sink = self._sinks.get(queue)
        if sink is None:
            sink = self._sinks[queue] = KafkaSink(kafka_sink.SPEC.typed({
                kafka_sink.TOPIC: queue, kafka_sink.LINGER_MS: 1,
                kafka_sink.DELIVERY_TIMEOUT_MS: 30000, kc.EXTRA_CONFIG: self.config.config,
            }), self.config.brokers)
        header = self.config.task_id_header
        await sink.send([SinkRecord(m.task_id, m.body, m.content_type, m.key,
                                    {**(m.headers or {}), header: m.task_id})
                         for m in messages])

    async def backlog(self, queue: str) -> dict[tuple[str, str], int] | None:
        return None

    async def close(self) -> None:
        sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            await sink.close()
