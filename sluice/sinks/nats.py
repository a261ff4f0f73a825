"""Sink to a NATS JetStream stream: dead letters (``dead_letter: {nats: {stream: JOBS_DLQ}}``)
and results.

Invariants:

1. ``send`` returns only once JetStream acknowledged every record of the batch (a PubAck:
   the record is stored in the stream), and raises :class:`~sluice.errors.DeliveryError`
   if any was not (``permanent`` when the server would refuse it again: too large, the
   stream full with discard new, the subject stored by another stream). The records of a
   batch are published back to back and their PubAcks awaited together: one round trip per
   batch, not per record.
2. Each record carries ``Nats-Msg-Id`` = its task id: a record published again within the
   stream's duplicate window (a retry after a lost PubAck, a crash before the outbox removed
   it) is stored once.
3. A keyed record goes to ``<subject>.<key>`` (with ``key_in_subject``) and carries its key in
   ``sluice-key`` (:mod:`sluice.connectors.nats_client` rule 3), with its task id in
   ``sluice-task-id`` and ``content-type``.
4. The connection is made at the first send (a failed one is tried again at the next); from
   then on the client reconnects by itself, and a send during an outage fails after
   ``timeout_s`` (transient: the outbox retries it, the consumer layer retries a dead letter).
5. Under on_success/on_failure of a pipeline whose source is NATS on the same url (and without
   ``outbox: true``), this sink is not used: the source publishes the records itself, on its
   own connection, before it acknowledges their message (:mod:`sluice.connectors.nats` rule
   9).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors import nats_client as nc
from sluice.connectors.base import SinkRecord
from sluice.errors import DeliveryError, SourceError
from sluice.sinks.http import DELIVERY_FIELDS
from sluice.spec import REQUIRED, Field, ObjectSpec

log = logging.getLogger(__name__)

NAME = "nats"  # its component name (and the NATS source's)
KEY_IN_SUBJECT, OUTBOX = "key_in_subject", "outbox"

CREATE_STREAM = nc.create_stream_spec("limits")

CONFIG = ObjectSpec(
    Field(nc.STREAM, "string", "The JetStream stream that stores the records (each publish "
          "is checked to land in it).", default=REQUIRED, pattern=nc.NAME_PATTERN),
    Field(nc.SUBJECT, "string", "Subject to publish to (a keyed record: <subject>.<key>); "
          "default: the stream's name.", default=None, pattern=nc.SUBJECT_PATTERN),
    nc.url_field(" Default: the url of the pipeline's NATS source.", required=False),
    Field(KEY_IN_SUBJECT, "boolean", "Publish a keyed record to <subject>.<key> (the stream "
          "must store <subject>.>); false: every record to <subject>. The key is in the "
          "sluice-key header either way.", default=True),
    nc.create_stream_field("sink", "limits"),
    Field(OUTBOX, "boolean", "Under on_success/on_failure of a pipeline whose source is NATS "
          "on the same url, results are published by the source before it acknowledges "
          "their message (and published again, deduplicated by Nats-Msg-Id, if the message "
          "comes back). true: through the durable outbox instead, with the retry keys below, "
          "a dead letter after max_attempts and a delivery status per task.", default=False),
    nc.connect_timeout_field(),
    label_field(nc.STREAM),
    *DELIVERY_FIELDS,  # timeout_s bounds the wait for the PubAcks of one send
)


@dataclass(frozen=True, slots=True)
class NatsSinkConfig(SinkSettings, nc.WithCreateStream):
    """The typed ``nats`` sink config (the keys of :data:`CONFIG`)."""

    stream: str
    subject: str | None
    url: str | None
    key_in_subject: bool
    create_stream: nc.CreateStreamConfig | None
    outbox: bool
    connect_timeout_s: float
    label: str | None
    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int

    @classmethod
    def create_stream_spec(cls) -> ObjectSpec:
        return CREATE_STREAM

    @property
    def target(self) -> str:
        return self.stream

    @property
    def base_subject(self) -> str:
        return self.subject or self.stream


class NatsSink:
    """Publishes records to one stream and waits for their PubAcks (see the invariants)."""

    takes_batches = True  # one send of many records costs about one of one (rule 1)

    def __init__(self, config: NatsSinkConfig, url: str) -> None:
        self.cfg = config
        self.url = url
        self.stream = config.stream
        self.subject = config.base_subject
        self.conn = nc.Connection(url, f"nats sink to stream {config.stream!r}",
                                  connect_timeout_s=config.connect_timeout_s, logger=log)
        self._starting = asyncio.Lock()
        self._ready = False

    async def start(self) -> None:
        """Connect and check the stream (rule 4); a failure is tried again at the next send."""
        async with self._starting:
            if self._ready:
                return
            await self.conn.connect()
            await nc.ensure_stream(self.conn, self.stream, self.subject,
                                   self.cfg.create_stream)
            self._ready = True

    async def send(self, records: Sequence[SinkRecord]) -> None:
        if not records:
            return
        if self.conn.closed:
            raise DeliveryError(f"{self.conn.what} is closed")
        try:
            await self.start()
        except SourceError as exc:  # the server or the stream: may come right later
            raise DeliveryError(str(exc)) from None
        await nc.publish(self.conn, self.stream, self.subject, records, self.cfg.timeout_s,
                         key_in_subject=self.cfg.key_in_subject)

    async def close(self) -> None:
        await self.conn.close()


def sink_url(config: NatsSinkConfig, ctx: registry.BuildContext) -> str:
    """Its own ``url``, else that of the pipeline's nats source."""
    return ctx.own_or_source_url(config.url, NAME, f"the nats sink to stream {config.stream!r}",
                                 "nats://host:4222")


def build_sink(config: NatsSinkConfig, ctx: registry.BuildContext) -> NatsSink:
    nc.nats_module()
    return NatsSink(config, sink_url(config, ctx))


SPEC = registry.register(registry.ComponentSpec(
    family="sink",
    name=NAME,
    summary="A NATS JetStream stream; a send returns once JetStream acknowledged every record "
            "(PubAck), each published with Nats-Msg-Id = its task id (deduplicated).",
    config=CONFIG,
    factory=build_sink,
    settings=NatsSinkConfig.from_mapping,
    extra="nats",
    endpoints=lambda config: nc.endpoints(config.url),
))
