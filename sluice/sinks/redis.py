"""Sink to a Redis stream: dead letters (``dead_letter: {redis: {stream: jobs.dlq}}``) and results.

Invariants:

1. ``send`` adds every record of the batch with ``XADD`` (one pipelined round trip) and returns
   only once the server replied to each (the entry is in the server's memory and its
   append-only file, fsynced within a second under ``appendfsync everysec``); with
   ``wait_replicas``, also once that many replicas acknowledged the writes (``WAIT``).
2. It raises :class:`~sluice.errors.DeliveryError` if any record was refused or the server is
   out of reach (``permanent`` when retrying cannot help: the key holds another type, no
   permission). A retried send adds the records again: at least once, and a reader dedups by
   the ``sluice-task-id`` field.
3. The entry layout is the source's (:mod:`sluice.connectors.redis_client`): ``body``,
   ``content-type``, ``key`` (when the record has one), ``sluice-task-id`` and one field per
   header.
4. A lost connection is made again at the next send (redis-py's pool); one warning when the
   server is lost, one info line when it is back.
5. Nothing is trimmed: the stream's readers trim what they acknowledged (a sluice source on it
   does, rule 6 of :mod:`sluice.connectors.redis`).
6. Under ``on_success``/``on_failure`` of a pipeline whose source is Redis on the same server
   and database, the results are not sent by this sink: the source adds them in one script
   with its acknowledgements (rule 9 of :mod:`sluice.connectors.redis`), unless ``outbox:
   true`` sends them through the pipeline's durable outbox (:mod:`sluice.sinks.delivery`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sluice import registry
from sluice.config.destinations import SinkSettings, label_field
from sluice.connectors import redis_client as rc
from sluice.connectors.base import SinkRecord
from sluice.connectors.outage import OutageLog
from sluice.errors import DeliveryError
from sluice.sinks.http import DELIVERY_FIELDS
from sluice.spec import REQUIRED, Field, ObjectSpec

log = logging.getLogger(__name__)

NAME = "redis"  # its component name (and the Redis source's)
STREAM, URL = rc.STREAM, rc.URL
WAIT_REPLICAS, WAIT_TIMEOUT_MS, OUTBOX = "wait_replicas", "wait_timeout_ms", "outbox"

CONFIG = ObjectSpec(
    Field(STREAM, "string", "Stream key to add records to (XADD; the first one creates it).",
          default=REQUIRED, pattern=rc.STREAM_PATTERN),
    Field(URL, "string", "Redis server, redis://[user:password@]host:port/db; default: the "
          "url of the pipeline's redis source.", default=None, pattern=rc.URL_PATTERN),
    Field(WAIT_REPLICAS, "integer", "Replicas that must acknowledge a send's writes (WAIT) "
          "before it returns; 0: the primary's reply to each XADD confirms it.", default=0,
          minimum=0),
    Field(WAIT_TIMEOUT_MS, "integer", "With wait_replicas: how long WAIT waits; fewer replicas "
          "by then fail the send (it is retried, adding the records again).", default=1000,
          minimum=1),
    Field(OUTBOX, "boolean", "Under on_success/on_failure of a pipeline whose source is Redis "
          "on the same server and database (url unset or equal), results are added by the "
          "source in one script with its acknowledgements (XACK, and XADD only of the entries "
          "it acknowledged). true: through the durable outbox instead, with the retry keys "
          "below, a dead letter after max_attempts and a delivery status per task.",
          default=False),
    label_field(STREAM),
    *DELIVERY_FIELDS,  # used under on_success / on_failure (the outbox's retries)
)


@dataclass(frozen=True, slots=True)
class RedisSinkConfig(SinkSettings):
    """The typed ``redis`` sink config (the keys of :data:`CONFIG`)."""

    stream: str
    url: str | None
    wait_replicas: int
    wait_timeout_ms: int
    outbox: bool
    label: str | None
    timeout_s: float
    max_attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    max_age_s: float
    concurrency: int

    @property
    def target(self) -> str:
        return self.stream


class RedisSink:
    """Adds records to one stream (see the invariants)."""

    takes_batches = True  # a batch is one pipelined round trip

    def __init__(self, config: RedisSinkConfig, url: str) -> None:
        self.cfg = config
        self.url = url
        self.stream = config.stream
        self.where = f"redis stream {self.stream!r} on {rc.safe_url(url)}"
        self.outage = OutageLog(f"redis sink to {self.stream!r}", log)
        self._client: Any = None

    async def send(self, records: Sequence[SinkRecord]) -> None:
        if not records:
            return
        rx = rc.exceptions()
        if self._client is None:
            self._client = rc.connect(self.url)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for record in records:
                    pipe.xadd(self.stream, rc.entry_fields(record))
                replies = await pipe.execute(raise_on_error=False)
            failed = [r for r in replies if isinstance(r, BaseException)]
            if not failed and self.cfg.wait_replicas:
                acked = await self._client.wait(self.cfg.wait_replicas,
                                                self.cfg.wait_timeout_ms)
                if int(acked) < self.cfg.wait_replicas:
                    raise DeliveryError(
                        f"{self.where}: {acked} of {self.cfg.wait_replicas} replica(s) "
                        f"acknowledged the writes in {self.cfg.wait_timeout_ms} ms")
        except (rx.RedisError, OSError) as exc:
            if rc.is_outage(exc):
                self.outage.failed(rc.describe(exc))
            error = rc.redis_error(self.where, exc)
            raise DeliveryError(str(error), permanent=not error.retriable) from None
        if failed:
            errors = [rc.redis_error(self.where, f) for f in failed]
            if any(rc.is_outage(f) for f in failed):
                self.outage.failed(rc.describe(failed[0]))
            raise DeliveryError(
                f"{len(failed)} of {len(records)} record(s) not added: {errors[0]}",
                permanent=all(not e.retriable for e in errors))
        self.outage.up()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def sink_url(config: RedisSinkConfig, ctx: registry.BuildContext) -> str:
    """Its own ``url``, else that of the pipeline's redis source."""
    return ctx.own_or_source_url(config.url, NAME, f"the redis sink to {config.stream!r}",
                                 "redis://host:port/db")


def build_sink(config: RedisSinkConfig, ctx: registry.BuildContext) -> RedisSink:
    rc.library()
    return RedisSink(config, sink_url(config, ctx))


SPEC = registry.register(registry.ComponentSpec(
    family="sink",
    name=NAME,
    summary="A Redis stream, written with XADD; a send returns once the server replied to "
            "every record (and, with wait_replicas, its replicas acknowledged them).",
    config=CONFIG,
    factory=build_sink,
    settings=RedisSinkConfig.from_mapping,
    extra="redis",
))
