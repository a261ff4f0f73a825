"""Submitting tasks to a pipeline whose source is a Kafka topic (``sluice submit``, the HTTP
trigger): the task is created in the store (``QUEUED``), then its message is produced to the
source topic with the task id in the ``sluice-task-id`` header, so the worker that consumes it
claims that same task.

Invariants:

1. A submit succeeds only once the broker acknowledged the message (idempotent producer,
   ``acks=all``); a 202 means the task is in the topic.
2. A task id already used in the pipeline is refused before anything is produced.
3. If the produce fails, the tasks it created are removed again (still ``QUEUED``, never
   seen by a worker), so the client may submit the same task id again (the rules of every
   broker's submitter: :mod:`sluice.connectors.publishing`).
4. Kafka has no delayed visibility: a delay is refused (the HTTP API answers 400).
"""

from __future__ import annotations

from collections.abc import Sequence

from sluice.config.model import PipelineConfig
from sluice.connectors import kafka_client as kc
from sluice.connectors.embedded import Submission
from sluice.connectors.kafka import SPEC
from sluice.connectors.publishing import TASK_ID, check_submittable, create_then_publish
from sluice.errors import Unsupported
from sluice.sinks import kafka as kafka_sink
from sluice.sinks.kafka import KafkaSink
from sluice.tasks.store import TaskRecord, TaskStore

HEADER = TASK_ID


class KafkaSubmitter:
    """Submits to one Kafka-sourced pipeline (see the invariants)."""

    def __init__(self, store: TaskStore, config: PipelineConfig) -> None:
        source = SPEC.typed(config.source.config)
        check_submittable(config, "task_id_header", source.task_id_header,
                          "produce to its topic")
        self.store = store
        self.config = config
        self.sink = KafkaSink(kafka_sink.SPEC.typed({
            kafka_sink.TOPIC: source.topic, kafka_sink.LINGER_MS: 1,
            kafka_sink.DELIVERY_TIMEOUT_MS: 30000, kc.EXTRA_CONFIG: source.config,
        }), source.brokers)
        self.sink.missing_topic_hint = (
            "create it first: a submit never creates topics (a worker whose source sets "
            "create_topic creates it when it starts)")

    async def submit(self, items: Sequence[Submission]) -> list[TaskRecord | None]:
        """The created tasks; ``None`` where the task id was already used."""
        if any(item.delay_s for item in items):
            raise Unsupported("a kafka source has no delayed delivery: submit without a delay")
        return await create_then_publish(
            self.store, self.config, items, lambda fresh: self.sink.send([r for _, r in fresh]),
            f"kafka topic {self.sink.topic!r} on {self.sink.brokers}")

    async def close(self) -> None:
        await self.sink.close()

