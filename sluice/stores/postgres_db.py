"""One PostgreSQL database for a process: its URL, connection pool, errors, schema and
notifications (asyncpg).

Invariants:

1. One pool per event loop (a CLI command that runs several event loops gets one each): made
   at first use, with the schema created or migrated first (:mod:`sluice.stores.
   postgres_schema`, invariant 1 there). Every connection's ``search_path`` is the URL's
   ``?schema=`` (default ``public``).
2. asyncpg's errors become sluice's in one place, :func:`map_pg_errors`: a server that cannot be
   reached, restarting or out of connections is :class:`~sluice.errors.Unavailable` (retry
   later: the pool replaces broken connections by itself), a refused login, a missing database
   or a missing privilege :class:`~sluice.errors.Misconfigured`. Errors of the SQL itself pass
   through: they are defects.
3. Notifications (LISTEN) arrive on one connection of their own per channel and event loop,
   outside the pool; when it breaks (the server restarted) it is made again, retried every
   second. A listener gets :data:`CONNECTED` whenever listening starts (also at once when it
   registers on a channel already listened to) and :data:`DISCONNECTED` when it stops: in
   between it may miss notifications, so every consumer of them also polls.
4. The store sets no session state on pooled connections (no ``SET``, no session advisory
   lock, no ``LISTEN``: those live on connections of their own), so a connection goes back to
   the pool without asyncpg's reset query: one round trip less per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sluice.errors import Misconfigured, MissingDependency, Unavailable
from sluice.stores import postgres_schema as schema

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger(__name__)

POOL_MIN, POOL_MAX = 1, 10
CONNECT_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 60.0
RELISTEN_EVERY_S = 1.0
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

Listener = Callable[[str], None]  # a notification's payload
CONNECTED = ""  # the payload a listener gets when listening starts (again): look again
DISCONNECTED = "\x00"  # ... when it stops (notifications may be missed until CONNECTED)


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise MissingDependency("asyncpg", "postgres") from None
    return asyncpg


@functools.cache
def _pooled() -> Any:
    """The pool's connection class: no reset query on release (invariant 4)."""
    asyncpg = _asyncpg()

    class PooledConnection(asyncpg.Connection):  # type: ignore[misc,name-defined]
        def get_reset_query(self) -> str:
            return ""

    return PooledConnection


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def split_url(url: str) -> tuple[str, str]:
    """(the URL asyncpg connects to, the schema): ``?schema=`` is sluice's, not libpq's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    wanted = [v for k, v in query if k == "schema"]
    name = wanted[-1] if wanted else "public"
    if not SCHEMA_NAME.match(name):
        raise Misconfigured(f"store URL {redact(url)}: schema {name!r} is not a plain "
                            "PostgreSQL identifier (letters, digits, _; at most 63)")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), name


def _permanent(exc: BaseException) -> bool:
    asyncpg = _asyncpg()
    return isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError
                      | asyncpg.InvalidCatalogNameError
                      | asyncpg.InsufficientPrivilegeError
                      | asyncpg.InvalidPasswordError)


def _outage(exc: BaseException) -> bool:
    asyncpg = _asyncpg()
    return isinstance(exc, OSError | asyncio.TimeoutError | TimeoutError
                      | asyncpg.PostgresConnectionError
                      | asyncpg.InterfaceError
                      | asyncpg.InternalClientError
                      | asyncpg.CannotConnectNowError
                      | asyncpg.TooManyConnectionsError
                      | asyncpg.AdminShutdownError
                      | asyncpg.CrashShutdownError
                      | asyncpg.OperatorInterventionError
                      | asyncpg.ConnectionDoesNotExistError
                      | asyncpg.SerializationError
                      | asyncpg.DeadlockDetectedError)


@contextlib.contextmanager
def map_pg_errors(url: str) -> Iterator[None]:
    """asyncpg's errors as sluice's (invariant 2)."""
    try:
        yield
    except (Unavailable, Misconfigured):
        raise
    except Exception as exc:
        if _permanent(exc):
            raise Misconfigured(f"the PostgreSQL store {redact(url)} cannot be used: {exc} "
                                "(check the URL's user, password, database and grants)"
                                ) from exc
        if _outage(exc):
            raise Unavailable(f"the PostgreSQL store {redact(url)} is unavailable: "
                              f"{type(exc).__name__}: {exc}") from exc
        raise


@dataclass
class _PerLoop:
    pool: Any = None
    ready: asyncio.Lock = field(default_factory=asyncio.Lock)
    listeners: dict[str, list[Listener]] = field(default_factory=dict)
    listening: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    listen_conns: set[Any] = field(default_factory=set)
    connected: set[str] = field(default_factory=set)  # channels listened to now

    def terminate(self) -> None:
        """Close every connection now, without the event loop (it may be closed)."""
        for conn in list(self.listen_conns):
            with contextlib.suppress(Exception):
                conn.terminate()
        self.listen_conns.clear()
        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.terminate()
            self.pool = None


class PgDatabase:
    """One PostgreSQL database (see the invariants); connections through :meth:`transaction`
    and :meth:`connection`, notifications through :meth:`listen`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.display_url = redact(url)
        self.dsn, self.schema = split_url(url)
        self._loops: dict[asyncio.AbstractEventLoop, _PerLoop] = {}

    def _here(self) -> _PerLoop:
        loop = asyncio.get_running_loop()
        here = self._loops.get(loop)
        if here is None:
            for old in [lp for lp in self._loops if lp.is_closed()]:
                self._loops.pop(old).terminate()  # a finished event loop's (a CLI command's)
            here = self._loops[loop] = _PerLoop()
        return here

    async def _connect_kwargs(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "timeout": CONNECT_TIMEOUT_S,
                "command_timeout": COMMAND_TIMEOUT_S,
                "server_settings": {"search_path": self.schema,
                                    "application_name": "sluice"}}

    async def pool(self) -> Any:
        """This event loop's pool, made (and the schema brought up to date) at first use."""
        here = self._here()
        if here.pool is not None:
            return here.pool
        async with here.ready:
            if here.pool is None:
                asyncpg = _asyncpg()
                with map_pg_errors(self.url):
                    await self._prepare_schema()
                    here.pool = await asyncpg.create_pool(
                        min_size=POOL_MIN, max_size=POOL_MAX, connection_class=_pooled(),
                        **await self._connect_kwargs())
        return here.pool

    async def _prepare_schema(self) -> tuple[int, int]:
        asyncpg = _asyncpg()
        kwargs = await self._connect_kwargs()
        conn = await asyncpg.connect(**kwargs)
        try:
            return await migrate(conn, self.schema, self.display_url)
        finally:
            await conn.close()

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema up to date now: (version before, after)."""
        with map_pg_errors(self.url):
            return await self._prepare_schema()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, outside a transaction (each statement commits by itself)."""
        pool = await self.pool()
        with map_pg_errors(self.url):
            async with pool.acquire() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside one transaction, committed when the block ends without
        an error (rolled back otherwise)."""
        pool = await self.pool()
        with map_pg_errors(self.url):
            async with pool.acquire() as conn, conn.transaction():
                yield conn

    async def listen(self, channel: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each notification's payload on ``channel`` of this store's
        schema (invariant 3; postgres_schema invariant 4); returns the function that stops
        it."""
        here = self._here()
        channel = schema.channel(channel, self.schema)
        here.listeners.setdefault(channel, []).append(listener)
        if channel in here.connected:
            asyncio.get_running_loop().call_soon(listener, CONNECTED)
        task = here.listening.get(channel)
        if task is None or task.done():
            here.listening[channel] = asyncio.create_task(
                self._listen_forever(here, channel), name=f"sluice-listen-{channel}")

        def stop() -> None:
            with contextlib.suppress(ValueError):
                here.listeners.get(channel, []).remove(listener)

        return stop

    async def _listen_forever(self, here: _PerLoop, channel: str) -> None:
        asyncpg = _asyncpg()

        def deliver(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            for listener in list(here.listeners.get(channel, [])):
                try:
                    listener(payload)
                except Exception:  # a listener's bug must not stop the others
                    log.exception("listener of %s failed", channel)

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(**await self._connect_kwargs())
                here.listen_conns.add(conn)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(channel, deliver)
                here.connected.add(channel)
                deliver(conn, 0, channel, CONNECTED)  # (re)connected: listeners look again
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("listening on %s failed (again in %gs): %s", channel,
                          RELISTEN_EVERY_S, exc)
            finally:
                if channel in here.connected:
                    here.connected.discard(channel)
                    deliver(conn, 0, channel, DISCONNECTED)
                if conn is not None:
                    here.listen_conns.discard(conn)
                    if not conn.is_closed():
                        with contextlib.suppress(Exception):
                            await conn.close()
            await asyncio.sleep(RELISTEN_EVERY_S)

    def terminate(self) -> None:
        """Close every event loop's connections now (a test's teardown, outside any loop)."""
        for here in self._loops.values():
            here.terminate()
        self._loops.clear()

    async def close(self) -> None:
        """Close this event loop's pool and listeners (others close with their loops)."""
        loop = asyncio.get_running_loop()
        here = self._loops.pop(loop, None)
        if here is None:
            return
        for task in here.listening.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if here.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(here.pool.close(), 5)


def _set(event: asyncio.Event, *_: Any) -> None:
    event.set()


async def migrate(conn: Any, schema_name: str, where: str) -> tuple[int, int]:
    """Apply the migrations ``conn``'s schema lacks, each in its own transaction, all under
    the advisory lock (postgres_schema invariant 1): (version before, after)."""
    await conn.execute("SELECT pg_advisory_lock($1)", schema.MIGRATION_LOCK)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema_name}"')
        await conn.execute(schema.SCHEMA_TABLE)
        before = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM sluice_schema"))
        if before > schema.VERSION:
            raise Misconfigured(f"the PostgreSQL store {where} has schema version {before}, "
                                f"newer than this sluice's {schema.VERSION}: upgrade sluice")
        for version, description, sql in schema.MIGRATIONS:
            if version <= before:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO sluice_schema (version, description)"
                                   " VALUES ($1, $2)", version, description)
            log.info("store %s: applied migration %d (%s)", where, version, description)
        return before, max(before, schema.VERSION)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", schema.MIGRATION_LOCK)
