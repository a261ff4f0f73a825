"""Sink to an MQTT topic (MQTT v5, QoS 1): results (``on_success``/``on_failure``) and dead
letters (``dead_letter: {mqtt: {topic: jobs.dlq}}``).

Invariants:

1. ``send`` publishes every record at QoS 1 and returns once the broker acknowledged each
   (PUBACK); it raises :class:`~sluice.errors.DeliveryError` if any was not, ``permanent`` when
   the broker refused it for a reason retrying cannot change (not authorized, topic name
   invalid, packet too large, payload format invalid).
2. An MQTT broker keeps a message only for the sessions subscribed to its topic: a PUBACK with
   "no matching subscribers" (0x10) means the broker dropped it. With ``require_subscriber``
   (the default) that fails the send (retriable: the outbox or the dead letter retries it once
   a consumer has subscribed); without it, the record is counted as delivered.
3. The record keeps the task's headers as user properties, with ``sluice-task-id``, its key as
   ``sluice-key`` and its content type as the content-type property. ``topic`` may contain
   ``{key}``: the record's key becomes a topic level (``orders/{key}``).
4. One connection (a clean session of its own), opened at the first send; a lost connection is
   remade in the background (one warning when it is lost, one info line when it is back); a
   send meanwhile fails as retriable.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors import mqtt_client as mc
from sluice.connectors.base import SinkRecord
from sluice.errors import DeliveryError, SourceError
from sluice.sinks.http import DELIVERY_FIELDS
from sluice.spec import REQUIRED, Field, ObjectSpec

NAME = "mqtt"  # its component name (and the MQTT source's)
TOPIC, URL, REQUIRE_SUBSCRIBER = "topic", "url", "require_subscriber"

CONFIG = ObjectSpec(
    Field(TOPIC, "string", "Topic to publish records to (no wildcards); {key} is replaced by "
          "the record's key (a record without one fails for good).", default=REQUIRED,
          pattern=r"^[^$+#][^+#]*$"),
    Field(URL, "string", "Broker URL: mqtt://[user:password@]host[:port] (mqtts:// for TLS). "
          "Default: the url of the pipeline's MQTT source.", default=None,
          pattern=mc.URL_PATTERN),
    Field(REQUIRE_SUBSCRIBER, "boolean", "A record the broker drops because no session "
          "subscribes to its topic (PUBACK reason 0x10) fails the send, to be retried; false: "
          "it counts as delivered.", default=True),
    label_field(TOPIC),
    *DELIVERY_FIELDS,  # used under on_success / on_failure (the outbox's retries)
)


@dataclass(frozen=True, slots=True)
class MqttSinkConfig(SinkSettings):
    """The typed ``mqtt`` sink config (the keys of :data:`CONFIG`)."""

    topic: str
    url: str | None
    require_subscriber: bool
    label: str | None
    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int

    @property
    def target(self) -> str:
        return self.topic


class MqttSink:
    """Publishes records to one topic at QoS 1 (see the invariants)."""

    takes_batches = True  # a batch is published in one go: about one round trip

    def __init__(self, config: MqttSinkConfig, url: str) -> None:
        self.cfg = config
        self.url = url
        self.address = mc.parse_url(url)
        self.topic = config.topic
        self.what = f"mqtt sink to {config.topic!r}"
        self._conn: mc.Connection | None = None
        self._opening = asyncio.Lock()

    async def _connection(self) -> mc.Connection:
        async with self._opening:
            if self._conn is None:
                conn = mc.Connection(self.address, f"sluice-out-{uuid.uuid4().hex[:16]}",
                                     what=self.what)
                try:
                    await conn.open()
                except SourceError as exc:  # may come right later
                    await conn.close()
                    raise DeliveryError(str(exc), permanent=not exc.retriable) from None
                self._conn = conn
            return self._conn

    async def send(self, records: Sequence[SinkRecord]) -> None:
        await self.publish([(r, None) for r in records])

    async def publish(self, records: Sequence[tuple[SinkRecord, float | None]]) -> None:
        """Publish each record (with its not-before time, for a delayed submit)."""
        if not records:
            return
        conn = await self._connection()
        topics = [self._topic_of(r) for r, _ in records]
        results = await asyncio.gather(*(
            conn.publish(topic, r.body, mc.publish_properties(
                r.task_id, r.content_type, r.headers, r.key, not_before))
            for topic, (r, not_before) in zip(topics, records, strict=True)),
            return_exceptions=True)
        failed: list[DeliveryError] = []
        for topic, result in zip(topics, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failed.append(DeliveryError(str(result)))
            elif result >= 0x80 or (result == mc.NO_MATCHING_SUBSCRIBERS
                                    and self.cfg.require_subscriber):
                failed.append(mc.publish_error(topic, self.address, result, self.what))
        if failed:
            raise DeliveryError(f"{self.what} on {self.address}: {len(failed)} of {len(records)} "
                                f"record(s) not acknowledged: {failed[0]}",
                                permanent=all(f.permanent for f in failed))

    def _topic_of(self, record: SinkRecord) -> str:
        if "{key}" not in self.topic:
            return self.topic
        if not record.key or any(c in record.key for c in "/+#"):
            raise DeliveryError(f"{self.what}: record {record.task_id!r} has no key usable as "
                                f"a topic level ({record.key!r})", permanent=True)
        return self.topic.replace("{key}", record.key)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def sink_url(config: MqttSinkConfig, ctx: registry.BuildContext) -> str:
    """Its own ``url``, else that of the pipeline's MQTT source."""
    return ctx.own_or_source_url(config.url, NAME, f"the mqtt sink to {config.topic!r}",
                                 "mqtt://host:port")


def build_sink(config: MqttSinkConfig, ctx: registry.BuildContext) -> MqttSink:
    mc.load()
    return MqttSink(config, sink_url(config, ctx))


SPEC = registry.register(registry.ComponentSpec(
    family="sink",
    name=NAME,
    summary="An MQTT topic, published at QoS 1 (MQTT v5); a send returns once the broker "
            "acknowledged every record, and fails when no session subscribes to the topic.",
    config=CONFIG,
    factory=build_sink,
    settings=MqttSinkConfig.from_mapping,
    extra="mqtt",
))
