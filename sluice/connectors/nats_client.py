"""What the NATS JetStream source, sink and submitter share: the lazy import of nats-py, one
connection per component (reconnecting by itself, two log lines per outage), the stream check
(a missing stream is a clear error, or created when asked), subjects for keys, and the one
place nats-py's errors become sluice's (:func:`nats_error`).

nats-py is an optional dependency (``pip install 'sluice[nats]'``): nothing here imports it at
module import, so the schema and ``sluice connectors`` cover NATS on every install.

Rules:

1. Each component (a source, a sink, a submitter) has a connection of its own. Its first
   connect is bounded (every server of ``url`` tried twice, ``connect_timeout_s`` each) and
   fails with :class:`~sluice.errors.Unavailable` (:class:`~sluice.errors.Misconfigured`
   for refused credentials) naming the address. Once connected, nats-py reconnects by
   itself, forever, with capped exponential backoff (:func:`_next_server`).
2. An outage is logged twice per connection: a warning when the connection is lost
   (nats-py's disconnected callback) and one line when it is back (its reconnected callback).
   nats-py's per-attempt errors (its error callback) are logged at DEBUG only, and its own
   default error logging is replaced.
3. Keys and subjects: a keyed record is published to ``<subject>.<key>`` when the key is a
   valid subject suffix, else to ``<subject>.~<sha256 of the key, 16 hex digits>``, and
   always with the exact key in the ``sluice-key`` header; a record without a key goes to
   ``<subject>``. A source reads the key from ``sluice-key``, else from the subject's tokens
   after its ``subject`` (a message a plain NATS client published to ``orders.user-1`` has
   the key ``user-1``), else none.
4. Every publish waits for JetStream's PubAck, and carries ``Nats-Msg-Id`` = the task id: a
   publish made again within the stream's duplicate window (after a timeout, a crash) is
   stored once (the PubAck says ``duplicate``).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from sluice.errors import DeliveryError, Misconfigured, MissingDependency, SourceError, Unavailable
from sluice.spec import REQUIRED, Field, ObjectSpec, Settings

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

    from sluice.connectors.base import SinkRecord

log = logging.getLogger("sluice.nats")

API_TIMEOUT_S = 5.0  # one JetStream API request (stream and consumer info, create)
FIRST_BACKOFF_S = 0.1  # reconnect backoff: 0.1, 0.2, 0.4 ... s (rule 1)
MAX_BACKOFF_S = 2.0
CONNECT_ATTEMPTS = 2  # per server, at the first connect (rule 1)

TASK_ID_HEADER, KEY_HEADER, CONTENT_TYPE_HEADER = "sluice-task-id", "sluice-key", "content-type"
MSG_ID_HEADER = "Nats-Msg-Id"

URL, STREAM, SUBJECT, CREATE_STREAM = "url", "stream", "subject", "create_stream"
CONNECT_TIMEOUT_S = "connect_timeout_s"
SUBJECTS, RETENTION, STORAGE = "subjects", "retention", "storage"
MAX_AGE_S, DUPLICATE_WINDOW_S, REPLICAS = "max_age_s", "duplicate_window_s", "replicas"

URL_PATTERN = r"^\s*(nats|tls)://[^,\s]+(\s*,\s*(nats|tls)://[^,\s]+)*\s*$"
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,255}$"  # a stream or a durable consumer
SUBJECT_PATTERN = r"^[^\s.*>]+(\.[^\s.*>]+)*$"  # a subject to publish to: no wildcards
FILTER_PATTERN = r"^[^\s.]+(\.[^\s.]+)*$"  # a subject that may hold wildcards
_KEY_SUFFIX = re.compile(SUBJECT_PATTERN)


# -- config shared by the source and the sink ------------------------------------------------

def url_field(default_doc: str, *, required: bool) -> Field:
    return Field(URL, "string", "NATS server URL(s), nats://[user:password@]host:port (tls:// "
                 f"for TLS), comma-separated for a cluster; credentials may come from "
                 f"${{ENV}}.{default_doc}", default=REQUIRED if required else None,
                 pattern=URL_PATTERN)


def connect_timeout_field() -> Field:
    return Field(CONNECT_TIMEOUT_S, "number", "Time limit of one connection attempt at start "
                 "(each server is tried twice); once connected, the client reconnects by "
                 "itself for as long as the process runs.", default=5.0, exclusive_minimum=0)


def create_stream_spec(retention: str) -> ObjectSpec:
    return ObjectSpec(
        Field(SUBJECTS, "array", "Subjects the stream stores; default: the subject and "
              "<subject>.> (its keyed subjects).", default=None,
              items=Field("subject", "string", "A subject (wildcards allowed).",
                          pattern=FILTER_PATTERN)),
        Field(RETENTION, "string", "limits: messages stay until max_age_s; workqueue: a "
              "message is removed once acknowledged; interest: once every consumer "
              "acknowledged it.", default=retention, enum=("limits", "workqueue", "interest")),
        Field(STORAGE, "string", "Where the server keeps the stream.", default="file",
              enum=("file", "memory")),
        Field(MAX_AGE_S, "number", "Messages older than this are removed; 0: no limit.",
              default=0.0, minimum=0),
        Field(DUPLICATE_WINDOW_S, "number", "How long a Nats-Msg-Id (the task id) is "
              "remembered: a publish with the same id within it is stored once (at most "
              "max_age_s).",
              default=120.0, exclusive_minimum=0),
        Field(REPLICAS, "integer", "Copies of the stream in a cluster.", default=1,
              minimum=1, maximum=5),
    )


def create_stream_field(what: str, retention: str) -> Field:
    """``create_stream``: ``true`` (defaults) or a mapping of settings; absent or ``false``:
    a missing stream is an error."""
    spec = create_stream_spec(retention)
    description = (f"Create the {what} stream when it does not exist: true (the defaults) or "
                   "a mapping of its settings. Without it, a missing stream is an error. An "
                   "existing stream is used as it is.")
    return Field(CREATE_STREAM, ("boolean", "object"), description, default=False, variants=(
        Field(CREATE_STREAM, "boolean", description),
        Field(CREATE_STREAM, "object", description, fields=spec),
    ))


@dataclass(frozen=True, slots=True)
class CreateStreamConfig(Settings):
    """The typed ``create_stream`` (the keys of :func:`create_stream_spec`)."""

    subjects: list[str] | None
    retention: str
    storage: str
    max_age_s: float
    duplicate_window_s: float
    replicas: int


CS = TypeVar("CS", bound="WithCreateStream")


class WithCreateStream(Settings):
    """Base of a NATS component's typed config (a frozen dataclass declaring ``create_stream``
    among its fields): ``false`` becomes ``None``, ``true`` or a mapping a
    :class:`CreateStreamConfig`."""

    __slots__ = ()
    create_stream: CreateStreamConfig | None

    @classmethod
    def create_stream_spec(cls) -> ObjectSpec:
        """The ``create_stream`` spec whose defaults ``true`` stands for."""
        raise NotImplementedError

    @classmethod
    def from_mapping(cls: type[CS], value: Mapping[str, Any] | CS) -> CS:
        if isinstance(value, Mapping):
            given = value.get(CREATE_STREAM)
            made: CreateStreamConfig | None = None
            if given is True:
                made = CreateStreamConfig.from_mapping(
                    cls.create_stream_spec().apply_defaults({}))
            elif isinstance(given, Mapping):
                made = CreateStreamConfig.from_mapping(
                    cls.create_stream_spec().apply_defaults(given))
            elif isinstance(given, CreateStreamConfig):
                made = given
            value = {**value, CREATE_STREAM: made}
        return super().from_mapping(value)

    def to_mapping(self) -> dict[str, Any]:
        out = super().to_mapping()
        made = self.create_stream
        out[CREATE_STREAM] = False if made is None else made.to_mapping()
        return out


# -- the client library ------------------------------------------------------------------------

def nats_module() -> ModuleType:
    """The nats module, or :class:`MissingDependency` naming the ``nats`` extra."""
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError:
        raise MissingDependency("nats-py", "nats") from None
    return nats


def servers_of(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]


def endpoints(url: str | None) -> list[tuple[tuple[str, ...], str]]:
    """The registry's ``endpoints`` hook of a NATS component: each server of its ``url``."""
    return [((URL,), server) for server in servers_of(url or "")]


def shown(url: str) -> str:
    """``url`` without its credentials (for messages and logs)."""
    out = []
    for server in servers_of(url):
        parts = urlsplit(server)
        host = parts.hostname or ""
        out.append(f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}")
    return ",".join(out)


_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)


def _is_connection_error(exc: BaseException) -> bool:
    import nats.errors as ne

    return isinstance(exc, (*_CONNECTION_ERRORS, ne.StaleConnectionError, ne.NoServersError,
                            ne.ConnectionClosedError, ne.TimeoutError,
                            ne.ConnectionReconnectingError, ne.OutboundBufferLimitError))


def nats_error(what: str, exc: BaseException) -> SourceError:
    """A nats-py error as sluice's, prefixed by ``what`` (the component, its stream and its
    server): :class:`Misconfigured` when retrying cannot help (credentials, permissions, a
    request the server refuses), else :class:`Unavailable` (the one place nats-py's errors
    are mapped)."""
    import nats.errors as ne
    import nats.js.errors as jse

    text = str(exc) or type(exc).__name__
    if _is_refusal(exc):
        return Misconfigured(f"{what}: the server refused the connection ({text}): check the "
                             "credentials and TLS settings in url")
    if isinstance(exc, ne.Error) and "permissions violation" in text.lower():
        return Misconfigured(f"{what}: {text}: the user lacks a permission")
    if isinstance(exc, jse.ServiceUnavailableError):
        return Unavailable(f"{what}: JetStream is not available ({text}); is the server "
                           "running with JetStream on (nats-server -js)?")
    if isinstance(exc, jse.APIError) and (exc.code or 0) < 500:
        return Misconfigured(f"{what}: the server refused the request: {exc.description or text}")
    if isinstance(exc, jse.NoStreamResponseError):
        return Unavailable(f"{what}: no JetStream answer; is JetStream on (nats-server -js)?")
    if _is_connection_error(exc) or isinstance(exc, jse.Error):
        return Unavailable(f"{what}: {text}")
    return Unavailable(f"{what}: {type(exc).__name__}: {text}")


def _is_refusal(exc: BaseException) -> bool:
    """The server refused the connection (credentials, TLS): retrying cannot help."""
    import nats.errors as ne

    return isinstance(exc, (ne.AuthorizationError, ne.SecureConnRequiredError,
                            ne.SecureConnWantedError, ne.SecureConnFailedError,
                            ne.InvalidUserCredentialsError)) or (
        isinstance(exc, ne.Error) and "authorization violation" in str(exc).lower())


def nats_errors() -> tuple[type[BaseException], ...]:
    """The exceptions :func:`nats_error` maps (nats-py's, socket errors and timeouts)."""
    import nats.errors as ne

    return (ne.Error, *_CONNECTION_ERRORS)


# -- one component's connection (rules 1, 2) -----------------------------------------------------

class Connection:
    """A component's own NATS connection: connect once, then nats-py keeps it up."""

    def __init__(self, url: str, what: str, *, connect_timeout_s: float = 5.0,
                 logger: logging.Logger = log) -> None:
        self.url = url
        self.what = what  # "nats source of stream ORDERS", for every line it logs
        self.connect_timeout_s = connect_timeout_s
        self.log = logger
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self._down_since: float | None = None
        self._up_since = 0.0  # when the last outage ended
        self._connect_error: BaseException | None = None  # the last, at the first connect

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "connect() first"
        return self._js

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def closed(self) -> bool:
        return self._closing

    def in_outage(self, after_s: float) -> bool:
        """Whether the connection is down, or came back less than ``after_s`` ago (a request
        sent before it went down fails that much later): its errors are the outage's, which
        was logged once (rule 2)."""
        return self._down_since is not None or time.monotonic() - self._up_since < after_s

    async def connect(self) -> None:
        """Rule 1: a bounded first connect, then reconnection forever."""
        if self.nc is not None:
            return
        nats = nats_module()
        options: dict[str, Any] = {
            "servers": servers_of(self.url),
            "name": f"sluice: {self.what}",
            "connect_timeout": self.connect_timeout_s,
            "allow_reconnect": True,
            "max_reconnect_attempts": CONNECT_ATTEMPTS - 1,  # then forever (below)
            "reconnect_time_wait": FIRST_BACKOFF_S,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        if "reconnect_to_server_handler" in inspect.signature(nats.connect).parameters:
            options["reconnect_to_server_handler"] = _next_server
        else:  # an older nats-py: its fixed wait between attempts
            options["reconnect_time_wait"] = MAX_BACKOFF_S
        try:
            nc = await nats.connect(**options)
        except nats_errors() as exc:
            raise self._start_error(exc) from None
        nc.options["max_reconnect_attempts"] = -1  # rule 1: forever, once connected
        self.nc = nc
        self._js = nc.jetstream(timeout=API_TIMEOUT_S)

    def _start_error(self, exc: BaseException) -> SourceError:
        import nats.errors as ne

        where = f"{self.what}: cannot connect to NATS at {shown(self.url)}"
        if isinstance(exc, ne.NoServersError) and self._connect_error is not None:
            exc = self._connect_error  # why the last attempt failed
        if _is_connection_error(exc):
            return Unavailable(f"{where} (no server answered): start the server (e.g. "
                               "`nats-server -js`), or correct url")
        return nats_error(where, exc)

    async def close(self) -> None:
        self._closing = True
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), API_TIMEOUT_S)
            except Exception as exc:  # closing anyway: nothing is left to do with it
                self.log.debug("%s: closing the connection: %s", self.what, exc)

    async def flush(self, timeout_s: float) -> None:
        """Send what the client buffered (acknowledgements) now, when connected."""
        if self.nc is not None and self.nc.is_connected:
            try:
                await self.nc.flush(timeout=max(int(timeout_s), 1))
            except nats_errors() as exc:
                self.log.debug("%s: flush: %s", self.what, exc)

    # -- nats-py's callbacks (rule 2) ---------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if self.nc is None:  # still at the first connect: its error says why (rule 1)
            if self._connect_error is None or not _is_refusal(self._connect_error):
                self._connect_error = exc
            self.log.debug("%s: %s: %s", self.what, type(exc).__name__, exc)
        elif _is_connection_error(exc) or self._closing:
            self.log.debug("%s: %s: %s", self.what, type(exc).__name__, exc)
        else:
            self.log.warning("%s: %s", self.what, exc)

    async def _on_disconnected(self) -> None:
        if self._closing or self._down_since is not None or self.nc is None:
            return
        self._down_since = time.monotonic()
        self.log.warning("%s: lost the connection to NATS at %s; reconnecting until it is "
                         "back", self.what, shown(self.url))

    async def _on_reconnected(self) -> None:
        since, self._down_since = self._down_since, None
        self._up_since = time.monotonic()
        if since is not None:
            self.log.info("%s: connected to NATS at %s again after %.1fs", self.what,
                          shown(self.url), time.monotonic() - since)

    async def _on_closed(self) -> None:
        if not self._closing and self.nc is not None:
            self.log.warning("%s: the NATS connection closed", self.what)


def _next_server(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py's reconnect hook: the server tried least, after a capped exponential backoff
    (rule 1)."""
    server = min(servers, key=lambda s: s.reconnects)
    tries = int(server.reconnects)
    return server, 0.0 if tries == 0 else min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (tries - 1))


# -- streams -----------------------------------------------------------------------------------

def stream_subjects(create: CreateStreamConfig, subject: str) -> list[str]:
    return list(create.subjects) if create.subjects else [subject, f"{subject}.>"]


CREATE_HINT = "create it, or set create_stream: true to have sluice create it"


async def ensure_stream(conn: Connection, stream: str, subject: str,
                        create: CreateStreamConfig | None,
                        missing_hint: str = CREATE_HINT) -> None:
    """Check that ``stream`` exists (creating it if ``create`` says so): :class:`Misconfigured`
    naming the stream and the server when it is missing, :class:`Unavailable` when the server
    does not answer."""
    import nats.js.api as api
    import nats.js.errors as jse

    where = f"{conn.what} at {shown(conn.url)}"
    try:
        await conn.js.stream_info(stream)
        return
    except jse.NotFoundError:
        pass
    except nats_errors() as exc:
        raise nats_error(f"{where}: cannot read stream {stream!r}", exc) from None
    if create is None:
        raise Misconfigured(f"nats stream {stream!r} does not exist on {shown(conn.url)}; "
                            f"{missing_hint}")
    config = api.StreamConfig(
        name=stream, subjects=stream_subjects(create, subject),
        retention=api.RetentionPolicy(create.retention), storage=api.StorageType(create.storage),
        max_age=create.max_age_s or None,
        # The server refuses a window longer than max_age.
        duplicate_window=min(create.duplicate_window_s, create.max_age_s or math.inf),
        num_replicas=create.replicas)
    try:
        await conn.js.add_stream(config)
    except jse.BadRequestError as exc:
        if exc.err_code == 10058:  # stream name already in use (created meanwhile)
            return
        raise nats_error(f"{where}: cannot create stream {stream!r}", exc) from None
    except nats_errors() as exc:
        raise nats_error(f"{where}: cannot create stream {stream!r}", exc) from None
    conn.log.info("created nats stream %s (subjects %s) on %s", stream,
                  ", ".join(config.subjects or ()), shown(conn.url))


# -- keys and subjects (rule 3) ------------------------------------------------------------------

def key_subject(subject: str, key: str | None) -> str:
    """Where a record with ``key`` is published (rule 3)."""
    if key is None:
        return subject
    if _KEY_SUFFIX.match(key):
        return f"{subject}.{key}"
    return f"{subject}.~{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def key_of(subject: str, message_subject: str, headers: Mapping[str, str]) -> str | None:
    """A message's key (rule 3): its ``sluice-key`` header, else the subject's tokens after
    ``subject``."""
    key = headers.get(KEY_HEADER)
    if key is not None:
        return key
    prefix = f"{subject}."
    if message_subject.startswith(prefix) and len(message_subject) > len(prefix):
        return message_subject[len(prefix):]
    return None


def record_headers(record: SinkRecord) -> dict[str, str]:
    """A record's NATS headers: its own (without JetStream's ``Nats-*`` headers of the message
    it came from), with ``content-type``, ``sluice-task-id``, the key and ``Nats-Msg-Id``
    (rules 3, 4)."""
    own = {k: v for k, v in record.headers.items() if not k.lower().startswith("nats-")}
    headers = {CONTENT_TYPE_HEADER: record.content_type, **own,
               TASK_ID_HEADER: record.task_id, MSG_ID_HEADER: record.task_id}
    if record.key is not None:
        headers[KEY_HEADER] = record.key
    return headers


# -- publishing (rule 4) -------------------------------------------------------------------------

# JetStream API error codes that retrying the same publish cannot cure.
PERMANENT_PUBLISH_ERRORS = frozenset({
    10054,  # maximum messages exceeded (discard new)
    10060,  # expected stream does not match
    10077,  # message size exceeds maximum allowed
})


async def publish(conn: Connection, stream: str, subject: str, records: Sequence[SinkRecord],
                  timeout_s: float, *, key_in_subject: bool = True) -> None:
    """Publish ``records`` and wait for every PubAck (rule 4); :class:`DeliveryError` naming
    how many failed (``permanent`` when every failure would recur)."""
    js = conn.js

    async def send_all() -> list[Any]:
        acks: list[Any] = []
        for r in records:
            try:
                acks.append(await js.publish_async(
                    key_subject(subject, r.key) if key_in_subject else subject, r.body,
                    headers=record_headers(r), stream=stream))
            except nats_errors() as exc:  # refused before it was sent (too large, closed)
                acks.append(_failed(exc))
        return list(await asyncio.gather(*acks, return_exceptions=True))

    try:
        results = await asyncio.wait_for(send_all(), timeout_s)
    except TimeoutError:
        results = [Unavailable(f"no PubAck within {timeout_s:g}s"
                               + ("" if conn.connected else " (disconnected from the server)"))]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        count = f"{len(failed)} of {len(records)} publish(es)" if len(results) > 1 else \
            f"the publish(es) of {len(records)} record(s)"
        raise DeliveryError(f"{conn.what} at {shown(conn.url)}: {count} not acknowledged: "
                            f"{_describe(failed[0], stream, subject)}",
                            permanent=all(_permanent(f) for f in failed))


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _permanent(exc: BaseException) -> bool:
    import nats.errors as ne
    import nats.js.errors as jse

    if isinstance(exc, ne.MaxPayloadError):
        return True
    return isinstance(exc, jse.APIError) and exc.err_code in PERMANENT_PUBLISH_ERRORS


def _describe(exc: BaseException, stream: str, subject: str) -> str:
    import nats.errors as ne
    import nats.js.errors as jse

    if isinstance(exc, (jse.NoStreamResponseError, ne.NoRespondersError)):
        return (f"no stream stores subject {subject!r} (expected stream {stream!r}); create "
                "it, or set create_stream")
    if isinstance(exc, jse.APIError):
        return f"{exc.description} (err_code {exc.err_code})"
    return str(exc) or type(exc).__name__
