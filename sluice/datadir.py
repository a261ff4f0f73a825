"""The data directory: one SQLite database (WAL) holding the embedded queues and the task store.

Invariants:

1. Every write runs in ``BEGIN IMMEDIATE`` … ``COMMIT``: the write lock is taken up front, so two
   processes never both read and then both try to upgrade (SQLite would fail one with BUSY).
2. A lock held past ``SLUICE_SQLITE_BUSY_TIMEOUT_MS`` (default 30000) is an error
   (:class:`~sluice.errors.Unavailable`), never a half-written change. sqlite3's errors become
   sluice's in one place, :func:`map_sqlite_errors`: a database unusable *now* is
   ``Unavailable`` (retry later), one unusable until its file changes is ``Misconfigured``.
3. A committed transaction survives a crash of the process (WAL, ``synchronous=NORMAL``); with
   ``SLUICE_SQLITE_SYNC=FULL`` it also survives power loss, at a cost in throughput.
4. In a process, one :class:`Database` per file and one connection, used from one thread at a
   time: async callers go through :meth:`Database.run`, which runs on the database's own thread,
   so the event loop never blocks on disk; sync callers (the CLI) use :meth:`Database.run_sync`.
5. Commits never run a WAL checkpoint (``wal_autocheckpoint=0``); a background thread with its
   own connection runs a PASSIVE checkpoint every second, which never blocks a writer, so the
   hot path does not stall while the WAL is copied back into the database file (every 0.1 s
   cost a worker about a tenth of its CPU at 10,000 tasks/s: the same hot pages copied back
   ten times over).
6. ``sluice_schema`` records the schema's version (one row per version reached, as in the
   PostgreSQL store); opening a database creates and upgrades its tables (forward only,
   idempotent: :data:`SCHEMA`, :data:`ADDED_COLUMNS`) and records :data:`VERSION`. A database
   whose version is above it was written by a newer sluice and is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from sluice.errors import Misconfigured, Unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path(".sluice")
# Short: each checkpoint fsyncs what was written since the last one, and writers wait on that
# fsync; 0.1 s keeps those waits to a few ms (bench/gateway.py: p99 at half load 6-8 ms, against
# 12-15 ms at 0.5 s and 130 ms at 5 s).
CHECKPOINT_EVERY_S = 1.0  # a page written many times a second is copied back once
DB_FILE = "sluice.db"
CACHE_KIB = 64 * 1024  # page cache per connection (PRAGMA cache_size)
MMAP_BYTES = 256 * 1024 * 1024  # the database file read through a memory map

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT    NOT NULL,
    task_id      TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    key          TEXT,
    headers      TEXT,
    enqueued_at  REAL    NOT NULL,
    visible_at   REAL    NOT NULL,
    lease_token  TEXT,
    deliveries   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, visible_at, id);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (queue, key, id);

CREATE TABLE IF NOT EXISTS tasks (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline     TEXT    NOT NULL,
    task_id      TEXT    NOT NULL,
    tenant       TEXT    NOT NULL,
    state        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    key          TEXT,
    result       BLOB,
    result_type  TEXT,
    error_type   TEXT,
    error_message TEXT,
    received_at  REAL,
    queued_at    REAL,
    started_at   REAL,
    finished_at  REAL,
    updated_at   REAL    NOT NULL,
    lease_owner  TEXT,
    lease_until  REAL,
    delivered    TEXT,
    error_traceback TEXT,
    payload      BLOB,
    payload_type TEXT,
    payload_size INTEGER,
    UNIQUE (pipeline, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_by_id ON tasks (task_id);

CREATE TABLE IF NOT EXISTS pipelines (
    name         TEXT PRIMARY KEY,
    paused       INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (pipeline, state, seq);

CREATE TABLE IF NOT EXISTS dead_letters (
    pipeline     TEXT    NOT NULL,
    task_id      TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    content_type TEXT    NOT NULL,
    key          TEXT,
    headers      TEXT,
    failed_at    REAL    NOT NULL,
    replayed_as  TEXT,
    replayed_at  REAL,
    PRIMARY KEY (pipeline, task_id)
);
""" + """
-- The routes of hosting pipelines' functions (sluice.tenancy.routes), their changes, and the
-- notes those changes leave on tasks' timelines.
CREATE TABLE IF NOT EXISTS routes (
    pipeline     TEXT    NOT NULL,
    tenant       TEXT    NOT NULL,
    function     TEXT    NOT NULL,
    tier         TEXT    NOT NULL,
    queue        TEXT,
    pinned       INTEGER NOT NULL DEFAULT 0,
    reason       TEXT,
    version      INTEGER NOT NULL,
    changed_at   REAL    NOT NULL,
    PRIMARY KEY (pipeline, tenant, function)
);
CREATE TABLE IF NOT EXISTS route_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline     TEXT    NOT NULL,
    tenant       TEXT    NOT NULL,
    function     TEXT    NOT NULL,
    action       TEXT    NOT NULL,
    tier         TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    moved        INTEGER NOT NULL,
    at           REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS route_events_by_pipeline ON route_events (pipeline, id);
CREATE TABLE IF NOT EXISTS task_notes (
    pipeline     TEXT    NOT NULL,
    task_id      TEXT    NOT NULL,
    at           REAL    NOT NULL,
    note         TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS task_notes_by_task ON task_notes (pipeline, task_id);
""" + """
-- Pipelines defined at runtime (sluice.definitions): one row per name, a tombstone once
-- deleted; version: one sequence over the table.
CREATE TABLE IF NOT EXISTS definitions (
    name         TEXT PRIMARY KEY,
    tenant       TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    format       TEXT    NOT NULL,
    put_by       TEXT    NOT NULL,
    restricted   INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    updated_at   REAL    NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS definitions_by_version ON definitions (version);
""" + """
-- The attempts of tasks that took more than one (sluice.tasks.store rule 1): none for a task
-- that succeeded at its first.
CREATE TABLE IF NOT EXISTS task_attempts (
    pipeline      TEXT    NOT NULL,
    task_id       TEXT    NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at    REAL,
    ended_at      REAL,
    outcome       TEXT    NOT NULL,
    error_type    TEXT,
    error_message TEXT,
    PRIMARY KEY (pipeline, task_id, attempt)
);
"""

VERSION = 4  # of the tables above with ADDED_COLUMNS; the PostgreSQL store counts the same way
SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS sluice_schema (version INTEGER PRIMARY KEY,"
                " description TEXT NOT NULL, applied_at REAL NOT NULL)")

# Columns added since a table was first made: (table, column, declaration). Added to an
# older database when it is opened; forward only, idempotent.
ADDED_COLUMNS = (("tasks", "error_traceback", "TEXT"),
                 # version 4: a task's kept payload (sluice.tasks.store rule 2)
                 ("tasks", "payload", "BLOB"), ("tasks", "payload_type", "TEXT"),
                 ("tasks", "payload_size", "INTEGER"))


def _add_columns(conn: sqlite3.Connection) -> None:
    for table, column, declaration in ADDED_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


# SQLite primary result codes that retrying cannot cure: the file or its settings must change.
# Every other code of an OperationalError (BUSY, LOCKED, IOERR, FULL, ...) is an outage.
PERMANENT_SQLITE_CODES = {
    3: "SQLITE_PERM",
    8: "SQLITE_READONLY",
    11: "SQLITE_CORRUPT",
    14: "SQLITE_CANTOPEN",
    23: "SQLITE_AUTH",
    26: "SQLITE_NOTADB",
}


@contextmanager
def map_sqlite_errors(path: Path) -> Iterator[None]:
    """sqlite3's errors as sluice's (the one place they are mapped): ``Misconfigured`` for a
    code in :data:`PERMANENT_SQLITE_CODES`, else ``Unavailable`` (locked past the busy timeout,
    an I/O error, a full disk). Errors of the SQL itself (constraints, misuse) pass through:
    they are defects, not states of the database."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if type(exc) not in (sqlite3.OperationalError, sqlite3.DatabaseError):
            raise  # IntegrityError, ProgrammingError, ...: a defect
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in PERMANENT_SQLITE_CODES:
            raise Misconfigured(f"the data directory's database {path} cannot be used: {exc} "
                                f"({PERMANENT_SQLITE_CODES[code & 0xFF]}; check the file and "
                                "its directory)") from exc
        raise Unavailable(f"the data directory's database {path} is unavailable: "
                          f"{exc}") from exc


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    task_id: str
    body: bytes
    content_type: str = "application/json"
    key: str | None = None
    headers: dict[str, str] | None = None


def put_in(conn: sqlite3.Connection, queue: str, messages: Sequence[QueuedMessage],
           now: float, delay_s: float = 0.0) -> None:
    conn.executemany(
        "INSERT INTO messages (queue, task_id, body, content_type, key, headers, enqueued_at,"
        " visible_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(queue, m.task_id, m.body, m.content_type, m.key,
          json.dumps(m.headers) if m.headers else None, now, now + delay_s) for m in messages],
    )


class Database:
    """One SQLite file, one connection, one thread (see the module invariants)."""

    _instances: ClassVar[dict[Path, Database]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-db")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Misconfigured(f"cannot make the data directory {path.parent}: "
                                f"{exc.strerror or exc}") from exc
        busy_ms = int(os.environ.get("SLUICE_SQLITE_BUSY_TIMEOUT_MS", "30000"))
        with map_sqlite_errors(path):
            self._conn = sqlite3.connect(
                path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            try:
                self._prepare(busy_ms)
            except BaseException:
                self._conn.close()
                raise
        self._closed = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_forever, args=(busy_ms,),
                                              name="sluice-db-checkpoint", daemon=True)
        self._checkpointer.start()

    def _prepare(self, busy_ms: int) -> None:
        sync = os.environ.get("SLUICE_SQLITE_SYNC", "NORMAL").upper()
        if sync not in ("NORMAL", "FULL"):
            sync = "NORMAL"
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={sync}")
        self._conn.execute(f"PRAGMA busy_timeout={busy_ms}")
        # The task table's indexes stay in memory as it grows (SQLite's default cache is 2 MB:
        # a claim or completion per task then reads index pages from the OS every time).
        self._conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        # Checkpoints run on their own thread (invariant 5), not inside a commit.
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        with self._lock:
            self._conn.executescript(SCHEMA)  # idempotent; executescript commits by itself
            _add_columns(self._conn)
            self._transaction(self.migrate_in)

    def migrate_in(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """Record the schema's version (invariant 6): (version before, after)."""
        conn.execute(SCHEMA_TABLE)
        (found,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM sluice_schema").fetchone()
        before = int(found)
        if before > VERSION:
            raise Misconfigured(f"the data directory's database {self.path} has schema version "
                                f"{before}, newer than this sluice's {VERSION}: upgrade sluice")
        if before < VERSION:
            conn.execute("INSERT INTO sluice_schema (version, description, applied_at)"
                         " VALUES (?, ?, ?)",
                         (VERSION, "queues, tasks, pipelines, dead letters, routes,"
                          " definitions, task attempts and kept payloads", time.time()))
        return before, VERSION

    def _checkpoint_forever(self, busy_ms: int) -> None:
        conn = sqlite3.connect(self.path, timeout=busy_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            while not self._closed.wait(CHECKPOINT_EVERY_S):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint of %s failed (will retry): %s", self.path, exc)
        finally:
            conn.close()

    @classmethod
    def open(cls, data_dir: str | Path | None = None) -> Database:
        """The process's Database for ``data_dir`` (default ``./.sluice``)."""
        return cls.at((Path(data_dir) if data_dir else DEFAULT_DATA_DIR) / DB_FILE)

    @classmethod
    def at(cls, file: str | Path) -> Database:
        """The process's Database for the database file ``file``."""
        path = Path(file).resolve()
        with cls._instances_lock:
            db = cls._instances.get(path)
            if db is None:
                db = cls._instances[path] = Database(path)
            return db

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one write transaction, on the calling thread.

        A database that cannot be written raises :class:`~sluice.errors.Unavailable` (locked
        past the busy timeout, disk full) or :class:`~sluice.errors.Misconfigured` (read-only);
        the transaction was rolled back.
        """
        with self._lock, map_sqlite_errors(self.path):
            result = self._transaction(fn)
        return result

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` outside a write transaction (a consistent WAL read snapshot per statement)."""
        with self._lock, map_sqlite_errors(self.path):
            result = fn(self._conn)
        return result

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.read_sync, fn)

    def close(self) -> None:
        with self._instances_lock:
            self._instances.pop(self.path, None)
        self._closed.set()
        self._checkpointer.join()
        self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()
