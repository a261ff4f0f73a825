"""Where each function's tasks go: the route table, in the store, one truth for the whole
deployment (every worker and gateway of a store reads the same rows).

A function with no row, or a row of tier ``shared``, goes to its pipeline's shared queue (the
source's own queue or topic); a row of tier ``dedicated`` names the function's own queue.

Invariants:

1. A route changes only by compare-and-set on its ``version`` (a function's first row: by an
   insert that fails if one exists), so of two workers that decide to move one function at
   once exactly one moves it; the other reads the winner's row.
2. On the embedded queue a move is one transaction with the route change: the function's
   messages change queue with it, keeping their rows (task ids, delivery counts, delays) and
   their tasks (attempts, timelines), so a crash (kill -9) leaves them all on one side. A
   message in flight keeps its lease: its worker settles it by row id and lease token, which
   do not change; if the lease lapses it is visible on its new queue.
3. An embedded submit reads the route in its own transaction (:func:`queue_in`), so a submit
   and a move are ordered: a task is on the side its route named when it was committed.
4. Every change writes a :class:`RouteEvent`: what happened, why, how many tasks moved; and
   each task it moves gets a note on its timeline (:func:`note_text`), in the same
   transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sluice.tenancy.config import FUNCTION_HEADER, TENANT_HEADER

DEDICATED, SHARED = "dedicated", "shared"
TIERS = (DEDICATED, SHARED, "auto")  # what a pin may ask for ("auto": back to the rules)
ISOLATED, RECLAIMED, PINNED = "isolated", "reclaimed", "pinned"

ROUTES_SCHEMA = """
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
"""


@dataclass(frozen=True, slots=True)
class Route:
    pipeline: str
    tenant: str
    function: str
    tier: str  # DEDICATED or SHARED
    queue: str | None  # the dedicated queue (None: the shared one)
    pinned: bool  # set by hand: the rules leave it alone
    reason: str | None
    version: int
    changed_at: float

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "queue": self.queue, "pinned": self.pinned,
                "reason": self.reason, "since": self.changed_at}


@dataclass(frozen=True, slots=True)
class RouteEvent:
    pipeline: str
    tenant: str
    function: str
    action: str  # ISOLATED, RECLAIMED or PINNED
    tier: str
    reason: str
    moved: int  # tasks moved between queues with the change
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "tenant": self.tenant, "function": self.function,
                "action": self.action, "tier": self.tier, "reason": self.reason,
                "moved": self.moved, "at": self.at}


@dataclass(frozen=True, slots=True)
class Change:
    """A route change to make by compare-and-set (invariant 1)."""

    pipeline: str
    tenant: str
    function: str
    tier: str
    queue: str | None  # the dedicated queue
    action: str
    reason: str
    expect_version: int  # 0: no row yet
    pinned: bool = False
    # Embedded queues: move the function's waiting messages from this queue to the other
    # (invariant 2); None where the queues are a broker's.
    move_from: str | None = None
    move_to: str | None = None


class RouteStore(Protocol):
    """The route table of one store (see the module invariants)."""

    async def routes(self, pipeline: str) -> list[Route]: ...

    async def change(self, change: Change) -> tuple[Route, int] | None:
        """Make ``change`` if its route is still at ``expect_version``: (the new route, tasks
        moved); None if another change came first (invariant 1)."""
        ...

    async def backlog(self, queue: str) -> dict[tuple[str, str], int]:
        """Messages on an embedded ``queue`` (waiting or in flight), by (tenant, function)."""
        ...

    async def queued(self, pipeline: str) -> dict[str, int]:
        """Tasks of ``pipeline`` waiting to run (QUEUED or RETRYING), by tenant."""
        ...

    async def events(self, pipeline: str, limit: int = 100) -> list[RouteEvent]:
        """The latest route changes, newest first."""
        ...

    async def note(self, pipeline: str, task_ids: Sequence[str], note: str) -> None:
        """Add a note to these tasks' timelines (a forwarded task: invariant 4)."""
        ...

    async def notes(self, pipeline: str, task_id: str) -> list[tuple[float, str]]:
        """A task's notes, oldest first: (when, what)."""
        ...


def note_text(change: Change) -> str:
    """The note a moved task gets (invariant 4)."""
    where = f"to its function's own queue {change.queue}" if change.tier == DEDICATED else \
        "back to the shared queue"
    return f"{change.action}: moved {where} ({change.reason})"


def dedicated_queue(pipeline: str, tenant: str, function: str) -> str:
    """The name of a function's dedicated queue (or topic): pipeline names are unique in a
    deployment, tenant and function names are ``[A-Za-z0-9][A-Za-z0-9_.-]*``."""
    return f"{pipeline}.fn.{tenant}.{function}"


# -- SQLite (the store's database; in the caller's transaction) ------------------------------

ROUTE_COLUMNS = "pipeline, tenant, function, tier, queue, pinned, reason, version, changed_at"
FUNCTION_OF = f"json_extract(headers, '$.\"{FUNCTION_HEADER}\"')"
TENANT_OF = f"json_extract(headers, '$.\"{TENANT_HEADER}\"')"


def _route(row: Any) -> Route:
    return Route(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], int(row[7]),
                 float(row[8]))


def routes_in(conn: sqlite3.Connection, pipeline: str) -> list[Route]:
    rows = conn.execute(f"SELECT {ROUTE_COLUMNS} FROM routes WHERE pipeline = ?",
                        (pipeline,)).fetchall()
    return [_route(r) for r in rows]


def queue_in(conn: sqlite3.Connection, pipeline: str, tenant: str, function: str) -> str | None:
    """The dedicated queue of a function, if it has one (invariant 3)."""
    row = conn.execute("SELECT queue FROM routes WHERE pipeline = ? AND tenant = ? AND"
                       " function = ? AND tier = ?",
                       (pipeline, tenant, function, DEDICATED)).fetchone()
    return None if row is None else str(row[0])


def change_in(conn: sqlite3.Connection, change: Change, now: float) -> tuple[Route, int] | None:
    c = change
    if c.expect_version == 0:
        cur = conn.execute(
            f"INSERT INTO routes ({ROUTE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)"
            " ON CONFLICT DO NOTHING",
            (c.pipeline, c.tenant, c.function, c.tier, c.queue, int(c.pinned), c.reason, now))
    else:
        cur = conn.execute(
            "UPDATE routes SET tier = ?, queue = ?, pinned = ?, reason = ?, version = version + 1,"
            " changed_at = ? WHERE pipeline = ? AND tenant = ? AND function = ? AND version = ?",
            (c.tier, c.queue, int(c.pinned), c.reason, now, c.pipeline, c.tenant, c.function,
             c.expect_version))
    if cur.rowcount != 1:
        return None
    moved = 0
    if c.move_from is not None and c.move_to is not None:
        conn.execute(f"INSERT INTO task_notes (pipeline, task_id, at, note) SELECT ?, task_id, ?,"
                     f" ? FROM messages WHERE queue = ? AND {TENANT_OF} = ? AND {FUNCTION_OF} = ?",
                     (c.pipeline, now, note_text(c), c.move_from, c.tenant, c.function))
        moved = conn.execute(
            f"UPDATE messages SET queue = ? WHERE queue = ? AND {TENANT_OF} = ? AND"
            f" {FUNCTION_OF} = ?", (c.move_to, c.move_from, c.tenant, c.function)).rowcount
    conn.execute("INSERT INTO route_events (pipeline, tenant, function, action, tier, reason,"
                 " moved, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (c.pipeline, c.tenant, c.function, c.action, c.tier, c.reason, moved, now))
    row = conn.execute(f"SELECT {ROUTE_COLUMNS} FROM routes WHERE pipeline = ? AND tenant = ?"
                       " AND function = ?", (c.pipeline, c.tenant, c.function)).fetchone()
    return _route(row), moved


def backlog_in(conn: sqlite3.Connection, queue: str) -> dict[tuple[str, str], int]:
    rows = conn.execute(f"SELECT {TENANT_OF}, {FUNCTION_OF}, COUNT(*) FROM messages"
                        " WHERE queue = ? GROUP BY 1, 2", (queue,)).fetchall()
    return {(str(t), str(f)): int(n) for t, f, n in rows if t is not None and f is not None}


def queued_in(conn: sqlite3.Connection, pipeline: str) -> dict[str, int]:
    rows = conn.execute("SELECT tenant, COUNT(*) FROM tasks WHERE pipeline = ? AND state IN"
                        " ('QUEUED', 'RETRYING') GROUP BY tenant", (pipeline,)).fetchall()
    return {str(t): int(n) for t, n in rows}


def events_in(conn: sqlite3.Connection, pipeline: str, limit: int) -> list[RouteEvent]:
    rows = conn.execute("SELECT pipeline, tenant, function, action, tier, reason, moved, at"
                        " FROM route_events WHERE pipeline = ? ORDER BY id DESC LIMIT ?",
                        (pipeline, limit)).fetchall()
    return [RouteEvent(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), float(r[7]))
            for r in rows]


def note_in(conn: sqlite3.Connection, pipeline: str, task_ids: Sequence[str], note: str,
            now: float) -> None:
    conn.executemany("INSERT INTO task_notes (pipeline, task_id, at, note) VALUES (?, ?, ?, ?)",
                     [(pipeline, t, now, note) for t in task_ids])


def notes_in(conn: sqlite3.Connection, pipeline: str, task_id: str) -> list[tuple[float, str]]:
    rows = conn.execute("SELECT at, note FROM task_notes WHERE pipeline = ? AND task_id = ?"
                        " ORDER BY at", (pipeline, task_id)).fetchall()
    return [(float(a), str(n)) for a, n in rows]
