"""What the Redis Streams source, sink and submitter share: the lazy import of redis-py, the
connection, the entry layout, the Lua scripts, the one place redis-py's errors become sluice's
(:func:`map_redis_errors`) and the outage log (:class:`Outage`).

redis-py is an optional dependency (``pip install 'sluice[redis]'``): nothing here imports it at
module import, so the schema and ``sluice connectors`` cover Redis on every install. (This
module and ``sluice.connectors.redis`` never shadow the library: ``import redis`` is absolute.)

The entry layout (what a producer that does not use sluice writes with ``XADD``):

=================== =============================================================================
field               meaning
=================== =============================================================================
``body``            the message (bytes as they are; JSON unless ``content-type`` says otherwise)
``content-type``    optional; default: the source's ``content_type``
``key``             optional; the ordering key (``consumer.ordering: key``)
``sluice-task-id``  optional (the source's ``task_id_field``); default: the entry id
any other field     a header of that name (text)
=================== =============================================================================
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sluice.connectors.base import SinkRecord
from sluice.errors import Misconfigured, MissingDependency, SourceError, Unavailable

log = logging.getLogger("sluice.redis")

URL, STREAM = "url", "stream"  # keys of both the source and the sink
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_PATTERN = r"^(redis|rediss|unix)://"
STREAM_PATTERN = r"^[^\s]{1,256}$"
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 30.0  # a reply slower than this (a blocking read's block included) fails
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 5.0

BODY, CONTENT_TYPE, KEY = b"body", b"content-type", b"key"
TASK_ID = "sluice-task-id"
FIXED = (BODY, CONTENT_TYPE, KEY)


def library() -> ModuleType:
    """The ``redis.asyncio`` module, or :class:`MissingDependency` naming the ``redis`` extra."""
    try:
        import redis.asyncio
    except ImportError:
        raise MissingDependency("redis", "redis") from None
    return redis.asyncio


def exceptions() -> ModuleType:
    library()
    import redis.exceptions

    return redis.exceptions


def safe_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query,
                       parts.fragment))


def connect(url: str) -> Any:
    """A ``redis.asyncio.Redis`` client of ``url`` (bytes replies; connected at first use)."""
    return library().Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
        retry_on_timeout=False, health_check_interval=0)


def consumer_name() -> str:
    """A consumer name unique to this source in this process: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- errors (the one place) -----------------------------------------------------------------

PERMANENT_REPLIES = ("WRONGTYPE", "NOPERM", "NOAUTH", "WRONGPASS", "ERR unknown command")


def redis_error(what: str, exc: BaseException) -> SourceError:
    """A redis-py exception as sluice's error, prefixed by ``what`` (which stream, which
    server): refused credentials or permissions and a key of the wrong type are
    ``Misconfigured``; an unreachable, loading or timing-out server is ``Unavailable``."""
    rx = exceptions()
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError)):
        return Misconfigured(f"{what}: {text} (check the user and password in url)")
    if isinstance(exc, rx.ResponseError) and str(exc).startswith(PERMANENT_REPLIES):
        return Misconfigured(f"{what}: {text}")
    return Unavailable(f"{what}: {text}")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the server is out of reach for now (retrying may cure it)."""
    rx = exceptions()
    if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError)):
        return False
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError, OSError)):
        return True
    text = str(exc)
    return isinstance(exc, rx.ResponseError) and text.startswith(
        ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM"))


@contextmanager
def map_redis_errors(what: str) -> Iterator[None]:
    """Run a block of redis-py calls; a RedisError (or a socket error) out of it becomes
    :func:`redis_error` (the one place the library's errors are mapped)."""
    rx = exceptions()
    try:
        yield
    except (rx.RedisError, OSError) as exc:
        raise redis_error(what, exc) from None


class Outage:
    """One component's view of the server's outages: one warning when one starts, one info
    line when it ends, never a line per retry; and the backoff to wait between tries (capped,
    exponential)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self._backoff_s = FIRST_BACKOFF_S

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Note a failed try; the seconds to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self._backoff_s = FIRST_BACKOFF_S
            log.warning("%s: redis unavailable, retrying until it is back: %s", self.what,
                        f"{type(exc).__name__}: {exc}")
        wait_s = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        return wait_s

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s: redis available again after %.1fs", self.what,
                     time.monotonic() - self.since)
            self.since = None


# -- the entry layout -----------------------------------------------------------------------

def entry_fields(record: SinkRecord, task_id_field: str = TASK_ID) -> dict[bytes, bytes]:
    """A record as stream entry fields (the layout above): its headers, then the fixed fields
    (a header named like one of them is overridden)."""
    fields = {k.encode(): v.encode() for k, v in record.headers.items()}
    fields[CONTENT_TYPE] = record.content_type.encode()
    fields[task_id_field.encode()] = record.task_id.encode()
    if record.key is not None:
        fields[KEY] = record.key.encode()
    else:
        fields.pop(KEY, None)
    fields[BODY] = record.body
    return fields


def text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def headers_of(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    """An entry's headers: every field but ``body`` and ``key``."""
    return {text(k): text(v) for k, v in fields.items() if k not in (BODY, KEY)}


def id_time_s(entry_id: str) -> float | None:
    """When an entry was added, from its id (``<ms>-<seq>``)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return None


# -- Lua scripts (each atomic on the server) -------------------------------------------------

# Hand out what is due to this consumer, before new entries: (1) retries whose delay ended
# (members of the delayed set, scored by due time in ms; each still in the group's pending
# list, so XCLAIM hands it over, counting a delivery); (2) with ARGV[6] = 1, entries whose lease
# lapsed (idle > lease_ms: their consumer died or stopped extending), scanning the pending list
# from the cursor ARGV[7], skipping retries still delayed. Returns {{id, fields, deliveries}...},
# the next due time of the delayed set (or false), and the next cursor.
TAKE_DUE = """
local stream, delayed = KEYS[1], KEYS[2]
local group, me = ARGV[1], ARGV[2]
local now, n, lease = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local cursor = ARGV[7]
local out = {}
local function take(id, min_idle)
  local got = redis.call('XCLAIM', stream, group, me, min_idle, id)
  if #got > 0 and got[1][2] then
    local p = redis.call('XPENDING', stream, group, id, id, 1)
    out[#out + 1] = {got[1][1], got[1][2], p[1] and p[1][4] or 1}
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, n)) do
  redis.call('ZREM', delayed, id)
  take(id, 0)
end
if ARGV[6] == '1' and #out < n then
  local scan = 100
  local pend = redis.call('XPENDING', stream, group, 'IDLE', lease, cursor, '+', scan)
  for _, p in ipairs(pend) do
    if #out >= n then break end
    cursor = '(' .. p[1]
    if not redis.call('ZSCORE', delayed, p[1]) then take(p[1], lease) end
  end
  if #pend < scan and #out < n then cursor = '-' end
end
local nxt = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
return {out, nxt[2] or false, cursor}
"""

# Delay entries: each (ARGV[3..]: id, due ms pairs) joins the delayed set and passes, still
# pending, to the placeholder consumer ARGV[2] (so its consumer's list empties; XCLAIM JUSTID
# counts no delivery). TAKE_DUE hands it out when due; a lapsed lease never takes it early.
DELAY = """
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
end
return 0
"""

# Extend leases: each entry (ARGV[3..]) still pending under this consumer (ARGV[2]) is claimed
# again by it, JUSTID: its idle time restarts and no delivery is counted. One another consumer
# took over (the lease had lapsed) is left to it. Returns how many were extended.
EXTEND = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# Trim what every group of the stream has acknowledged: XTRIM MINID ~ the oldest id some group
# still needs (its oldest pending entry, else its last delivered one: the entries after it are
# not read yet). Approximate (~) trims whole nodes only, so never past that id.
TRIM = """
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local keep = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    need = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if keep == nil or older(need, keep) then keep = need end
end
if keep == nil or keep == '0-0' then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
"""
