"""The route table (:mod:`sluice.tenancy.routes`) of the SQLite store: its SQL, in the
caller's transaction (``*_in``), and the async :class:`SqliteRoutes` over a database."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from sluice.datadir import Database
from sluice.tenancy.config import FUNCTION_HEADER, TENANT_HEADER
from sluice.tenancy.routes import DEDICATED, Change, Route, RouteEvent, note_text

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


class SqliteRoutes:
    """:class:`~sluice.tenancy.routes.RouteStore` on a :class:`~sluice.datadir.Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def routes(self, pipeline: str) -> list[Route]:
        return await self.db.read(lambda c: routes_in(c, pipeline))

    async def change(self, change: Change) -> tuple[Route, int] | None:
        return await self.db.run(lambda c: change_in(c, change, time.time()))

    async def backlog(self, queue: str) -> dict[tuple[str, str], int]:
        return await self.db.read(lambda c: backlog_in(c, queue))

    async def queued(self, pipeline: str) -> dict[str, int]:
        return await self.db.read(lambda c: queued_in(c, pipeline))

    async def events(self, pipeline: str, limit: int = 100) -> list[RouteEvent]:
        return await self.db.read(lambda c: events_in(c, pipeline, limit))

    async def note(self, pipeline: str, task_ids: Sequence[str], note: str) -> None:
        if task_ids:
            await self.db.run(lambda c: note_in(c, pipeline, task_ids, note, time.time()))

    async def notes(self, pipeline: str, task_id: str) -> list[tuple[float, str]]:
        return await self.db.read(lambda c: notes_in(c, pipeline, task_id))
