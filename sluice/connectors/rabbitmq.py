"""The RabbitMQ source (aio-pika): a queue read by competing consumers, each delivery held
unacknowledged until its task is finished.

Invariants:

1. The queue is a quorum queue by default (``queue_type``), declared at start, or only checked
   (``topology: check``: a passive declare; a missing queue is a clear error).
2. Consuming starts at the first ``fetch``. The channel's prefetch (``basic.qos``) follows what
   the consumer layer asks for: deliveries handed out and not settled plus ``max_n``, at most
   ``max_prefetch`` (with ``shards``, split over the shard queues). So a worker never holds
   more than the layer wants (other workers on the queue get the rest), and a layer that stops
   fetching stops the broker sending (backpressure). Under ``consumer.ordering`` (key or
   partition) the prefetch is ``max_prefetch`` from the start and the consumer is never
   replaced: a replaced consumer's deliveries may arrive after its successor's, out of queue
   order.
3. A delivery is this worker's while it is unacknowledged and the connection lives: ``extend``
   has nothing to renew. The broker's own limit is its ``consumer_timeout`` (30 minutes by
   default): a delivery unacknowledged longer closes the channel; it is then opened again, the
   delivery requeued, and the task store's claim keeps a second run from starting while the
   first still runs (its lease is extended) or after it finished.
4. ``ack`` acknowledges in batches: the longest run of the oldest unsettled deliveries in one
   ``basic.ack`` with ``multiple``, the rest one by one (no round trip either way).
5. ``retry_later(delay)`` publishes a copy (same task id, with the deliveries so far) to the
   delay queue ``<queue>.delay.<ms>`` (:mod:`~sluice.connectors.rabbitmq_client` rule 3),
   waits for the broker's confirm, then acknowledges the original: the copy is back in the
   queue after the delay (rounded up, at most +10%), for any worker. A delivery in an ordering
   lane (a keyed one under ``ordering: key``, any under ``partition``) would come back behind
   its key's later messages, which its lane holds and which could fill the prefetch: it stays
   unacknowledged, in its place, and this source hands it out again after the delay (a crash
   gives it back to the queue ahead of them). A zero delay requeues (``basic.nack``; back at
   its place in a quorum queue).
6. A task's id is the ``task_id_header`` header, else the ``message_id`` property, else a
   SHA-256 of the message (body, content type, timestamp, headers but the broker's): the same
   on every redelivery, so the task store's claim skips a message whose task is finished.
   ``Delivery.deliveries`` counts the quorum queue's ``x-delivery-count`` (a classic queue: the
   ``redelivered`` flag) plus those before a retry's copy was made.
7. A lost connection (:class:`~sluice.connectors.rabbitmq_client.Link`) drops what was
   buffered (the broker requeues every unacknowledged delivery); settlements of deliveries of
   the lost channel are dropped too (they come back, and their finished tasks are acknowledged
   unrun). Meanwhile ``fetch`` returns nothing after its wait; nothing raises.
8. With ``shards: N``, each shard queue is single-active-consumer: one consumer at a time, in
   the whole cluster, reads a shard, so a key's messages reach one worker, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors import rabbitmq_client as rc
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.publishing import check_submittable, create_then_publish
from sluice.errors import Misconfigured, SourceError
from sluice.sinks import rabbitmq as rabbit_sink
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.tasks.store import TaskRecord

log = logging.getLogger(__name__)

NAME = "rabbitmq"
COUNT_READS, COUNT_PAUSE_S = 10, 0.02  # pending(): reads of the ready count until it settles
TOPOLOGY, TASK_ID_HEADER, KEY_HEADER = "topology", "task_id_header", "key_header"
CONTENT_TYPE, LEASE_S, MAX_PREFETCH = "content_type", "lease_s", "max_prefetch"
BROKER_HEADERS = frozenset({"x-delivery-count", "x-death", "x-first-death-exchange",
                            "x-first-death-queue", "x-first-death-reason",
                            "x-last-death-exchange", "x-last-death-queue",
                            "x-last-death-reason", rc.DELIVERIES_HEADER})

CONFIG = ObjectSpec(
    Field(rc.URL, "string", "AMQP URL of the broker, amqp[s]://user:password@host:port/vhost; "
          "use ${ENV} for the password.", default=REQUIRED, pattern=rc.URL_PATTERN),
    Field(rc.QUEUE, "string", "Queue to consume (with shards: the prefix of the shard queues).",
          default=REQUIRED, pattern=rc.QUEUE_PATTERN),
    Field(TOPOLOGY, "string", "declare: declare the queue at start (durable, queue_type, "
          "queue_arguments); check: only check that it exists (passive declare), a missing "
          "queue stops the start with an error.", default=rc.DECLARE,
          enum=(rc.DECLARE, rc.CHECK)),
    rc.queue_type_field(),
    rc.shards_field(),
    rc.queue_arguments_field(),
    Field(TASK_ID_HEADER, "string", "Header whose value is the task id; without it, the "
          "message_id property; without both, a SHA-256 of the message (two identical "
          "messages without ids are then one task).", default=rc.TASK_ID_HEADER),
    Field(KEY_HEADER, "string", "Header whose value is the message's key (ordering: key; "
          "the shard with shards).", default=rc.KEY_HEADER),
    Field(CONTENT_TYPE, "string", "Content type of a message without a content_type property.",
          default="application/json"),
    Field(LEASE_S, "number", "How long a running task stays claimed in the task store unless "
          "extended (every lease_s/3 while it runs). The delivery itself stays this worker's "
          "while its connection lives (up to the broker's consumer_timeout).", default=30.0,
          exclusive_minimum=0),
    Field(MAX_PREFETCH, "integer", "Most unacknowledged deliveries on the channel (basic.qos "
          "prefetch_count); below it, the prefetch follows what the consumer layer asks for.",
          default=1000, minimum=1, maximum=65535),
)


@dataclass(frozen=True, slots=True)
class RabbitSourceConfig(Settings):
    """The typed ``rabbitmq`` source config (the keys of :data:`CONFIG`)."""

    url: str
    queue: str
    topology: str
    queue_type: str
    shards: int
    queue_arguments: dict[str, Any] | None
    task_id_header: str
    key_header: str
    content_type: str
    lease_s: float
    max_prefetch: int


class RabbitSource:
    """:class:`~sluice.connectors.base.Source` over one queue or its shards (see the module
    invariants)."""

    shares_backlog = True  # competing consumers: the layer paces what a worker holds

    def __init__(self, config: RabbitSourceConfig, pipeline: str, *,
                 ordering: str = "unordered") -> None:
        self.cfg = config
        self.ordering = ordering  # a retry in an ordering lane keeps its place (rule 5)
        self._delayed: list[tuple[float, int, Delivery]] = []  # (due, seq, delivery): a heap
        self._seq = 0
        self.lease_s = float(config.lease_s)
        self.queues = rc.shard_queues(config.queue, config.shards)
        self.topology = rc.Topology(config.queue_type, config.queue_arguments,
                                    declare=config.topology == rc.DECLARE)
        self.link = rc.Link(config.url, f"rabbitmq source of {config.queue!r} (pipeline "
                            f"{pipeline})", self._on_open)
        self.link.on_lost(self._drop)
        self._channel: Any = None  # consumes (aio-pika); _raw: its aiormq channel
        self._raw: Any = None
        self._publish: Any = None  # publishes retries' copies, with confirms
        self._buffer: deque[Delivery] = deque()
        self._unsettled: deque[int] = deque()  # delivery tags not yet settled, in order
        self._settled: set[int] = set()  # settled out of order, still in _unsettled
        self._out = 0  # handed out by fetch, not settled (this channel's)
        self._prefetch = 0  # of the current consumer (per consumer, as RabbitMQ counts it)
        self._old = 0  # deliveries of replaced consumers not yet settled (their tags <= _cutoff)
        self._cutoff = 0
        self._consuming = False
        self._tags: list[str] = []  # consumer tags of this channel
        self._wanted = 1  # the prefetch the layer last asked for (rule 2)
        self._wanted_consuming = False  # a fetch came: consume again after a reconnect
        self._arrived = asyncio.Event()
        self._closed = False

    # -- the connection ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise SourceError(f"{self.link.what} is closed")
        await self.link.start()

    async def _on_open(self, connection: Any) -> None:
        channel = await connection.channel(publisher_confirms=False)
        publish = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for queue in self.queues:
            await self.topology.main(channel, queue, single_active=self.cfg.shards > 0)
        self.link.watch(channel)
        self.link.watch(publish)
        self._channel, self._publish = channel, publish
        self._raw = await channel.get_underlay_channel()
        self._prefetch, self._consuming, self._tags = 0, False, []
        if self._wanted_consuming:
            await self._consume(self._wanted)

    def _drop(self) -> None:
        """The connection is lost (rule 7): what it delivered is the broker's again."""
        self._buffer.clear()
        self._delayed.clear()
        self._unsettled.clear()
        self._settled.clear()
        self._out = self._old = self._cutoff = 0
        self._consuming, self._tags = False, []
        self._arrived.set()

    async def _consume(self, wanted: int) -> None:
        """Consume with the prefetch for ``wanted`` deliveries held (rule 2). A consumer keeps
        the prefetch it started with (``basic.qos`` applies to later consumers), so a new one
        replaces it: only when what the layer wants is a quarter off (two round trips), and
        never on shards (a single-active consumer that let go would hand its shard over:
        theirs is ``max_prefetch`` split over the shards, once)."""
        if self.cfg.shards > 0:
            wanted = self.cfg.max_prefetch
        per = max(1, -(-wanted // len(self.queues)))
        if self._consuming and (per == self._prefetch + self._old or self.cfg.shards > 0):
            return
        if self._consuming:
            for tag in self._tags:  # deliveries before its CancelOk still come in order
                await self._raw.basic_cancel(tag)
            self._consuming, self._tags = False, []
            # Its deliveries stay unsettled on the channel, outside the new one's prefetch.
            self._old = len(self._unsettled) - len(self._settled)
            self._cutoff = self._unsettled[-1] if self._unsettled else self._cutoff
            per = max(1, per - self._old)
        await self._raw.basic_qos(prefetch_count=per)
        self._prefetch = per
        generation = self.link.generation
        for index, queue in enumerate(self.queues):
            ok = await self._raw.basic_consume(queue, functools.partial(
                self._on_message, generation, index))
            self._tags.append(ok.consumer_tag)
        self._consuming = True

    async def _on_message(self, generation: int, index: int, message: Any) -> None:
        if generation != self.link.generation:
            return  # a late delivery of a lost channel: the broker has it again
        tag = int(message.delivery.delivery_tag)
        self._unsettled.append(tag)
        self._buffer.append(self._delivery(message, generation, index, tag))
        self._arrived.set()

    def _delivery(self, message: Any, generation: int, index: int, tag: int) -> Delivery:
        props = message.header.properties
        raw = props.headers or {}
        headers = {str(k): text for k, v in raw.items()
                   if k not in BROKER_HEADERS and (text := rc.header_text(v)) is not None}
        task_id = headers.get(self.cfg.task_id_header) or props.message_id or _digest(
            message.body, props, headers)
        count = raw.get("x-delivery-count")
        before = (int(count) if isinstance(count, int) else
                  1 if message.delivery.redelivered else 0)
        carried = raw.get(rc.DELIVERIES_HEADER)
        before += int(carried) if isinstance(carried, int) else 0
        stamp = props.timestamp
        return Delivery(
            task_id=str(task_id),
            body=message.body,
            content_type=props.content_type or self.cfg.content_type,
            key=headers.get(self.cfg.key_header),
            headers=headers,
            enqueued_at=stamp.timestamp() if stamp is not None else None,
            deliveries=before + 1,
            ref=(generation, tag),
            partition=index if self.cfg.shards > 0 else None,
        )

    # -- the source protocol -----------------------------------------------------------------

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_s
        if not await self.link.wait_up(wait_s):
            return []  # an outage: the loop goes on (rule 7)
        wanted = min(self.cfg.max_prefetch, self._out + len(self._delayed) + max(max_n, 1))
        if self.ordering != "unordered":
            # One consumer for good: a replaced consumer's deliveries may arrive after its
            # successor's, out of queue order (rule 2).
            wanted = self.cfg.max_prefetch
        self._wanted, self._wanted_consuming = wanted, True
        held = self._prefetch * len(self.queues) + self._old
        starving = wanted > held and not self._buffer  # the layer waits for more (a retry)
        if not self._consuming or (self.ordering == "unordered" and (
                starving or not held * 3 // 4 <= wanted <= held * 5 // 4)):
            try:
                await self._consume(wanted)
            except Exception as exc:
                if self.link.up:
                    raise rc.amqp_error(f"{self.link.what}: cannot consume", exc) from None
                return []
        while True:
            now = time.monotonic()
            got: list[Delivery] = []
            while self._delayed and self._delayed[0][0] <= now and len(got) < max_n:
                got.append(heapq.heappop(self._delayed)[2])  # due retries first
            while self._buffer and len(got) < max_n:
                got.append(self._buffer.popleft())
            if got:
                self._out += len(got)
                return got
            remaining = deadline - now
            if remaining <= 0:
                return []
            if self._delayed:
                remaining = min(remaining, max(self._delayed[0][0] - now, 0.0))
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return []

    def _current(self, deliveries: Sequence[Delivery]) -> list[int]:
        """The tags of those delivered on the live channel (rule 7); they are no longer out."""
        generation = self.link.generation if self.link.up else -1
        tags = [d.ref[1] for d in deliveries if d.ref[0] == generation]
        self._out = max(self._out - len(tags), 0)
        if self._old:
            self._old = max(self._old - sum(1 for t in tags if t <= self._cutoff), 0)
        return tags

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        tags = self._current(deliveries)
        if tags:
            await self._ack(tags)

    async def _ack(self, tags: list[int]) -> None:
        """Rule 4: the oldest run in one ``multiple`` ack, the rest one by one."""
        acking = set(tags)
        upto = None
        while self._unsettled and (self._unsettled[0] in acking or
                                   self._unsettled[0] in self._settled):
            tag = self._unsettled.popleft()
            if tag in acking:
                upto = tag
                acking.discard(tag)
            else:
                self._settled.discard(tag)
        try:
            if upto is not None:
                await self._raw.basic_ack(upto, multiple=True, wait=False)
            for tag in acking:
                self._settled.add(tag)
                await self._raw.basic_ack(tag, wait=False)
        except Exception as exc:  # the channel is gone: the broker requeued them (rule 7)
            log.debug("%s: acks not sent (%s)", self.link.what, exc)

    async def _requeue(self, tags: list[int]) -> None:
        try:
            for tag in tags:
                self._settled.add(tag)
                await self._raw.basic_nack(tag, requeue=True, wait=False)
        except Exception as exc:
            log.debug("%s: requeues not sent (%s)", self.link.what, exc)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        generation = self.link.generation if self.link.up else -1
        live = [(d, s) for d, s in deliveries if d.ref[0] == generation]
        self._current([d for d, _ in live])
        now = [d.ref[1] for d, s in live if s <= 0]
        later = [(d, s) for d, s in live if s > 0 and not self._in_lane(d)]
        if now:
            await self._requeue(now)
        due = time.monotonic()
        for d, delay_s in live:
            if delay_s > 0 and self._in_lane(d):  # kept unacknowledged, in its place (rule 5)
                self._seq += 1
                again = dataclasses.replace(d, deliveries=d.deliveries + 1)
                heapq.heappush(self._delayed, (due + delay_s, self._seq, again))
                self._arrived.set()
        if not later:
            return
        try:
            await self._publish_copies(later)
        except Exception as exc:
            if not self.link.up:
                return  # the originals are the broker's again (rule 7)
            log.warning("%s: cannot delay %d retr%s (%s); requeued at once instead",
                        self.link.what, len(later), "y" if len(later) == 1 else "ies",
                        rc.amqp_error("retry", exc))
            await self._requeue([d.ref[1] for d, _ in later])
            return
        await self._ack([d.ref[1] for d, _ in later])

    def _in_lane(self, d: Delivery) -> bool:
        """Whether the consumer layer holds an ordering lane for it (its retry keeps its
        place: rule 5)."""
        return self.ordering == "partition" or (self.ordering == "key" and d.key is not None)

    async def _publish_copies(self, items: Sequence[tuple[Delivery, float]]) -> None:
        """Rule 5: each copy in its delay queue, confirmed by the broker."""
        channel = self._publish
        publishes = []
        for d, delay_s in items:
            home = self.queues[d.partition or 0]
            target = await self.topology.delay(channel, home, rc.delay_ms(delay_s))
            record = SinkRecord(d.task_id, d.body, d.content_type, d.key, d.headers)
            publishes.append(channel.default_exchange.publish(
                rc.message(record, key_header=self.cfg.key_header,
                           task_id_header=self.cfg.task_id_header, deliveries=d.deliveries),
                routing_key=target, mandatory=True))
        await asyncio.gather(*publishes)

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return None  # an unacknowledged delivery is ours while the connection lives (rule 3)

    async def pending(self) -> int:
        """Ready messages in the queue (or shards), those buffered or handed out here, and
        those waiting in the delay queues this process used; at least 1 during an outage.
        The broker applies acknowledgements after they are sent (no answer says when): the
        ready count is read until two reads agree, so a settlement just sent is counted
        once, not in both places."""
        if not await self.link.wait_up(1.0):
            return max(1, self._out + len(self._buffer))
        with rc.map_amqp_errors(f"{self.link.what}: cannot count the queue"):
            ready, before = await self._ready(), -1
            for _ in range(COUNT_READS):
                if ready == before:
                    break
                await asyncio.sleep(COUNT_PAUSE_S)
                ready, before = await self._ready(), ready
            delayed = await self.topology.delayed(self._publish)
        return ready + delayed + len(self._buffer) + len(self._delayed) + self._out

    async def _ready(self) -> int:
        total = 0
        for queue in self.queues:
            q = await self._channel.declare_queue(queue, passive=True)
            total += int(q.declaration_result.message_count or 0)
        return total

    async def close(self) -> None:
        self._closed = True
        await self.link.close()


def _digest(body: bytes, props: Any, headers: dict[str, str]) -> str:
    """A task id for a message without one (rule 6): the same on every redelivery."""
    h = hashlib.sha256(body)
    h.update(repr((props.content_type, props.timestamp, props.correlation_id,
                   sorted(headers.items()))).encode())
    return f"amqp-{h.hexdigest()[:32]}"


def build_source(config: RabbitSourceConfig, ctx: registry.BuildContext) -> RabbitSource:
    rc.aio_pika()  # a missing extra is reported when the pipeline is built, not at first use
    return RabbitSource(config, ctx.pipeline, ordering=ctx.ordering)


# -- submitting --------------------------------------------------------------------------------

class RabbitSubmitter:
    """Submits to a pipeline whose source is RabbitMQ (``sluice submit``, the HTTP trigger):
    the task is created ``QUEUED`` in the store, then its message published (with the task id
    in ``sluice-task-id``, the key in the key header, to the key's shard) and confirmed by the
    broker; a delay goes through the delay queue. If the publish fails, the tasks are removed
    again, so the same task ids may be submitted again."""

    def __init__(self, config: PipelineConfig, ctx: registry.SubmitContext) -> None:
        source = SPEC.typed(config.source.config)
        check_submittable(config, "task_id_header", source.task_id_header,
                          "publish to its queue")
        if (source.task_id_header, source.key_header) != (rc.TASK_ID_HEADER, rc.KEY_HEADER):
            raise Misconfigured(f"pipeline {config.name!r}: submitting needs the source's "
                                f"task_id_header {rc.TASK_ID_HEADER!r} and key_header "
                                f"{rc.KEY_HEADER!r}")
        self.store = ctx.store.tasks
        self.config = config
        self.sink = rabbit_sink.RabbitSink(rabbit_sink.SPEC.typed({
            rc.QUEUE: source.queue, rc.URL: source.url, rabbit_sink.TOPOLOGY: source.topology,
            rc.QUEUE_TYPE: source.queue_type, rc.SHARDS: source.shards,
            rc.QUEUE_ARGUMENTS: source.queue_arguments,
        }), source.url, f"rabbitmq submitter to {source.queue!r}")

    async def submit(self, items: Sequence[registry.Submission]) -> list[TaskRecord | None]:
        async def publish(fresh: Sequence[tuple[registry.Submission, SinkRecord]]) -> None:
            by_delay: dict[float, list[SinkRecord]] = {}
            for item, record in fresh:
                by_delay.setdefault(item.delay_s, []).append(record)
            for delay_s, records in by_delay.items():
                await self.sink.publish(records, delay_s)

        return await create_then_publish(self.store, self.config, items, publish,
                                         f"pipeline {self.config.name!r}")

    async def close(self) -> None:
        await self.sink.close()


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name=NAME,
    summary="A RabbitMQ queue (quorum by default), read by competing consumers with a "
            "prefetch that follows the consumer layer; retries wait in per-delay TTL queues.",
    config=CONFIG,
    factory=build_source,
    settings=RabbitSourceConfig.from_mapping,
    extra="rabbitmq",
    capabilities=frozenset({registry.Capability.SUBMIT,
                            registry.Capability.DELAYED_REDELIVERY}),
    submitter=RabbitSubmitter,
    # Its dead letter, when the pipeline names none: the queue '<pipeline>.dlq' on its broker.
    default_dead_letter=lambda pipeline: {NAME: {rc.QUEUE: f"{pipeline}.dlq"}},
))
