"""What the MQTT source, sink and submitter share: the lazy import of aiomqtt, the broker URL,
MQTT v5 properties (the task id, headers and key as user properties), one connection that
reconnects by itself (:class:`Connection`), and the one place the library's errors become
sluice's (:func:`connect_error`, :func:`publish_error`).

aiomqtt (over paho-mqtt) is an optional dependency (``pip install 'sluice[mqtt]'``): nothing here
imports it at module import. aiomqtt 2.x has no manual acknowledgement, so :class:`Connection`
subclasses its client (tested with aiomqtt 2.5, paho-mqtt 2.2) to turn paho's ``manual_ack``
on, to take PUBLISH packets as paho hands them over (with their DUP flag and packet id), to read
the CONNACK's session-present flag, and to read the reason code of each PUBACK.

Invariants of a :class:`Connection`:

1. MQTT v5 only (user properties, session expiry, receive maximum, PUBACK reason codes).
2. Each connection attempt is a new client object, numbered by ``epoch``: a packet id belongs
   to the epoch it arrived in, and an acknowledgement is sent only in that epoch (after a
   reconnect the broker resends what was not acknowledged, with the same packet ids).
3. The first connection is made by :meth:`Connection.open`, which raises a clear error naming
   the broker (unreachable: :class:`Unavailable`; refused credentials or client id:
   :class:`Misconfigured`). After that, a lost connection is remade by a supervisor task with
   capped exponential backoff, forever until :meth:`Connection.close`; it logs one warning when
   the outage starts and one info line when it ends, never a line per attempt.
4. Publishing is at QoS 1 and returns once the broker's PUBACK came back, with its reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import glob
import logging
import os
import random
import re
import ssl
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.connectors.outage import OutageLog
from sluice.errors import DeliveryError, Misconfigured, MissingDependency, SourceError, Unavailable

log = logging.getLogger("sluice.mqtt")

URL_PATTERN = r"^mqtts?://([^@/\s]+@)?[^:/\s@]+(:[0-9]{1,5})?/?$"
DEFAULT_URL = "mqtt://127.0.0.1:1883"

TASK_ID_PROPERTY = "sluice-task-id"
KEY_PROPERTY = "sluice-key"
NOT_BEFORE_PROPERTY = "sluice-not-before"  # epoch seconds: a sluice source holds it until then

CONNECT_TIMEOUT_S = 10.0
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0  # the cap of the reconnect backoff (doubling from RECONNECT_FIRST_S)
PUBLISH_TIMEOUT_S = 30.0

# PUBACK / CONNACK reason codes (MQTT v5, 3.4.2.1 and 3.2.2.2).
NO_MATCHING_SUBSCRIBERS = 0x10
PERMANENT_PUBLISH_REASONS = {0x87: "not authorized", 0x90: "topic name invalid",
                             0x95: "packet too large", 0x99: "payload format invalid"}
PERMANENT_CONNECT_REASONS = {0x84, 0x85, 0x86, 0x87, 0x8C, 0x95}  # version, client id, auth


def load() -> Any:
    """The aiomqtt module, or :class:`MissingDependency` naming the ``mqtt`` extra."""
    try:
        import aiomqtt
    except ImportError:
        raise MissingDependency("aiomqtt", "mqtt") from None
    return aiomqtt


@dataclass(frozen=True, slots=True)
class Address:
    """A broker's address from its URL: ``mqtt://[user:password@]host[:port]`` (``mqtts://``:
    TLS with the system's certificates)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:  # never the password
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> Address:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise Misconfigured(f"not an MQTT broker URL: {url!r} (expected mqtt://host:port)")
    tls = parts.scheme == "mqtts"
    return Address(parts.hostname, parts.port or (8883 if tls else 1883), tls,
                   urllib.parse.unquote(parts.username) if parts.username else None,
                   urllib.parse.unquote(parts.password) if parts.password else None)


def same_broker(a: str, b: str) -> bool:
    try:
        x, y = parse_url(a), parse_url(b)
    except Misconfigured:
        return False
    return (x.host, x.port, x.tls) == (y.host, y.port, y.tls)


# -- properties --------------------------------------------------------------------------------

def properties(packet: str, **values: Any) -> Any:
    """paho Properties of a packet type (``CONNECT``, ``PUBLISH``, ``DISCONNECT``)."""
    load()
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(getattr(PacketTypes, packet))  # type: ignore[no-untyped-call]
    for name, value in values.items():
        if value is not None:
            setattr(props, name, value)
    return props


def publish_properties(task_id: str | None, content_type: str | None,
                       headers: Mapping[str, str], key: str | None = None,
                       not_before: float | None = None) -> Any:
    """A PUBLISH's properties: content type, and the headers, task id, key and not-before time
    as user properties."""
    user = [(k, v) for k, v in headers.items()
            if k not in (TASK_ID_PROPERTY, KEY_PROPERTY, NOT_BEFORE_PROPERTY)]
    if task_id is not None:
        user.append((TASK_ID_PROPERTY, task_id))
    if key is not None:
        user.append((KEY_PROPERTY, key))
    if not_before is not None:
        user.append((NOT_BEFORE_PROPERTY, f"{not_before:.3f}"))
    return properties("PUBLISH", ContentType=content_type or None, UserProperty=user or None)


def read_properties(message: Any) -> tuple[str | None, dict[str, str]]:
    """A received PUBLISH's content type and user properties (a repeated one: its last)."""
    props = getattr(message, "properties", None)
    if props is None:
        return None, {}
    content_type = getattr(props, "ContentType", None)
    user = getattr(props, "UserProperty", None) or []
    return content_type, {str(k): str(v) for k, v in user}


# -- errors (the one place aiomqtt's and paho's errors are mapped) -----------------------------

def connect_error(address: Address, what: str, exc: BaseException) -> SourceError:
    """A failed connection to ``address`` as sluice's error: a refusal for credentials, client
    id or protocol is :class:`Misconfigured`; anything else (refused, reset, timed out) is an
    outage, :class:`Unavailable`."""
    load()
    from aiomqtt.exceptions import MqttConnectError

    code = getattr(getattr(exc, "rc", None), "value", getattr(exc, "rc", None))
    if isinstance(exc, MqttConnectError) and code in PERMANENT_CONNECT_REASONS:
        return Misconfigured(f"{what}: the MQTT broker at {address} refused the connection: "
                             f"{exc}; check the url's credentials and the client id")
    return Unavailable(f"{what}: cannot reach the MQTT broker at {address}: {exc}; is it "
                       "running? (start it, or correct the url)")


def publish_error(topic: str, address: Address, reason: int, what: str) -> DeliveryError:
    """A PUBACK reason code of 0x80 or more (or no subscriber) as a :class:`DeliveryError`."""
    name = PERMANENT_PUBLISH_REASONS.get(reason)
    if reason == NO_MATCHING_SUBSCRIBERS:
        return DeliveryError(f"{what}: no session subscribes to topic {topic!r} on {address}: "
                             "the broker dropped the message (an MQTT broker keeps messages "
                             "only for subscribed sessions)")
    return DeliveryError(f"{what}: the broker at {address} refused a message to {topic!r}: "
                         f"reason 0x{reason:02x} {name or ''}".rstrip(),
                         permanent=name is not None)


# -- one connection ----------------------------------------------------------------------------

OnMessage = Callable[["Connection", Any, int], None]  # (connection, paho message, epoch)
OnConnect = Callable[["Connection", bool], Awaitable[None]]  # (connection, session present)


@functools.cache
def _client_class() -> Any:
    """aiomqtt's client with the hooks of the module docstring."""
    import aiomqtt

    class HookedClient(aiomqtt.Client):
        owner: Connection
        epoch: int

        def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any = None) -> None:
            self.owner._connack(self, bool(getattr(flags, "session_present", False)),
                                properties, getattr(reason_code, "value", reason_code) == 0)
            super()._on_connect(client, userdata, flags, reason_code, properties)

        def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                           properties: Any = None) -> None:
            super()._on_disconnect(client, userdata, flags, reason_code, properties)
            self.owner._lost(self)

        def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
            self.owner._message(self, message)

        def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any,
                        properties: Any) -> None:
            self.owner._puback(self, mid, int(getattr(reason_code, "value", 0) or 0))

    return HookedClient


class Connection:
    """One MQTT v5 client session that reconnects by itself (see the module invariants)."""

    def __init__(self, address: Address, client_id: str, *, what: str,
                 persistent: bool = False, session_expiry_s: int = 0,
                 receive_maximum: int | None = None, keepalive_s: int = 30,
                 on_message: OnMessage | None = None, on_connect: OnConnect | None = None,
                 manual_ack: bool = False) -> None:
        self.address = address
        self.client_id = client_id
        self.what = what
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self.on_message = on_message
        self.on_connect = on_connect
        self.manual_ack = manual_ack
        self.epoch = 0
        self.session_present = False
        self.connected = asyncio.Event()
        self._client: Any = None
        self._publishes: dict[int, asyncio.Future[int]] = {}
        self._down = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self.outage = OutageLog(what, log)

    # -- opening, losing and remaking ---------------------------------------------------------

    async def open(self) -> None:
        """The first connection (invariant 3): raises a clear error if it cannot be made."""
        if self._supervisor is not None:
            return
        try:
            await self._connect()
        except SourceError:
            raise
        except Exception as exc:
            raise connect_error(self.address, self.what, exc) from None
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt {self.what}")

    async def _connect(self) -> None:
        aiomqtt = load()
        client = _client_class()(
            self.address.host, self.address.port, identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=not self.persistent,
            keepalive=self.keepalive_s, timeout=CONNECT_TIMEOUT_S,
            username=self.address.username, password=self.address.password,
            tls_context=ssl.create_default_context() if self.address.tls else None,
            properties=properties(
                "CONNECT", SessionExpiryInterval=self.session_expiry_s if self.persistent else 0,
                ReceiveMaximum=self.receive_maximum))
        client.owner = self
        client.epoch = self.epoch + 1
        client.pending_calls_threshold = 1 << 30  # batches of publishes are the normal case
        client._client.manual_ack_set(self.manual_ack)
        self._client = client
        self.epoch = client.epoch
        self._down.clear()
        try:
            await client.__aenter__()
        except BaseException:
            self._client = None
            raise
        # aiomqtt may end a connection without paho's on_disconnect (a read error)
        client._disconnected.add_done_callback(lambda _: self._lost(client))
        if self._down.is_set():  # lost again at once
            raise Unavailable(f"{self.what}: the connection to {self.address} closed at once")
        self.connected.set()
        if self.on_connect is not None:
            await self.on_connect(self, self.session_present)

    async def _supervise(self) -> None:
        while not self._closing:
            await self._down.wait()
            if self._closing:
                return
            self.outage.down(f"lost the connection to {self.address}")
            delay_s = RECONNECT_FIRST_S
            while not self._closing:
                await self._drop_client()
                try:
                    await self._connect()
                    break
                except Exception as exc:  # an outage: tried again, quietly (invariant 3)
                    self.outage.down(exc)
                await asyncio.sleep(delay_s * random.uniform(0.8, 1.0))
                delay_s = min(delay_s * 2, RECONNECT_MAX_S)
            if not self._closing:
                self.outage.up()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        for future in self._publishes.values():
            if not future.done():
                future.set_exception(Unavailable(f"{self.what}: lost the MQTT broker at "
                                                 f"{self.address} before its PUBACK"))
        self._publishes.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.__aexit__(None, None, None), 1.0)
            gone = client._disconnected
            if gone.done() and not gone.cancelled():
                gone.exception()  # retrieved: a lost connection is reported by the supervisor

    # -- the client's hooks (on the event loop) -------------------------------------------------

    def _connack(self, client: Any, session_present: bool, props: Any, ok: bool) -> None:
        if client is not self._client:
            return
        self.session_present = session_present
        if ok:  # the resent messages come right after: they may be acknowledged at once
            self.connected.set()
        server_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
        if server_max:  # paho does not follow the server's receive maximum by itself (nor
            # lets it be set once connected: nothing is in flight yet at the CONNACK)
            client._client._max_inflight_messages = int(server_max)

    def _lost(self, client: Any) -> None:
        if client is self._client:
            self.connected.clear()
            self._down.set()

    def _message(self, client: Any, message: Any) -> None:
        if client is self._client and self.on_message is not None:
            self.on_message(self, message, client.epoch)

    def _puback(self, client: Any, mid: int, reason: int) -> None:
        if client is not self._client:
            return
        future = self._publishes.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(reason)

    # -- what users of a connection call ------------------------------------------------------

    def ack(self, mid: int, epoch: int) -> bool:
        """PUBACK a message of ``epoch``; False when that connection is gone (invariant 2)."""
        client = self._client
        if client is None or client.epoch != epoch or not self.connected.is_set():
            return False
        client._client.ack(mid, 1)
        return True

    async def publish(self, topic: str, payload: bytes, props: Any,
                      timeout_s: float = PUBLISH_TIMEOUT_S) -> int:
        """Publish at QoS 1; the PUBACK's reason code (invariant 4). Raises
        :class:`Unavailable` when not connected or when the PUBACK does not come."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise Unavailable(f"{self.what}: not connected to the MQTT broker at "
                              f"{self.address}")
        info = client._client.publish(topic, payload, 1, False, props)
        if info.rc != 0:
            raise Unavailable(f"{self.what}: cannot publish to {topic!r} on {self.address} "
                              f"(paho rc {info.rc})")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._publishes[info.mid] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise Unavailable(f"{self.what}: no PUBACK from {self.address} for a message to "
                              f"{topic!r} in {timeout_s:g}s") from None
        finally:
            self._publishes.pop(info.mid, None)

    async def subscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is None:
            raise Unavailable(f"{self.what}: not connected to {self.address}")
        codes = await client.subscribe(topic_filter, qos=1)
        code = codes[0] if codes else None
        value = int(getattr(code, "value", code if isinstance(code, int) else 0))
        if value >= 0x80:
            raise Misconfigured(f"{self.what}: the MQTT broker at {self.address} refused the "
                                f"subscription to {topic_filter!r}: {code}")

    async def unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None:
            await client.unsubscribe(topic_filter)

    async def round_trip(self) -> None:
        """One request answered by the broker: whatever it sent before is received by then."""
        client = self._client
        if client is not None and self.connected.is_set():
            with contextlib.suppress(Exception):
                await client.unsubscribe(f"sluice/_nothing/{self.client_id}", timeout=2.0)

    async def close(self) -> None:
        """Disconnect (a persistent session stays with the broker for its expiry)."""
        self._closing = True
        self._down.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        await self._drop_client()


async def wipe_session(address: Address, client_id: str) -> None:
    """Make the broker forget the session of ``client_id`` (and what it queued for it)."""
    conn = Connection(address, client_id, what=f"ending the session {client_id}")
    await conn.open()
    await conn.close()


# -- client id slots ---------------------------------------------------------------------------
#
# A worker's client id is ``<base>-<n>``, n the lowest slot whose lock file it could lock (in the
# data directory, under mqtt/). The lock lasts as long as the process holds the file open, so a
# worker restarted on the same data directory takes its predecessor's slot, and with it its
# session (what the broker kept for it). A slot's file stays after its worker has gone: it tells
# the workers still running that a session may be left there to take over.

def slot_dir(data_dir: Path | None) -> Path:
    root = data_dir if data_dir is not None else Path(tempfile.gettempdir()) / "sluice"
    return root / "mqtt"


def slot_path(directory: Path, base: str, n: int) -> Path:
    return directory / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', base)}.{n}.lock"


def try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its lock, or ``None`` if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not removed meanwhile
    except (BlockingIOError, FileNotFoundError):
        same = False
    if not same:
        os.close(fd)
        return None
    return fd


def take_slot(directory: Path, base: str) -> tuple[int, int]:
    """The lowest free slot of ``base``: (its number, the descriptor holding its lock)."""
    n = 0
    while True:
        fd = try_lock(slot_path(directory, base, n))
        if fd is not None:
            return n, fd
        n += 1


def other_slots(directory: Path, base: str) -> list[int]:
    """The slots of ``base`` that have a file (held or left)."""
    prefix = slot_path(directory, base, 0).name[:-len("0.lock")]
    out = []
    for path in directory.glob(f"{glob.escape(prefix)}*.lock"):
        middle = path.name[len(prefix):-len(".lock")]
        if middle.isdigit():
            out.append(int(middle))
    return sorted(out)


def release_slot(fd: int, path: Path | None = None) -> None:
    """Let go of a slot; with ``path``, its file is removed first (no session left there)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    os.close(fd)
