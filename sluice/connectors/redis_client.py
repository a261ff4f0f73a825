"""What the Redis Streams source, sink and submitter share: the lazy import of redis-py, the
connection, the entry layout, the Lua scripts, the one place redis-py's errors become sluice's
(:func:`map_redis_errors`); outages are logged by :class:`~sluice.connectors.outage.OutageLog`.

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
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from sluice.connectors.base import Delivery, Output, SinkRecord
from sluice.errors import Misconfigured, MissingDependency, SourceError, Unavailable

log = logging.getLogger("sluice.redis")

URL, STREAM = "url", "stream"  # keys of both the source and the sink
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_PATTERN = r"^(redis|rediss|unix)://"
STREAM_PATTERN = r"^[^\s]{1,256}$"
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 30.0  # a reply slower than this (a blocking read's block included) fails

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


def server_of(url: str) -> tuple[str, str, str, str]:
    """What names one database of one server as one user: scheme, host:port (or the socket
    path), db, user (the port and db defaulted as redis-py does; the password ignored)."""
    parts = urlsplit(url)
    db = parse_qs(parts.query).get("db", [""])[0]
    if parts.scheme == "unix":
        where = parts.path
    else:
        where = f"{(parts.hostname or 'localhost').lower()}:{parts.port or 6379}"
        db = parts.path.strip("/") or db
    return parts.scheme, where, str(int(db)) if db.isdigit() else db or "0", parts.username or ""


def same_server(a: str, b: str) -> bool:
    """Whether two urls name the same database of the same server, as the same user (one
    script may then write to both)."""
    return server_of(a) == server_of(b)


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


def describe(exc: BaseException) -> str:
    """An error as an outage's reason."""
    return f"{type(exc).__name__}: {exc}"


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
    return {k.decode(errors="replace"): v.decode(errors="replace")
            for k, v in fields.items() if k != BODY and k != KEY}


def id_time_s(entry_id: str) -> float | None:
    """When an entry was added, from its id (``<ms>-<seq>``)."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return None


# -- Lua scripts (each atomic on the server) -------------------------------------------------

# Read new entries for this consumer without blocking (XREADGROUP COUNT ARGV[3] ... >: the
# same read, with the same effect on the group), the reply packed in one string: for each entry,
# its id's length and its number of field and value strings (2 bytes each), its id, then each
# string (4-byte length, then it); big-endian. One bulk string costs the client one read where
# the command's own reply is a nested array of seven or more (see :func:`read_entries`).
READ_NEW = """
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[1], '>')
if not got then return '' end
local parts = {}
for _, entry in ipairs(got[1][2]) do
  local id, fields = entry[1], entry[2]
  parts[#parts + 1] = struct.pack('>I2I2', #id, #fields) .. id
  for j = 1, #fields do
    parts[#parts + 1] = struct.pack('>I4', #fields[j]) .. fields[j]
  end
end
return table.concat(parts)
"""


def read_entries(packed: bytes) -> list[tuple[str, dict[bytes, bytes]]]:
    """:data:`READ_NEW`'s reply: each entry's id and fields."""
    out: list[tuple[str, dict[bytes, bytes]]] = []
    at, end = 0, len(packed)
    unpack_head, unpack_len = _HEAD.unpack_from, _LEN.unpack_from
    while at < end:
        id_len, strings = unpack_head(packed, at)
        at += 4 + id_len
        entry_id = packed[at - id_len:at].decode()
        fields: dict[bytes, bytes] = {}
        for _ in range(strings // 2):
            (size,) = unpack_len(packed, at)
            at += 4 + size
            name = packed[at - size:at]
            (size,) = unpack_len(packed, at)
            at += 4 + size
            fields[name] = packed[at - size:at]
        out.append((entry_id, fields))
    return out


_HEAD, _LEN = struct.Struct(">HH"), struct.Struct(">I")


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

# Acknowledge entries and write their outputs, in one script (atomic: Redis runs nothing else
# meanwhile, and replicates and logs its writes as one MULTI/EXEC; a connection lost before it
# ran leaves neither). KEYS[1] is the source stream, KEYS[2..] the output streams; ARGV[1] the
# group, ARGV[2] the batch (:func:`ack_batch`): for each entry, its id and its outputs, each
# with its stream's index in KEYS and its fields. An entry's outputs are added only if its
# XACK acknowledged it (it was pending in the group): a script run again (its reply lost), or
# an entry already acknowledged by another consumer that read it again, writes nothing a
# second time. Checked before anything is written (a script's writes are not undone by a
# later error): each output key is a stream or absent, the group exists (the first XACK); the
# shebang makes a server out of memory refuse the script before it starts. Returns how many
# entries were acknowledged here.
ACK_WRITING = """#!lua
for i = 2, #KEYS do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE the result stream ' .. KEYS[i] .. ' holds a ' .. t)
  end
end
local stream, group, batch = KEYS[1], ARGV[1], ARGV[2]
local pos, size, acked, first, formats = 1, #batch, 0, true, {}
while pos <= size do
  local id, k, took
  id, k, pos = struct.unpack('>I2c0I2', batch, pos)
  if first then
    took = redis.pcall('XACK', stream, group, id)
    if type(took) == 'table' and took['err'] then return took end
    first = false
  else
    took = redis.call('XACK', stream, group, id)
  end
  if took == 1 then acked = acked + 1 end
  for _ = 1, k do
    local at, m
    at, m, pos = struct.unpack('>I2I2', batch, pos)
    local format = formats[m]
    if not format then
      format = '>' .. string.rep('I4c0', m)
      formats[m] = format
    end
    local fields = {struct.unpack(format, batch, pos)}
    pos = fields[m + 1]
    if took == 1 then redis.call('XADD', KEYS[at], '*', unpack(fields, 1, m)) end
  end
end
return acked
"""


def _field(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(4, "big") + data


_CONTENT_TYPE, _TASK_ID, _BODY = _field(CONTENT_TYPE), _field(TASK_ID), _field(BODY)
_RESULT_FIELDS = (6).to_bytes(2, "big")  # content-type, sluice-task-id, body: names and values


def ack_batch(stream: str, items: Sequence[tuple[Delivery, Sequence[Output]]],
              ) -> tuple[list[str], bytes, list[str]]:
    """:data:`ACK_WRITING`'s keys and batch for these entries and their outputs, and the entry
    ids. The batch is, for each entry: its id (2-byte length, then it), its number of outputs
    (2 bytes), and for each output: its stream's index in the keys (2 bytes), its number of
    field and value strings (2 bytes), each (4-byte length, then it); big-endian. The fields
    are :func:`entry_fields`'s (one script argument per batch: thousands of arguments cost the
    client more than the server)."""
    keys = [stream]
    index: dict[str, int] = {}
    parts: list[bytes] = []
    append = parts.append
    ids: list[str] = []
    for delivery, outputs in items:
        entry_id: str = delivery.ref
        ids.append(entry_id)
        raw = entry_id.encode()
        append(len(raw).to_bytes(2, "big") + raw + len(outputs).to_bytes(2, "big"))
        for output in outputs:
            at = index.get(output.topic)
            if at is None:
                keys.append(output.topic)
                at = index[output.topic] = len(keys)  # KEYS is 1-based in Lua
            record = output.record
            if record.headers or record.key is not None:
                fields = entry_fields(record)
                append(at.to_bytes(2, "big") + (2 * len(fields)).to_bytes(2, "big"))
                parts.extend(_field(x) for pair in fields.items() for x in pair)
                continue
            # A result record (no headers, no key): the hot path, in two parts.
            ctype, task_id, body = record.content_type.encode(), record.task_id.encode(), \
                record.body
            append(b"".join((at.to_bytes(2, "big"), _RESULT_FIELDS, _CONTENT_TYPE,
                             len(ctype).to_bytes(4, "big"), ctype, _TASK_ID,
                             len(task_id).to_bytes(4, "big"), task_id, _BODY,
                             len(body).to_bytes(4, "big"))))
            append(body)
    return keys, b"".join(parts), ids
