"""The NATS JetStream source (nats-py): a durable pull consumer whose deliveries are leased by
the server's AckWait.

Invariants:

1. A pipeline's workers share one durable pull consumer (``consumer``, default
   ``sluice-<pipeline>``) on ``stream``: competing consumers, each message handed to one of
   them (``shares_backlog``: the consumer loop paces how much each holds). At start the
   consumer is created, or updated, with explicit acks, AckWait = ``lease_s``, MaxDeliver
   -1 and MaxAckPending = ``max_ack_pending``; the stream must exist (or ``create_stream``).
2. ``fetch`` hands out at most ``max_n`` messages, and pulls only when it holds none: one pull
   request of ``max_n`` plus what the loop takes in ``PULL_AHEAD_S`` at its recent pace (none
   for a slow handler, at most ``MAX_PULL_AHEAD``), expiring after ``wait_s``. What it pulled
   beyond ``max_n`` is handed out by the next fetches without a round trip, extended with the
   deliveries the loop holds, and sent back (NAK) if not taken within ``lease_s / 2`` or at
   close: a worker holds about what it finishes in ``PULL_AHEAD_S`` beyond what its loop asked
   for (the consumer layer paces a shared backlog), so other workers do not starve.
3. A fetched message is leased for AckWait. ``extend`` sends in-progress (+WPI: AckWait starts
   again), ``ack`` sends +ACK, ``retry_later`` a NAK with the delay (the server redelivers it
   after that delay; 0: at once). The last ack of a batch is a request: ``ack`` returns once
   the server applied the batch (it processes a consumer's acks in order), or after
   ``ACK_CONFIRM_S`` without an answer (rule 4).
4. Acknowledgements are fire-and-forget publishes: while the connection is down the client
   buffers them and sends them when it is back. One lost is harmless: the message comes back
   after AckWait, and the task store's claim skips a finished task (or sees it still running
   under a live lease, and the message waits for it).
5. MaxDeliver is -1: sluice decides when a task has failed for good (``consumer.retry.
   max_attempts``, counted in its task store, then the dead letter). A cap at the server
   would end a message's deliveries without a dead letter, and deliveries that are not
   attempts (a paused task's rechecks, hand-backs at a stop) would count against it.
6. A task's id is its ``task_id_header`` header, else its ``Nats-Msg-Id`` header, else
   ``<stream>/<stream sequence>``: all three stay the same across redeliveries.
   ``Delivery.deliveries`` is the server's delivery count.
7. Keys come from the ``sluice-key`` header, else from the subject's tokens after ``subject``
   (:mod:`sluice.connectors.nats_client` rule 3). Order per key is kept by the consumer
   layer's lanes (this source hands out messages in stream order and keeps no key order of
   its own: ``orders_keys`` is false, so a retry holds its key's lane until it is back).
8. While the connection is down, ``fetch`` returns nothing after its wait (no pull request is
   queued to be sent later), settlements are buffered (rule 4), and ``pending`` waits for
   the server.
9. Results for NATS destinations on the source's url (``produce_to``; not ``outbox: true``)
   are published by the source on its own connection, and their PubAcks awaited, before their
   messages are acknowledged (``ack_producing``); no outbox row is written. If a publish
   fails, the batch's messages that had results are handed back (NAK, ``RESULT_RETRY_S``):
   their tasks are final, so the consumer loop makes their records again from the task store
   and they are published again, with the same ``Nats-Msg-Id``: JetStream stores a record
   published twice within the stream's duplicate window once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors import nats_client as nc
from sluice.connectors.base import Delivery, Output, SinkRecord
from sluice.errors import DeliveryError, Misconfigured, SourceError
from sluice.sinks import nats as nats_sink
from sluice.spec import REQUIRED, Field, ObjectSpec

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from sluice.config.model import ComponentConfig, PipelineConfig

log = logging.getLogger(__name__)

NAME = "nats"
MIN_FETCH_WAIT_S = 0.01  # a fetch with no wait still gives the server this long to answer
ACK_CONFIRM_S = 2.0  # how long an ack batch waits for the server's answer (rule 3)
PENDING_RETRY_S = 0.5  # pending() asks again this often while the server is away
# Rule 2: a pull asks for what the loop takes in this long at its recent pace beyond max_n
# (measured over windows of RATE_WINDOW_S), at most MAX_PULL_AHEAD.
PULL_AHEAD_S = 0.1
MAX_PULL_AHEAD = 500
RATE_WINDOW_S = 0.1
RESULT_RETRY_S = 1.0  # rule 9: a message whose results were not published comes back then

CONSUMER, FILTER_SUBJECT, TASK_ID_HEADER = "consumer", "filter_subject", "task_id_header"
CONTENT_TYPE, LEASE_S, MAX_ACK_PENDING = "content_type", "lease_s", "max_ack_pending"

CREATE_STREAM = nc.create_stream_spec("workqueue")

CONFIG = ObjectSpec(
    nc.url_field("", required=True),
    Field(nc.STREAM, "string", "The JetStream stream to consume.", default=REQUIRED,
          pattern=nc.NAME_PATTERN),
    Field(nc.SUBJECT, "string", "The stream's base subject: a message published to "
          "<subject>.<key> has that key (unless its sluice-key header says otherwise); "
          "submitted tasks are published there. Default: the stream's name.", default=None,
          pattern=nc.SUBJECT_PATTERN),
    Field(CONSUMER, "string", "Durable pull consumer shared by the pipeline's workers; "
          "default: sluice-<pipeline> (dots as underscores).", default=None,
          pattern=nc.NAME_PATTERN),
    Field(FILTER_SUBJECT, "string", "Consume only the stream's messages on this subject "
          "(wildcards allowed); default: every message of the stream.", default=None,
          pattern=nc.FILTER_PATTERN),
    Field(TASK_ID_HEADER, "string", "Header whose value is the task id; a message without it "
          "gets its Nats-Msg-Id header, else <stream>/<stream sequence>.",
          default=nc.TASK_ID_HEADER),
    Field(CONTENT_TYPE, "string", "Content type of a message without a content-type header.",
          default="application/json"),
    nc.create_stream_field("source", "workqueue"),
    Field(LEASE_S, "number", "The consumer's AckWait: a fetched message not acknowledged "
          "within it is delivered again. While its handler runs it is extended (in-progress) "
          "every lease_s/3; the task store's claim lasts as long.", default=30.0,
          exclusive_minimum=0),
    Field(MAX_ACK_PENDING, "integer", "The consumer's MaxAckPending: messages handed out and "
          "not yet acknowledged, across all workers, including those waiting for a delayed "
          "retry; at this many the server hands out no more.", default=20000, minimum=1),
    nc.connect_timeout_field(),
)


@dataclass(frozen=True, slots=True)
class NatsSourceConfig(nc.WithCreateStream):
    """The typed ``nats`` source config (the keys of :data:`CONFIG`)."""

    url: str
    stream: str
    subject: str | None
    consumer: str | None
    filter_subject: str | None
    task_id_header: str
    content_type: str
    create_stream: nc.CreateStreamConfig | None
    lease_s: float
    max_ack_pending: int
    connect_timeout_s: float

    @classmethod
    def create_stream_spec(cls) -> ObjectSpec:
        return CREATE_STREAM

    @property
    def base_subject(self) -> str:
        """Where keyed subjects start and submits go: ``subject``, else the stream's name."""
        return self.subject or self.stream

    def consumer_of(self, pipeline: str) -> str:
        """The durable consumer: ``consumer``, else ``sluice-<pipeline>``."""
        return self.consumer or f"sluice-{pipeline.replace('.', '_')}"


class NatsSource:
    """:class:`~sluice.connectors.base.Source` over one durable pull consumer (see the module
    invariants)."""

    shares_backlog = True  # rule 1
    orders_keys = False  # rule 7

    def __init__(self, config: NatsSourceConfig, consumer: str) -> None:
        self.cfg = config
        self.stream = config.stream
        self.subject = config.base_subject
        self.consumer = consumer
        self.lease_s = float(config.lease_s)
        self.conn = nc.Connection(config.url, f"nats source of stream {config.stream!r}",
                                  connect_timeout_s=config.connect_timeout_s, logger=log)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._extra: deque[tuple[float, Msg]] = deque()  # (when) pulled ahead (rule 2)
        self._handed = 0  # handed out since _rate_since (rule 2)
        self._rate_since = time.monotonic()
        self._rate_per_s = 0.0
        self._outputs: dict[str, nats_sink.NatsSinkConfig] = {}  # by stream (rule 9)
        self._results_failing = False
        self._expiring: asyncio.Task[None] | None = None  # _expire_extra (rule 2)
        self._closed = False

    async def start(self) -> None:
        if self._sub is not None:
            return
        if self._closed:
            raise SourceError(f"{self.conn.what} is closed")
        await self.conn.connect()
        try:
            await nc.ensure_stream(self.conn, self.stream, self.subject, self.cfg.create_stream)
            await self._ensure_consumer()
            for stream, out in self._outputs.items():
                await nc.ensure_stream(self.conn, stream, out.base_subject, out.create_stream)
            self._sub = await self.conn.js.pull_subscribe_bind(durable=self.consumer,
                                                               stream=self.stream)
        except BaseException:
            await self.conn.close()
            raise
        log.info("nats source: consuming stream %s on %s as consumer %s", self.stream,
                 nc.shown(self.cfg.url), self.consumer)

    async def _ensure_consumer(self) -> None:
        import nats.js.api as api
        import nats.js.errors as jse

        config = api.ConsumerConfig(
            name=self.consumer, durable_name=self.consumer,
            description="sluice: a pipeline's workers",
            ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.lease_s, max_deliver=-1,  # rule 5
            max_ack_pending=self.cfg.max_ack_pending, filter_subject=self.cfg.filter_subject)
        where = (f"{self.conn.what} at {nc.shown(self.cfg.url)}: consumer {self.consumer!r}")
        try:
            await self.conn.js.add_consumer(self.stream, config)
        except jse.BadRequestError as exc:
            raise Misconfigured(
                f"{where}: the server refused it: {exc.description} (err_code {exc.err_code}); "
                "an existing consumer with other settings (its filter, its deliver policy) "
                f"cannot be changed: delete it (nats consumer rm {self.stream} "
                f"{self.consumer}) or name another one (consumer:)") from None
        except nc.nats_errors() as exc:
            raise nc.nats_error(where, exc) from None

    # -- the protocol ---------------------------------------------------------------------

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        sub = self._subscription()
        if max_n <= 0:
            return []
        await self._drop_stale_extra()
        if self._extra:  # rule 2: already ours, and the oldest
            return self._hand_out([self._extra.popleft()[1]
                                   for _ in range(min(max_n, len(self._extra)))])
        if not self.conn.connected:  # rule 8: no pull request queued for later
            await asyncio.sleep(wait_s)
            return []
        import nats.errors as ne

        started = time.monotonic()
        try:
            msgs = await sub.fetch(batch=max_n + self._pull_ahead(),
                                   timeout=max(wait_s, MIN_FETCH_WAIT_S))
        except (ne.TimeoutError, TimeoutError):
            return []
        except nc.nats_errors() as exc:
            error = nc.nats_error(f"{self.conn.what}: fetch", exc)
            if self._closed or not error.retriable:
                raise error from None
            log.debug("%s", error)
            await asyncio.sleep(max(wait_s - (time.monotonic() - started), 0.0))
            return []
        if len(msgs) > max_n:
            now = time.monotonic()
            self._extra.extend((now, m) for m in msgs[max_n:])
            if self._expiring is None or self._expiring.done():
                self._expiring = asyncio.create_task(self._expire_extra())
            msgs = msgs[:max_n]
        return self._hand_out(msgs)

    def _hand_out(self, msgs: Sequence[Msg]) -> list[Delivery]:
        """Rule 2: count what the loop takes (its pace sets the pull ahead)."""
        now = time.monotonic()
        self._handed += len(msgs)
        elapsed = now - self._rate_since
        if elapsed >= RATE_WINDOW_S:
            latest = self._handed / elapsed
            self._rate_per_s = latest if latest > self._rate_per_s else (
                self._rate_per_s + latest) / 2
            self._handed, self._rate_since = 0, now
        return [self._delivery(m) for m in msgs]

    def _pull_ahead(self) -> int:
        """Rule 2: how many to pull beyond ``max_n``: what the loop takes in
        ``PULL_AHEAD_S`` at its recent pace (none for a slow handler), at most
        ``MAX_PULL_AHEAD``."""
        return min(MAX_PULL_AHEAD, int(self._rate_per_s * PULL_AHEAD_S))

    async def _expire_extra(self) -> None:
        """Rule 2: send back what was pulled ahead and is not taken in time, also while the
        loop fetches nothing (a paused pipeline)."""
        while self._extra and not self._closed:
            await asyncio.sleep(max(self._extra[0][0] + self.lease_s / 2 - time.monotonic(),
                                    0.0) + 0.01)
            with contextlib.suppress(SourceError):
                await self._drop_stale_extra()

    async def _drop_stale_extra(self) -> None:
        """Rule 2: messages pulled ahead and not taken for half their lease go back (NAK)."""
        limit = time.monotonic() - self.lease_s / 2
        stale: list[Msg] = []
        while self._extra and self._extra[0][0] < limit:
            stale.append(self._extra.popleft()[1])
        if stale:
            await self._settle([m.nak for m in stale])

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        calls: list[Callable[[], Awaitable[Any]]] = [d.ref.ack for d in deliveries[:-1]]
        last = deliveries[-1].ref
        # Rule 3: the batch's last one waits for the server's answer (acks are processed in
        # order): once ack returns, every ack of the batch was applied (pending() counts it).
        calls.append(functools.partial(last.ack_sync, timeout=ACK_CONFIRM_S)
                     if self.conn.connected else last.ack)
        await self._settle(calls)

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if deliveries:
            await self._settle([functools.partial(d.ref.nak, delay=max(delay_s, 0.0))
                                for d, delay_s in deliveries])

    def produce_to(self, topics: Sequence[tuple[str, Any]]) -> None:
        """Rule 9, before :meth:`start`: each result stream with its sink's typed config."""
        for stream, config in topics:
            if not isinstance(config, nats_sink.NatsSinkConfig):
                raise TypeError(f"{self.conn.what}: cannot publish results to {stream!r}")
            known = self._outputs.setdefault(stream, config)
            if (known.base_subject, known.key_in_subject) != (config.base_subject,
                                                              config.key_in_subject):
                raise Misconfigured(f"pipeline destinations to nats stream {stream!r} differ "
                                    "in subject or key_in_subject: give them one")

    async def ack_producing(self, items: Sequence[tuple[Delivery, Sequence[Output]]]) -> None:
        """Rule 9: publish the results (PubAcks awaited), then acknowledge the messages."""
        by_stream: dict[str, list[SinkRecord]] = {}
        for _, outputs in items:
            for out in outputs:
                by_stream.setdefault(out.topic, []).append(out.record)
        try:
            for stream, records in by_stream.items():
                config = self._outputs[stream]
                await nc.publish(self.conn, stream, config.base_subject, records,
                                 config.timeout_s, key_in_subject=config.key_in_subject)
        except DeliveryError as exc:
            if not self._results_failing and not self.conn.in_outage(
                    max(o.timeout_s for o in self._outputs.values())):
                log.warning("%s: results not acknowledged (%s); their messages come back in "
                            "%gs, to publish them again", self.conn.what, exc, RESULT_RETRY_S)
                self._results_failing = True  # (an outage's are logged by the connection)
            await self.ack([d for d, outputs in items if not outputs])
            await self.retry_later([(d, RESULT_RETRY_S) for d, outputs in items if outputs])
            return
        if self._results_failing and by_stream:
            self._results_failing = False
            log.info("%s: results published again", self.conn.what)
        await self.ack([d for d, _ in items])

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        msgs = [d.ref for d in deliveries] + [m for _, m in self._extra]
        if msgs:
            await self._settle([m.in_progress for m in msgs])

    async def pending(self) -> int:
        """Messages not finished: not yet delivered (``num_pending``) plus delivered and not
        acknowledged (``num_ack_pending``: leased, or waiting for a delayed redelivery)."""
        self._subscription()
        while True:
            try:
                info = await self.conn.js.consumer_info(self.stream, self.consumer)
                return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except nc.nats_errors() as exc:
                error = nc.nats_error(f"{self.conn.what}: consumer info", exc)
                if self._closed or not error.retriable:
                    raise error from None
                await asyncio.sleep(PENDING_RETRY_S)  # rule 8

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._expiring is not None:
            self._expiring.cancel()
        if self._sub is not None and self._extra:  # rule 2: not the loop's: back at once
            with contextlib.suppress(SourceError):
                await self._settle([m.nak for _, m in self._extra])
            self._extra.clear()
        await self.conn.flush(nc.API_TIMEOUT_S)
        self._sub = None
        await self.conn.close()

    # -- helpers ------------------------------------------------------------------------------

    def _subscription(self) -> JetStreamContext.PullSubscription:
        if self._sub is None:
            raise SourceError(f"{self.conn.what} is {'closed' if self._closed else 'not started'}")
        return self._sub

    async def _settle(self, calls: Sequence[Callable[[], Awaitable[Any]]]) -> None:
        """Send each message's acknowledgement (rules 3, 4): buffered by the client while
        disconnected; refused only once this source is closed."""
        import nats.errors as ne

        client = self.conn.nc
        if client is None:
            raise SourceError(f"{self.conn.what} is closed")
        for call in calls:
            try:
                await call()
            except ne.MsgAlreadyAckdError:
                continue
            except nc.nats_errors() as exc:
                if client.is_closed:
                    raise SourceError(f"{self.conn.what} is closed") from None
                # The client's buffer is full (a long outage): the message comes back after
                # AckWait instead (rule 4).
                log.debug("%s: acknowledgement not sent: %s", self.conn.what, exc)

    def _delivery(self, msg: Msg) -> Delivery:
        headers = msg.headers or {}
        meta = msg.metadata
        return Delivery(
            task_id=(headers.get(self.cfg.task_id_header) or headers.get(nc.MSG_ID_HEADER)
                     or f"{self.stream}/{meta.sequence.stream}"),
            body=msg.data,
            content_type=(headers.get(nc.CONTENT_TYPE_HEADER) or headers.get("Content-Type")
                          or self.cfg.content_type),
            key=nc.key_of(self.subject, msg.subject, headers),
            headers=headers,
            enqueued_at=meta.timestamp.timestamp() if meta.timestamp else None,
            deliveries=int(meta.num_delivered),
            ref=msg,
        )


def build_source(config: NatsSourceConfig, ctx: registry.BuildContext) -> NatsSource:
    nc.nats_module()  # a missing extra is reported when the pipeline is built, not at first use
    return NatsSource(config, config.consumer_of(ctx.pipeline))


def submitter(config: PipelineConfig, ctx: registry.SubmitContext) -> registry.Submitter:
    from sluice.connectors.nats_submit import NatsSubmitter  # its connection: only to submit

    return NatsSubmitter(ctx.store.tasks, config)


def outputs_with_ack(config: PipelineConfig, destination: ComponentConfig) -> bool:
    """Rule 9: whether the source publishes this result destination itself: a NATS
    destination on the source's url, unless it asks for the outbox."""
    if destination.type != nats_sink.NAME:
        return False
    out = nats_sink.SPEC.typed(destination.config)
    return not out.outbox and (not out.url or nc.servers_of(out.url) == nc.servers_of(
        SPEC.typed(config.source.config).url))


def default_dead_letter(pipeline: str) -> dict[str, Any]:
    """A pipeline on NATS that names no dead letter: the stream ``sluice-dlq-<pipeline>`` on
    the source's server, subject ``sluice.dlq.<pipeline>``, created when missing."""
    safe = pipeline.replace(".", "_")
    return {NAME: {nc.STREAM: f"sluice-dlq-{safe}", nc.SUBJECT: f"sluice.dlq.{safe}",
                   nc.CREATE_STREAM: True}}


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name=NAME,
    summary="A NATS JetStream stream, consumed by a durable pull consumer shared by the "
            "pipeline's workers; a message is leased for AckWait (lease_s), extended while it "
            "runs, and retried by a delayed NAK.",
    config=CONFIG,
    factory=build_source,
    settings=NatsSourceConfig.from_mapping,
    extra="nats",
    capabilities=frozenset({registry.Capability.SUBMIT, registry.Capability.OUTPUTS_WITH_ACK}),
    submitter=submitter,
    outputs_with_ack=outputs_with_ack,
    default_dead_letter=default_dead_letter,
    endpoints=lambda config: nc.endpoints(config.url),
))
