"""The route table (:mod:`sluice.tenancy.routes`) of the SQLite store."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sluice.datadir import Database
from sluice.tenancy.routes import (
    Change,
    Route,
    RouteEvent,
    backlog_in,
    change_in,
    events_in,
    note_in,
    notes_in,
    queued_in,
    routes_in,
)


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
