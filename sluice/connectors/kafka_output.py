"""Results written with the Kafka source's commits: the producer the source's poll thread owns
when a pipeline's Kafka destinations are on the source's brokers.

A result record waits in the source (:class:`~sluice.connectors.partitioned.PartitionedBuffer`,
rule 6) until its message's offset is about to be committed; then :meth:`OutputProducer.commit`
writes the records below the new commit points and commits those points, in one of two ways:

1. At least once (the default): the records are produced by an idempotent producer and the
   offsets are committed only after the broker acknowledged every one of them. A failed or
   timed-out send commits nothing; the records stay and are sent again at the next commit (a
   reader may see one twice, with the same ``sluice-task-id``, never none).
2. Exactly once (``consumer.exactly_once``): one transaction per commit. The records are
   produced, the points added with ``send_offsets_to_transaction`` with the consumer's group
   metadata (a member a rebalance pushed out of the group is fenced by the broker: KIP-447),
   and the transaction commits. Readers with ``read_committed`` see a record exactly when its
   message's offset is committed; an aborted transaction or a crash discards both, and the
   messages are read again. A transaction that must be aborted keeps its records here for the
   next commit; a fenced or fatally failed producer stops the source.

Either way the outbox is not used for these destinations: the source's log is the outbox. A
message whose task was recorded final before a crash gets its record made again from the task
store (rule 9 of :mod:`sluice.consumer.loop`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sluice.connectors import kafka_client as kc
from sluice.connectors.base import Output
from sluice.connectors.outage import OutageLog
from sluice.sinks.kafka import kafka_headers

if TYPE_CHECKING:
    from sluice.connectors.kafka import KafkaSourceConfig

log = logging.getLogger(__name__)

TXN_TIMEOUT_S = 30.0  # one transactional call (init, send offsets, commit, abort)
TXN_COMMIT_TRIES = 3  # a commit that fails with a retriable error is tried again this often
SEND_TIMEOUT_S = 30.0  # at least once: how long a commit waits for the broker's acks

# librdkafka properties of a consumer that a producer does not take (the source's ``config``
# applies to both of its clients).
CONSUMER_ONLY = frozenset({"isolation.level", "auto.offset.reset", "fetch.min.bytes",
                           "fetch.max.bytes", "fetch.wait.max.ms", "max.partition.fetch.bytes",
                           "queued.min.messages", "queued.max.messages.kbytes",
                           "session.timeout.ms", "heartbeat.interval.ms", "group.id",
                           "group.instance.id", "max.poll.interval.ms",
                           "partition.assignment.strategy", "enable.auto.commit",
                           "auto.commit.interval.ms", "enable.auto.offset.store",
                           "check.crcs", "enable.partition.eof"})


def error_of(exc: Any) -> Any:
    """The KafkaError a KafkaException carries."""
    return exc.args[0] if exc.args else exc


def rebalancing(error: Any) -> bool:
    ck = kc.confluent()
    return bool(error.code() in (ck.KafkaError.ILLEGAL_GENERATION,
                                 ck.KafkaError.REBALANCE_IN_PROGRESS,
                                 ck.KafkaError.UNKNOWN_MEMBER_ID,
                                 ck.KafkaError.FENCED_INSTANCE_ID))


class OutputProducer:
    """The poll thread's producer of result records (see the module rules). Every method is
    called on the source's poll thread."""

    def __init__(self, source_topic: str, brokers: str, cfg: KafkaSourceConfig, group: str,
                 *, exactly_once: bool) -> None:
        self.source_topic = source_topic
        self.brokers = brokers
        self.cfg = cfg
        self.group = group
        self.exactly_once = exactly_once
        self._producer: Any = None
        self._failed: list[Any] = []  # delivery errors of the current commit (rule 1)

    def open(self, topics: Sequence[tuple[str, kc.CreateTopicConfig | None]],
             admin_config: dict[str, Any], outage: OutageLog | None = None) -> None:
        """Create the producer and check (or create) the output topics. With exactly once, an
        open transaction of an earlier process with the same transactional.id is aborted here
        (init_transactions)."""
        ck = kc.confluent()
        own: dict[str, Any] = {"enable.idempotence": True, "acks": "all", "linger.ms": 5,
                               "allow.auto.create.topics": False}
        tid = ""
        if self.exactly_once:
            instance = self.cfg.instance_id
            tid = (self.cfg.transactional_id
                   or f"sluice.{self.group}.{instance or uuid.uuid4().hex[:12]}")
            own["transactional.id"] = tid
            own["transaction.timeout.ms"] = self.cfg.transaction_timeout_ms
        else:
            own["delivery.timeout.ms"] = int(SEND_TIMEOUT_S * 1000)
        extra = {k: v for k, v in (self.cfg.config or {}).items()
                 if k not in CONSUMER_ONLY}
        with kc.map_kafka_errors(f"kafka source for {self.source_topic!r}: cannot create its "
                                 "producer"):
            self._producer = ck.Producer(kc.client_config(self.brokers, extra, outage=outage,
                                                          **own))
        for topic, create_topic in topics:
            kc.ensure_topic(self._producer, self.brokers, topic, create_topic, admin_config)
        if self.exactly_once:
            with kc.map_kafka_errors(f"kafka source for {self.source_topic!r}: cannot start "
                                     f"transactions as {tid!r} on {self.brokers}"):
                self._producer.init_transactions(TXN_TIMEOUT_S)

    def poll(self) -> None:
        self._producer.poll(0)

    def commit(self, outputs: Sequence[Output], offsets: list[Any], consumer: Any,
               commit_offsets: Callable[[], None]) -> bool:
        """Write ``outputs``, then commit ``offsets``; ``False`` if nothing was committed (the
        outputs are to be written again at the next commit)."""
        if self.exactly_once:
            return self._transaction(outputs, offsets, consumer)
        return self._acknowledged(outputs, commit_offsets)

    def _acknowledged(self, outputs: Sequence[Output],
                      commit_offsets: Callable[[], None]) -> bool:
        """Rule 1: the offsets are committed once the broker acknowledged every record."""
        if outputs:
            self._failed = []
            for output in outputs:
                self._produce(output, self._report)
            left = self._producer.flush(SEND_TIMEOUT_S)
            if left or self._failed:
                problem = self._failed[0] if self._failed else f"{left} not acknowledged"
                log.warning("kafka source %s: %d result record(s) not all acknowledged (%s); "
                            "nothing committed, they are sent again at the next commit",
                            self.source_topic, len(outputs), problem)
                return False
        commit_offsets()
        return True

    def _report(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed.append(error)

    def _transaction(self, outputs: Sequence[Output], offsets: list[Any],
                     consumer: Any) -> bool:
        """Rule 2: the outputs and the offsets in one transaction."""
        ck = kc.confluent()
        producer = self._producer
        try:
            producer.begin_transaction()
            for output in outputs:
                self._produce(output, None)
            producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(),
                                                 TXN_TIMEOUT_S)
            for attempt in range(TXN_COMMIT_TRIES):
                try:
                    producer.commit_transaction(TXN_TIMEOUT_S)
                    break
                except ck.KafkaException as exc:
                    if not error_of(exc).retriable() or attempt == TXN_COMMIT_TRIES - 1:
                        raise
        except ck.KafkaException as exc:
            error = error_of(exc)
            if error.fatal() or not (error.txn_requires_abort() or error.retriable()):
                raise kc.kafka_error(f"kafka source {self.source_topic!r}: the transactional "
                                     "producer failed for good", error) from None
            log.log(logging.INFO if rebalancing(error) else logging.WARNING,
                    "kafka source %s: transaction of %d output(s) aborted (%s); the next "
                    "commit makes it again", self.source_topic, len(outputs), error)
            with kc.map_kafka_errors(f"kafka source {self.source_topic!r}: cannot abort a "
                                     "transaction"):
                producer.abort_transaction(TXN_TIMEOUT_S)
            return False
        return True

    def _produce(self, output: Output, on_delivery: Any) -> None:
        record = output.record
        while True:
            try:
                self._producer.produce(output.topic, value=record.body, key=record.key,
                                       headers=kafka_headers(record), on_delivery=on_delivery)
                return
            except BufferError:  # the client's queue is full: let it send
                self._producer.poll(0.05)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(TXN_TIMEOUT_S)  # nothing is pending between commits
