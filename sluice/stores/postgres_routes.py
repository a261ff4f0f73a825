"""The route table (:mod:`sluice.tenancy.routes`) of the PostgreSQL store: the same invariants
as SQLite's, over a database every worker and gateway of a deployment shares. A change is one
transaction: the compare-and-set of the route, the move of the function's waiting messages
(announced on the queue channel at the commit), and its event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_schema import QUEUE_CHANNEL, notify_sql, now_sql
from sluice.tenancy.config import FUNCTION_HEADER, TENANT_HEADER
from sluice.tenancy.routes import (
    DEDICATED,
    Change,
    Route,
    RouteEvent,
    note_text,
)

ROUTE_COLUMNS = "pipeline, tenant, function, tier, queue, pinned, reason, version, changed_at"
TENANT_OF = f"(headers::jsonb ->> '{TENANT_HEADER}')"
FUNCTION_OF = f"(headers::jsonb ->> '{FUNCTION_HEADER}')"
INSERT = (f"INSERT INTO routes ({ROUTE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, "
          f"{now_sql('$8')}) ON CONFLICT DO NOTHING RETURNING {ROUTE_COLUMNS}")
UPDATE = ("UPDATE routes SET tier = $4, queue = $5, pinned = $6, reason = $7,"
          f" version = version + 1, changed_at = {now_sql('$8')} WHERE pipeline = $1 AND"
          f" tenant = $2 AND function = $3 AND version = $9 RETURNING {ROUTE_COLUMNS}")
MOVE = (f"WITH moved AS (UPDATE messages SET queue = $2 WHERE queue = $1 AND {TENANT_OF} = $3"
        f" AND {FUNCTION_OF} = $4 RETURNING 1) SELECT count(*),"
        f" {notify_sql(repr(QUEUE_CHANNEL), '$2')} FROM moved")
EVENT = ("INSERT INTO route_events (pipeline, tenant, function, action, tier, reason, moved, at)"
         f" VALUES ($1, $2, $3, $4, $5, $6, $7, {now_sql('$8')})")


NOTE_MOVED = ("INSERT INTO task_notes (pipeline, task_id, at, note) SELECT $1, task_id,"
              f" {now_sql('$6')}, $2 FROM messages WHERE queue = $3 AND {TENANT_OF} = $4"
              f" AND {FUNCTION_OF} = $5")


def _route(row: Any) -> Route:
    return Route(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], int(row[7]),
                 float(row[8]))


class PgRoutes:
    """:class:`~sluice.tenancy.routes.RouteStore` on a :class:`PgDatabase`."""

    def __init__(self, db: PgDatabase, now: Any) -> None:
        self.db = db
        self._now = now  # () -> the caller's time, or None: the database's clock

    async def routes(self, pipeline: str) -> list[Route]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"SELECT {ROUTE_COLUMNS} FROM routes WHERE pipeline = $1",
                                    pipeline)
        return [_route(r) for r in rows]

    async def change(self, change: Change) -> tuple[Route, int] | None:
        c, now = change, self._now()
        args = (c.pipeline, c.tenant, c.function, c.tier, c.queue, c.pinned, c.reason, now)
        async with self.db.transaction() as conn:
            if c.expect_version == 0:
                row = await conn.fetchrow(INSERT, *args)
            else:
                row = await conn.fetchrow(UPDATE, *args, c.expect_version)
            if row is None:
                return None
            moved = 0
            if c.move_from is not None and c.move_to is not None:
                await conn.execute(NOTE_MOVED, c.pipeline, note_text(c), c.move_from, c.tenant,
                                   c.function, now)
                record = await conn.fetchrow(MOVE, c.move_from, c.move_to, c.tenant,
                                             c.function)
                moved = int(record[0]) if record is not None else 0
            await conn.execute(EVENT, c.pipeline, c.tenant, c.function, c.action, c.tier,
                               c.reason, moved, now)
        return _route(row), moved

    async def backlog(self, queue: str) -> dict[tuple[str, str], int]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"SELECT {TENANT_OF}, {FUNCTION_OF}, count(*) FROM messages"
                                    " WHERE queue = $1 GROUP BY 1, 2", queue)
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows
                if r[0] is not None and r[1] is not None}

    async def queued(self, pipeline: str) -> dict[str, int]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT tenant, count(*) FROM tasks WHERE pipeline = $1 AND"
                                    " state IN ('QUEUED', 'RETRYING') GROUP BY tenant", pipeline)
        return {str(r[0]): int(r[1]) for r in rows}

    async def events(self, pipeline: str, limit: int = 100) -> list[RouteEvent]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT pipeline, tenant, function, action, tier, reason,"
                                    " moved, at FROM route_events WHERE pipeline = $1"
                                    " ORDER BY id DESC LIMIT $2", pipeline, limit)
        return [RouteEvent(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), float(r[7]))
                for r in rows]


    async def note(self, pipeline: str, task_ids: Sequence[str], note: str) -> None:
        if not task_ids:
            return
        async with self.db.transaction() as conn:
            await conn.execute("INSERT INTO task_notes (pipeline, task_id, at, note) SELECT $1,"
                               f" t, {now_sql('$4')}, $3 FROM unnest($2::text[]) AS t",
                               pipeline, list(task_ids), note, self._now())

    async def notes(self, pipeline: str, task_id: str) -> list[tuple[float, str]]:
        async with self.db.connection() as conn:
            rows = await conn.fetch("SELECT at, note FROM task_notes WHERE pipeline = $1 AND"
                                    " task_id = $2 ORDER BY at", pipeline, task_id)
        return [(float(r[0]), str(r[1])) for r in rows]


ROUTE_SQL = ("SELECT queue FROM routes WHERE pipeline = $1 AND tenant = $2 AND function = $3"
             f" AND tier = '{DEDICATED}'")


async def queue_in(conn: Any, pipeline: str, tenant: str, function: str) -> str | None:
    """The dedicated queue of a function, read in ``conn``'s transaction (invariant 3)."""
    value = await conn.fetchval(ROUTE_SQL, pipeline, tenant, function)
    return None if value is None else str(value)
