"""Sink to an embedded queue: dead letters (default ``<pipeline>.dlq``), and a way for one
pipeline to consume another's records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors.base import SinkRecord
from sluice.connectors.embedded import QUEUE, QUEUE_PATTERN, QueuedMessage
from sluice.spec import REQUIRED, Field, ObjectSpec
from sluice.stores.base import Store

CONFIG = ObjectSpec(
    Field(QUEUE, "string", "Queue to put records on.", default=REQUIRED, pattern=QUEUE_PATTERN),
    label_field(QUEUE),
)


@dataclass(frozen=True, slots=True)
class EmbeddedSinkConfig(SinkSettings):
    """The typed ``embedded`` sink config (the keys of :data:`CONFIG`)."""

    queue: str
    label: str | None

    @property
    def target(self) -> str:
        return self.queue


class EmbeddedSink:
    """Puts records on an embedded queue (dead letters; a pipeline can consume them)."""

    takes_batches = True  # one transaction for the whole batch

    def __init__(self, store: Store, queue: str) -> None:
        self.store = store
        self.queue = queue

    async def send(self, records: Sequence[SinkRecord]) -> None:
        messages = [QueuedMessage(r.task_id, r.body, r.content_type, r.key, dict(r.headers))
                    for r in records]
        await self.store.put(self.queue, messages)

    async def close(self) -> None:
        return None


def build_sink(config: EmbeddedSinkConfig, ctx: registry.BuildContext) -> EmbeddedSink:
    return EmbeddedSink(ctx.store, config.queue)


registry.register(registry.ComponentSpec(
    family="sink",
    name="embedded",
    summary="An embedded queue in the store (the data directory's, or --store's).",
    config=CONFIG,
    factory=build_sink,
    settings=EmbeddedSinkConfig.from_mapping,
))
