"""The Redis Streams source (redis-py asyncio): a consumer group read with ``XREADGROUP``, each
entry leased to its consumer while it is in the group's pending entries list (PEL).

Invariants:

1. A fetch hands out, in this order and up to ``max_n`` in all: retries whose delay ended, then
   (every ``lease_s / 4`` at most) entries whose lease lapsed, then new entries
   (``XREADGROUP COUNT max_n - got``, in a script that packs the reply in one string; when
   there is none, ``XREADGROUP ... BLOCK`` waits for the first). The source buffers nothing: it
   holds no more than the consumer layer asked for (``shares_backlog``: the layer paces how
   much it takes).
2. Lease: a read entry is pending under this source's consumer (a name unique to the process
   and the source) until it is acknowledged (``XACK``). ``extend`` claims it again by the same
   consumer (``XCLAIM ... JUSTID``: its idle time restarts; no delivery counted), only if it is
   still that consumer's. An entry idle longer than ``lease_s`` (its worker died, or stopped
   extending) is claimed by whichever consumer of the group fetches next (``XCLAIM`` with
   ``min-idle-time``: the crashed worker's messages come back), which counts a delivery.
3. Retry delay: ``retry_later`` puts the entry's id in the sorted set ``<stream>:delayed``,
   scored by its due time, and moves the entry, still pending, to the placeholder consumer
   ``sluice.delayed``, in one Lua script. The entry is never acknowledged or copied meanwhile:
   its id, its task id and its fields stay; it is not trimmed; a lapsed-lease scan skips it.
   When due, the next fetch of any consumer removes it from the set and claims it (one script):
   nothing is lost (it is pending throughout; if the worker that delayed it dies, another
   hands it out when due) and nothing doubled (set removal and claim are atomic).
4. ``Delivery.deliveries`` is the group's delivery count (``XPENDING``): 1 for a new entry,
   counted up by each claim of a retry or of a lapsed lease.
5. A task's id is the entry's ``task_id_field`` (``sluice-task-id``), else the entry id: both
   are stable across redeliveries (rule 3), so the task store's claim skips a finished task.
6. Trimming: every ``trim_interval_s``, ``XTRIM MINID ~`` to the oldest id some group of the
   stream still needs (its oldest pending entry, else its last delivered one): an entry no
   group has acknowledged is never trimmed.
7. Outage: redis-py does not reconnect a blocking read by itself. A fetch that meets a lost
   server waits one backoff step (capped, exponential) and returns nothing, so the loop goes
   on; ``ack``, ``retry_later`` and ``extend`` retry until it is back, for up to
   ``SETTLE_PATIENCE_S``, then leave the entries pending (they come back when their lease
   lapses and the task store's claim settles them). One warning when an outage starts, one
   info line when it ends.
8. No key order across consumers: a group hands entries to its consumers as they ask. With
   ``consumer.ordering: key`` the consumer layer keeps each key's entries in order within one
   worker (its lanes), holding a key's lane for a retry.
9. Results written with the acknowledgement (``OUTPUTS_WITH_ACK``, rule 9 of the consumer loop):
   a Redis destination on the source's server and database (its ``url`` unset or the same),
   unless it asks for the outbox (``outbox: true``), is written by the source itself. One
   script (``ACK_WRITING``: atomic, like a MULTI/EXEC; replicated and logged as one) takes a
   batch: for each entry, ``XACK``, and only if that acknowledged it (it was still pending in
   the group), ``XADD`` of its results. So a result is in its stream exactly when its entry is
   acknowledged: a crash or a lost connection before the script ran leaves neither (the entry
   comes back after ``lease_s``, its task is final, and its result is made again from the task
   store: rule 3 of :mod:`sluice.consumer.results`); a script sent again after its reply was
   lost, or a worker settling an entry that another one, having read it again after its
   lease lapsed, already acknowledged, writes nothing a second time. A result is written
   twice only for an entry that becomes pending again after its acknowledgement (the group
   moved back with ``XGROUP SETID``) or for two entries with one task id: each is then a
   delivery of its own. ``ack_producing`` sends the script and returns; its reply is awaited
   in the background, one batch at a time (the next call, ``pending`` and ``close`` wait for
   it), so the consumer layer records the next batch meanwhile. With ``wait_replicas`` the
   acknowledgement waits for the replicas (``WAIT``) after the script; too few by
   ``wait_timeout_ms`` is logged, not undone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors import redis_client as rc
from sluice.connectors.base import Delivery, Output
from sluice.connectors.outage import OutageLog
from sluice.connectors.publishing import check_submittable, create_then_publish
from sluice.errors import Misconfigured, SourceError, Unavailable, Unsupported
from sluice.sinks import redis as redis_sink
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings
from sluice.tasks.store import TaskRecord, TaskStore

if TYPE_CHECKING:
    from sluice.config.model import ComponentConfig, PipelineConfig

log = logging.getLogger(__name__)

NAME = "redis"
DELAYED_CONSUMER = "sluice.delayed"  # rule 3
MAX_BLOCK_S = 1.0  # one blocking read; bounds how late a retry due meanwhile is handed out
SETTLE_PATIENCE_S = 10.0  # rule 7
PENDING_SCAN = 1000

URL, STREAM, GROUP, CREATE = rc.URL, rc.STREAM, "group", "create"
START_ID, TASK_ID_FIELD, CONTENT_TYPE = "start_id", "task_id_field", "content_type"
LEASE_S, TRIM_INTERVAL_S = "lease_s", "trim_interval_s"

CONFIG = ObjectSpec(
    Field(URL, "string", "Redis server: redis://[user:password@]host:port/db (rediss:// for "
          "TLS, unix:///path.sock?db=0).", default=REQUIRED, pattern=rc.URL_PATTERN),
    Field(STREAM, "string", "Stream key to consume.", default=REQUIRED,
          pattern=rc.STREAM_PATTERN),
    Field(GROUP, "string", "Consumer group; default: sluice.<pipeline>.", default=None),
    Field(CREATE, "boolean", "Create the group when it does not exist (XGROUP CREATE ... "
          "MKSTREAM: the stream too). false: a missing stream or group is an error at start.",
          default=True),
    Field(START_ID, "string", "Where a group created by sluice starts reading: 0 (every entry "
          "already in the stream) or $ (only entries added from now on).", default="0",
          enum=("0", "$")),
    Field(TASK_ID_FIELD, "string", "Entry field whose value is the task id; an entry without "
          "it gets its entry id.", default=rc.TASK_ID),
    Field(CONTENT_TYPE, "string", "Content type of an entry without a content-type field.",
          default="application/json"),
    Field(LEASE_S, "number", "How long a read entry stays this worker's (pending under its "
          "consumer) unless extended (every lease_s/3 while its task runs); after that any "
          "consumer of the group claims it (a crashed worker's entries come back).",
          default=30.0, exclusive_minimum=0),
    Field(TRIM_INTERVAL_S, "number", "How often a worker trims the entries every group of the "
          "stream has acknowledged (XTRIM MINID ~ the oldest one a group still needs); 0: "
          "never trim.", default=10.0, minimum=0),
)


@dataclass(frozen=True, slots=True)
class RedisSourceConfig(Settings):
    """The typed ``redis`` source config (the keys of :data:`CONFIG`)."""

    url: str
    stream: str
    group: str | None
    create: bool
    start_id: str
    task_id_field: str
    content_type: str
    lease_s: float
    trim_interval_s: float

    def group_of(self, pipeline: str) -> str:
        """The consumer group: ``group``, else ``sluice.<pipeline>``."""
        return self.group or f"sluice.{pipeline}"


def delayed_key(stream: str) -> str:
    return f"{stream}:delayed"


class RedisSource:
    """:class:`~sluice.connectors.base.Source` over one stream's consumer group (see the module
    invariants)."""

    shares_backlog = True  # rule 1: several workers read one group

    def __init__(self, config: RedisSourceConfig, group: str) -> None:
        self.cfg = config
        self.stream = config.stream
        self.delayed = delayed_key(config.stream)
        self.group = group
        self.consumer = rc.consumer_name()
        self.lease_s = float(config.lease_s)
        self.where = f"redis stream {self.stream!r} (group {group}) on {rc.safe_url(config.url)}"
        self.outage = OutageLog(f"redis source of {self.stream!r}", log)
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._cursor = "-"
        self._next_reclaim = 0.0
        self._next_trim = 0.0
        self._next_due_s: float | None = None  # the delayed set's earliest due time (epoch s)
        self._held: set[str] = set()  # entry ids handed out here and not settled (rule 2)
        self._outputs: list[str] = []  # the streams written with the acknowledgement (rule 9)
        self._wait: tuple[int, int] = (0, 0)  # their largest wait_replicas, its timeout (ms)
        self._replicas_short = False  # the last WAIT found too few replicas (logged once)
        self._acking: asyncio.Task[None] | None = None  # the ack_producing under way

    async def start(self) -> None:
        if self._client is not None:
            return
        client = rc.connect(self.cfg.url)
        try:
            with rc.map_redis_errors(f"cannot use {self.where}"):
                await client.ping()
                await self._ensure_group(client)
                await self._check_outputs(client)
        except Unavailable as exc:
            await client.aclose()
            raise Unavailable(f"{exc}; start the server or correct url") from None
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        for name, body in (("read", rc.READ_NEW), ("take", rc.TAKE_DUE), ("delay", rc.DELAY),
                           ("extend", rc.EXTEND), ("trim", rc.TRIM),
                           ("ack_writing", rc.ACK_WRITING)):
            self._scripts[name] = client.register_script(body)
        self._next_trim = time.monotonic() + self.cfg.trim_interval_s
        log.info("redis source: consuming %s as consumer %s", self.where, self.consumer)

    async def _ensure_group(self, client: Any) -> None:
        rx = rc.exceptions()
        if self.cfg.create:
            try:
                await client.xgroup_create(self.stream, self.group, id=self.cfg.start_id,
                                           mkstream=True)
                log.info("redis source: created group %s on stream %s", self.group,
                         self.stream)
            except rx.ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise
            return
        try:
            groups = await client.xinfo_groups(self.stream)
        except rx.ResponseError as exc:
            if "no such key" in str(exc):
                raise Misconfigured(f"{self.where}: the stream does not exist; create it "
                                    "(XGROUP CREATE ... MKSTREAM), or set create: true") from None
            raise
        if not any(rc.text(g["name"]) == self.group for g in groups):
            raise Misconfigured(f"{self.where}: the group does not exist; create it (XGROUP "
                                "CREATE), or set create: true")

    async def _check_outputs(self, client: Any) -> None:
        """Rule 9: a result stream that is a key of another type is an error at start (the
        script would refuse every batch)."""
        for out in self._outputs:
            kind = rc.text(await client.type(out))
            if kind not in ("stream", "none"):
                raise Misconfigured(f"{self.where}: the result stream {out!r} is a {kind}, not "
                                    "a stream: delete it or write the results elsewhere")

    # -- fetching ---------------------------------------------------------------------------

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        if self._client is None:
            raise SourceError(f"the redis source of {self.stream!r} is not started")
        deadline = time.monotonic() + wait_s
        rx = rc.exceptions()
        while True:
            try:
                got = await self._take_due(max_n)
                if len(got) < max_n:
                    got += await self._read_new(max_n - len(got), 0.0 if got else
                                                self._block_s(deadline))
                await self._maybe_trim()
                self.outage.up()
            except (rx.RedisError, OSError) as exc:
                if not rc.is_outage(exc):
                    if isinstance(exc, rx.ResponseError) and "NOGROUP" in str(exc):
                        await self._group_gone()
                        continue
                    raise rc.redis_error(self.where, exc) from None
                pause = self.outage.failed(rc.describe(exc))
                await asyncio.sleep(max(min(pause, deadline - time.monotonic()), 0.0))
                return []
            if got or time.monotonic() >= deadline:
                return got

    def _block_s(self, deadline: float) -> float:
        """How long the next read may block: until the deadline, the next due retry, or
        MAX_BLOCK_S, whichever is first."""
        block = min(deadline - time.monotonic(), MAX_BLOCK_S)
        if self._next_due_s is not None:
            block = min(block, self._next_due_s - time.time())
        return max(block, 0.0)

    async def _take_due(self, max_n: int) -> list[Delivery]:
        """Rule 1: due retries, then lapsed leases (at most every lease_s/4)."""
        now = time.monotonic()
        reclaim = now >= self._next_reclaim
        if reclaim:
            self._next_reclaim = now + min(self.lease_s / 4, 5.0)
        elif self._next_due_s is None or self._next_due_s > time.time():
            return []  # nothing due when last looked (the set is looked at with each reclaim)
        out, next_due, cursor = await self._scripts["take"](
            keys=[self.stream, self.delayed],
            args=[self.group, self.consumer, int(time.time() * 1000), max_n,
                  int(self.lease_s * 1000), 1 if reclaim else 0, self._cursor])
        self._cursor = rc.text(cursor)
        self._next_due_s = None if not next_due else float(next_due) / 1000.0
        # An entry held here whose lease lapsed (its extends failed in an outage) was claimed
        # back by this consumer: its lease is renewed, and it is not handed out a second time.
        return [self._delivery(rc.text(entry_id), _pairs(flat), int(count))
                for entry_id, flat, count in out if rc.text(entry_id) not in self._held]

    async def _read_new(self, n: int, block_s: float) -> list[Delivery]:
        """Up to ``n`` new entries: read by a script (one packed reply, rule 1); if there are
        none, a read that blocks up to ``block_s`` for the first to come."""
        packed = await self._scripts["read"](keys=[self.stream],
                                             args=[self.group, self.consumer, n])
        if packed:
            return [self._delivery(entry_id, fields, 1)
                    for entry_id, fields in rc.read_entries(packed)]
        block_ms = int(block_s * 1000)
        if block_ms <= 0:
            return []
        reply = await self._client.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                              count=n, block=block_ms)
        out: list[Delivery] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                if fields is not None:
                    out.append(self._delivery(entry_id.decode(), fields, 1))
        return out

    def _delivery(self, entry_id: str, fields: Mapping[bytes, bytes], count: int) -> Delivery:
        self._held.add(entry_id)
        headers = rc.headers_of(fields)
        key = fields.get(rc.KEY)
        return Delivery(
            task_id=headers.get(self.cfg.task_id_field) or entry_id,
            body=fields.get(rc.BODY, b""),
            content_type=headers.get("content-type", self.cfg.content_type),
            key=None if key is None else key.decode(errors="replace"),
            headers=headers,
            enqueued_at=rc.id_time_s(entry_id),
            deliveries=max(count, 1),
            ref=entry_id,
        )

    async def _group_gone(self) -> None:
        """The group (or the stream) vanished while running: made again when the source may
        create it, else an error."""
        if not self.cfg.create:
            raise Misconfigured(f"{self.where}: the group or the stream was deleted")
        log.warning("%s: the group was deleted; creating it again", self.where)
        with rc.map_redis_errors(self.where):
            await self._ensure_group(self._client)

    async def _maybe_trim(self) -> None:
        if self.cfg.trim_interval_s <= 0 or time.monotonic() < self._next_trim:
            return
        self._next_trim = time.monotonic() + self.cfg.trim_interval_s
        trimmed = await self._scripts["trim"](keys=[self.stream], args=[])
        if trimmed:
            log.debug("%s: trimmed %d acknowledged entries", self.where, trimmed)

    # -- settling ---------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            ids = [d.ref for d in deliveries]
            self._held.difference_update(ids)
            await self._settle("ack", lambda: self._client.xack(self.stream, self.group, *ids))

    def produce_to(self, topics: Sequence[tuple[str, Any]]) -> None:
        """Before :meth:`start`: the streams written with the acknowledgement (rule 9), each
        with its sink's typed config (its ``wait_replicas`` is read)."""
        for stream, sink in topics:
            if stream not in self._outputs:
                self._outputs.append(stream)
            replicas = int(getattr(sink, "wait_replicas", 0) or 0)
            if replicas > self._wait[0]:
                self._wait = (replicas, int(sink.wait_timeout_ms))

    async def ack_producing(self, items: Sequence[tuple[Delivery, Sequence[Output]]]) -> None:
        """Rule 9: acknowledge each entry and add its outputs, in one script. Sent before this
        returns, its reply awaited in the background (one batch at a time: the next call
        waits for the reply of the one before; :meth:`pending` and :meth:`close` wait too)."""
        if not items:
            return
        keys, batch, ids = rc.ack_batch(self.stream, items)
        self._held.difference_update(ids)
        await self._acked()
        self._acking = asyncio.get_running_loop().create_task(self._ack_writing(keys, batch,
                                                                                ids))

    async def _ack_writing(self, keys: list[str], batch: bytes, ids: list[str]) -> None:
        try:
            if len(keys) == 1:  # no outputs at all (no destination for these states)
                await self._settle("ack", lambda: self._client.xack(self.stream, self.group,
                                                                    *ids))
                return
            await self._settle("ack", lambda: self._scripts["ack_writing"](
                keys=keys, args=[self.group, batch]))
            if self._wait[0]:
                await self._settle("ack", self._wait_replicas, patience_s=0.0)
        except SourceError as exc:  # not an outage (those are retried, then left pending)
            log.error("%s: %d entries not acknowledged, nor their results written (they come "
                      "back after lease_s): %s", self.where, len(ids), exc)

    async def _acked(self) -> None:
        """Wait for the reply to the acknowledgement under way, if any."""
        acking = self._acking
        if acking is None:
            return
        try:
            await asyncio.shield(acking)  # a cancelled caller leaves it to run on
        except asyncio.CancelledError:
            if not acking.cancelled():
                raise  # the caller was cancelled, not the acknowledgement
        if self._acking is acking:
            self._acking = None

    async def _wait_replicas(self) -> None:
        replicas, timeout_ms = self._wait
        acked = int(await self._client.wait(replicas, timeout_ms))
        if acked < replicas and not self._replicas_short:
            log.warning("%s: %d of %d replica(s) acknowledged the results written in %d ms "
                        "(they are not undone)", self.where, acked, replicas, timeout_ms)
        elif acked >= replicas and self._replicas_short:
            log.info("%s: %d replica(s) acknowledge the results again", self.where, replicas)
        self._replicas_short = acked < replicas

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        if not deliveries:
            return
        now_ms = time.time() * 1000
        args: list[Any] = [self.group, DELAYED_CONSUMER]
        for d, delay_s in deliveries:
            args += [d.ref, int(now_ms + max(delay_s, 0.0) * 1000)]
            self._held.discard(d.ref)
        due = min(now_ms / 1000 + max(delay_s, 0.0) for _, delay_s in deliveries)
        await self._settle("retry_later", lambda: self._scripts["delay"](
            keys=[self.stream, self.delayed], args=args))
        if self._next_due_s is None or due < self._next_due_s:
            self._next_due_s = due

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            ids = [d.ref for d in deliveries]
            await self._settle("extend", lambda: self._scripts["extend"](
                keys=[self.stream], args=[self.group, self.consumer, *ids]), patience_s=0.0)

    async def _settle(self, what: str, call: Any,
                      patience_s: float = SETTLE_PATIENCE_S) -> None:
        """Rule 7: retried through an outage for up to ``patience_s``, then given up (the
        entries stay pending)."""
        if self._client is None:
            raise SourceError(f"the redis source of {self.stream!r} is not started")
        rx = rc.exceptions()
        give_up = time.monotonic() + patience_s
        while True:
            try:
                await call()
            except (rx.RedisError, OSError) as exc:
                if not rc.is_outage(exc):
                    raise rc.redis_error(f"{self.where}: {what}", exc) from None
                pause = self.outage.failed(rc.describe(exc))
                if time.monotonic() + pause > give_up:
                    log.debug("%s: %s given up during the outage (the entries stay "
                              "pending)", self.where, what)
                    return
                await asyncio.sleep(pause)
                continue
            self.outage.up()
            return

    async def pending(self) -> int:
        """Entries not finished: pending in the group (leased or delayed) plus those not read
        by it yet (its lag)."""
        if self._client is None:
            raise SourceError(f"the redis source of {self.stream!r} is not started")
        await self._acked()
        with rc.map_redis_errors(self.where):
            for g in await self._client.xinfo_groups(self.stream):
                if rc.text(g["name"]) != self.group:
                    continue
                lag = g.get("lag")
                if lag is None:  # unknown after deletions: whether any entry is left to read
                    last = rc.text(g["last-delivered-id"])
                    lag = len(await self._client.xrange(self.stream, f"({last}", "+",
                                                        count=PENDING_SCAN))
                return int(g["pending"]) + int(lag)
        return 0

    async def close(self) -> None:
        if self._client is not None:
            await self._acked()
        client, self._client = self._client, None
        if client is None:
            return
        rx = rc.exceptions()
        try:
            # A consumer with nothing pending is forgotten (its pending entries would be lost
            # with it: then it stays, and its entries are claimed when their leases lapse).
            mine = await client.xpending_range(self.stream, self.group, "-", "+", 1,
                                               consumername=self.consumer)
            if not mine:
                await client.xgroup_delconsumer(self.stream, self.group, self.consumer)
        except (rx.RedisError, OSError) as exc:
            log.debug("%s: closing: %s", self.where, exc)
        finally:
            await client.aclose()


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A Lua reply's flat field list as a mapping."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def build_source(config: RedisSourceConfig, ctx: registry.BuildContext) -> RedisSource:
    rc.library()  # a missing extra is reported when the pipeline is built, not at first use
    return RedisSource(config, config.group_of(ctx.pipeline))


class RedisSubmitter:
    """Submits to one Redis-sourced pipeline (``sluice submit``, the HTTP trigger): the tasks
    are created ``QUEUED`` in the store, then their entries added to the source stream with
    the task id in ``sluice-task-id`` (one pipelined batch of ``XADD``; a submit succeeds once
    the server replied to every one). If the add fails, the created tasks are removed again, so
    the same task ids may be submitted again. A task id already used is refused before
    anything is added. No delay: a new entry cannot be held back in a stream."""

    def __init__(self, store: TaskStore, config: PipelineConfig) -> None:
        source = SPEC.typed(config.source.config)
        check_submittable(config, "task_id_field", source.task_id_field, "add to its stream")
        self.store = store
        self.config = config
        self.sink = redis_sink.RedisSink(redis_sink.SPEC.typed(
            {rc.STREAM: source.stream, rc.URL: source.url}), source.url)

    async def submit(self, items: Sequence[registry.Submission]) -> list[TaskRecord | None]:
        if any(item.delay_s for item in items):
            raise Unsupported("a redis source has no delayed delivery of new entries: submit "
                              "without a delay")
        return await create_then_publish(
            self.store, self.config, items, lambda fresh: self.sink.send([r for _, r in fresh]),
            f"redis stream {self.sink.stream!r}")

    async def close(self) -> None:
        await self.sink.close()


def submitter(config: PipelineConfig, ctx: registry.SubmitContext) -> registry.Submitter:
    return RedisSubmitter(ctx.store.tasks, config)


def outputs_with_ack(config: PipelineConfig, destination: ComponentConfig) -> bool:
    """Rule 9: whether the source writes this result destination with its acknowledgement
    instead of the outbox: a Redis stream on the source's server and database (its url unset
    or naming the same), unless it asks for the outbox."""
    if destination.type != redis_sink.NAME:
        return False
    out = redis_sink.SPEC.typed(destination.config)
    return not out.outbox and (not out.url or rc.same_server(
        out.url, SPEC.typed(config.source.config).url))


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name=NAME,
    summary="A Redis stream, read by a consumer group (XREADGROUP); an entry is leased while "
            "pending, retries are delayed in a sorted set, results to streams on its server "
            "are added in one script with the acknowledgements, acknowledged entries are "
            "trimmed.",
    config=CONFIG,
    factory=build_source,
    settings=RedisSourceConfig.from_mapping,
    extra="redis",
    capabilities=frozenset({registry.Capability.SUBMIT, registry.Capability.OUTPUTS_WITH_ACK}),
    submitter=submitter,
    outputs_with_ack=outputs_with_ack,
    default_dead_letter=lambda pipeline: {NAME: {STREAM: f"{pipeline}.dlq"}},
))
