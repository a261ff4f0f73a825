"""The Kafka source (confluent-kafka): a consumer group whose commits cover only finished work.

Invariants:

1. One thread, the poll thread, makes every call on the consumer (consume, commit, pause,
   resume, close), and the rebalance callbacks run on it. The event loop never waits on Kafka:
   it trades with the poll thread through a :class:`PartitionedBuffer` (one lock).
2. The poll thread polls all the time, whether or not the consumer layer fetches, so the
   member stays in its group (``max.poll.interval.ms``) while handlers run long.
3. A consumed message is tracked (:mod:`sluice.consumer.offsets`) until it is acknowledged. A
   partition's committed offset is its lowest unfinished offset: work finishing out of order is
   never committed past unfinished work, so a crash loses nothing.
4. Commits are asynchronous every ``commit_interval_ms``, synchronous on revocation and at close.
5. ``retry_later`` keeps the delivery in memory (Kafka cannot requeue) and hands it out again
   after the delay; its offset stays uncommitted meanwhile, so a crash redelivers it.
6. On revocation, the partition's buffered and delayed deliveries are dropped (the next owner
   reads them from the committed offset), its deliveries in flight get up to
   ``revoke_timeout_s`` to finish, then the finished offsets are committed and the partition is
   let go. A settlement for a partition no longer held (or held again, a new epoch) is ignored.
7. Backpressure: a partition with ``max_uncommitted`` offsets tracked is paused, and resumed when
   it is down to half; the poll thread goes on polling (rule 2).
8. A task's id is the value of its ``task_id_header``, else ``topic/partition/offset``: the task
   store claims by id, so a message redelivered after its task finished is skipped.
9. Results for Kafka destinations on the source's brokers (``produce_to``) are written by the
   poll thread's own producer at each commit, before the offsets they belong to are committed:
   after the broker acknowledged them (at least once), or in one transaction with the offsets
   (``consumer.exactly_once``); see :mod:`sluice.connectors.kafka_output`.
10. Brokers away mid-run are an outage, not an error: librdkafka reconnects by itself, its
    errors and log lines about it make one warning (:mod:`sluice.connectors.outage`), and the
    first answer to a metadata request (about once a second meanwhile) or a consumed message
    makes one line saying they are back. While starting, nothing is logged: a failed start
    raises one error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors import kafka_client as kc
from sluice.connectors.base import Delivery, Output
from sluice.connectors.kafka_output import OutputProducer, rebalancing
from sluice.connectors.outage import OutageLog
from sluice.connectors.partitioned import PartitionedBuffer
from sluice.consumer.offsets import Partition
from sluice.errors import SourceError
from sluice.sinks import kafka as kafka_sink
from sluice.spec import REQUIRED, Field, ObjectSpec

if TYPE_CHECKING:
    from sluice.config.model import ComponentConfig, PipelineConfig
    from sluice.tenancy.queues import QueueOps

log = logging.getLogger(__name__)

NAME = "kafka"
POLL_TIMEOUT_S = 0.05  # one consume call; bounds how late a request or a stop is served
OUTAGE_PROBE_S = 1.0  # while the brokers are away, a metadata request this often (rule 10)
OUTAGE_PROBE_TIMEOUT_S = 0.5

BROKERS, TOPIC, GROUP, TASK_ID_HEADER = "brokers", "topic", "group", "task_id_header"
CONTENT_TYPE, AUTO_OFFSET_RESET, LEASE_S = "content_type", "auto_offset_reset", "lease_s"
SESSION_TIMEOUT_MS, HEARTBEAT_INTERVAL_MS = "session_timeout_ms", "heartbeat_interval_ms"
MAX_POLL_INTERVAL_MS, MAX_POLL_RECORDS = "max_poll_interval_ms", "max_poll_records"
MAX_UNCOMMITTED, COMMIT_INTERVAL_MS = "max_uncommitted", "commit_interval_ms"
REVOKE_TIMEOUT_S, INSTANCE_ID = "revoke_timeout_s", "instance_id"
TRANSACTIONAL_ID, TRANSACTION_TIMEOUT_MS = "transactional_id", "transaction_timeout_ms"

CONFIG = ObjectSpec(
    Field(BROKERS, "string", "Bootstrap brokers, host:port[,host:port...].", default=REQUIRED,
          pattern=kc.BROKERS_PATTERN),
    Field(TOPIC, "string", "Topic to consume.", default=REQUIRED, pattern=kc.TOPIC_PATTERN),
    Field(GROUP, "string", "Consumer group id; default: sluice.<pipeline>.", default=None),
    Field(TASK_ID_HEADER, "string", "Header whose value is the task id; a message without it "
          "gets topic/partition/offset.", default="sluice-task-id"),
    Field(CONTENT_TYPE, "string", "Content type of a message without a content-type header.",
          default="application/json"),
    kc.create_topic_field("source"),
    Field(AUTO_OFFSET_RESET, "string", "Where a group without a committed offset starts.",
          default="earliest", enum=("earliest", "latest")),
    Field(LEASE_S, "number", "How long a running task stays claimed in the task store unless "
          "extended (every lease_s/3 while it runs); after a worker dies, its tasks run "
          "elsewhere once this lapses.", default=30.0, exclusive_minimum=0),
    Field(SESSION_TIMEOUT_MS, "integer", "A member silent this long leaves the group and its "
          "partitions move (the broker bounds it, by default 6000 to 300000).", default=10000,
          minimum=1),
    Field(HEARTBEAT_INTERVAL_MS, "integer", "How often the member heartbeats; a rebalance "
          "reaches it at its next heartbeat, so this bounds how fast partitions move.",
          default=1000, minimum=1),
    Field(MAX_POLL_INTERVAL_MS, "integer", "Longest a rebalance may wait for this member.",
          default=300000, minimum=1),
    Field(MAX_POLL_RECORDS, "integer", "Messages taken from the client per poll.",
          default=500, minimum=1, maximum=100000),
    Field(MAX_UNCOMMITTED, "integer", "Offsets tracked per partition (buffered, running, "
          "waiting to retry, or finished after an unfinished one) before the partition is "
          "paused.", default=5000, minimum=1),
    Field(COMMIT_INTERVAL_MS, "integer", "Commit finished offsets this often.", default=500,
          minimum=1),
    Field(REVOKE_TIMEOUT_S, "number", "On a rebalance, how long a revoked partition's work in "
          "flight may take to finish before the partition is let go anyway.", default=15.0,
          minimum=0),
    Field(INSTANCE_ID, "string", "Static group membership (group.instance.id): a restarted "
          "worker with the same id takes its partitions back without a rebalance.",
          default=None),
    Field(TRANSACTIONAL_ID, "string", "With consumer.exactly_once: the producer's "
          "transactional.id. Default: sluice.<group>.<instance_id> with instance_id, else a new "
          "one per process. A stable id lets a restarted worker abort its predecessor's open "
          "transaction at once instead of after transaction_timeout_ms.", default=None),
    Field(TRANSACTION_TIMEOUT_MS, "integer", "With consumer.exactly_once: the broker aborts a "
          "transaction left open this long (a worker that died mid-transaction); readers of the "
          "output with read_committed wait for it meanwhile.", default=10000, minimum=1000),
    kc.extra_config_field(),
)


@dataclass(frozen=True, slots=True)
class KafkaSourceConfig(kc.WithCreateTopic):
    """The typed ``kafka`` source config (the keys of :data:`CONFIG`)."""

    brokers: str
    topic: str
    group: str | None
    task_id_header: str
    content_type: str
    create_topic: kc.CreateTopicConfig
    auto_offset_reset: str
    lease_s: float
    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int
    max_poll_records: int
    max_uncommitted: int
    commit_interval_ms: int
    revoke_timeout_s: float
    instance_id: str | None
    transactional_id: str | None
    transaction_timeout_ms: int
    config: dict[str, Any] | None

    def group_of(self, pipeline: str) -> str:
        """The consumer group: ``group``, else ``sluice.<pipeline>``."""
        return self.group or f"sluice.{pipeline}"


@dataclass(slots=True)
class _Request:  # work the event loop asks of the poll thread
    fn: Any
    future: Future[Any]


class KafkaSource:
    """:class:`~sluice.connectors.base.Source` over one topic (see the module invariants)."""

    def __init__(self, config: KafkaSourceConfig, group: str, *,
                 exactly_once: bool = False) -> None:
        self.cfg = config
        self.exactly_once = exactly_once
        # (topic, its create_topic), rule 9
        self._outputs: list[tuple[str, kc.CreateTopicConfig | None]] = []
        self._out: OutputProducer | None = None
        self.brokers = config.brokers
        self.topic = config.topic
        self.group = group
        self.lease_s = float(config.lease_s)
        self.buffer = PartitionedBuffer()
        self._lock = threading.Lock()  # guards the requests to the poll thread
        self._requests: deque[_Request] = deque()
        self._poll_done = False
        self._stopping = threading.Event()
        self._closing = False
        self._failure: BaseException | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-kafka")
        self._consumer: Any = None
        self._poller: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._last_commit = 0.0
        self.outage = OutageLog(f"kafka source of {self.topic!r} on {self.brokers}", log)
        self._last_probe = 0.0

    # -- the event loop's side ------------------------------------------------------------

    async def start(self) -> None:
        if self._poller is not None:
            return
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(self._executor, self._open)
        self._poller = self._loop.run_in_executor(self._executor, self._poll_forever)

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_s
        while True:
            if isinstance(self._failure, SourceError):  # mapped in the poll thread
                raise self._failure
            if self._failure is not None:
                raise SourceError(f"{self._stopped}: {self._failure}") from self._failure
            self._wakeup.clear()
            got, next_due = self.buffer.take(max_n)
            if got:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if next_due is not None:
                remaining = min(remaining, max(next_due - time.monotonic(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            self.buffer.ack(deliveries)

    def produce_to(self, topics: Sequence[tuple[str, Any]]) -> None:
        """Each topic with its sink's typed config (its ``create_topic`` is read), or
        ``None``."""
        self._outputs.extend((topic, _create_topic(sink)) for topic, sink in topics)

    async def ack_producing(self, items: Sequence[tuple[Delivery, Sequence[Output]]]) -> None:
        if items:
            self.buffer.ack_producing(items)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if deliveries:
            self.buffer.retry_later(deliveries)
            self._wakeup.set()

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return None  # a partition is ours while the member is in the group (rule 2)

    async def pending(self) -> int:
        """Messages not finished: tracked here (buffered, running, delayed) plus the lag of the
        assigned partitions; 1 until the first assignment (the group is still forming)."""
        if self._poller is None:
            return 1
        return int(await self._ask(self._count_pending))

    async def close(self) -> None:
        if self._poller is None:
            self._executor.shutdown(wait=False)
            return
        self._stopping.set()
        with contextlib.suppress(Exception):  # already logged by the poll thread
            await self._poller
        self._poller = None
        self._executor.shutdown(wait=True)

    async def _ask(self, fn: Any) -> Any:
        future: Future[Any] = Future()
        with self._lock:
            if self._poll_done:
                raise SourceError(f"the kafka source of {self.topic!r} is closed")
            self._requests.append(_Request(fn, future))
        return await asyncio.wrap_future(future)

    @property
    def _stopped(self) -> str:
        return f"kafka consumer of {self.topic!r} on {self.brokers} stopped"

    def _wake_loop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # -- the poll thread ------------------------------------------------------------------

    def _open(self) -> None:
        ck = kc.confluent()
        own = {
            "group.id": self.group,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self.cfg.auto_offset_reset,
            "session.timeout.ms": self.cfg.session_timeout_ms,
            "heartbeat.interval.ms": self.cfg.heartbeat_interval_ms,
            "max.poll.interval.ms": self.cfg.max_poll_interval_ms,
            "on_commit": self._on_commit,
        }
        if self.cfg.instance_id:
            own["group.instance.id"] = self.cfg.instance_id
        if self.exactly_once:
            own["isolation.level"] = "read_committed"
        config = kc.client_config(self.brokers, self.cfg.config, outage=self.outage, **own)
        self.outage.quiet = True  # a start that fails says so once, in its error (rule 10)
        with kc.map_kafka_errors(f"kafka source for {self.topic!r}: cannot create its consumer"):
            self._consumer = ck.Consumer(config)
        try:
            admin_config = kc.client_config(self.brokers, self.cfg.config, outage=self.outage)
            kc.ensure_topic(self._consumer, self.brokers, self.topic, self.cfg.create_topic,
                            admin_config)
            if self._outputs or self.exactly_once:
                out = OutputProducer(self.topic, self.brokers, self.cfg, self.group,
                                     exactly_once=self.exactly_once)
                out.open(self._outputs, admin_config, self.outage)
                self._out = out
            with kc.map_kafka_errors(f"kafka source for {self.topic!r}: cannot subscribe"):
                self._consumer.subscribe([self.topic], on_assign=self._on_assign,
                                         on_revoke=self._on_revoke, on_lost=self._on_lost)
        except BaseException:
            self._consumer.close()
            raise
        finally:
            self.outage.up()
            self.outage.quiet = False
        log.info("kafka source: consuming %s on %s as group %s%s", self.topic, self.brokers,
                 self.group, " (exactly-once)" if self.exactly_once else "")

    def _poll_forever(self) -> None:
        consumer = self._consumer
        batch = self.cfg.max_poll_records
        interval_s = self.cfg.commit_interval_ms / 1e3
        try:
            while not self._stopping.is_set():
                self._serve_requests()
                self._backpressure()
                with kc.map_kafka_errors(self._stopped):
                    messages = consumer.consume(batch, POLL_TIMEOUT_S)
                if messages and self.buffer.accept(self._records(messages)):
                    self._wake_loop()
                self._probe_outage(bool(messages))
                if self._out is not None:
                    self._out.poll()
                if time.monotonic() - self._last_commit >= interval_s:
                    self._commit(None, sync=False)
            self._closing = True
            self._commit(None, sync=True)
        except BaseException as exc:
            log.error("kafka source for %s stopped: %s", self.topic, exc)
            self._failure = exc
            self._wake_loop()
            raise
        finally:
            self._closing = True
            try:
                consumer.close()  # revokes every partition (committing) and leaves the group
            except Exception as exc:
                log.warning("kafka source: closing the consumer: %s", exc)
            if self._out is not None:
                self._out.close()
            with self._lock:
                requests, self._requests = list(self._requests), deque()
                self._poll_done = True
            for req in requests:
                req.future.set_exception(SourceError("the kafka source is closed"))

    def _probe_outage(self, consumed: bool) -> None:
        """While the brokers are away, ask one for the topic's metadata about once a second:
        its answer ends the outage (rule 10)."""
        if not self.outage.is_down:
            return
        now = time.monotonic()
        if not consumed:
            if now - self._last_probe < OUTAGE_PROBE_S:
                return
            self._last_probe = now
            try:
                self._consumer.list_topics(self.topic, timeout=OUTAGE_PROBE_TIMEOUT_S)
            except kc.confluent().KafkaException:
                return
        self.outage.up()

    def _serve_requests(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                req = self._requests.popleft()
            try:
                req.future.set_result(req.fn())
            except Exception as exc:
                req.future.set_exception(exc)

    def _records(self, messages: list[Any]) -> list[tuple[Partition, int, Delivery]]:
        ck = kc.confluent()
        header = self.cfg.task_id_header
        out: list[tuple[Partition, int, Delivery]] = []
        for m in messages:
            error = m.error()
            if error is not None:
                if error.fatal():
                    raise kc.kafka_error(self._stopped, error)
                if kc.is_outage(error):
                    self.outage.down(error.str())
                elif error.code() != ck.KafkaError._PARTITION_EOF:
                    log.warning("kafka source %s: %s", self.topic, error)
                continue
            part: Partition = (m.topic(), m.partition())
            offset = int(m.offset())
            headers = kc.headers_dict(m.headers())
            kind, stamp = m.timestamp()
            raw_key = m.key()
            out.append((part, offset, Delivery(
                task_id=headers.get(header) or f"{part[0]}/{part[1]}/{offset}",
                body=m.value() or b"",
                content_type=headers.get("content-type", self.cfg.content_type),
                key=None if raw_key is None else raw_key.decode("utf-8", errors="replace"),
                partition=part[1],
                headers=headers,
                enqueued_at=stamp / 1000.0 if kind != ck.TIMESTAMP_NOT_AVAILABLE else None,
            )))
        return out

    def _backpressure(self) -> None:
        pause, resume = self.buffer.backpressure(self.cfg.max_uncommitted)
        if pause:
            self._consumer.pause(_tps(pause))
            log.debug("kafka source: paused %s (max_uncommitted reached)", pause)
        if resume:
            self._consumer.resume(_tps(resume))
            log.debug("kafka source: resumed %s", resume)

    def _commit(self, parts: list[Partition] | None, *, sync: bool) -> None:
        self._last_commit = time.monotonic()
        points = self.buffer.to_commit(parts)
        if not points:
            return
        ck = kc.confluent()
        offsets = [ck.TopicPartition(t, p, o) for (t, p), o in points.items()]
        if self._out is None:
            self._commit_offsets(offsets, points, sync)
            return
        # Rule 9: the results below the points first, then the points.
        if self._out.commit(self.buffer.outputs_below(points), offsets, self._consumer,
                            lambda: self._commit_offsets(offsets, points, sync)):
            self.buffer.drop_outputs(points)
            if self.exactly_once:  # committed by the transaction
                for part, point in points.items():
                    self.buffer.confirm(part, point)

    def _commit_offsets(self, offsets: list[Any], points: dict[Partition, int],
                        sync: bool) -> None:
        ck = kc.confluent()
        try:
            if sync:
                self._on_commit(None, self._consumer.commit(offsets=offsets, asynchronous=False))
            else:
                self._consumer.commit(offsets=offsets, asynchronous=True)
        except ck.KafkaException as exc:
            if kc.is_outage(exc):
                self.outage.down(exc)
            else:
                log.warning("kafka source %s: commit of %s failed: %s", self.topic, points, exc)

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        if error is not None and kc.is_outage(error):
            self.outage.down(error.str())
            return
        if error is not None:
            log.log(logging.INFO if rebalancing(error) else logging.WARNING,
                    "kafka source %s: commit refused (%s); the next commit covers it",
                    self.topic, error)
            return
        for tp in partitions or []:
            if tp.error is None and tp.offset >= 0:
                self.buffer.confirm((tp.topic, tp.partition), tp.offset)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.buffer.assign((tp.topic, tp.partition) for tp in partitions)
        if partitions:
            log.info("kafka source: assigned %s", _names(partitions))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self._let_go([(tp.topic, tp.partition) for tp in partitions], lost=False)

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        self._let_go([(tp.topic, tp.partition) for tp in partitions], lost=True)

    def _let_go(self, parts: list[Partition], *, lost: bool) -> None:
        if not parts:
            return
        self.buffer.begin_revoke(parts)
        wait_s = 0.0 if lost or self._closing else float(self.cfg.revoke_timeout_s)
        left = self.buffer.wait_settled(parts, wait_s)
        if left and wait_s > 0:
            log.warning("kafka source: letting go of %s with work still in flight %s (it "
                        "finishes here; the next owner skips it once recorded)", parts, left)
        paused = [p for p in parts if p in set(self.buffer.paused())]
        if paused:  # let go of it unpaused: if it comes back, it is read again
            self._consumer.resume(_tps(paused))
        if not lost:
            self._commit(parts, sync=True)
        self.buffer.end_revoke(parts)
        log.info("kafka source: %s %s", "lost" if lost else "revoked", parts)

    def _count_pending(self) -> int:
        if not self.buffer.assigned_once:
            return 1
        tracked, parts = self.buffer.unfinished()
        return tracked + self._lag(parts)

    def _lag(self, parts: list[Partition]) -> int:
        if not parts:
            return 0
        ck = kc.confluent()
        positions = self._consumer.position(_tps(parts))
        unknown = [tp for tp in positions if tp.offset < 0]
        committed = {(tp.topic, tp.partition): tp.offset for tp in
                     (self._consumer.committed(unknown, timeout=kc.METADATA_TIMEOUT_S)
                      if unknown else [])}
        total = 0
        for tp in positions:
            # The client keeps the watermarks of every fetch response (for read_committed, the
            # last stable offset); ask the broker only before the first one.
            part = ck.TopicPartition(tp.topic, tp.partition)
            low, high = self._consumer.get_watermark_offsets(part, cached=True)
            if high < 0 or (low < 0 and tp.offset < 0):
                low, high = self._consumer.get_watermark_offsets(
                    part, timeout=kc.METADATA_TIMEOUT_S)
            at = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            if at < 0:
                at = low if self.cfg.auto_offset_reset == "earliest" else high
            total += max(high - at, 0)
        return total


def _tps(parts: Sequence[Partition]) -> list[Any]:
    ck = kc.confluent()
    return [ck.TopicPartition(t, p) for t, p in parts]


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


def _create_topic(sink: Any) -> kc.CreateTopicConfig | None:
    """What a result topic is created with, from its sink's typed config."""
    return sink.create_topic if isinstance(sink, kafka_sink.KafkaSinkConfig) else None


def build_source(config: KafkaSourceConfig, ctx: registry.BuildContext) -> KafkaSource:
    kc.confluent()  # a missing extra is reported when the pipeline is built, not at first use
    return KafkaSource(config, config.group_of(ctx.pipeline), exactly_once=ctx.exactly_once)


# -- the pipeline around a Kafka source --------------------------------------------------------

SINK = kafka_sink.NAME  # the destinations this source can write with its commits (rule 9)
DESTINATION_SLOTS = ("on_success", "on_failure")


def outputs_with_ack(config: PipelineConfig, destination: ComponentConfig) -> bool:
    """Whether the source writes this result destination with its commits instead of the
    outbox: a Kafka destination on the source's brokers, unless it asks for the outbox
    (always under ``consumer.exactly_once``: :func:`pipeline_check` refuses the rest)."""
    if destination.type != SINK:
        return False
    out = kafka_sink.SPEC.typed(destination.config)
    if out.outbox and not config.consumer.exactly_once:
        return False
    return not out.brokers or kc.same_brokers(out.brokers,
                                              SPEC.typed(config.source.config).brokers)


def pipeline_check(doc: Mapping[str, Any]) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """``consumer.exactly_once`` joins the source and its Kafka destinations in one
    transaction: there must be one, on the source's brokers, not through the outbox."""
    if not doc["consumer"].get("exactly_once"):
        return
    ((_, source_config),) = doc["source"].items()
    source = SPEC.typed(source_config)
    sinks = [((slot, i), kafka_sink.SPEC.typed(item[SINK])) for slot in DESTINATION_SLOTS
             for i, item in enumerate(doc.get(slot) or ()) if SINK in item]
    if not sinks:
        yield ("consumer", "exactly_once"), (
            "exactly_once has nothing to write: add a kafka destination to on_success or "
            "on_failure (other destinations are at least once)")
    for path, out in sinks:
        if out.brokers and not kc.same_brokers(out.brokers, source.brokers):
            yield (*path, SINK, kafka_sink.BROKERS), (
                "with consumer.exactly_once, a kafka destination must be on the source's "
                f"brokers (one transaction covers both): {source.brokers}")
        if out.outbox:
            yield (*path, SINK, kafka_sink.OUTBOX), (
                "with consumer.exactly_once, a kafka destination is written in the source's "
                "transactions, not through the outbox: remove outbox: true")


def submitter(config: PipelineConfig, ctx: registry.SubmitContext) -> registry.Submitter:
    from sluice.connectors.kafka_submit import KafkaSubmitter  # its producer: only to submit

    return KafkaSubmitter(ctx.store.tasks, config)


def hosting(config: KafkaSourceConfig, ctx: registry.BuildContext) -> QueueOps:
    """A hosting pipeline's dedicated queues: topics of their own (kafka_hosting)."""
    from sluice.connectors.kafka_hosting import KafkaQueues

    return KafkaQueues(config, ctx)


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name=NAME,
    summary="An Apache Kafka topic, consumed by a consumer group (cooperative-sticky); commits "
            "only offsets below which every message is finished.",
    config=CONFIG,
    factory=build_source,
    settings=KafkaSourceConfig.from_mapping,
    extra="kafka",
    capabilities=frozenset({registry.Capability.SUBMIT, registry.Capability.OUTPUTS_WITH_ACK,
                            registry.Capability.UNTRACKED, registry.Capability.EXACTLY_ONCE}),
    pipeline_check=pipeline_check,
    submitter=submitter,
    outputs_with_ack=outputs_with_ack,
    hosting=hosting,
    endpoints=lambda config: kc.endpoints(config.brokers, config.config),
    restricted_check=lambda config: kc.restricted_check(config.config),
))
