"""What the RabbitMQ source, sink and submitter share: the lazy import of aio-pika, the
connection that comes back by itself (:class:`Link`), the queue topology (quorum or classic
queues, key shards, per-delay retry queues) and the one place the library's errors become
sluice's (:func:`map_amqp_errors`).

Invariants:

1. A :class:`Link` is one AMQP connection. Its first open (``start``) raises: ``Unavailable``
   when the broker cannot be reached, ``Misconfigured`` when it refuses the credentials, the
   virtual host, or the topology (a queue missing under ``topology: check``, a queue declared
   with other arguments). Once started, a lost connection (or a channel the broker closed) is
   opened again, forever while the process runs, with capped exponential backoff: one warning
   when the outage starts, one info line when it ends, never a line per attempt.
2. Each open bumps ``generation``: a delivery tag belongs to the channel of its generation, and
   a settlement for an older one is dropped (the broker has requeued that delivery already).
3. Retry delays are queues of their own: ``<queue>.delay.<ms>`` holds its messages for ``ms``
   (``x-message-ttl``), then dead-letters them back to ``<queue>`` (``x-dead-letter-exchange``
   "", routing key ``<queue>``; at least once on quorum queues). A delay is rounded up to two
   significant digits of milliseconds (at most +10%, never early), so few queues exist, and an
   unused one is deleted by the broker (``x-expires``: twice its delay plus a minute, renewed
   by each declare, so a queue never expires with a message in it).
4. Key shards: ``shards: N`` makes ``N`` single-active-consumer queues ``<queue>.k0`` ..
   ``<queue>.k{N-1}``; a message with key ``k`` goes to shard ``crc32(utf8(k)) % N`` (without a
   key: ``crc32(task id) % N``); every publisher of sluice (sink, submitter) routes so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from sluice.connectors.base import SinkRecord
from sluice.errors import Misconfigured, MissingDependency, SourceError, Unavailable
from sluice.spec import Field

log = logging.getLogger("sluice.rabbitmq")

CONNECT_TIMEOUT_S = 10.0
INITIAL_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
DELAY_QUEUE_MARGIN_MS = 60_000
QUORUM, CLASSIC = "quorum", "classic"
DECLARE, CHECK = "declare", "check"
TASK_ID_HEADER = "sluice-task-id"
KEY_HEADER = "sluice-key"
DELIVERIES_HEADER = "sluice-deliveries"  # deliveries before a retry's copy was published
QUEUE_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
URL_PATTERN = r"^amqps?://"

URL, QUEUE, QUEUE_TYPE, SHARDS = "url", "queue", "queue_type", "shards"
QUEUE_ARGUMENTS = "queue_arguments"


def url_field(what: str) -> Field:
    return Field(URL, "string", f"AMQP URL of the broker, amqp[s]://user:password@host:port/"
                 f"vhost ({what}); use ${{ENV}} for the password.", default=None,
                 pattern=URL_PATTERN)


def queue_type_field() -> Field:
    return Field(QUEUE_TYPE, "string", "Type of the queues sluice declares (x-queue-type): "
                 "quorum (replicated, durable, counts redeliveries) or classic.",
                 default=QUORUM, enum=(QUORUM, CLASSIC))


def shards_field() -> Field:
    return Field(SHARDS, "integer", "Key shards: 0 for one queue; N for N single-active-"
                 "consumer queues <queue>.k0..k{N-1}, a message going to shard "
                 "crc32(key) % N, so one consumer at a time reads a key's messages, in order.",
                 default=0, minimum=0, maximum=1024)


def queue_arguments_field() -> Field:
    return Field(QUEUE_ARGUMENTS, "object", "Extra queue arguments for the queues sluice "
                 "declares (e.g. x-delivery-limit, x-max-length); they override sluice's own.",
                 default=None)


def aio_pika() -> ModuleType:
    """The aio_pika module, or :class:`MissingDependency` naming the ``rabbitmq`` extra."""
    try:
        import aio_pika as module
    except ImportError:
        raise MissingDependency("aio-pika", "rabbitmq") from None
    driver = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _ReportedByLink) for f in driver.filters):
        driver.addFilter(_ReportedByLink())
    return module


class _ReportedByLink(logging.Filter):
    """Drops aiormq's own lines about a connection failing or lost: a :class:`Link` reports
    each outage once, by itself (rule 1); aiormq would add a line per attempt."""

    PREFIXES = ("error when creating transport", "Unexpected connection close from remote",
                "Cancelling cause reader exited abnormally", "Server connection")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def where(url: str) -> str:
    """The broker's address for messages: ``host:port/vhost``, without the credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    vhost = parts.path[1:] if len(parts.path) > 1 else "/"
    return f"{parts.scheme}://{host}:{port} (vhost {vhost})"


# -- errors ---------------------------------------------------------------------------------

def amqp_error(what: str, exc: BaseException) -> SourceError:
    """A driver error as sluice's (rule 1): permanent ones (credentials, vhost, a missing or
    differently declared queue, access) are ``Misconfigured``, the rest ``Unavailable``."""
    import aiormq.exceptions as ex

    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, ex.ProbableAuthenticationError | ex.AuthenticationError):
        return Misconfigured(f"{what}: the broker refused the credentials ({_text(exc)}); "
                             "check the user and password in the url")
    if isinstance(exc, ex.ConnectionNotAllowed):
        return Misconfigured(f"{what}: the broker refused the virtual host ({_text(exc)}); "
                             "check the vhost in the url and the user's permissions")
    if isinstance(exc, ex.ChannelNotFoundEntity):
        return Misconfigured(f"{what}: {_text(exc)}; create it, or set topology: declare "
                             "to have sluice declare it")
    if isinstance(exc, ex.ChannelPreconditionFailed | ex.ChannelAccessRefused |
                  ex.IncompatibleProtocolError):
        return Misconfigured(f"{what}: {_text(exc)}")
    if isinstance(exc, OSError | TimeoutError | ex.AMQPError | ex.ChannelInvalidStateError):
        return Unavailable(f"{what}: {_text(exc)}; is the broker running there?")
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")


def _text(exc: BaseException) -> str:
    args = [a for a in getattr(exc, "args", ()) if a not in (None, "")]
    detail = args[-1] if args else exc
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    return f"{type(exc).__name__}: {detail}"


@contextmanager
def map_amqp_errors(what: str) -> Iterator[None]:
    """Run a block of aio-pika calls; a driver error out of it becomes :func:`amqp_error`."""
    try:
        yield
    except SourceError:
        raise
    except (OSError, TimeoutError, RuntimeError) as exc:
        raise amqp_error(what, exc) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("aiormq", "aio_pika", "pamqp")):
            raise amqp_error(what, exc) from None
        raise


# -- the connection -------------------------------------------------------------------------

OnOpen = Callable[[Any], Awaitable[None]]


class Link:
    """One AMQP connection, opened again whenever it is lost (rules 1-2)."""

    def __init__(self, url: str, what: str, on_open: OnOpen) -> None:
        self.url = url
        self.what = what
        self.where = where(url)
        self._on_open = on_open
        self.connection: Any = None
        self.generation = 0
        self._up = asyncio.Event()
        self._closed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        self._lost_callbacks: list[Callable[[], None]] = []

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (synchronously) each time the connection is lost."""
        self._lost_callbacks.append(callback)

    async def start(self) -> None:
        """The first open: raises what keeps it from opening (rule 1)."""
        if self.connection is None and not self._closed:
            await self._open()

    async def _open(self) -> None:
        pika = aio_pika()
        with map_amqp_errors(f"{self.what}: cannot connect to RabbitMQ at {self.where}"):
            connection = await pika.connect(self.url, timeout=CONNECT_TIMEOUT_S,
                                            client_properties={"connection_name": self.what})
        self.generation += 1  # before on_open: deliveries may arrive while it consumes
        try:
            with map_amqp_errors(f"{self.what} on RabbitMQ at {self.where}"):
                await self._on_open(connection)
        except BaseException:
            await _quietly(connection.close())
            raise
        self.connection = connection
        connection.close_callbacks.add(self._connection_closed)
        self._up.set()

    def watch(self, channel: Any) -> None:
        """A channel of this connection: the broker closing it counts as a lost connection
        (its deliveries are requeued; everything is opened again)."""
        channel.close_callbacks.add(self._channel_closed)

    def _channel_closed(self, channel: Any, exc: BaseException | None = None) -> None:
        if self._closed or channel is None or self.connection is None:
            return
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            self._lost(exc)
            asyncio.get_running_loop().create_task(_quietly(self.connection.close()))

    def _connection_closed(self, connection: Any, exc: BaseException | None = None) -> None:
        if connection is self.connection:
            self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if self._closed or not self._up.is_set():
            return
        self._up.clear()
        self._down_since = time.monotonic()
        log.warning("%s: lost RabbitMQ at %s (%s); reconnecting in the background",
                    self.what, self.where, _text(exc) if exc else "closed")
        for callback in self._lost_callbacks:
            callback()
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = INITIAL_BACKOFF_S
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._open()
            except SourceError as exc:
                log.debug("%s: reconnect failed: %s", self.what, exc)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            down_s = time.monotonic() - (self._down_since or time.monotonic())
            log.info("%s: RabbitMQ at %s is back (after %.1fs)", self.what, self.where, down_s)
            return

    async def wait_up(self, timeout_s: float) -> bool:
        if self._up.is_set():
            return True
        try:
            await asyncio.wait_for(self._up.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closed = True
        self._up.clear()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await _quietly(self._reconnecting)
            self._reconnecting = None
        connection, self.connection = self.connection, None
        if connection is not None:
            await _quietly(connection.close())


async def _quietly(awaitable: Awaitable[Any]) -> None:
    with suppress(Exception, asyncio.CancelledError):  # closing: whatever it raises
        await awaitable


# -- topology -------------------------------------------------------------------------------

def queue_arguments(queue_type: str, extra: Mapping[str, Any] | None = None, *,
                    single_active: bool = False) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": queue_type}
    if single_active:
        args["x-single-active-consumer"] = True
    args.update(extra or {})
    return args


def shard_queues(queue: str, shards: int) -> list[str]:
    """The queues a pipeline's messages live in (rule 4)."""
    return [queue] if shards <= 0 else [f"{queue}.k{i}" for i in range(shards)]


def shard_of(queue: str, shards: int, key: str | None, task_id: str) -> str:
    """The queue a message goes to (rule 4)."""
    if shards <= 0:
        return queue
    return f"{queue}.k{zlib.crc32((key or task_id).encode()) % shards}"


def delay_ms(delay_s: float) -> int:
    """A delay in ms, rounded up to two significant digits (rule 3)."""
    ms = max(1, math.ceil(delay_s * 1000 - 1e-6))
    if ms < 100:
        return ms
    unit = 10 ** (len(str(ms)) - 2)
    return int(math.ceil(ms / unit) * unit)


def delay_queue(queue: str, ms: int) -> str:
    return f"{queue}.delay.{ms}"


def delay_arguments(queue: str, ms: int, queue_type: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-expires": 2 * ms + DELAY_QUEUE_MARGIN_MS,
    }
    if queue_type == QUORUM:  # dead-lettered at least once (not lost in a broker crash)
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


class Topology:
    """Declares (or checks) queues on one channel; remembers what it declared."""

    def __init__(self, queue_type: str, extra: Mapping[str, Any] | None, *,
                 declare: bool = True) -> None:
        self.queue_type = queue_type
        self.extra = dict(extra or {})
        self.declare = declare
        self._delays: dict[str, tuple[str, int, float]] = {}  # name → (target, ms, declared)

    async def main(self, channel: Any, queue: str, *, single_active: bool = False) -> int:
        """Declare or check a pipeline's queue: its ready messages."""
        if self.declare:
            q = await channel.declare_queue(queue, durable=True, arguments=queue_arguments(
                self.queue_type, self.extra, single_active=single_active))
        else:
            q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)

    async def delay(self, channel: Any, queue: str, ms: int) -> str:
        """The delay queue of ``ms`` for ``queue``, declared (again when half its expiry has
        passed since this process last declared it: rule 3)."""
        name = delay_queue(queue, ms)
        now = time.monotonic()
        known = self._delays.get(name)
        if known is None or now - known[2] > (2 * ms + DELAY_QUEUE_MARGIN_MS) / 2000.0:
            await channel.declare_queue(name, durable=True,
                                        arguments=delay_arguments(queue, ms, self.queue_type))
            self._delays[name] = (queue, ms, now)
        return name

    async def delayed(self, channel: Any) -> int:
        """Messages waiting in the delay queues this process used (declared again: it
        renews their expiry and answers their counts)."""
        total = 0
        for name, (queue, ms, _) in list(self._delays.items()):
            q = await channel.declare_queue(name, durable=True,
                                            arguments=delay_arguments(queue, ms,
                                                                      self.queue_type))
            self._delays[name] = (queue, ms, time.monotonic())
            total += int(q.declaration_result.message_count or 0)
        return total


# -- messages -------------------------------------------------------------------------------

def message(record: SinkRecord, *, key_header: str = KEY_HEADER,
            task_id_header: str = TASK_ID_HEADER, deliveries: int | None = None) -> Any:
    """A record as a persistent AMQP message: its headers, with the task id and the key in
    theirs, the task id as message_id."""
    pika = aio_pika()
    headers: dict[str, Any] = {**record.headers, task_id_header: record.task_id}
    if record.key is not None:
        headers[key_header] = record.key
    if deliveries is not None:
        headers[DELIVERIES_HEADER] = deliveries
    return pika.Message(record.body, headers=headers, content_type=record.content_type,
                        message_id=record.task_id, delivery_mode=pika.DeliveryMode.PERSISTENT,
                        timestamp=datetime.now().astimezone())


def header_text(value: Any) -> str | None:
    """A header value as text; ``None`` for a table or a list (x-death)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return None
