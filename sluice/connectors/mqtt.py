"""The MQTT source (aiomqtt over paho-mqtt, MQTT v5): a topic filter read at QoS 1 through a
persistent session, shared by the pipeline's workers (``$share/<group>/<topic>``).

MQTT has no lease and no delayed delivery. A QoS 1 message that a client has not acknowledged
(PUBACK) stays in its session and is sent again only when that client id reconnects (session
resumption); a broker never takes it back from a live connection. So:

1. A PUBACK is sent only once the consumer layer acknowledges the message, which it does after
   the task's end is recorded in the task store. Until then the message is in this worker's
   session: a crash or an outage leaves it there, and the broker sends it again (DUP, same
   packet id) when the session is resumed.
2. The task store's lease and claim guard against double runs; ``extend`` has nothing to renew
   at the broker (a no-op): a message is this worker's for as long as its session is.
3. ``retry_later(delay)`` keeps the message unacknowledged in this worker and hands it out again
   after the delay (exact, on this worker's clock); a crash meanwhile leaves it in the session,
   redelivered at once on resumption (its task store record still says when it may run).
4. Client ids are stable per slot (:func:`~sluice.connectors.mqtt_client.take_slot`):
   ``<client_id or sluice-<group>-<host>>-<n>``, n the lowest slot free in the data directory.
   A worker restarted on the same data directory resumes its predecessor's session; two
   workers on one data directory get different ids. A stopped worker keeps its session (nothing
   it held is lost): a worker still running on the same data directory takes it over within
   ``TAKEOVER_INTERVAL_S``: it unsubscribes it (the broker stops routing the group's messages to
   it), reads what it holds up to a marker message it sends itself (the broker sends a
   session's messages in order), runs those, then ends the session and removes the slot.
5. After a reconnect, a resent message whose packet id is one this worker still holds (same
   task id and body) is the same message: the held delivery is bound to the new connection
   (not handed out twice); one already acknowledged while disconnected is acknowledged now. If
   the broker lost the session (no persistence, expired), nothing held can be acknowledged any
   more: it is finished here and its acknowledgement dropped.
6. Backpressure: the broker sends at most ``receive_maximum`` unacknowledged messages (MQTT v5
   Receive Maximum); the rest wait in the session at the broker. The consumer layer fetches
   what its budget allows; what it has not fetched waits in this source's buffer (at most
   ``receive_maximum``, with the delayed ones).
7. A task's id is the ``task_id_property`` user property, else ``mqtt-`` + a SHA-256 of the
   topic and payload (the same on every redelivery; identical payloads on one topic are then
   one task). Its key is the ``sluice-key`` user property, else the topic level
   ``key_topic_level`` when set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sluice import registry
from sluice.connectors import mqtt_client as mc
from sluice.connectors.base import Delivery, SinkRecord
from sluice.connectors.publishing import check_submittable, create_then_publish
from sluice.errors import Unsupported
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

if TYPE_CHECKING:
    from sluice.config.model import PipelineConfig
    from sluice.tasks.store import TaskRecord

log = logging.getLogger(__name__)

NAME = "mqtt"
TAKEOVER_INTERVAL_S = 2.0  # how often a worker looks for sessions of workers that stopped
PENDING_TAKEOVER_WAIT_S = 2.0  # pending() waits this long for a takeover's messages
DRAIN_PREFIX = "sluice/_drain/"  # marker topics of a session being taken over (rule 4)

URL, TOPIC, GROUP, SHARED, CLIENT_ID = "url", "topic", "group", "shared", "client_id"
SESSION_EXPIRY_S, RECEIVE_MAXIMUM, KEEPALIVE_S = "session_expiry_s", "receive_maximum", \
    "keepalive_s"
PAYLOAD_FORMAT, TASK_ID_PROPERTY, KEY_TOPIC_LEVEL, LEASE_S = "payload_format", \
    "task_id_property", "key_topic_level", "lease_s"
CONTENT_TYPES = {"json": "application/json", "raw": "application/octet-stream"}

CONFIG = ObjectSpec(
    Field(URL, "string", "Broker URL: mqtt://[user:password@]host[:port] (mqtts:// for TLS); "
          "the password may come from the environment: ${MQTT_PASSWORD}.",
          default=mc.DEFAULT_URL, pattern=mc.URL_PATTERN),
    Field(TOPIC, "string", "Topic filter to read (MQTT wildcards + and # allowed; a submit "
          "needs a topic without them).", default=REQUIRED, pattern=r"^[^$].*$"),
    Field(GROUP, "string", "Shared subscription group: the workers read "
          "$share/<group>/<topic>, each message going to one of them. Default: "
          "sluice.<pipeline>.", default=None, pattern=r"^[^/+#\s]+$"),
    Field(SHARED, "boolean", "false: a plain subscription (every worker gets every message; "
          "one worker then keeps the broker's order per topic).", default=True),
    Field(CLIENT_ID, "string", "Base of the client ids; each worker uses <client_id>-<n>, n "
          "the lowest slot free in its data directory (stable across restarts). Default: "
          "sluice-<group>-<hostname>.", default=None, pattern=r"^[^\s/+#]+$"),
    Field(SESSION_EXPIRY_S, "integer", "How long the broker keeps a worker's session (its "
          "subscription and unacknowledged or queued messages) while it is disconnected.",
          default=604800, minimum=1, maximum=4294967295),
    Field(RECEIVE_MAXIMUM, "integer", "MQTT v5 Receive Maximum: unacknowledged messages the "
          "broker sends this worker at most (running, buffered, waiting to retry); the rest "
          "wait at the broker.", default=1000, minimum=1, maximum=65535),
    Field(KEEPALIVE_S, "integer", "MQTT keep-alive: a silent connection is found dead after "
          "1.5 times this.", default=30, minimum=1, maximum=65535),
    Field(PAYLOAD_FORMAT, "string", "json or raw: the content type of a message without an "
          "MQTT v5 content-type property (application/json or application/octet-stream).",
          default="json", enum=tuple(CONTENT_TYPES)),
    Field(TASK_ID_PROPERTY, "string", "User property whose value is the task id; a message "
          "without it gets mqtt-<SHA-256 of topic and payload> (identical payloads on one "
          "topic are one task).", default=mc.TASK_ID_PROPERTY),
    Field(KEY_TOPIC_LEVEL, "integer", "Topic level (0-based) that is the message's key when "
          "it has no sluice-key user property, e.g. 1 for orders/<customer>.", default=None,
          minimum=0),
    Field(LEASE_S, "number", "How long a running task stays claimed in the task store unless "
          "extended (every lease_s/3 while it runs); after a worker dies, its tasks may run "
          "elsewhere once this lapses. MQTT itself has no lease.", default=30.0,
          exclusive_minimum=0),
)


@dataclass(frozen=True, slots=True)
class MqttSourceConfig(Settings):
    """The typed ``mqtt`` source config (the keys of :data:`CONFIG`)."""

    url: str
    topic: str
    group: str | None
    shared: bool
    client_id: str | None
    session_expiry_s: int
    receive_maximum: int
    keepalive_s: int
    payload_format: str
    task_id_property: str
    key_topic_level: int | None
    lease_s: float

    def group_of(self, pipeline: str) -> str:
        return self.group or f"sluice.{pipeline}"

    def subscription(self, pipeline: str) -> str:
        return f"$share/{self.group_of(pipeline)}/{self.topic}" if self.shared else self.topic

    def client_base(self, pipeline: str) -> str:
        """The client ids' base (rule 4)."""
        return self.client_id or f"sluice-{self.group_of(pipeline)}-{socket.gethostname()}"


@dataclass(slots=True)
class _Ref:  # a delivery's handle: the connection and packet id it came with (rule 5)
    conn: mc.Connection
    mid: int
    epoch: int
    finished: bool = False


@dataclass(slots=True)
class _Takeover:  # a stopped worker's session being taken over (rule 4)
    conn: mc.Connection
    slot: int
    fd: int
    marker: str
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    finishing: asyncio.Task[None] | None = None


class MqttSource:
    """:class:`~sluice.connectors.base.Source` over one topic filter (see the module rules)."""

    shares_backlog = False  # the broker assigns messages as they are published, not fetched
    orders_keys = False

    def __init__(self, config: MqttSourceConfig, pipeline: str, data_dir: Path | None) -> None:
        self.cfg = config
        self.address = mc.parse_url(config.url)
        self.subscription = config.subscription(pipeline)
        self.base = config.client_base(pipeline)
        self.lease_s = float(config.lease_s)
        self.content_type = CONTENT_TYPES[config.payload_format]
        self._dir = mc.slot_dir(data_dir)
        self._slot: tuple[int, int] | None = None
        self.conn: mc.Connection | None = None
        self._ready: deque[Delivery] = deque()
        self._delayed: list[tuple[float, int, Delivery]] = []  # (due, seq, delivery): a heap
        self._seq = itertools.count()
        self._held: dict[int, Delivery] = {}  # every delivery not acknowledged, by id()
        self._by_mid: dict[tuple[int, int], Delivery] = {}  # (id(conn), packet id) → it
        self._wakeup = asyncio.Event()
        self._takeovers: dict[int, _Takeover] = {}
        self._scanning = asyncio.Lock()
        self._acked = asyncio.Event()  # some delivery was acknowledged (a takeover waits)
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def client_id(self) -> str:
        return f"{self.base}-{self._slot[0] if self._slot else 0}"

    def _connection(self, client_id: str, what: str) -> mc.Connection:
        return mc.Connection(
            self.address, client_id, what=what, persistent=True,
            session_expiry_s=self.cfg.session_expiry_s,
            receive_maximum=self.cfg.receive_maximum, keepalive_s=self.cfg.keepalive_s,
            on_message=self._on_message, on_connect=self._on_connect, manual_ack=True)

    async def start(self) -> None:
        if self.conn is not None:
            return
        self._slot = await asyncio.to_thread(mc.take_slot, self._dir, self.base)
        conn = self._connection(self.client_id, f"mqtt source {self.cfg.topic!r}")
        try:
            await conn.open()
        except BaseException:
            mc.release_slot(self._slot[1])
            self._slot = None
            raise
        self.conn = conn
        log.info("mqtt source: reading %s on %s as %s (session %s)", self.subscription,
                 self.address, conn.client_id, "resumed" if conn.session_present else "new")
        self._watcher = asyncio.create_task(self._take_over_forever(), name="mqtt takeover")

    async def _on_connect(self, conn: mc.Connection, session_present: bool) -> None:
        stale = [(k, d) for k, d in self._by_mid.items() if k[0] == id(conn)]
        if not session_present:  # rule 5: nothing held from before can be acknowledged
            if stale and self.conn is not None:
                log.warning("mqtt source %s: the broker did not resume the session %s (it was "
                            "lost: persistence off, or expired); what it had queued for this "
                            "worker is gone", self.cfg.topic, conn.client_id)
            for key, d in stale:
                del self._by_mid[key]
                d.ref.epoch = -1
        takeover = next((t for t in self._takeovers.values() if t.conn is conn), None)
        if takeover is None:
            await conn.subscribe(self.subscription)

    # -- messages in (rules 5, 7) ---------------------------------------------------------------

    def _on_message(self, conn: mc.Connection, message: Any, epoch: int) -> None:
        topic, body, mid = message.topic, bytes(message.payload), int(message.mid)
        if topic.startswith(DRAIN_PREFIX):
            conn.ack(mid, epoch)
            for t in self._takeovers.values():
                if t.marker == topic:
                    t.drained.set()
            return
        content_type, user = mc.read_properties(message)
        task_id = user.get(self.cfg.task_id_property) or _hashed_id(topic, body)
        key = (id(conn), mid)
        known = self._by_mid.get(key)
        if known is not None:
            if (message.dup and known.ref.epoch != epoch and known.task_id == task_id
                    and known.body == body):  # the same message, resent (rule 5)
                if known.ref.finished:
                    del self._by_mid[key]
                    conn.ack(mid, epoch)
                else:
                    known.ref.epoch = epoch
                return
            known.ref.epoch = -1  # a packet id used again: that one is gone
        delivery = Delivery(
            task_id=task_id, body=body, content_type=content_type or self.content_type,
            key=user.get(mc.KEY_PROPERTY) or self._topic_key(topic), headers=user,
            deliveries=2 if message.dup else 1, ref=_Ref(conn, mid, epoch))
        self._by_mid[key] = delivery
        self._held[id(delivery)] = delivery
        not_before = _float(user.get(mc.NOT_BEFORE_PROPERTY))
        if not_before is not None and not_before > time.time():
            self._delay(delivery, not_before - time.time())
        else:
            self._ready.append(delivery)
        self._wakeup.set()

    def _topic_key(self, topic: str) -> str | None:
        level = self.cfg.key_topic_level
        if level is None:
            return None
        levels = topic.split("/")
        return levels[level] if level < len(levels) else None

    def _delay(self, delivery: Delivery, delay_s: float) -> None:
        heapq.heappush(self._delayed, (time.monotonic() + delay_s, next(self._seq), delivery))

    # -- the Source protocol --------------------------------------------------------------------

    async def fetch(self, max_n: int, wait_s: float) -> list[Delivery]:
        deadline = time.monotonic() + wait_s
        while True:
            self._wakeup.clear()
            got = self._take(max_n)
            if got or self._closed:
                return got
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return []
            if self._delayed:
                remaining = min(remaining, max(self._delayed[0][0] - now, 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take(self, max_n: int) -> list[Delivery]:
        got: list[Delivery] = []
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now and len(got) < max_n:
            got.append(heapq.heappop(self._delayed)[2])  # due retries first
        while self._ready and len(got) < max_n:
            got.append(self._ready.popleft())
        return got

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for d in deliveries:
            if self._held.pop(id(d), None) is None:
                continue
            ref: _Ref = d.ref
            key = (id(ref.conn), ref.mid)
            if ref.conn.ack(ref.mid, ref.epoch) or ref.epoch < 0:
                if self._by_mid.get(key) is d:
                    del self._by_mid[key]
            else:  # disconnected: acknowledged when the broker resends it (rule 5)
                ref.finished = True
        self._acked.set()

    async def retry_later(self, deliveries: Sequence[tuple[Delivery, float]]) -> None:
        for d, delay_s in deliveries:
            if id(d) in self._held:
                d.deliveries += 1
                self._delay(d, max(delay_s, 0.0))
        if deliveries:
            self._wakeup.set()

    async def extend(self, deliveries: Sequence[Delivery]) -> None:
        return None  # rule 2: nothing to renew at the broker

    async def pending(self) -> int:
        """Messages this worker holds, not acknowledged (buffered, handed out, delayed), once
        whatever the broker had sent before this call has arrived. (What waits at the broker
        beyond ``receive_maximum`` cannot be counted: the broker sends it as soon as there is
        room, so an empty fetch after acknowledging everything means the session is empty.)"""
        if self.conn is None:
            return len(self._held)
        await self.conn.round_trip()
        await self._take_over_free_slots()
        waiting = [t.drained.wait() for t in self._takeovers.values()]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waiting), PENDING_TAKEOVER_WAIT_S)
        undrained = sum(1 for t in self._takeovers.values() if not t.drained.is_set())
        return len(self._held) + undrained + await asyncio.to_thread(self._left_sessions)

    def _left_sessions(self) -> int:
        """Slots of stopped workers not yet taken over: their sessions may hold messages."""
        own = self._slot[0] if self._slot else -1
        left = 0
        for n in mc.other_slots(self._dir, self.base):
            if n == own or n in self._takeovers:
                continue
            fd = mc.try_lock(mc.slot_path(self._dir, self.base, n))
            if fd is not None:
                mc.release_slot(fd)
                left += 1
        return left

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        for t in list(self._takeovers.values()):  # kept for the next look (rule 4)
            if t.finishing is not None:
                t.finishing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t.finishing
            await t.conn.close()
            if t.fd >= 0:
                mc.release_slot(t.fd)
        self._takeovers.clear()
        if self.conn is not None:
            await self.conn.close()  # its session stays with the broker (rules 1, 4)
            self.conn = None
        if self._slot is not None:
            mc.release_slot(self._slot[1])
            self._slot = None

    # -- taking over the sessions of stopped workers (rule 4) ---------------------------------

    async def _take_over_forever(self) -> None:
        while True:
            await self._take_over_free_slots()
            await asyncio.sleep(TAKEOVER_INTERVAL_S)

    async def _take_over_free_slots(self) -> None:
        """Begin to take over every slot whose worker has gone (its file is not locked)."""
        async with self._scanning:
            own = self._slot[0] if self._slot else -1
            for n in await asyncio.to_thread(mc.other_slots, self._dir, self.base):
                if n == own or n in self._takeovers or self._closed:
                    continue
                fd = await asyncio.to_thread(mc.try_lock, mc.slot_path(self._dir, self.base, n))
                if fd is None:
                    continue  # its worker runs
                try:
                    await self._begin_takeover(n, fd)
                except Exception as exc:  # tried again at the next look
                    log.warning("mqtt source %s: taking over the session %s-%d: %s",
                                self.cfg.topic, self.base, n, exc)
                    taken = self._takeovers.pop(n, None)
                    if taken is not None:
                        await taken.conn.close()
                    mc.release_slot(fd)

    async def _begin_takeover(self, n: int, fd: int) -> None:
        client_id = f"{self.base}-{n}"
        conn = self._connection(client_id, f"mqtt source {self.cfg.topic!r} (taking over "
                                           f"{client_id})")
        takeover = _Takeover(conn, n, fd, f"{DRAIN_PREFIX}{client_id}")
        self._takeovers[n] = takeover
        await conn.open()
        if not conn.session_present:  # nothing was left there
            await conn.close()
            await mc.wipe_session(self.address, client_id)
            del self._takeovers[n]
            mc.release_slot(fd, mc.slot_path(self._dir, self.base, n))
            return
        await conn.unsubscribe(self.subscription)  # nothing more is routed to it
        await conn.subscribe(takeover.marker)
        assert self.conn is not None
        await self.conn.publish(takeover.marker, b"", None)  # queued behind what it holds
        takeover.finishing = asyncio.create_task(self._finish_takeover(takeover))

    async def _finish_takeover(self, takeover: _Takeover) -> None:
        """Once the session's messages are all in (its marker came) and acknowledged here: end
        the session and free its slot."""
        conn, n = takeover.conn, takeover.slot
        try:
            await takeover.drained.wait()
            count = sum(1 for d in self._held.values() if d.ref.conn is conn)
            log.info("mqtt source %s: took over the session %s of a stopped worker (%d "
                     "message(s))", self.cfg.topic, conn.client_id, count)
            while any(d.ref.conn is conn for d in self._held.values()):
                self._acked.clear()
                await self._acked.wait()
            await conn.close()
            await mc.wipe_session(self.address, conn.client_id)
            for key in [k for k in self._by_mid if k[0] == id(conn)]:
                del self._by_mid[key]
            fd, takeover.fd = takeover.fd, -1
            mc.release_slot(fd, mc.slot_path(self._dir, self.base, n))
        except Exception as exc:  # its slot file stays: tried again at the next look
            log.warning("mqtt source %s: taking over the session %s: %s", self.cfg.topic,
                        conn.client_id, exc)
            await conn.close()
            fd, takeover.fd = takeover.fd, -1
            mc.release_slot(fd)
        finally:
            self._takeovers.pop(n, None)


def _hashed_id(topic: str, body: bytes) -> str:
    return "mqtt-" + hashlib.sha256(topic.encode() + b"\0" + body).hexdigest()[:32]


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def build_source(config: MqttSourceConfig, ctx: registry.BuildContext) -> MqttSource:
    mc.load()  # a missing extra is reported when the pipeline is built, not at first use
    return MqttSource(config, ctx.pipeline, ctx.data_dir)


# -- submitting ----------------------------------------------------------------------------------

class MqttSubmitter:
    """Submits to a pipeline whose source is MQTT: the tasks are created in the store
    (``QUEUED``), then their messages are published to the source topic at QoS 1 with the task
    id (and a delay as ``sluice-not-before``); a submit returns once the broker acknowledged
    them. If publishing fails, the created tasks are removed again, so the same ids may be
    submitted again. A topic no session subscribes to is refused: the broker would drop the
    messages."""

    def __init__(self, config: PipelineConfig, ctx: registry.SubmitContext) -> None:
        source = SPEC.typed(config.source.config)
        if any(c in source.topic for c in "+#"):
            raise Unsupported(f"pipeline {config.name!r} reads the topic filter "
                              f"{source.topic!r}: submitting needs a topic without wildcards")
        check_submittable(config, "task_id_property", source.task_id_property,
                          "publish to its topic")
        from sluice.sinks import mqtt as mqtt_sink  # it imports this module

        self.config = config
        self.store = ctx.store.tasks
        self.sink = mqtt_sink.MqttSink(mqtt_sink.SPEC.typed({
            mqtt_sink.TOPIC: source.topic, mqtt_sink.URL: source.url}), source.url)

    async def submit(self, items: Sequence[registry.Submission]) -> list[TaskRecord | None]:
        now = time.time()

        async def publish(fresh: Sequence[tuple[registry.Submission, SinkRecord]]) -> None:
            await self.sink.publish([(record, now + item.delay_s if item.delay_s else None)
                                     for item, record in fresh])

        return await create_then_publish(self.store, self.config, items, publish,
                                         f"mqtt topic {self.sink.topic!r}")

    async def close(self) -> None:
        await self.sink.close()


def _check(config: Any, _file: Path | None) -> list[tuple[tuple[str, ...], str]]:
    problems: list[tuple[tuple[str, ...], str]] = []
    if isinstance(config, dict) and config.get(SHARED, True) and str(
            config.get(TOPIC, "")).startswith("$share/"):
        problems.append(((TOPIC,), "give the plain topic: the source adds $share/<group>/ "
                                   "itself (shared: true)"))
    return problems


SPEC = registry.register(registry.ComponentSpec(
    family="source",
    name=NAME,
    summary="An MQTT v5 topic filter read at QoS 1 through persistent sessions, shared by the "
            "pipeline's workers ($share/<group>/<topic>); a message is acknowledged once its "
            "task's end is recorded.",
    config=CONFIG,
    factory=build_source,
    settings=MqttSourceConfig.from_mapping,
    extra="mqtt",
    check=_check,
    capabilities=frozenset({registry.Capability.SUBMIT,
                            registry.Capability.DELAYED_REDELIVERY}),
    submitter=MqttSubmitter,
))
