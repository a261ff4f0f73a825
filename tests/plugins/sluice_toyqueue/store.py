"""The toy queue's own storage: one SQLite file, ``toyqueue.db`` in the pipeline's data directory.

Rules (those of a visibility-timeout queue):

1. A message is visible when its ``visible_at`` has passed. Leasing it moves ``visible_at``
   ahead by the lease and gives it a fresh lease token; only the holder of that token can
   extend, delete or requeue it (a stale token changes nothing).
2. A lease is taken in one ``BEGIN IMMEDIATE`` transaction (select and update in a single
   ``UPDATE … RETURNING``), so two processes sharing the file never lease one message twice.
3. A message whose lease lapsed without an extension (its worker died) is visible again, and
   the next lease counts one more delivery of it: at-least-once.
4. Messages are handed out oldest visible first (by ``visible_at``, then by insertion).
5. Every message not deleted counts as pending: visible, delayed or leased.

SQLite errors are mapped in one place (:func:`mapped_errors`): a busy or locked file is
transient (``Unavailable``), anything else is the file's configuration (``Misconfigured``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sluice.errors import Misconfigured, Unavailable

FILE_NAME = "toyqueue.db"
BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS toy_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    task_id TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    key TEXT,
    headers TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease TEXT
);
CREATE INDEX IF NOT EXISTS toy_messages_visible ON toy_messages (queue, visible_at, id);
"""


@dataclass(frozen=True)
class Message:
    """A message to put on a toy queue."""

    task_id: str
    body: bytes
    content_type: str = "application/json"
    key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Leased:
    """A leased message: ``ref`` (row id, lease token) settles it."""

    ref: tuple[int, str]
    message: Message
    enqueued_at: float
    deliveries: int


def queue_file(data_dir: str | Path | None) -> Path:
    """The toy queue's file in a data directory (sluice's default ``./.sluice`` for none)."""
    return (Path(data_dir) if data_dir else Path(".sluice")).resolve() / FILE_NAME


@contextlib.contextmanager
def mapped_errors(path: Path) -> Iterator[None]:
    """SQLite's errors as sluice's: busy or locked is transient, the rest is permanent."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise Unavailable(f"toy queue {path}: busy: {exc}", retry_after_s=1.0) from exc
        raise Misconfigured(f"toy queue {path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise Misconfigured(f"toy queue {path}: {exc}") from exc


class ToyQueue:
    """One named queue in a toy queue file. Thread-safe: one connection, one call at a time."""

    def __init__(self, path: Path, queue: str) -> None:
        self.path = path
        self.queue = queue
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._owner = uuid.uuid4().hex[:12]
        self._tokens = itertools.count()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, mapped_errors(self.path):
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def put(self, messages: Sequence[Message], now: float, delay_s: float = 0.0) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO toy_messages (queue, task_id, body, content_type, key, headers,"
                " enqueued_at, visible_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(self.queue, m.task_id, m.body, m.content_type, m.key,
                  json.dumps(dict(m.headers)), now, now + delay_s) for m in messages])

    def lease(self, max_n: int, lease_s: float, now: float) -> list[Leased]:
        """Up to ``max_n`` visible messages, leased for ``lease_s`` (rules 1-4)."""
        token = f"{self._owner}:{next(self._tokens)}"
        with self._transaction() as conn:
            rows = conn.execute(
                "UPDATE toy_messages SET visible_at = ?, lease = ?, deliveries = deliveries + 1"
                " WHERE id IN (SELECT id FROM toy_messages WHERE queue = ? AND visible_at <= ?"
                " ORDER BY visible_at, id LIMIT ?)"
                " RETURNING id, task_id, body, content_type, key, headers, enqueued_at,"
                " deliveries",
                (now + lease_s, token, self.queue, now, max_n)).fetchall()
        rows.sort(key=lambda r: int(r[0]))
        return [Leased((int(r[0]), token), Message(r[1], bytes(r[2]), r[3], r[4],
                                                   json.loads(r[5])), float(r[6]), int(r[7]))
                for r in rows]

    def next_visible(self) -> float | None:
        """When the next message becomes visible (``None``: the queue is empty)."""
        with self._lock, mapped_errors(self.path):
            row = self._connect().execute(
                "SELECT MIN(visible_at) FROM toy_messages WHERE queue = ?",
                (self.queue,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def delete(self, refs: Sequence[tuple[int, str]]) -> None:
        with self._transaction() as conn:
            conn.executemany("DELETE FROM toy_messages WHERE id = ? AND lease = ?", refs)

    def requeue(self, items: Sequence[tuple[tuple[int, str], float]], now: float) -> None:
        """Each leased message visible again after its delay (seconds), its lease ended."""
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE toy_messages SET visible_at = ?, lease = NULL WHERE id = ? AND lease = ?",
                [(now + delay_s, ref[0], ref[1]) for ref, delay_s in items])

    def extend(self, refs: Sequence[tuple[int, str]], lease_s: float, now: float) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE toy_messages SET visible_at = ? WHERE id = ? AND lease = ?",
                [(now + lease_s, ref[0], ref[1]) for ref in refs])

    def count(self) -> int:
        """Messages not deleted: visible, delayed or leased (rule 5)."""
        with self._lock, mapped_errors(self.path):
            row = self._connect().execute(
                "SELECT COUNT(*) FROM toy_messages WHERE queue = ?", (self.queue,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
