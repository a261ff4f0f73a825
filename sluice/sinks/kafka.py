"""Sink to a Kafka topic: dead letters (``dead_letter: {kafka: {topic: jobs.dlq}}``) and results.

Invariants:

1. The producer is idempotent (``enable.idempotence=true``, so ``acks=all``): a retry inside the
   client never writes a record twice, and records of one partition keep their order.
2. ``send`` returns only when the broker has acknowledged every record of the batch, and raises
   :class:`~sluice.errors.DeliveryError` if any failed (``permanent`` when retrying cannot
   help: a record too large, a topic not allowed). As a dead letter, the consumer layer settles
   the failed message only after the send returned, so its offset is committed only after the
   broker acknowledged the dead letter. Under ``on_success``/``on_failure``, records go through
   the pipeline's durable outbox first (:mod:`sluice.sinks.delivery`).
3. One thread polls the producer (delivery reports); the event loop only enqueues records.
4. The record keeps the task's key and headers, with ``sluice-task-id`` and ``content-type``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors import kafka_client as kc
from sluice.connectors.base import SinkRecord
from sluice.connectors.outage import OutageLog
from sluice.errors import DeliveryError, Misconfigured, SourceError
from sluice.sinks.http import DELIVERY_FIELDS
from sluice.spec import REQUIRED, Field, ObjectSpec

log = logging.getLogger(__name__)

QUEUE_FULL_PAUSE_S = 0.005
PERMANENT_ERRORS = ("MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD",
                    "TOPIC_AUTHORIZATION_FAILED")

TOPIC, BROKERS, LINGER_MS = "topic", "brokers", "linger_ms"
DELIVERY_TIMEOUT_MS, OUTBOX = "delivery_timeout_ms", "outbox"
NAME = "kafka"  # its component name (and the Kafka source's)

CONFIG = ObjectSpec(
    Field(TOPIC, "string", "Topic to write records to.", default=REQUIRED,
          pattern=kc.TOPIC_PATTERN),
    Field(BROKERS, "string", "Bootstrap brokers; default: those of the pipeline's Kafka "
          "source.", default=None, pattern=kc.BROKERS_PATTERN),
    kc.create_topic_field("sink"),
    Field(LINGER_MS, "integer", "How long the producer gathers records into one request.",
          default=5, minimum=0),
    Field(DELIVERY_TIMEOUT_MS, "integer", "A record the broker has not acknowledged in this "
          "time fails the send (it is retried later).", default=30000, minimum=1),
    Field(OUTBOX, "boolean", "Under on_success/on_failure of a pipeline whose source is "
          "Kafka on the same brokers, results are written by the source with its commits (a "
          "message's offset is committed once the broker acknowledged its result). true: "
          "through the durable outbox instead, with the retry keys below, a dead letter after "
          "max_attempts and a delivery status per task.", default=False),
    kc.extra_config_field(),
    label_field(TOPIC),
    *DELIVERY_FIELDS,  # used under on_success / on_failure (the outbox's retries)
)


@dataclass(frozen=True, slots=True)
class KafkaSinkConfig(SinkSettings, kc.WithCreateTopic):
    """The typed ``kafka`` sink config (the keys of :data:`CONFIG`)."""

    topic: str
    brokers: str | None
    create_topic: kc.CreateTopicConfig
    linger_ms: int
    delivery_timeout_ms: int
    outbox: bool
    config: dict[str, Any] | None
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


class KafkaSink:
    """Writes records to one topic with an idempotent producer (see the invariants)."""

    takes_batches = True  # one send of many records costs about one of one (the outbox)

    def __init__(self, config: KafkaSinkConfig, brokers: str) -> None:
        self.cfg = config
        self.brokers = brokers
        self.topic = config.topic
        self._producer: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-kafka-out")
        self._starting = asyncio.Lock()
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        self.missing_topic_hint = kc.CREATE_HINT  # what a missing topic's error advises
        self.outage = OutageLog(f"kafka sink to {self.topic!r} on {brokers}", log)

    async def start(self) -> None:
        async with self._starting:
            if self._producer is None:  # a failed start is tried again at the next send
                await asyncio.get_running_loop().run_in_executor(self._executor, self._open)
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_forever, daemon=True,
                                            name="sluice-kafka-out-poll")
            self._poller.start()

    def _open(self) -> None:
        ck = kc.confluent()
        own = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self.cfg.linger_ms,
            "delivery.timeout.ms": self.cfg.delivery_timeout_ms,
            "allow.auto.create.topics": False,
        }
        with kc.map_kafka_errors(f"kafka sink to {self.topic!r}: cannot create its producer"):
            producer = ck.Producer(kc.client_config(self.brokers, self.cfg.config,
                                                    outage=self.outage, **own))
        kc.ensure_topic(producer, self.brokers, self.topic, self.cfg.create_topic,
                        kc.client_config(self.brokers, self.cfg.config, outage=self.outage),
                        self.missing_topic_hint)
        self._producer = producer

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.05)

    async def send(self, records: Sequence[SinkRecord]) -> None:
        if not records:
            return
        try:
            await self.start()
        except SourceError as exc:  # the topic or the brokers: may come right later
            raise DeliveryError(str(exc)) from None
        ck = kc.confluent()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            while True:
                try:
                    self._producer.produce(
                        self.topic, value=record.body, key=record.key,
                        headers=kafka_headers(record), on_delivery=_reporter(loop, future))
                    break
                except BufferError:  # the client's queue is full: let it drain
                    await asyncio.sleep(QUEUE_FULL_PAUSE_S)
                except ck.KafkaException as exc:
                    future.set_exception(_delivery_error(exc.args[0] if exc.args else exc))
                    break
            futures.append(future)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if len(failed) < len(results):
            self.outage.up()  # the brokers acknowledged a record: they are there
        if failed:
            first = failed[0]
            raise DeliveryError(
                f"kafka sink to {self.topic!r} on {self.brokers}: {len(failed)} of "
                f"{len(records)} record(s) not acknowledged: {first}",
                permanent=all(isinstance(f, DeliveryError) and f.permanent for f in failed))

    async def close(self) -> None:
        if self._producer is not None:
            remaining = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._producer.flush, 10.0)
            if remaining:
                log.warning("kafka sink %s: %d record(s) not delivered at close", self.topic,
                            remaining)
        self._stopping.set()
        if self._poller is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._poller.join)
        self._executor.shutdown(wait=False)


def kafka_headers(record: SinkRecord) -> list[tuple[str, bytes]]:
    """A record's Kafka headers (rule 4): its own, with ``sluice-task-id`` and ``content-type``."""
    headers = {"content-type": record.content_type, **record.headers,
               "sluice-task-id": record.task_id}
    return [(k, v.encode()) for k, v in headers.items()]


def _reporter(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> Any:
    def report(error: Any, _message: Any) -> None:
        loop.call_soon_threadsafe(_resolve, future, error)

    return report


def _resolve(future: asyncio.Future[None], error: Any) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(_delivery_error(error))


def _delivery_error(error: Any) -> DeliveryError:
    """A KafkaError as a DeliveryError; permanent when the broker would refuse it again."""
    ck = kc.confluent()
    permanent = {getattr(ck.KafkaError, name) for name in PERMANENT_ERRORS}
    code = error.code() if isinstance(error, ck.KafkaError) else None
    return DeliveryError(str(error), permanent=code in permanent)


def sink_brokers(config: KafkaSinkConfig, ctx: registry.BuildContext) -> str:
    """Its own ``brokers``, else those of the pipeline's Kafka source."""
    if config.brokers:
        return config.brokers
    source = ctx.source
    if source is not None and source.type == NAME:
        from sluice.connectors.kafka import SPEC as SOURCE  # it imports this module

        return SOURCE.typed(source.config).brokers
    raise Misconfigured(f"pipeline {ctx.pipeline!r}: the kafka sink to {config.topic!r} "
                        "needs brokers: the pipeline's source is not kafka, so set brokers: "
                        "host:port")


def build_sink(config: KafkaSinkConfig, ctx: registry.BuildContext) -> KafkaSink:
    kc.confluent()
    return KafkaSink(config, sink_brokers(config, ctx))


SPEC = registry.register(registry.ComponentSpec(
    family="sink",
    name=NAME,
    summary="A Kafka topic, written by an idempotent producer; a send returns once the broker "
            "acknowledged every record.",
    config=CONFIG,
    factory=build_sink,
    settings=KafkaSinkConfig.from_mapping,
    extra="kafka",
    endpoints=lambda config: kc.endpoints(config.brokers, config.config),
    restricted_check=lambda config: kc.restricted_check(config.config),
))
