"""The pipeline definitions (:mod:`sluice.definitions`) of the SQLite store: their SQL, in the
caller's transaction (``*_in``), and the async :class:`SqliteDefinitions` over a database.

One row per name: a put replaces it, a delete turns it into a tombstone; each takes the next
version of the whole table (``MAX(version) + 1``) inside the write transaction, which the
database's write lock orders (datadir invariant 1), so versions are committed in order and a
reader asking for the changes after *v* never misses one committed later with a lower one.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sluice.datadir import Database
from sluice.definitions import Definition

COLUMNS = "name, tenant, body, format, put_by, restricted, version, updated_at, deleted"


def _definition(row: Any) -> Definition:
    return Definition(row[0], row[1], row[2], row[3], row[4], bool(row[5]), int(row[6]),
                      float(row[7]), bool(row[8]))


def _next_version(conn: sqlite3.Connection) -> int:
    (found,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM definitions").fetchone()
    return int(found) + 1


def put_in(conn: sqlite3.Connection, name: str, tenant: str, body: str, fmt: str, put_by: str,
           restricted: bool, now: float) -> Definition:
    version = _next_version(conn)
    conn.execute(
        f"INSERT INTO definitions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)"
        " ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant, body = excluded.body,"
        " format = excluded.format, put_by = excluded.put_by,"
        " restricted = excluded.restricted, version = excluded.version,"
        " updated_at = excluded.updated_at, deleted = 0",
        (name, tenant, body, fmt, put_by, int(restricted), version, now))
    return Definition(name, tenant, body, fmt, put_by, restricted, version, now)


def delete_in(conn: sqlite3.Connection, name: str, now: float) -> Definition | None:
    if get_in(conn, name) is None:
        return None
    conn.execute("UPDATE definitions SET deleted = 1, version = ?, updated_at = ?"
                 " WHERE name = ?", (_next_version(conn), now, name))
    row = conn.execute(f"SELECT {COLUMNS} FROM definitions WHERE name = ?", (name,)).fetchone()
    return _definition(row)


def get_in(conn: sqlite3.Connection, name: str) -> Definition | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM definitions WHERE name = ? AND deleted = 0",
                       (name,)).fetchone()
    return None if row is None else _definition(row)


def live_in(conn: sqlite3.Connection) -> list[Definition]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM definitions WHERE deleted = 0"
                        " ORDER BY name").fetchall()
    return [_definition(r) for r in rows]


def changes_in(conn: sqlite3.Connection, since_version: int) -> list[Definition]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM definitions WHERE version > ?"
                        " ORDER BY version", (since_version,)).fetchall()
    return [_definition(r) for r in rows]


class SqliteDefinitions:
    """:class:`~sluice.definitions.DefinitionStore` on a :class:`~sluice.datadir.Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, name: str, tenant: str, body: str, fmt: str, *, put_by: str,
                  restricted: bool) -> Definition:
        return await self.db.run(lambda c: put_in(c, name, tenant, body, fmt, put_by,
                                                  restricted, time.time()))

    async def delete(self, name: str) -> Definition | None:
        return await self.db.run(lambda c: delete_in(c, name, time.time()))

    async def get(self, name: str) -> Definition | None:
        return await self.db.read(lambda c: get_in(c, name))

    async def live(self) -> list[Definition]:
        return await self.db.read(live_in)

    async def changes(self, since_version: int) -> list[Definition]:
        return await self.db.read(lambda c: changes_in(c, since_version))
