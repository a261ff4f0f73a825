"""The pipeline definitions (:mod:`sluice.definitions`) of the PostgreSQL store: the same
rules as SQLite's, over a database every worker and gateway of a deployment shares.

A put or a delete takes :data:`DEFINITIONS_LOCK` (a transaction-scoped advisory lock) before
it reads ``MAX(version) + 1``: versions are then given and committed one at a time, in order,
so a process asking for the changes after *v* never misses a row committed later with a lower
version (which a sequence, whose numbers commit out of order, would allow).
"""

from __future__ import annotations

from typing import Any

from sluice.definitions import Definition
from sluice.stores.postgres_db import PgDatabase
from sluice.stores.postgres_schema import now_sql

DEFINITIONS_LOCK = 0x51_1C_E0_02  # pg_advisory_xact_lock key while a version is given
COLUMNS = "name, tenant, body, format, put_by, restricted, version, updated_at, deleted"
LOCK = "SELECT pg_advisory_xact_lock($1)"
NEXT = "(SELECT COALESCE(MAX(version), 0) + 1 FROM definitions)"
PUT = (f"INSERT INTO definitions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, {NEXT},"
       f" {now_sql('$7')}, FALSE) ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant,"
       " body = excluded.body, format = excluded.format, put_by = excluded.put_by,"
       " restricted = excluded.restricted, version = excluded.version,"
       f" updated_at = excluded.updated_at, deleted = FALSE RETURNING {COLUMNS}")
DELETE = (f"UPDATE definitions SET deleted = TRUE, version = {NEXT},"
          f" updated_at = {now_sql('$2')} WHERE name = $1 AND NOT deleted RETURNING {COLUMNS}")


def _definition(row: Any) -> Definition:
    return Definition(row[0], row[1], row[2], row[3], row[4], bool(row[5]), int(row[6]),
                      float(row[7]), bool(row[8]))


class PgDefinitions:
    """:class:`~sluice.definitions.DefinitionStore` on a :class:`PgDatabase`."""

    def __init__(self, db: PgDatabase, now: Any) -> None:
        self.db = db
        self._now = now  # () -> the caller's time, or None: the database's clock

    async def put(self, name: str, tenant: str, body: str, fmt: str, *, put_by: str,
                  restricted: bool) -> Definition:
        async with self.db.transaction() as conn:
            await conn.execute(LOCK, DEFINITIONS_LOCK)
            row = await conn.fetchrow(PUT, name, tenant, body, fmt, put_by, restricted,
                                      self._now())
        return _definition(row)

    async def delete(self, name: str) -> Definition | None:
        async with self.db.transaction() as conn:
            await conn.execute(LOCK, DEFINITIONS_LOCK)
            row = await conn.fetchrow(DELETE, name, self._now())
        return None if row is None else _definition(row)

    async def get(self, name: str) -> Definition | None:
        async with self.db.connection() as conn:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM definitions WHERE name = $1"
                                      " AND NOT deleted", name)
        return None if row is None else _definition(row)

    async def live(self) -> list[Definition]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM definitions WHERE NOT deleted"
                                    " ORDER BY name")
        return [_definition(r) for r in rows]

    async def changes(self, since_version: int) -> list[Definition]:
        async with self.db.connection() as conn:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM definitions WHERE version > $1"
                                    " ORDER BY version", since_version)
        return [_definition(r) for r in rows]
